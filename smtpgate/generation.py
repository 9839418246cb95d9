"""One load, one generation: everything ``serve`` uses, built from one read of main.cf.

Theory of operation:

1. :func:`load_generation` reads the file (``-o`` overrides last) and hands the
   :class:`~smtpgate.config.Settings` to :func:`build_generation`.  ``check``, ``serve``
   and every reload call it; ``explain`` calls its first half,
   :func:`compile_configuration` (the plan and the typed front-end configuration: no
   certificate, no backend).
2. The first half converts every value once: the :class:`Plan` (restriction lists,
   tables opened) and the :class:`ServiceConfig` (limits, banner, listeners, workers,
   files).  The second half builds what needs files or the network later: the front end's
   ``ssl.SSLContext`` (the key is often readable by root only: the supervisor loads it
   before it forks the workers), the relay to the backend and the DNS resolver, with the
   relay's MX lookup wired to that resolver, and the recipient verifier
   (``reject_unverified_recipient``: smtpgate.verify) bound to the plan, probing through
   that relay.  The policy delegation client
   (``check_policy_service``) is bound to the plan in the first half, so that
   ``explain`` asks the same policy servers as ``serve``; it opens no connection until
   a request needs one (each worker opens its own), and the server closes it when its
   generation retires.
3. Every problem is a :class:`Diagnostic` naming file and line, collected from all the
   steps at once (each reported once: the settings and the typed conversions find a bad
   number alike); the generation is None when one of them is an error.
4. A :class:`Generation` is immutable.  A reload builds the next one completely and the
   supervisor's new workers serve it; nothing changes a generation in place.

Tables: ``check`` opens them strictly (a table that cannot be read is an error); ``serve``,
its reloads and ``explain`` replace it by a surrogate whose every lookup answers
``451 4.3.5``, with a warning, as Postfix's daemons do.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from smtpgate.config import Diagnostic, Settings, load_settings
from smtpgate.config.milterconf import milter_config
from smtpgate.config.postscreenconf import postscreen_settings
from smtpgate.config.relayconf import relay_config
from smtpgate.config.service import ServiceConfig, relay_diagnostics, service_config
from smtpgate.delegation import DelegationClient
from smtpgate.errors import ConfigError
from smtpgate.milter import Milters
from smtpgate.policy.plan import Plan, build_plan
from smtpgate.policy.ports import Resolver
from smtpgate.postscreen.config import DISABLED, PostscreenConfig, postscreen_config
from smtpgate.relay import Relay, load_cert_files
from smtpgate.resolver import mx_hosts, resolver_from_config
from smtpgate.verify import RelayVerifier


@dataclass(frozen=True)
class Configuration:
    """The values of one load, before anything needs a file besides the tables."""

    plan: Plan
    config: ServiceConfig
    milters: Milters = field(default_factory=Milters)
    postscreen: PostscreenConfig = DISABLED


@dataclass(frozen=True)
class Generation:
    """Everything the workers serve with, built from one (re)load of the configuration.

    ``serve``'s supervisor builds it while it is root and forks the workers around it; a
    reload builds the next one (``number`` counts them, 1 at start).
    """

    number: int
    plan: Plan
    config: ServiceConfig
    tls_context: ssl.SSLContext | None
    """The front end's STARTTLS context; None when STARTTLS is not offered."""
    relay: Relay
    resolver: Resolver
    milters: Milters = field(default_factory=Milters)
    """``smtpd_milters``: false when empty; ``milters.session()`` per SMTP session."""
    postscreen: PostscreenConfig = DISABLED
    """The postscreen_* parameters (``enabled`` False: postscreen does not run)."""

    @property
    def verifier(self) -> RelayVerifier | None:
        """The recipient verifier bound to the plan (None: no reject_unverified_recipient)."""
        verifier = self.plan.verifier
        return verifier if isinstance(verifier, RelayVerifier) else None

    @property
    def policy_client(self) -> DelegationClient | None:
        """The policy delegation client bound to the plan (None: no check_policy_service)."""
        client = self.plan.policy_client
        return client if isinstance(client, DelegationClient) else None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, number: int = 0, strict_tables: bool = False
    ) -> Generation:
        """:func:`build_generation`, raising ConfigError that lists every error."""
        generation, diagnostics = build_generation(
            settings, number=number, strict_tables=strict_tables
        )
        if generation is None:
            errors = [str(d) for d in diagnostics if d.severity == "error"]
            raise ConfigError("\n".join(errors))
        return generation


