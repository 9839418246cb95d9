"""Typed, immutable settings built from main.cf entries, defaults and ``-o`` overrides.

Theory of operation:

1. Entries come from the lexer (:mod:`smtpgate.config.maincf`) in file order; a name set
   twice keeps the later value ("overriding earlier entry", a warning, as in Postfix).
   ``-o name=value`` overrides come last and win silently; their location is
   "command line".
2. A name that is not set takes its default: :data:`PARAMETERS` for what smtpgate
   supports, else Postfix's built-in default (so ``$alias_maps`` still expands), else it is
   undefined. ``myhostname``, ``mydomain`` and ``config_directory`` are computed the
   Postfix way (see their ``postfix_difference``).
3. Every supported and every explicitly set parameter is expanded once, here, with
   Postfix's rules (:mod:`smtpgate.config.expand`); lookups are memoised, a loop such as
   ``a = $b`` / ``b = $a`` is an error naming the loop, and nesting deeper than 100 is an
   error. An undefined ``$name`` expands to empty with a warning.
4. Diagnostics, following ``postconf_unused.c``: a parameter that neither smtpgate nor
   Postfix knows is an "unknown parameter" unless it is a restriction class or another
   value refers to it; one that only Postfix knows is "known to Postfix but not supported
   by smtpgate". Values of supported bool/int/size/time/code parameters are checked;
   a bad one is an ``error`` diagnostic (and the typed accessor raises).

Errors that Postfix treats as fatal when it reads the file (a line without ``=``, a
malformed ``compatibility_level``, a ``$`` syntax error or loop in a value that is used)
raise :class:`ConfigError` naming the file and line.
"""

from __future__ import annotations

import difflib
import os
import platform
import re
from collections.abc import Callable, Iterable, Sequence

from smtpgate.config.diagnostics import COMMAND_LINE_LOCATION, Diagnostic, Location
from smtpgate.config.expand import ExpansionError, compat_level, expand, references
from smtpgate.config.maincf import Entry, parse_maincf, split_list, split_nameval
from smtpgate.config.params import NOT_SUPPORTED_YET, PARAMETERS, POSTFIX_DEFAULTS, classify
from smtpgate.errors import ConfigError

MAX_DEPTH = 100
DEFAULT_DOMAIN = "localdomain"
_BOOLS = {"yes": True, "true": True, "no": False, "false": False}
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME = re.compile(r"(\d+)([a-z]?)")
_INT = re.compile(r"-?\d+")


def _error(message: str, location: Location | None, path: str | None) -> ConfigError:
    if location is None:
        return ConfigError(message, path)
    return ConfigError(message, location.path, location.line or None)


class _Resolver:
    """Expands parameter values on demand, with memo, loop detection and warnings."""

    def __init__(
        self,
        explicit: dict[str, tuple[str, Location]],
        hostname: str,
        config_directory: str,
    ) -> None:
        self.explicit = explicit
        self.hostname = hostname
        self.config_directory = config_directory
        self.cache: dict[str, str] = {}
        self.stack: list[str] = []
        self.undefined: dict[tuple[str, str], Location | None] = {}

    def default(self, name: str) -> str | None:
        if name == "myhostname":
            if "." in self.hostname:
                return self.hostname.replace("$", "$$")
            domain = self.value("mydomain") if "mydomain" in self.explicit else None
            return f"{self.hostname}.{domain or DEFAULT_DOMAIN}".replace("$", "$$")
        if name == "mydomain":
            host = self.value("myhostname") or ""
            _, dot, domain = host.partition(".")
            return (domain if dot else DEFAULT_DOMAIN).replace("$", "$$")
        if name == "config_directory":
            return self.config_directory.replace("$", "$$")
        spec = PARAMETERS.get(name)
        if spec is not None:
            return spec.default
        return POSTFIX_DEFAULTS.get(name)

    def raw(self, name: str) -> str | None:
        if name in self.explicit:
            return self.explicit[name][0]
        return self.default(name)

    def where(self) -> Location | None:
        for name in reversed(self.stack):
            if name in self.explicit:
                return self.explicit[name][1]
        return None

    def value(self, name: str) -> str | None:
        if name in self.cache:
            return self.cache[name]
        raw = self.raw(name)
        if raw is None:
            return None
        if name in self.stack:
            loop = " -> ".join([*self.stack[self.stack.index(name) :], name])
            raise ExpansionError(f"parameter expansion loop: {loop}", name)
        if len(self.stack) >= MAX_DEPTH:
            raise ExpansionError(f'unreasonable macro call nesting: "{name}"', name)
        spec = PARAMETERS.get(name)
        if spec is not None and not spec.expand:
            self.cache[name] = raw
            return raw
        self.stack.append(name)
        try:
            result = expand(raw, self.lookup)
        except ExpansionError as exc:
            exc.param = exc.param or name
            raise
        finally:
            self.stack.pop()
        self.cache[name] = result
        return result

    def lookup(self, name: str, test: bool) -> str | None:
        raw = self.raw(name)
        if raw is None:
            if test:  # ${name?...} and ${name:...} ask whether it is set: no warning
                return None
            self.undefined.setdefault((self.stack[-1] if self.stack else "", name), self.where())
            return None
        return raw if test else self.value(name)


