"""The one load: ``load_generation`` builds everything serve uses, once, or says why not.

Real files (main.cf, tables, certificates from ``openssl``), no server: what the
supervisor builds as root before it forks, and what ``check`` and reloads build too.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest

from smtpgate.config.service import ListenAddress
from smtpgate.errors import TableUnavailableError
from smtpgate.generation import load_configuration, load_generation
from tests.serve.certs import test_pki

MAIN_CF = """\
myhostname = mx.example.org
relayhost = [127.0.0.1]:2526
mynetworks = 127.0.0.0/8
relay_domains = bar.org
smtpd_recipient_restrictions = permit_mynetworks,
    check_recipient_access hash:$config_directory/rcpt, reject_unauth_destination
"""


def write(folder: Path, text: str = MAIN_CF, rcpt: str | None = "foo@bar.org OK\n") -> str:
    if rcpt is not None:
        (folder / "rcpt").write_text(rcpt)
    (folder / "main.cf").write_text(text)
    return str(folder / "main.cf")


def test_every_part_is_built_from_one_read(tmp_path: Path) -> None:
    pki = test_pki()
    path = write(tmp_path)
    overrides = [
        "listen=127.0.0.1:2525, [::1]:2525",
        "smtpgate_workers=3",
        "smtpd_timeout=7s",
        "smtpd_peername_lookup=no",
        "smtpd_tls_security_level=encrypt",
        f"smtpd_tls_cert_file={pki.server_cert}",
        f"smtpd_tls_key_file={pki.server_key}",
        "dns_servers=127.0.0.1:5353",
        "reject_code=550",
    ]
    generation, diagnostics = load_generation(path, overrides, number=4)
    assert generation is not None, [str(d) for d in diagnostics]
    config = generation.config
    assert generation.number == 4
    assert config.listen == (ListenAddress("127.0.0.1", 2525), ListenAddress("::1", 2525))
    assert (config.workers, config.timeout, config.peername_lookup) == (3, 7.0, False)
    assert (config.tls_cert_file, config.tls_required) == (str(pki.server_cert), True)
    assert isinstance(generation.tls_context, ssl.SSLContext)
    assert generation.plan.codes.reject_code == 550
    assert str(generation.relay.relayhost) == "[127.0.0.1]:2526"
    assert generation.relay.next_hops is not None  # the MX lookup goes through the resolver
    assert generation.resolver.servers == ["Do53:127.0.0.1@5353"]  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        generation.config = config  # type: ignore[misc]


def test_no_starttls_no_context(tmp_path: Path) -> None:
    generation, _ = load_generation(write(tmp_path))
    assert generation is not None
    assert generation.tls_context is None and not generation.config.tls_offered


def test_every_error_at_once_each_once_with_file_and_line(tmp_path: Path) -> None:
    text = MAIN_CF.replace("relayhost = [127.0.0.1]:2526\n", "relayhost =\n")
    text += "smtpd_timeout = soon\nsmtpd_sender_restrictions = permit_mynetwork\n"
    text += "smtpd_forbidden_commands = hash:$config_directory/missing\n"
    generation, diagnostics = load_generation(write(tmp_path, text))
    assert generation is None
    errors = sorted(str(d) for d in diagnostics if d.severity == "error")
    cf = tmp_path / "main.cf"
    assert errors == [
        f"{cf}, line 2: error: relayhost is empty: smtpgate relays every accepted message to "
        "it; set relayhost = [backend.example]:25",
        f"{cf}, line 7: error: bad time configuration: smtpd_timeout = soon (use a number "
        "with an optional unit s, m, h, d or w)",
        f'{cf}, line 8: error: smtpd_sender_restrictions: unknown restriction "permit_mynetwork"',
        f"{cf}, line 9: error: smtpd_forbidden_commands: open {tmp_path}/missing: "
        "No such file or directory",
    ]


def test_a_table_that_cannot_be_read_serve_and_reload_alike(tmp_path: Path) -> None:
    """serve and every reload: a warning and a table whose lookups fail (451 4.3.5);
    check (strict): an error."""
    path = write(tmp_path, rcpt=None)
    generation, diagnostics = load_generation(path)
    assert generation is not None
    [warning] = [d for d in diagnostics if d.severity == "warning"]
    assert f"{tmp_path}/main.cf, line 5: open {tmp_path}/rcpt" in str(warning)
    assert "every lookup in hash:" in warning.message
    [rcpt_list] = [generation.plan.stage_list("smtpd_recipient_restrictions")[1].arg]
    with pytest.raises(TableUnavailableError):
        rcpt_list.lookup("foo@bar.org")
    strict, diagnostics = load_generation(path, strict_tables=True)
    assert strict is None
    [error] = [d for d in diagnostics if d.severity == "error"]
    assert f"{tmp_path}/main.cf, line 5: open {tmp_path}/rcpt" in str(error)


def test_explain_loads_the_same_plan_without_certificate_or_backend(tmp_path: Path) -> None:
    """explain needs neither the key (root-only on a real MX) nor a usable relayhost."""
    overrides = [
        "smtpd_tls_security_level=may",
        f"smtpd_tls_cert_file={tmp_path}/unreadable.pem",
        "relayhost=",
    ]
    path = write(tmp_path)
    loaded, diagnostics = load_configuration(path, overrides)
    assert loaded is not None, [str(d) for d in diagnostics]
    assert loaded.config.banner == "mx.example.org ESMTP Postfix"
    generation, diagnostics = load_generation(path, overrides)
    assert generation is None
    assert any("smtpd_tls_cert_file: cannot read" in str(d) for d in diagnostics)


def test_the_policy_client_is_bound_to_the_plan_when_a_service_is_named(tmp_path: Path) -> None:
    from smtpgate.delegation import DelegationClient

    plain, _ = load_generation(write(tmp_path))
    assert plain is not None and plain.policy_client is None
    text = MAIN_CF + "smtpd_relay_restrictions = check_policy_service inet:127.0.0.1:9998\n"
    generation, diagnostics = load_generation(write(tmp_path, text))
    assert generation is not None, [str(d) for d in diagnostics]
    assert isinstance(generation.policy_client, DelegationClient)
    assert generation.plan.policy_client is generation.policy_client
    loaded, _ = load_configuration(str(tmp_path / "main.cf"))  # explain's half: the same
    assert loaded is not None and isinstance(loaded.plan.policy_client, DelegationClient)