def _unique(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    return list(dict.fromkeys(diagnostics))


def _failed(diagnostics: Sequence[Diagnostic]) -> bool:
    return any(d.severity == "error" for d in diagnostics)


def compile_configuration(
    settings: Settings, diagnostics: Sequence[Diagnostic] = (), *, strict_tables: bool = False
) -> tuple[Configuration | None, list[Diagnostic]]:
    """The plan and the typed front-end configuration; None when there is an error.

    ``diagnostics`` are those of reading the settings, merged into the result.
    """
    plan, from_plan = build_plan(settings, strict_tables=strict_tables)
    config, from_service = service_config(settings)
    values, from_postscreen = postscreen_settings(settings, strict_tables=strict_tables)
    postscreen = None
    if values is not None:
        postscreen, parsed = postscreen_config(values)
        from_postscreen += parsed
    found = _unique([*diagnostics, *from_plan, *from_service, *from_postscreen])
    if plan is None or config is None or postscreen is None or _failed(found):
        return None, found
    if plan.policy_services:
        plan = plan.with_policy_client(DelegationClient())
    return Configuration(plan, config, postscreen=postscreen), found


def build_generation(
    settings: Settings,
    diagnostics: Sequence[Diagnostic] = (),
    *,
    number: int = 0,
    strict_tables: bool = False,
) -> tuple[Generation | None, list[Diagnostic]]:
    """Everything serve uses, from ``settings``; None when any diagnostic is an error."""
    compiled, found = compile_configuration(settings, diagnostics, strict_tables=strict_tables)
    found += relay_diagnostics(settings)
    relay = resolver = context = milters = None
    try:
        relay = Relay.from_config(relay_config(settings))
    except ConfigError as exc:
        found.append(_located(settings, exc, "relayhost"))
    try:
        milters = Milters(milter_config(settings))
    except ConfigError as exc:
        found.append(_located(settings, exc, "smtpd_milters"))
    if compiled is not None:
        try:
            resolver = resolver_from_config(compiled.config)
        except ConfigError as exc:
            found.append(_located(settings, exc, "dns_servers"))
        try:
            context = server_tls_context(settings, compiled.config)
        except ConfigError as exc:
            found.append(Diagnostic("error", str(exc), None))
    found = _unique(found)
    if compiled is None or relay is None or resolver is None or milters is None or _failed(found):
        return None, found
    _wire_next_hops(relay, resolver)
    plan = compiled.plan
    if plan.verifies_recipients:
        plan = plan.with_verifier(RelayVerifier(relay, plan.verify))
    generation = Generation(
        number,
        plan,
        compiled.config,
        context,
        relay,
        resolver,
        milters,
        postscreen=compiled.postscreen,
    )
    return generation, found


def load_generation(
    config_path: str, overrides: Sequence[str] = (), *, number: int = 0, strict_tables: bool = False
) -> tuple[Generation | None, list[Diagnostic]]:
    """Read ``config_path`` and build everything serve uses: the one load.

    Raises ConfigError when the file cannot be read or parsed at all.
    """
    settings, diagnostics = load_settings(config_path, overrides)
    return build_generation(settings, diagnostics, number=number, strict_tables=strict_tables)


def load_configuration(
    config_path: str, overrides: Sequence[str] = ()
) -> tuple[Configuration | None, list[Diagnostic]]:
    """The first half of :func:`load_generation` (``explain``: no certificate, no backend).

    Raises ConfigError when the file cannot be read or parsed at all.
    """
    settings, diagnostics = load_settings(config_path, overrides)
    compiled, found = compile_configuration(settings, diagnostics)
    try:
        milters = Milters(milter_config(settings))
    except ConfigError as exc:
        found.append(_located(settings, exc, "smtpd_milters"))
        return None, found
    if compiled is None:
        return None, found
    return dataclasses.replace(compiled, milters=milters), found


def server_tls_context(settings: Settings, config: ServiceConfig) -> ssl.SSLContext | None:
    """TLS 1.2 or newer, no client certificate requested; None when STARTTLS is off.

    The files are read here, once per (re)load, by the supervisor while it is still root:
    a key that only root may read (``/etc/letsencrypt/live/*/privkey.pem``) works.
    """
    if not config.tls_offered:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert_files(
        context,
        settings,
        ("smtpd_tls_cert_file", config.tls_cert_file),
        ("smtpd_tls_key_file", config.tls_key_file),
    )
    return context


def _wire_next_hops(relay: Relay, resolver: Resolver) -> None:
    """Give the relay the MX lookup for an unbracketed relayhost."""

    async def next_hops(host: str, port: int) -> list[tuple[str, int]]:
        return await mx_hosts(resolver, host, port)

    relay.next_hops = next_hops


def _located(settings: Settings, exc: ConfigError, parameter: str) -> Diagnostic:
    """An error that does not say where: where ``parameter`` is set."""
    where = None if exc.path else settings.location(parameter)
    return Diagnostic("error", str(exc), where)