class Settings:
    """Immutable main.cf settings: expanded values, where each was set, typed accessors."""

    __slots__ = (
        "_classes",
        "_config_directory",
        "_entries",
        "_errors",
        "_explicit",
        "_hostname",
        "_lexer_diagnostics",
        "_overrides",
        "_path",
        "_resolver",
        "_values",
    )

    def __init__(
        self,
        path: str | None,
        entries: Sequence[Entry],
        overrides: Sequence[Entry],
        hostname: str,
    ) -> None:
        """Build from lexed entries; use :func:`parse_settings` / :func:`load_settings`."""
        self._path = path
        self._entries = tuple(entries)
        self._overrides = tuple(overrides)
        self._hostname = hostname
        self._explicit: dict[str, tuple[str, Location]] = {}
        for entry in (*self._entries, *self._overrides):
            self._explicit[entry.name] = (entry.value, entry.location)
        directory = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        self._resolver = _Resolver(self._explicit, hostname, directory)
        self._values: dict[str, str] = {}
        self._errors: dict[str, ConfigError] = {}
        self._classes: frozenset[str] = frozenset()
        self._config_directory = directory
        self._lexer_diagnostics: tuple[Diagnostic, ...] = ()

    # -- construction -------------------------------------------------------------------

    def _raise(self, exc: ExpansionError, fallback: str) -> ConfigError:
        param = exc.param or fallback
        location = self._explicit[param][1] if param in self._explicit else None
        if location is None and fallback in self._explicit:
            location = self._explicit[fallback][1]
        return _error(f"{param}: {exc.message}", location, self._path)

    def _check_compatibility_level(self) -> None:
        level = self._resolve("compatibility_level")
        try:
            compat_level(level)
        except ExpansionError as exc:
            raise _error(
                f"{exc.message} (use a level such as 3.6)",
                self.location("compatibility_level"),
                self._path,
            ) from None

    def _resolve(self, name: str) -> str:
        try:
            value = self._resolver.value(name)
        except RecursionError:
            raise self._raise(ExpansionError("unreasonable macro call nesting"), name) from None
        except ExpansionError as exc:
            raise self._raise(exc, name) from None
        assert value is not None
        return value

    def _used(self) -> set[str]:
        used = set(self._classes)
        for value, _ in self._explicit.values():
            used |= references(value)
        for spec in PARAMETERS.values():  # old names that a default falls back to
            used |= references(spec.default)
        return used

    def _build(self) -> list[Diagnostic]:
        self._check_compatibility_level()
        for name in PARAMETERS:
            self._values[name] = self._resolve(name)
        self._classes = frozenset(split_list(self._values["smtpd_restriction_classes"]))
        self._config_directory = self._values["config_directory"]
        used = self._used()
        diagnostics: list[Diagnostic] = []
        for name, (value, location) in self._explicit.items():
            if name in PARAMETERS:
                continue
            if name in NOT_SUPPORTED_YET and not self._is_postfix_default(name):
                diagnostics.append(Diagnostic("error", _not_yet_message(name, value), location))
            if name in used:
                self._values[name] = self._resolve(name)
                continue
            try:
                self._values[name] = self._resolve(name)
            except ConfigError as exc:
                self._errors[name] = exc
            if name not in NOT_SUPPORTED_YET:
                diagnostics.append(Diagnostic("warning", _unused_message(name, value), location))
        diagnostics.extend(self._undefined_warnings())
        diagnostics.extend(self._typed_diagnostics())
        return diagnostics

    def _is_postfix_default(self, name: str) -> bool:
        """Whether *name*'s value equals Postfix's default, as written or once expanded.

        ``postscreen_greet_banner = $smtpd_banner`` and ``smtpd_sasl_auth_enable = No``
        are Postfix's defaults; comparing the expanded words (case-insensitively, as
        Postfix reads booleans and lists) also accepts a ``$name`` that expands to the
        default. Expansion here records no undefined-parameter warnings: it is a probe.
        """
        value = self._explicit[name][0]
        default = POSTFIX_DEFAULTS[name]
        if _words(value) == _words(default):
            return True
        undefined = dict(self._resolver.undefined)
        try:
            expanded = self._resolve(name)
            expanded_default = expand(default, self._resolver.lookup)
        except (ConfigError, ExpansionError, RecursionError):
            return False
        finally:
            self._resolver.undefined = undefined
        return _words(expanded) == _words(expanded_default)

    def _undefined_warnings(self) -> Iterable[Diagnostic]:
        for (param, name), location in self._resolver.undefined.items():
            where = f"{param}: " if param else ""
            yield Diagnostic(
                "warning", f"{where}undefined parameter: ${name} (expands to empty)", location
            )

    def _typed_diagnostics(self) -> Iterable[Diagnostic]:
        converters: dict[str, Callable[[str], object]] = {
            "bool": self.as_bool,
            "int": self.as_int,
            "size": self.as_int,
            "code": self.as_code,
            "time": self.as_time,
        }
        for name, spec in PARAMETERS.items():
            convert = converters.get(spec.kind)
            if convert is None:
                continue
            try:
                convert(name)
            except ConfigError as exc:
                yield Diagnostic("error", exc.message, self.location(name))

    # -- public API ----------------------------------------------------------------------

    @property
    def path(self) -> str | None:
        """The configuration file, as given."""
        return self._path

    @property
    def config_directory(self) -> str:
        """The expanded ``config_directory`` (by default the folder of the file)."""
        return self._config_directory

    @property
    def restriction_classes(self) -> frozenset[str]:
        """Names listed in ``smtpd_restriction_classes``."""
        return self._classes

    def __getitem__(self, name: str) -> str:
        if name in self._values:
            return self._values[name]
        if name in self._errors:
            raise self._errors[name]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self._values or name in self._errors

    def get(self, name: str, default: str | None = None) -> str | None:
        """The expanded value, or *default* for a name neither supported nor set."""
        return self[name] if name in self else default

    def raw(self, name: str) -> str | None:
        """The value as written (or the default text), before ``$name`` expansion."""
        if name in self._explicit:
            return self._explicit[name][0]
        if name in PARAMETERS:
            return self._resolver.default(name)
        return None

    def location(self, name: str) -> Location | None:
        """Where *name* was set (file and line, or "command line"); None for a default."""
        entry = self._explicit.get(name)
        return entry[1] if entry else None

    def blame(self, name: str) -> Location:
        """Where to report a problem with *name*: where it was set, else the file itself."""
        return self.location(name) or Location(self._path or "main.cf", 0)

    def is_explicit(self, name: str) -> bool:
        """True when the file or an override sets *name*."""
        return name in self._explicit

    def misspellings(self, name: str) -> list[tuple[str, Location]]:
        """Unknown parameters this configuration sets whose names are close to *name*.

        The same closeness as the "did you mean" hint of the unknown-parameter warning:
        ``relayhsot`` for ``relayhost``.
        """
        return [
            (other, location)
            for other, (_, location) in self._explicit.items()
            if classify(other) == "unknown" and _closest(other) == name
        ]

    def names(self) -> list[str]:
        """Every supported name plus every name the configuration sets, sorted."""
        return sorted(set(PARAMETERS) | set(self._explicit))

    def _bad(self, name: str, what: str, hint: str) -> ConfigError:
        return _error(
            f"bad {what} configuration: {name} = {self[name]} ({hint})",
            self.location(name),
            self._path,
        )

    def as_bool(self, name: str) -> bool:
        """``yes``/``no`` (also ``true``/``false``), case-insensitive."""
        value = _BOOLS.get(self[name].strip().lower())
        if value is None:
            raise self._bad(name, "boolean", "use yes or no")
        return value

    def as_int(self, name: str) -> int:
        """A decimal integer."""
        text = self[name].strip()
        if not _INT.fullmatch(text):
            raise self._bad(name, "numerical", "use a whole number")
        return int(text)

    def as_code(self, name: str) -> int:
        """An SMTP reply code, 4xx or 5xx."""
        code = self.as_int(name)
        if not 400 <= code <= 599:
            raise self._bad(name, "reply code", "use a 4xx or 5xx SMTP code")
        return code

    def as_time(self, name: str, default_unit: str = "s") -> float:
        """Seconds, from a Postfix time value: a number with an optional unit s m h d w."""
        match = _TIME.fullmatch(self[name].strip())
        unit = (match.group(2) or default_unit) if match else ""
        if match is None or unit not in _TIME_UNITS:
            raise self._bad(name, "time", "use a number with an optional unit s, m, h, d or w")
        return float(int(match.group(1)) * _TIME_UNITS[unit])

    def as_list(self, name: str) -> list[str]:
        """The expanded value split the Postfix way (see :func:`split_list`)."""
        return split_list(self[name])

    def with_overrides(self, overrides: Sequence[str]) -> tuple[Settings, list[Diagnostic]]:
        """A copy with more ``-o name=value`` overrides applied after the existing ones.

        The diagnostics are those of the new settings as a whole.
        """
        return _make(
            self._path,
            list(self._entries),
            [*self._overrides, *_parse_overrides(overrides)],
            self._hostname,
            list(self._lexer_diagnostics),
        )

    def __repr__(self) -> str:
        return f"<Settings {self._path!r}: {len(self._explicit)} set>"


