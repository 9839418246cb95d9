"""The screening's configuration: the typed postscreen parameters
(:mod:`smtpgate.config.postscreenconf`) with ``postscreen_dnsbl_sites`` parsed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from smtpgate.config.diagnostics import Diagnostic
from smtpgate.config.postscreenconf import PostscreenSettings, PostscreenValues
from smtpgate.policy.dnsbl import ZoneError
from smtpgate.postscreen.dnsbl import Site, parse_sites


@dataclass(frozen=True)
class PostscreenConfig(PostscreenValues):
    """What the screening reads (see :class:`PostscreenValues`), with the DNS lists."""

    sites: tuple[Site, ...] = ()

    @property
    def dnsbl_enable(self) -> bool:
        return bool(self.sites)


DISABLED = PostscreenConfig()


def postscreen_config(
    values: PostscreenSettings,
) -> tuple[PostscreenConfig | None, list[Diagnostic]]:
    """Parse the DNS list entries; None (and an error naming the line) when one is bad."""
    try:
        sites = parse_sites(values.site_specs)
    except ZoneError as exc:
        message = f"postscreen_dnsbl_sites: {exc}"
        return None, [Diagnostic("error", message, values.sites_location)]
    common = {f.name: getattr(values, f.name) for f in dataclasses.fields(PostscreenValues)}
    return PostscreenConfig(**common, sites=sites), []
