"""The smtpgate command: check, query and explain, with their exit codes and messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from smtpgate.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"
SEED = EXAMPLES / "seed" / "main.cf"
GOOD = EXAMPLES / "main.cf"
ENVELOPE = [
    "--client",
    "203.0.113.82",
    "--helo",
    "me.testing.example.com",
    "--from",
    "318787866@qq.com",
    "--to",
    "foo@bar.org",
]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_check_seed_explains_reject_521():
    result = run("check", "-c", str(SEED), "-o", "relayhost=[127.0.0.1]:2526")
    assert result.exit_code == 0, result.output
    assert "restricted_senders, line 3: warning:" in result.stderr
    assert "restricted_senders, line 4: warning:" in result.stderr
    assert 'sends $access_map_reject_code with the text "521", not a 521 reply' in result.stderr
    assert "ok, 2 warning(s)" in result.stdout


def test_check_refuses_a_config_without_relayhost():
    result = run("check", "-c", str(SEED))
    assert result.exit_code == 2
    assert f"smtpgate: {SEED}: error: relayhost is empty: " in result.stderr
    assert "1 error(s), 2 warning(s): smtpgate would not start" in result.stderr


def test_a_misspelt_relayhost_is_named_beside_the_error(tmp_path: Path):
    config = tmp_path / "main.cf"
    config.write_text("myhostname = mx.example.org\nrelayhsot = [127.0.0.1]:2526\n")
    result = run("check", "-c", str(config))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[:2] == [
        f"smtpgate: {config}, line 2: warning: unknown parameter: relayhsot = [127.0.0.1]:2526 "
        "(did you mean relayhost?)",
        f"smtpgate: {config}: error: relayhost is empty: smtpgate relays every accepted message "
        f"to it; set relayhost = [backend.example]:25 ({config}, line 2 sets relayhsot: "
        "did you mean relayhost?)",
    ]
    serve = run("serve", "-c", str(config), "-o", "listen=127.0.0.1:0")
    assert serve.exit_code == 2
    assert "error: relayhost is empty" in serve.stderr


def test_explain_and_query_need_no_relayhost():
    # They relay nothing: the seed's files work unchanged (see also the explain test below).
    result = run("explain", "-c", str(SEED), *ENVELOPE)
    assert result.exit_code == 0, result.output
    assert "relayhost" not in result.stderr
    query = run("query", "-c", str(SEED), "hash:restricted_senders", "qq.com")
    assert (query.exit_code, query.stdout) == (0, "REJECT  521\n")


def test_unsupported_parameter_stops_check_serve_and_explain(tmp_path: Path):
    config = tmp_path / "main.cf"
    config.write_text(
        "relayhost = [127.0.0.1]:2526\nsmtpd_milter_maps = cidr:/etc/postfix/milter_map\n"
        "mine = $smtpd_milter_maps\n"
    )
    line = f"smtpgate: {config}, line 2: error: not supported yet: smtpd_milter_maps = "
    for args in (
        ["check"],
        ["serve", "-o", "listen=127.0.0.1:0"],
        ["explain", *ENVELOPE],
    ):
        result = run(args[0], "-c", str(config), *args[1:])
        assert result.exit_code == 2, args
        assert line in result.stderr, args


def test_each_unimplemented_restriction_is_one_error(tmp_path: Path):
    from smtpgate.policy.registry import RESTRICTIONS

    later = sorted(name for name, spec in RESTRICTIONS.items() if not spec.implemented)
    assert "check_policy_service" not in later and "reject_unverified_sender" in later
    words = {"none": "", "table": " hash:/nonexistent", "zone": " inet:127.0.0.1:10023"}
    config = tmp_path / "main.cf"
    classes = [f"class{n}" for n in range(len(later))]
    lines = ["relayhost = [127.0.0.1]:2526", f"smtpd_restriction_classes = {', '.join(classes)}"]
    lines += [
        f"{cls} = {name}{words[RESTRICTIONS[name].arg]}, permit"
        for cls, name in zip(classes, later, strict=True)
    ]
    config.write_text("\n".join(lines) + "\n")
    result = run("check", "-c", str(config))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == len(later), errors
    for number, (cls, name) in enumerate(zip(classes, later, strict=True), start=3):
        expected = (
            f"smtpgate: {config}, line {number}: error: {cls}: "
            f'restriction "{name}" is not supported yet ('
        )
        assert any(error.startswith(expected) for error in errors), expected


def test_explain_seed_ends_with_postfix_reply():
    result = run("explain", "-c", str(SEED), *ENVELOPE)
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").splitlines()
    assert lines[-1] == "554 5.7.1 <318787866@qq.com>: Sender address rejected: 521"
    assert any("restricted_senders qq.com -> found: REJECT  521" in line for line in lines)
    assert any(
        line.strip().startswith("log: NOQUEUE: reject: RCPT from unknown[203.0.113.82]: 554")
        for line in lines
    )


def test_explain_good_example_disconnects_with_521():
    result = run("explain", "-c", str(GOOD), *ENVELOPE, "--to", "bar@bar.org", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    last = doc["exchanges"][-1]
    assert last["command"] == "RCPT TO:<foo@bar.org>"
    assert last["reply"] == ["521 5.7.1 <318787866@qq.com>: Sender address rejected: go away"]
    assert last["disconnect"] is True
    # the second recipient is never sent: the server hung up
    assert [e["command"] for e in doc["exchanges"]][-2:] == [
        "MAIL FROM:<318787866@qq.com>",
        "RCPT TO:<foo@bar.org>",
    ]
    assert doc["greeting"]["reply"] == ["220 mx.example.org ESMTP Postfix"]


def test_explain_good_sender_is_accepted():
    args = ["--client", "203.0.113.82", "--from", "friend@example.net", "--to", "foo@bar.org"]
    result = run("explain", "-c", str(GOOD), *args)
    assert result.exit_code == 0
    assert result.stdout.rstrip().splitlines()[-1] == "250 2.1.5 Ok"


def test_explain_rejects_a_bad_client_address():
    result = run(
        "explain", "-c", str(GOOD), "--client", "not-an-ip", "--from", "a@b", "--to", "c@d"
    )
    assert result.exit_code == 2
    assert "--client 'not-an-ip' is not an IPv4 or IPv6 address" in result.stderr


def test_check_missing_file_says_so(tmp_path: Path):
    result = run("check", "-c", str(tmp_path / "nope.cf"))
    assert result.exit_code == 2
    assert "nope.cf" in result.stderr


def _config(tmp_path: Path, text: str, **tables: str) -> Path:
    for name, body in tables.items():
        (tmp_path / name).write_text(body)
    path = tmp_path / "main.cf"
    path.write_text(text)
    return path


def test_check_errors_name_file_and_line(tmp_path: Path):
    cf = _config(
        tmp_path,
        "myhostname = mx.example.org\n"
        "relay_domains = bar.org\n"
        "smtpd_recipient_restrictions = permit_mynetwork, reject_unauth_destination\n"
        "smtpd_sender_restrictions = check_sender_access hash:$config_directory/missing\n",
    )
    result = run("check", "-c", str(cf))
    assert result.exit_code == 2
    assert (
        f'{cf}, line 3: error: smtpd_recipient_restrictions: unknown restriction "permit_mynetwork"'
        in result.stderr
    )
    assert "missing" in result.stderr and "No such file" in result.stderr
    assert "smtpgate would not start" in result.stderr


def test_check_flags_an_unlisted_class_and_open_relay_order(tmp_path: Path):
    cf = _config(
        tmp_path,
        "relay_domains = bar.org\n"
        "smtpd_relay_restrictions = permit_mynetworks, permit, reject_unauth_destination\n"
        "smtpd_recipient_restrictions = check_recipient_access inline:{ foo@bar.org=vip }\n"
        "vip = permit\n",
    )
    result = run("check", "-c", str(cf))
    assert "permit before reject_unauth_destination" in result.stderr
    assert "open relay" in result.stderr
    assert '"vip" is neither an action nor a restriction' in result.stderr
    assert "vip is defined but not listed in smtpd_restriction_classes" in result.stderr


def test_check_refuses_an_open_relay(tmp_path: Path):
    cf = _config(tmp_path, "smtpd_relay_restrictions = permit_mynetworks\n")
    result = run("check", "-c", str(cf))
    assert result.exit_code == 2
    assert "specify at least one working instance of" in result.stderr


def test_query_behaves_as_postmap(tmp_path: Path):
    shutil.copy(EXAMPLES / "seed" / "restricted_senders", tmp_path / "rs")
    found = run("query", f"hash:{tmp_path / 'rs'}", "QQ.com")
    assert (found.exit_code, found.stdout) == (0, "REJECT  521\n")
    missing = run("query", f"hash:{tmp_path / 'rs'}", "example.com")
    assert (missing.exit_code, missing.stdout) == (1, "")
    broken = run("query", "nosuchtype:/x", "k")
    assert broken.exit_code == 2
    assert "unsupported dictionary type: nosuchtype" in broken.stderr


def test_explain_uses_dns_only_when_asked(tmp_path: Path):
    from tests.dns.dnsserver import FakeDns

    cf = _config(
        tmp_path,
        "relay_domains = bar.org\n"
        "smtpd_recipient_restrictions = reject_unauth_destination, reject_rbl_client zen.test\n",
    )
    dns = FakeDns().start()
    try:
        dns.add("82.113.0.203.zen.test.", "A", "127.0.0.2")
        host, port = dns.address
        args = ["--client", "203.0.113.82", "--from", "a@example.net", "--to", "foo@bar.org"]
        listed = run("explain", "-c", str(cf), *args, "--dns-servers", f"{host}:{port}")
        assert listed.exit_code == 0, listed.output
        last = listed.stdout.rstrip().splitlines()[-1]
        assert last == (
            "554 5.7.1 Service unavailable; Client host [203.0.113.82] blocked using zen.test"
        )
        assert "82.113.0.203.zen.test" in listed.stdout  # the lookup is part of the trail
        # without --dns-servers nothing is looked up: the list is unavailable (deferred)
        offline = run("explain", "-c", str(cf), *args)
        assert offline.stdout.rstrip().splitlines()[-1].startswith("450 4.7.1 ")
    finally:
        dns.stop()


def test_check_names_bad_proxy_protocol_settings(tmp_path: Path):
    cf = _config(
        tmp_path,
        "myhostname = mx.example.org\n"
        "relayhost = [127.0.0.1]:2526\n"
        "smtpd_upstream_proxy_protocol = proxy\n"
        "smtpgate_upstream_proxy_networks = 10.0.0.300/32\n"
        "smtpgate_backend_proxy_protocol = v3\n",
    )
    result = run("check", "-c", str(cf))
    assert result.exit_code == 2
    assert (
        f"{cf}, line 3: error: unsupported smtpd_upstream_proxy_protocol value: proxy "
        "(use haproxy, or leave it empty)"
    ) in result.stderr
    assert f"{cf}, line 4: error: smtpgate_upstream_proxy_networks:" in result.stderr
    assert (
        f"error: {cf}, line 5: smtpgate_backend_proxy_protocol: unsupported value: v3 "
        "(use v1, v2, or leave it empty)"
    ) in result.stderr  # the relay's configuration errors read this way
    good = _config(
        tmp_path,
        "myhostname = mx.example.org\n"
        "relayhost = [127.0.0.1]:2526\n"
        "smtpd_upstream_proxy_protocol = haproxy\n"
        "smtpd_upstream_proxy_timeout = 10s\n"
        "smtpgate_upstream_proxy_networks = 10.0.0.0/24, [fd00::]/64\n"
        "smtpgate_backend_proxy_protocol = v1\n",
    )
    assert run("check", "-c", str(good)).stdout.endswith("ok, 0 warning(s)\n")