def _unused_message(name: str, value: str) -> str:
    if name in POSTFIX_DEFAULTS:
        return (
            f"parameter known to Postfix but not supported by smtpgate (ignored): {name} = {value}"
        )
    close = _closest(name)
    hint = f" (did you mean {close}?)" if close else ""
    return f"unknown parameter: {name} = {value}{hint}"


def _closest(name: str) -> str | None:
    close = difflib.get_close_matches(name, list(PARAMETERS), n=1, cutoff=0.8)
    return close[0] if close else None


def _not_yet_message(name: str, value: str) -> str:
    return (
        f"not supported yet: {name} = {value} (smtpgate has no {NOT_SUPPORTED_YET[name]} "
        "and would run as if this line were not there)"
    )


def _words(value: str) -> list[str]:
    return [word.lower() for word in split_list(value)]


def _parse_overrides(overrides: Sequence[str]) -> list[Entry]:
    entries = []
    for override in overrides:
        result = split_nameval(override)
        if isinstance(result, str):
            raise ConfigError(
                f'invalid parameter override "{override}": {result} (use -o name=value)',
                COMMAND_LINE_LOCATION.path,
            )
        entries.append(Entry(result[0], result[1], COMMAND_LINE_LOCATION))
    return entries


def _duplicates(entries: Sequence[Entry]) -> list[Diagnostic]:
    seen: dict[str, Entry] = {}
    diagnostics = []
    for entry in entries:
        earlier = seen.get(entry.name)
        if earlier is not None:
            diagnostics.append(
                Diagnostic(
                    "warning",
                    f"overriding earlier entry: {earlier.name}={earlier.value} "
                    f"(set at {earlier.location})",
                    entry.location,
                )
            )
        seen[entry.name] = entry
    return diagnostics


