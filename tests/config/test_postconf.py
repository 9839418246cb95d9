"""Differential tests: smtpgate's expansion and defaults against Postfix's own ``postconf``.

Each case writes a main.cf into a temporary folder and compares ``postconf -c DIR -x -h``
with :class:`Settings`. postconf prints values with runs of white space folded, so both
sides are compared word by word. ``mynetworks`` (Postfix computes it from the interfaces)
and ``listen`` (smtpgate only) are left out; ``myhostname`` is set in every case.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from smtpgate.config import PARAMETERS, POSTFIX_DEFAULTS, parse_settings

POSTCONF = shutil.which("postconf") or (
    "/usr/sbin/postconf" if Path("/usr/sbin/postconf").exists() else None
)
pytestmark = pytest.mark.skipif(POSTCONF is None, reason="postconf (Postfix) is not installed")

# smtpgate's own parameters (listen, pid_file, dns_servers, ...) have no Postfix twin.
OWN = {name for name in PARAMETERS if name not in POSTFIX_DEFAULTS}
SKIP = OWN | {
    "mynetworks",
    "listen",
    "local_recipient_maps",
    "smtpd_forbid_bare_newline",
    "smtpd_forbid_bare_newline_exclusions",  # $mynetworks differs
    "smtpd_forbid_unauth_pipelining",
    "smtpd_client_event_limit_exceptions",  # $mynetworks differs
}
# Where smtpgate's default text deliberately differs from `postconf -d` (see postfix_difference).
COMPUTED = OWN | {
    "myhostname",
    "mydomain",
    "mynetworks",
    "config_directory",
    "compatibility_level",
    "local_recipient_maps",
    "smtpd_forbid_bare_newline",
    "smtpd_forbid_unauth_pipelining",
    "smtpd_per_request_deadline",
    "smtpd_client_event_limit_exceptions",
}


def postconf(directory: Path, *args: str) -> str:
    assert POSTCONF is not None
    result = subprocess.run(
        [POSTCONF, "-c", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def postfix_values(directory: Path, names: list[str], *options: str) -> dict[str, str]:
    out = postconf(directory, *options, *names)
    values: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line[:1].isspace() and current:
            values[current] += line
            continue
        current, _, value = line.partition(" =")
        values[current] = value
    return values


def words(value: str) -> list[str]:
    return value.split()


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "main.cf").write_text(text)
    (tmp_path / "master.cf").write_text("")
    return tmp_path


CONFIGS = {
    f"level {level}": f"myhostname = mx.example.com\ncompatibility_level = {level}\n"
    for level in ("0", "1", "2", "3.5", "3.6", "3.7", "3.10")
} | {
    "domains": (
        "myhostname = mail.example.org\n"
        "compatibility_level = 2\n"
        "mydomain = example.net\n"
        "relay_domains = $mydestination, example.com\n"
        "mydestination = $myhostname, localhost.$mydomain\n"
        "  $mydomain\n"
    ),
    "classes and restrictions": (
        "myhostname = mx.example.com\n"
        "compatibility_level = 3.6\n"
        "smtpd_restriction_classes = from_bad\n"
        "from_bad = check_sender_access hash:$config_directory/bad\n"
        "smtpd_recipient_restrictions =\n"
        "    check_recipient_access inline:{ foo@bar.org = from_bad },\n"
        "    # a comment between continuation lines\n"
        "    permit_mynetworks, reject_unauth_destination\n"
        "smtpd_client_restrictions = ${{$compatibility_level} >=level {3} ? {permit} : {reject}}\n"
    ),
    "conditionals": (
        "myhostname = mx.example.com\n"
        "compatibility_level = 3.6\n"
        "set = 1\n"
        "empty =\n"
        "smtpd_banner = ${set?{yes}:{no}} ${empty?{yes}:{no}} ${empty:fallback} $$literal\n"
        "smtpd_sender_restrictions = ${{$set} == {1} ? {reject} : {permit}}\n"
        "smtpd_helo_restrictions = ${{10} > {9} ? {numeric}} ${{abc} < {abd} ? {string}}\n"
        "smtpd_data_restrictions = $(set)x ${set}y\n"
        "relayhost = [${myhostname}]:2525\n"
        "maillog_file = ${queue_directory}/log\n"
    ),
    "crlf and tabs": (
        "myhostname = mx.example.com\r\ncompatibility_level = 3.6\r\n"
        "smtpd_recipient_restrictions =\tpermit_mynetworks,\r\n\treject\r\n"
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_expanded_values_match_postconf(tmp_path: Path, name: str) -> None:
    directory = write_config(tmp_path, CONFIGS[name])
    settings, _ = parse_settings(CONFIGS[name], str(directory / "main.cf"), hostname="unused")
    names = [n for n in settings.names() if n not in SKIP]
    expected = postfix_values(directory, names, "-x")
    mismatches = {
        n: (settings[n], expected[n])
        for n in names
        if words(settings[n]) != words(expected.get(n, "<missing>"))
    }
    assert mismatches == {}


def test_unset_compatibility_level_matches_postfix_at_3_6(tmp_path: Path) -> None:
    directory = write_config(tmp_path, "myhostname = mx.example.com\ncompatibility_level = 3.6\n")
    settings, _ = parse_settings("myhostname = mx.example.com\n", "main.cf", hostname="x")
    names = [n for n in PARAMETERS if n not in SKIP | {"config_directory"}]
    expected = postfix_values(directory, names, "-x")
    assert {n: settings[n] for n in names if words(settings[n]) != words(expected[n])} == {}


def test_supported_defaults_are_postconf_d_verbatim(tmp_path: Path) -> None:
    directory = write_config(tmp_path, "")
    names = [n for n in PARAMETERS if n not in COMPUTED and n != "listen"]
    expected = {n: v.strip() for n, v in postfix_values(directory, names, "-d").items()}
    assert {n: PARAMETERS[n].default for n in names if PARAMETERS[n].default != expected[n]} == {}


def test_shipped_parameter_list_matches_postconf_d(tmp_path: Path) -> None:
    directory = write_config(tmp_path, "")
    # The shipped list was made with Debian's master.cf, whose services add names such as
    # virtual_delivery_slot_cost; an empty master.cf gives the core names only.
    names = {line.partition(" =")[0] for line in postconf(directory, "-d").splitlines()}
    assert names - set(POSTFIX_DEFAULTS) == set()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("foo\n", "line 1: missing '=' after attribute name"),
        ("a = 1\n\nfoo bar\n", "line 3: missing '=' after attribute name"),
        ("= b\n", "line 1: missing attribute name"),
    ],
)
def test_syntax_errors_match_postconf(tmp_path: Path, text: str, fragment: str) -> None:
    directory = write_config(tmp_path, text)
    assert POSTCONF is not None
    result = subprocess.run(
        [POSTCONF, "-c", str(directory), "-n"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and fragment in result.stderr
    with pytest.raises(Exception) as info:
        parse_settings(text, str(directory / "main.cf"))
    assert fragment in str(info.value)
