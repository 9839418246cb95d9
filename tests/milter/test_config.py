"""smtpd_milters and milter_*: Postfix 3.7's defaults, the brace form, errors with file and line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.milterconf import MilterConfig, milter_config
from smtpgate.errors import ConfigError
from smtpgate.generation import build_generation


def config(text: str, path: str = "/etc/smtpgate/main.cf") -> MilterConfig:
    settings, _ = parse_settings(text, path, (), hostname="mx.example.com")
    return milter_config(settings)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config("# first\n" + text, path="main.cf")
    return str(caught.value)


def test_postfix_3_7_defaults() -> None:
    found = config("")
    assert not found and found.milters == ()
    assert dict(found.macros) == {
        "connect": ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
        "helo": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
        "mail": (
            "i",
            "{auth_type}",
            "{auth_authen}",
            "{auth_author}",
            "{mail_addr}",
            "{mail_host}",
            "{mail_mailer}",
        ),
        "rcpt": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
        "data": ("i",),
        "end_of_header": ("i",),
        "end_of_data": ("i",),
        "unknown_command": (),
    }
    assert found.daemon_name == "mx.example.com"
    assert found.v == "Postfix 3.7.11"
    assert dict(found.macro_defaults) == {}


@pytest.mark.postfix
def test_the_defaults_are_those_of_the_installed_postfix() -> None:
    # postconf -d is Postfix's own word (Debian's postfix is installed for the tests).
    out = subprocess.run(
        ["/usr/sbin/postconf", "-d"], capture_output=True, text=True, check=True
    ).stdout
    postfix = dict(
        line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
        for line in out.splitlines()
        if line.startswith(("milter_", "smtpd_milters"))
    )
    from smtpgate.config.params import PARAMETERS

    for name, value in postfix.items():
        if name in ("milter_header_checks",):
            continue
        assert PARAMETERS[name].default == value, name


def test_one_milter_with_the_global_settings() -> None:
    (spec,) = config(
        "smtpd_milters = inet:127.0.0.1:11332\nmilter_default_action = accept\n"
        "milter_command_timeout = 1m\nmilter_connect_timeout = 5\nmilter_content_timeout = 2m\n"
    ).milters
    assert (spec.name, spec.transport, spec.host, spec.port) == (
        "inet:127.0.0.1:11332",
        "inet",
        "127.0.0.1",
        11332,
    )
    assert (spec.connect_timeout, spec.command_timeout, spec.content_timeout) == (5, 60, 120)
    assert (spec.default_action, spec.version, spec.no_header_reply) == ("accept", 6, False)


def test_several_milters_and_the_brace_form(tmp_path: Path) -> None:
    found = config(
        "smtpd_milters = inet:localhost:11332, unix:/run/opendkim/opendkim.sock\n"
        "  { inet:[::1]:8891, connect_timeout=10s, {default_action = reject},\n"
        "    command_timeout=2s content_timeout=20s, {protocol = 4 no_header_reply} }\n"
        "  local:relative.sock\n",
        path=str(tmp_path / "main.cf"),
    )
    names = [m.name for m in found.milters]
    assert names == [
        "inet:localhost:11332",
        "unix:/run/opendkim/opendkim.sock",
        "inet:[::1]:8891",
        "local:relative.sock",
    ]
    dkim, ipv6, local = found.milters[1:]
    assert (dkim.transport, dkim.path) == ("unix", "/run/opendkim/opendkim.sock")
    assert (ipv6.host, ipv6.port, ipv6.default_action) == ("::1", 8891, "reject")
    assert (ipv6.connect_timeout, ipv6.command_timeout, ipv6.content_timeout) == (10, 2, 20)
    assert (ipv6.version, ipv6.no_header_reply) == (4, True)
    assert local.path == str(tmp_path / "relative.sock")
    assert found.milters[0].command_timeout == 30  # the others keep main.cf's


def test_macro_defaults_daemon_name_and_v() -> None:
    found = config(
        "milter_macro_defaults = auth_type=none, {client_ptr}=unknown, { x = a b }\n"
        "milter_macro_daemon_name = gate\nmilter_macro_v = smtpgate\n"
        "milter_rcpt_macros = i, {rcpt_addr}\n"
    )
    assert dict(found.macro_defaults) == {
        "{auth_type}": "none",
        "{client_ptr}": "unknown",
        "{x}": "a b",
    }
    assert (found.daemon_name, found.v) == ("gate", "smtpgate")
    assert found.macros["rcpt"] == ("i", "{rcpt_addr}")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "smtpd_milters = 127.0.0.1:11332",
            "invalid transport name: 127.0.0.1 in Milter service: 127.0.0.1:11332",
        ),
        ("smtpd_milters = inet:11332", 'expected "inet:host:port" instead of "inet:11332"'),
        ("smtpd_milters = inet:host:0", 'bad port "0" in "inet:host:0" (use a number 1-65535)'),
        ("smtpd_milters = unix:", 'Milter service needs transport:endpoint instead of "unix:"'),
        ("smtpd_milters = { inet:h:1, connect_timout=5 }", 'unknown option: "connect_timout = 5"'),
        (
            "smtpd_milters = { inet:h:1, command_timeout=5x }",
            "command_timeout: bad time value or unit: 5x",
        ),
        (
            "smtpd_milters = { inet:h:1, default_action=defer }",
            "unrecognized default action: defer",
        ),
        ("smtpd_milters = { inet:h:1, protocol=5 }", "bad protocol information: 5"),
        (
            "smtpd_milters = { inet:h:1, timeout }",
            "malformed option: missing '=' after attribute name",
        ),
        ("smtpd_milters = { }", 'empty milter definition: "{ }"'),
        ("smtpd_milters = { inet:h:1", "missing '}' in \"{ inet:h:1\""),
        ("milter_default_action = bounce", "unrecognized default action: bounce"),
        ("milter_protocol = 6 7", "bad protocol information: 7"),
        ("milter_protocol = no_header_reply", "no protocol version information"),
        ("milter_command_timeout = soon", "bad time configuration"),
        ("milter_connect_timeout = 0", "invalid milter_connect_timeout parameter value 0 < 1s"),
        ("milter_macro_defaults = {x", "missing '}'"),
    ],
)
def test_bad_values_name_file_and_line(line: str, message: str) -> None:
    text = error(line)
    name = line.split(" =")[0]
    assert text.startswith("main.cf, line 2: "), text
    assert name in text and message in text, text


def test_check_reports_a_bad_milter_with_its_line() -> None:
    settings, diagnostics = parse_settings(
        "relayhost = [127.0.0.1]:25\n\nsmtpd_milters = inet:h:1, bogus\n",
        "main.cf",
        (),
        hostname="mx.example.com",
    )
    generation, found = build_generation(settings, diagnostics)
    assert generation is None
    assert [str(d) for d in found if d.severity == "error"] == [
        "error: main.cf, line 3: smtpd_milters: "
        'Milter service needs transport:endpoint instead of "bogus"'
    ]


def test_the_generation_holds_the_milters() -> None:
    settings, diagnostics = parse_settings(
        "relayhost = [127.0.0.1]:25\nsmtpd_milters = inet:127.0.0.1:11332\n",
        "main.cf",
        (),
        hostname="mx.example.com",
    )
    generation, _ = build_generation(settings, diagnostics)
    assert generation is not None and generation.milters
    assert generation.milters.names == ("inet:127.0.0.1:11332",)
    settings, diagnostics = parse_settings(
        "relayhost = [127.0.0.1]:25\n", "main.cf", (), hostname="mx.example.com"
    )
    generation, _ = build_generation(settings, diagnostics)
    assert generation is not None and not generation.milters


def test_milter_header_checks_is_refused_with_its_line() -> None:
    _, diagnostics = parse_settings(
        "milter_header_checks = pcre:/etc/postfix/milter_header_checks\n",
        "main.cf",
        (),
        hostname="mx.example.com",
    )
    assert [str(d) for d in diagnostics] == [
        "main.cf, line 1: error: not supported yet: milter_header_checks = "
        "pcre:/etc/postfix/milter_header_checks (smtpgate has no milter header checks and "
        "would run as if this line were not there)"
    ]
