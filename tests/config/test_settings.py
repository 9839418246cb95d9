"""Settings: defaults, compatibility levels, diagnostics with locations, overrides, types."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.config import (
    NOT_SUPPORTED_YET,
    PARAMETERS,
    POSTFIX_DEFAULTS,
    Diagnostic,
    Location,
    Settings,
    load_settings,
    parse_settings,
)
from smtpgate.errors import ConfigError

RELAY_DEFAULT = "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination"


def parse(text: str, *overrides: str, path: str = "/etc/smtpgate/main.cf") -> Settings:
    result, _ = parse_settings(text, path, overrides, hostname="mx.example.com")
    return result


def messages(text: str, *overrides: str) -> list[str]:
    _, diagnostics = parse_settings(text, "main.cf", overrides, hostname="mx.example.com")
    return [str(d) for d in diagnostics]


def test_unset_compatibility_level_behaves_as_3_6() -> None:
    s = parse("")
    assert s["compatibility_level"] == "3.6"
    assert s["smtpd_relay_restrictions"] == RELAY_DEFAULT
    assert s.as_list("smtpd_relay_restrictions") == RELAY_DEFAULT.split(", ")
    assert s.as_bool("smtpd_relay_before_recipient_restrictions") is True
    assert s["relay_domains"] == ""
    assert s["mynetworks_style"] == "host"
    assert not s.is_explicit("compatibility_level")


@pytest.mark.parametrize(
    ("level", "relay", "before", "relay_domains", "style"),
    [
        ("0", "", "no", "mx.example.com, localhost.example.com, localhost", "subnet"),
        ("1", RELAY_DEFAULT, "no", "mx.example.com, localhost.example.com, localhost", "subnet"),
        ("2", RELAY_DEFAULT, "no", "", "host"),
        ("3.5", RELAY_DEFAULT, "no", "", "host"),
        ("3.6", RELAY_DEFAULT, "yes", "", "host"),
        ("3.10", RELAY_DEFAULT, "yes", "", "host"),
    ],
)
def test_defaults_follow_compatibility_level(
    level: str, relay: str, before: str, relay_domains: str, style: str
) -> None:
    s = parse(f"compatibility_level = {level}\n")
    assert s["smtpd_relay_restrictions"] == relay
    assert s["smtpd_relay_before_recipient_restrictions"] == before
    assert s["relay_domains"] == relay_domains
    assert s["mynetworks_style"] == style


def test_bad_compatibility_level_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse("a = 1\ncompatibility_level = three\n", path="main.cf")
    assert str(info.value).startswith(
        'main.cf, line 2: malformed compatibility level syntax: "three"'
    )


def test_host_defaults_and_config_directory(tmp_path: Path) -> None:
    s, _ = parse_settings("", str(tmp_path / "main.cf"), hostname="vm")
    assert s["myhostname"] == "vm.localdomain"
    assert s["mydomain"] == "localdomain"
    assert s["smtpd_banner"] == "vm.localdomain ESMTP Postfix"
    assert s.config_directory == str(tmp_path)
    assert s["config_directory"] == str(tmp_path)
    assert s.location("myhostname") is None and s.raw("myhostname") == "vm.localdomain"
    s, _ = parse_settings("mydomain = example.org\n", "main.cf", hostname="vm")
    assert s["myhostname"] == "vm.example.org"
    s = parse("myhostname = mail.example.net\n")
    assert s["mydomain"] == "example.net"
    assert s["mydestination"] == "mail.example.net, localhost.example.net, localhost"
    assert s["myorigin"] == "mail.example.net"


def test_table_paths_can_use_config_directory(tmp_path: Path) -> None:
    main_cf = tmp_path / "main.cf"
    main_cf.write_text("smtpd_sender_restrictions = check_sender_access hash:$config_directory/x\n")
    s, diagnostics = load_settings(main_cf, hostname="mx.example.com")
    assert s.as_list("smtpd_sender_restrictions") == [
        "check_sender_access",
        f"hash:{tmp_path}/x",
    ]
    assert s.raw("smtpd_sender_restrictions") == "check_sender_access hash:$config_directory/x"
    assert s.location("smtpd_sender_restrictions") == Location(str(main_cf), 1)
    assert s.path == str(main_cf)
    assert diagnostics == []


def test_mynetworks_default_is_loopback() -> None:
    assert parse("")["mynetworks"] == "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128"


def test_raw_parameters_are_not_expanded() -> None:
    s = parse("smtpd_reject_footer = \\c$client_address\n")
    assert s["smtpd_reject_footer"] == "\\c$client_address"
    assert '!"#$%&' in s["smtpd_expansion_filter"]


def test_restriction_classes_and_references_are_not_unused() -> None:
    text = (
        "smtpd_restriction_classes = from_qq, strict\n"
        "from_qq = check_sender_access hash:/etc/postfix/qq\n"
        "strict = reject\n"
        "base = /etc/postfix\n"
        "smtpd_recipient_restrictions = check_recipient_access hash:$base/protected\n"
        "stray = 1\n"
    )
    s, diagnostics = parse_settings(text, "main.cf", hostname="mx.example.com")
    assert s.restriction_classes == {"from_qq", "strict"}
    assert s["from_qq"] == "check_sender_access hash:/etc/postfix/qq"
    assert s.as_list("strict") == ["reject"]
    assert s["smtpd_recipient_restrictions"] == "check_recipient_access hash:/etc/postfix/protected"
    assert [str(d) for d in diagnostics] == [
        "main.cf, line 6: warning: unknown parameter: stray = 1"
    ]


def test_unknown_and_unsupported_warnings_name_file_and_line() -> None:
    text = (
        "myhostname = mx.example.com\n"
        "smtpd_recipient_restriction = reject\n"
        "alias_maps = hash:/etc/aliases\n"
        "smtpd_foo = bar\n"
    )
    assert messages(text) == [
        "main.cf, line 2: warning: unknown parameter: smtpd_recipient_restriction = reject "
        "(did you mean smtpd_recipient_restrictions?)",
        "main.cf, line 3: warning: parameter known to Postfix but not supported by smtpgate "
        "(ignored): alias_maps = hash:/etc/aliases",
        "main.cf, line 4: warning: unknown parameter: smtpd_foo = bar",
    ]


def test_unsupported_postfix_parameter_expands_to_its_postfix_default() -> None:
    s = parse("mydestination = $myhostname, $queue_directory\n")
    assert s["mydestination"] == "mx.example.com, /var/spool/postfix"
    with pytest.raises(KeyError):
        s["queue_directory"]
    assert s.get("queue_directory") is None
    assert s.get("nonesuch", "fallback") == "fallback"


def test_undefined_reference_expands_to_empty_with_a_warning() -> None:
    text = "myhostname = mx.example.com\nmynetworks = $nonesuch 10.0.0.0/8\n"
    s, diagnostics = parse_settings(text, "main.cf", hostname="x")
    assert s["mynetworks"] == " 10.0.0.0/8"
    assert s.as_list("mynetworks") == ["10.0.0.0/8"]
    assert [str(d) for d in diagnostics] == [
        "main.cf, line 2: warning: mynetworks: undefined parameter: $nonesuch (expands to empty)"
    ]


def test_duplicate_entry_later_wins_with_a_warning() -> None:
    s, diagnostics = parse_settings("relayhost = a\nrelayhost = b\n", "main.cf", hostname="x")
    assert s["relayhost"] == "b"
    assert s.location("relayhost") == Location("main.cf", 2)
    assert [str(d) for d in diagnostics] == [
        "main.cf, line 2: warning: overriding earlier entry: relayhost=a (set at main.cf, line 1)"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a = $b\nb = $a\nmynetworks = $a\n",
            "main.cf, line 1: a: parameter expansion loop: a -> b -> a",
        ),
        ("mynetworks = $mynetworks\n", "main.cf, line 1: mynetworks: parameter expansion loop"),
        ("relayhost = ${foo\n", 'main.cf, line 1: relayhost: truncated macro reference: "${foo"'),
        ("x = 1\ny = ${x?{a} junk}\nrelayhost = $y\n", 'main.cf, line 2: y: ":" expected at'),
    ],
)
def test_expansion_errors_raise_with_location(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "main.cf", hostname="x")
    assert str(info.value).startswith(message)


def test_long_chain_is_an_error_not_a_crash() -> None:
    text = "".join(f"p{i} = $p{i + 1}\n" for i in range(300)) + "relayhost = $p0\n"
    with pytest.raises(ConfigError, match="unreasonable macro call nesting"):
        parse_settings(text, "main.cf", hostname="x")


def test_errors_in_unused_parameters_are_warnings() -> None:
    s, diagnostics = parse_settings("junk = ${foo\n", "main.cf", hostname="x")
    assert [d.severity for d in diagnostics] == ["warning"]
    with pytest.raises(ConfigError, match="truncated macro reference"):
        s["junk"]


def test_overrides_win_and_say_command_line() -> None:
    s = parse("relayhost = [a]:25\n", "relayhost=[b]:2525", "relayhost = [c]:25")
    assert s["relayhost"] == "[c]:25"
    assert s.location("relayhost") == Location("command line", 0)
    assert str(s.location("relayhost")) == "command line"
    assert messages("", "smtpd_bogus=1") == [
        "command line: warning: unknown parameter: smtpd_bogus = 1"
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "foo",
            "command line: invalid parameter override \"foo\": missing '=' after attribute name",
        ),
        ("=x", 'command line: invalid parameter override "=x": missing attribute name'),
    ],
)
def test_bad_override_syntax(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse("", override)
    assert str(info.value).startswith(message)


def test_with_overrides_returns_a_new_settings() -> None:
    s = parse("relayhost = [a]:25\n", "relayhost=[b]:25")
    t, diagnostics = s.with_overrides(["relayhost=[c]:25", "smtpd_delay_reject=no"])
    assert (s["relayhost"], t["relayhost"]) == ("[b]:25", "[c]:25")
    assert s.as_bool("smtpd_delay_reject") and not t.as_bool("smtpd_delay_reject")
    assert diagnostics == []


def test_typed_accessors() -> None:
    s = parse(
        "smtpd_delay_reject = No\nsmtpd_helo_required = TRUE\nmessage_size_limit = 1000\n"
        "smtpd_timeout = 5m\nsmtpd_error_sleep_time = 2\n"
    )
    assert s.as_bool("smtpd_delay_reject") is False
    assert s.as_bool("smtpd_helo_required") is True
    assert s.as_int("message_size_limit") == 1000
    assert s.as_time("smtpd_timeout") == 300.0
    assert s.as_time("smtpd_error_sleep_time") == 2.0
    assert s.as_time("smtpd_error_sleep_time", "m") == 120.0
    assert parse("").as_time("smtpd_timeout") == 300.0
    assert parse("").as_int("access_map_reject_code") == 554


@pytest.mark.parametrize(
    ("text", "call", "message"),
    [
        ("smtpd_delay_reject = maybe\n", "as_bool", "bad boolean configuration"),
        ("message_size_limit = 10MB\n", "as_int", "bad numerical configuration"),
        ("smtpd_timeout = 5x\n", "as_time", "bad time configuration"),
    ],
)
def test_typed_errors_name_where_the_value_was_set(text: str, call: str, message: str) -> None:
    s, diagnostics = parse_settings("# first\n" + text, "main.cf", hostname="x")
    name = text.split()[0]
    assert [(d.severity, d.location) for d in diagnostics] == [("error", Location("main.cf", 2))]
    with pytest.raises(ConfigError) as info:
        getattr(s, call)(name)
    assert str(info.value).startswith(f"main.cf, line 2: {message}: {name} = ")


def test_bad_reply_code_is_an_error_diagnostic() -> None:
    assert messages("access_map_reject_code = 250\n") == [
        "main.cf, line 1: error: bad reply code configuration: access_map_reject_code = 250 "
        "(use a 4xx or 5xx SMTP code)"
    ]


@pytest.mark.parametrize(
    "line",
    [
        "smtpd_milter_maps = cidr:/etc/postfix/smtpd_milter_map",
        "milter_header_checks = pcre:/etc/postfix/milter_header_checks",
        "smtpd_sasl_auth_enable = yes",
        "smtpd_proxy_filter = 127.0.0.1:10025",
        "address_verify_relayhost = [127.0.0.1]:10026",
        "unverified_sender_reject_code = 550",
        "postscreen_command_filter = pcre:/etc/postfix/command_filter",
        "header_checks = regexp:/etc/postfix/header_checks",
        "virtual_alias_maps = hash:/etc/postfix/virtual",
        "smtpd_enforce_tls = yes",
    ],
)
def test_parameters_that_change_what_is_accepted_are_errors(line: str) -> None:
    name, value = (part.strip() for part in line.split("=", 1))
    assert messages(f"# first\n{line}\n") == [
        f"main.cf, line 2: error: not supported yet: {name} = {value} (smtpgate has no "
        f"{NOT_SUPPORTED_YET[name]} and would run as if this line were not there)"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "smtpd_milter_maps =\n",
        "smtpd_sasl_auth_enable = No\n",
        "postscreen_greet_banner = $smtpd_banner\n",
        "postscreen_greet_wait = ${stress?{2}:{6}}s\n",
        "address_verify_relayhost = $relayhost\n",
        "mine = ignore\npostscreen_dnsbl_action = $mine\n",
    ],
)
def test_postfix_defaults_of_unsupported_parameters_are_fine(text: str) -> None:
    assert [m for m in messages(text) if "error" in m] == []


def test_a_referenced_unsupported_parameter_is_still_an_error() -> None:
    # A reference must not hide the line that is not supported (it only silences the
    # "unused" warning).
    found = messages(
        "milter_header_checks = pcre:/etc/postfix/mhc\nmine = $milter_header_checks\n"
        "smtpd_milters = inet:127.0.0.1:11332, $mine\n"
    )
    assert [m.split(": ")[0:2] for m in found] == [["main.cf, line 1", "error"]]


def test_non_smtpd_milters_is_a_warning() -> None:
    # Debian/rspamd set-ups write non_smtpd_milters = $smtpd_milters: smtpgate receives
    # mail by SMTP only, so it applies to nothing here.
    found = messages("smtpd_milters = inet:127.0.0.1:11332\nnon_smtpd_milters = $smtpd_milters\n")
    assert [m.split(": ")[0:2] for m in found] == [["main.cf, line 2", "warning"]]


def test_tuning_parameters_of_a_refused_feature_stay_warnings() -> None:
    (message,) = messages("smtpd_sasl_security_options = noanonymous\n")
    assert message == (
        "main.cf, line 1: warning: parameter known to Postfix but not supported by smtpgate "
        "(ignored): smtpd_sasl_security_options = noanonymous"
    )


def test_the_classification_covers_every_postfix_name_once() -> None:
    from smtpgate.config.params import classify

    assert classify("relayhost") == "supported"
    assert classify("smtpd_milters") == "supported"
    assert classify("smtpd_milter_maps") == "not_yet"
    assert classify("queue_directory") == "ignored"
    assert classify("relayhsot") == "unknown"
    assert not set(NOT_SUPPORTED_YET) & set(PARAMETERS)
    assert set(NOT_SUPPORTED_YET) <= set(POSTFIX_DEFAULTS)


def test_misspellings_of_a_parameter() -> None:
    s = parse("# x\nrelayhsot = [10.0.0.1]:25\nrelay_host = x\n")
    assert s.misspellings("relayhost") == [
        ("relayhsot", Location("/etc/smtpgate/main.cf", 2)),
        ("relay_host", Location("/etc/smtpgate/main.cf", 3)),
    ]
    assert s.blame("relayhost") == Location("/etc/smtpgate/main.cf", 0)


def test_names_and_key_errors() -> None:
    s = parse("custom = 1\n")
    assert set(PARAMETERS) <= set(s.names())
    assert "custom" in s.names() and "listen" in s.names()
    assert s["listen"] == "0.0.0.0:25"
    with pytest.raises(KeyError):
        s["never_heard_of"]
    assert s.raw("never_heard_of") is None


def test_diagnostic_str() -> None:
    location = Location("/etc/smtpgate/main.cf", 12)
    diagnostic = Diagnostic("warning", "unknown parameter: smtpd_foo = bar", location)
    assert str(diagnostic) == (
        "/etc/smtpgate/main.cf, line 12: warning: unknown parameter: smtpd_foo = bar"
    )
    assert str(Diagnostic("error", "x", None)) == "error: x"


def test_load_settings_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.cf")
    assert str(info.value).startswith(f"{tmp_path / 'nope.cf'}: No such file or directory")
    assert "-c FILE" in str(info.value)


def test_load_settings_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "main.cf"
    path.write_bytes(b"a = 1\nb = \xff\n")
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8"):
        load_settings(path)


def test_load_settings_reads_a_path_like(tmp_path: Path) -> None:
    path = tmp_path / "main.cf"
    path.write_text("relayhost = [backend]:25\r\n")
    s, _ = load_settings(path, ["smtpd_delay_reject=no"], hostname="x")
    assert s["relayhost"] == "[backend]:25"
    assert s.config_directory == os.fspath(tmp_path)


TEXT = st.text(st.sampled_from(list("ab_= \t\n#{}$():?,<>!.1")) | st.characters(), max_size=120)


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_parse_settings_raises_only_config_error(text: str) -> None:
    try:
        s, diagnostics = parse_settings(text, "main.cf", hostname="x")
    except ConfigError:
        return
    for name in s.names():
        try:
            s[name]
        except ConfigError:
            pass
    assert all(isinstance(d, Diagnostic) for d in diagnostics)