def _sort_key(diagnostic: Diagnostic) -> tuple[int, int]:
    location = diagnostic.location
    if location is None:
        return (2, 0)
    return (0, location.line) if location.line > 0 else (1, 0)


def _make(
    path: str | None,
    entries: list[Entry],
    overrides: list[Entry],
    hostname: str,
    diagnostics: list[Diagnostic],
) -> tuple[Settings, list[Diagnostic]]:
    settings = Settings(path, entries, overrides, hostname)
    settings._lexer_diagnostics = tuple(diagnostics)
    found = [*diagnostics, *_duplicates(entries), *settings._build()]
    return settings, sorted(found, key=_sort_key)


def parse_settings(
    text: str,
    path: str = "main.cf",
    overrides: Sequence[str] = (),
    *,
    hostname: str | None = None,
) -> tuple[Settings, list[Diagnostic]]:
    """Parse main.cf *text*; *path* is used in messages and for ``config_directory``.

    *hostname* replaces ``platform.node()`` as the base of the ``myhostname`` default.
    Raises :class:`ConfigError` for what Postfix treats as fatal.
    """
    entries, diagnostics = parse_maincf(text, path)
    return _make(
        path,
        entries,
        _parse_overrides(overrides),
        (platform.node() or "localhost") if hostname is None else hostname,
        diagnostics,
    )


def load_settings(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    hostname: str | None = None,
) -> tuple[Settings, list[Diagnostic]]:
    """Read and parse the main.cf-syntax file at *path* (UTF-8)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        raise ConfigError(
            "No such file or directory: create it (examples/main.cf is a start) "
            "or name another one with -c FILE",
            name,
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration: {exc.strerror}", name) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 text (save the file as UTF-8)", name, line) from None
    return parse_settings(text, name, overrides, hostname=hostname)
