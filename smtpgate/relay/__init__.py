"""Relay accepted mail to the backend MTA in lock-step: the client's 250 is the backend's 250.

The package, by concern (each module's docstring is its theory of operation):

- :mod:`.transaction` -- :class:`Relay` (one connection pool per next hop; ``begin``) and
  the lock-step :class:`Transaction`: MAIL at the first RCPT, pipelined XFORWARD/MAIL/RCPT,
  DATA sent early, the message with DATA or BDAT, abort; every doubt a 451.
- :mod:`.pool` -- :class:`Pool`: backend connections of one next hop, opened (MX lookup,
  greeting, EHLO, STARTTLS), checked out, checked in, reused with RSET, dropped on doubt.
- :mod:`.client` -- one SMTP client connection on a plain asyncio protocol: replies read
  in order, so a pipelined group's replies are judged one by one.
- :mod:`.wire` -- pure framing: the message after DATA (CRLF, dot-stuffing, the end) or
  in BDAT chunks, XFORWARD/xtext, :func:`quote_local`, backend reply to :class:`Reply`.
- :mod:`.tls` -- ``smtp_tls_security_level``, contexts, :func:`load_cert_files`, names.

The configuration comes typed from :mod:`smtpgate.config.relayconf`
(:class:`RelayConfig`, :func:`relay_config`); next hops are :class:`Relayhost` values.
"""

from smtpgate.config.relayconf import (
    RelayConfig,
    Relayhost,
    parse_filter_destination,
    parse_relayhost,
    relay_config,
)
from smtpgate.errors import FilterDestinationError, RelayError
from smtpgate.facts import ClientFacts
from smtpgate.policy.address import quote_822_local as quote_local
from smtpgate.relay.pool import Pool
from smtpgate.relay.tls import TLSPolicy, load_cert_files, peer_name_matches, tls_policy
from smtpgate.relay.transaction import R451_PROXY, Relay, Transaction
from smtpgate.relay.wire import (
    bdat_chunks,
    frame_data,
    xforward_commands,
)
from smtpgate.smtp.syntax import xtext

__all__ = [
    "R451_PROXY",
    "ClientFacts",
    "FilterDestinationError",
    "Pool",
    "Relay",
    "RelayConfig",
    "RelayError",
    "Relayhost",
    "TLSPolicy",
    "Transaction",
    "bdat_chunks",
    "frame_data",
    "load_cert_files",
    "parse_filter_destination",
    "parse_relayhost",
    "peer_name_matches",
    "quote_local",
    "relay_config",
    "tls_policy",
    "xforward_commands",
    "xtext",
]
