"""The configuration reference, rendered from the parameter table (``docs/configuration.md``).

``make docs`` writes it; a test fails when the committed page differs from what the
code would render, so the documentation cannot drift from the defaults.
"""

from __future__ import annotations

from smtpgate.config.params import PARAMETERS

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
parameter not listed here gets a warning naming file and line: either unknown to
Postfix too (with a "did you mean" hint), or known to Postfix but not supported by
smtpgate. Names listed in `smtpd_restriction_classes`, and names used only through
`$name`, are yours to define.

Parameters of the SMTP service (`listen`, `relayhost`, TLS, timeouts and limits) take
effect with `smtpgate serve`; `check` validates them now.

This page is generated from `smtpgate/config/params.py` (`make docs`); do not edit it.

| parameter | default | meaning | difference from Postfix |
| --- | --- | --- | --- |
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    rows = []
    for name in sorted(PARAMETERS):
        spec = PARAMETERS[name]
        default = f"`{_cell(spec.default)}`" if spec.default else "(empty)"
        rows.append(
            f"| `{name}` | {default} | {_cell(spec.doc)} | {_cell(spec.postfix_difference)} |"
        )
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_reference(), end="")
