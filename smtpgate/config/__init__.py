"""Configuration in Postfix main.cf syntax: lexer, ``$name`` expansion, defaults, diagnostics.

The config layer owns turning one main.cf-syntax file plus ``-o name=value`` overrides
into an immutable :class:`Settings`, converting the values once into typed, frozen
configurations, and saying where every problem is.  Outside this package nothing reads a
parameter by its name (``tests/test_parameter_reads.py``): the rest of the program gets
typed fields.  Besides the file given to :func:`load_settings`, the only files read here
are the three tables and match lists of the front end (:mod:`.service`); the plan's
tables are opened by the policy layer.

- :mod:`.maincf` -- logical lines, ``name = value``, :func:`split_list` (Postfix
  ``readlline.c``, ``split_nameval.c``, ``mystrtok.c``).
- :mod:`.expand` -- ``$name``, ``${name?x}``, ``${name:x}``, ``${{a} <level {b} ? {x} : {y}}``
  (``mac_parse.c``, ``mac_expand.c``, ``compat_level.c``).
- :mod:`.params` -- :data:`PARAMETERS` (what smtpgate supports, with Postfix's defaults)
  and the Postfix 3.7 parameter list.
- :mod:`.settings` -- :class:`Settings`, :func:`parse_settings`, :func:`load_settings`.
- :mod:`.service` -- :class:`~.service.ServiceConfig`: what the SMTP front end, the server,
  the supervisor, the mail log and the DNS resolver use.
- :mod:`.policyconf` -- :class:`~.policyconf.PolicyConfig`: the plan compiler's input.
"""

from smtpgate.config.diagnostics import Diagnostic, Location
from smtpgate.config.expand import ExpansionError
from smtpgate.config.maincf import split_list, strip_braces
from smtpgate.config.params import NOT_SUPPORTED_YET, PARAMETERS, POSTFIX_DEFAULTS, ParamSpec
from smtpgate.config.settings import Settings, load_settings, parse_settings

__all__ = [
    "NOT_SUPPORTED_YET",
    "PARAMETERS",
    "POSTFIX_DEFAULTS",
    "Diagnostic",
    "ExpansionError",
    "Location",
    "ParamSpec",
    "Settings",
    "load_settings",
    "parse_settings",
    "split_list",
    "strip_braces",
]
