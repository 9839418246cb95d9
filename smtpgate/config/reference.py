"""The configuration reference, rendered from the parameter table (``docs/configuration.md``).

``make docs`` writes it; a test fails when the committed page differs from what the
code would render, so the documentation cannot drift from the defaults.
"""

from __future__ import annotations

from smtpgate.config.params import NOT_YET_FEATURES, PARAMETERS

HEADER = """\
# Configuration reference

smtpgate reads one file in Postfix `main.cf` syntax: logical lines (a line that starts
with white space continues the previous one), `#` comments, `$name`, `${name}` and
`$(name)` expansion, and Postfix 3.x conditional forms (`${name?value}`,
`${name:value}`, `${{$a} == {b} ? {x} : {y}}`). `config_directory` is the folder of the
config file, and a relative table path is resolved from it. `-o name=value` on the
command line overrides a parameter.

When `compatibility_level` is not set, smtpgate uses Postfix's defaults at level 3.6
(Debian's shipped main.cf): `smtpd_relay_restrictions` defaults to
`permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination`. Every
parameter not listed here gets a diagnostic naming file and line:

- unknown to Postfix too: a warning, with a "did you mean" hint (and an empty
  `relayhost`, which `check` and `serve` refuse, names the near miss too);
- known to Postfix, changing what mail is accepted, and not supported by smtpgate yet
  (see [the list below](#not-supported-yet)): an error when set to anything but
  Postfix's default, because running without it would let mail through that Postfix
  refused or scanned;
- known to Postfix and changing nothing a front end does (queue, delivery, local
  delivery, tuning of a feature that is itself refused, such as
  `smtpd_policy_service_*`, or `non_smtpd_milters`, which never applies to SMTP): a warning.

Names listed in `smtpd_restriction_classes`, and names used only through `$name`, are
yours to define.

Parameters of the SMTP service (`listen`, `relayhost`, TLS, timeouts and limits) take
effect with `smtpgate serve`; `check` validates them now.

This page is generated from `smtpgate/config/params.py` (`make docs`); do not edit it.

| parameter | default | meaning | difference from Postfix |
| --- | --- | --- | --- |
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


NOT_YET_HEADER = """
## Not supported yet

These Postfix parameters are an error (`not supported yet`, with file and line) when
they are set to anything but Postfix's default (`postconf -d`; a `$name` that expands to
the default is the default too). The restrictions of these features
(`reject_unverified_sender`, `check_sasl_access`, ...) are refused the same way.

A name ending in `*` stands for every Postfix parameter with that prefix.

| feature | parameters |
| --- | --- |
"""


def render_reference() -> str:
    rows = []
    for name in sorted(PARAMETERS):
        spec = PARAMETERS[name]
        default = f"`{_cell(spec.default)}`" if spec.default else "(empty)"
        rows.append(
            f"| `{name}` | {default} | {_cell(spec.doc)} | {_cell(spec.postfix_difference)} |"
        )
    not_yet = [
        f"| {_cell(feature)} | {', '.join(f'`{n}`' for n in names)} |"
        for feature, names in NOT_YET_FEATURES
    ]
    return HEADER + "\n".join(rows) + "\n" + NOT_YET_HEADER + "\n".join(not_yet) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_reference(), end="")
