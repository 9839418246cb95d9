"""The machine's envelope actions, with an in-memory backend that records what it is given
(the real-socket versions: tests/differential/sessions.py access/*, tests/serve)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from smtpgate.config import parse_settings
from smtpgate.config.service import ServiceConfig
from smtpgate.facts import ClientFacts
from smtpgate.policy.plan import build_plan
from smtpgate.reply import Reply
from smtpgate.smtp.machine import SmtpMachine
from smtpgate.smtp.ports import LocalCounters


class Recorded:
    def __init__(self, backend: RecordingBackend, filter: str | None, hold: bool) -> None:
        self.backend, self.filter, self.hold = backend, filter, hold
        self.recipients: list[tuple[str, list[str]]] = []
        self.message: bytes | None = None
        self.aborted = False

    backend_peer = "recorder"
    outcome_unknown = False

    async def rcpt(self, recipient: str, params: Sequence[str] = ()) -> Reply:
        self.recipients.append((recipient, list(params)))
        return Reply(250, "2.1.5", "Ok")

    def start_data(self) -> None:
        pass

    async def data(self, message: bytes | Iterable[bytes]) -> Reply:
        self.message = message if isinstance(message, bytes) else b"".join(message)
        return Reply(250, "2.0.0", "Ok: queued as R1")

    async def abort(self) -> None:
        self.aborted = True


class RecordingBackend:
    def __init__(self, holds_elsewhere: bool = False) -> None:
        self.transactions: list[Recorded] = []
        self._holds = holds_elsewhere

    async def begin(
        self,
        client: ClientFacts,
        sender: str,
        mail_params: Sequence[str],
        *,
        filter: str | None = None,
        hold: bool = False,
    ) -> Recorded:
        self.transactions.append(Recorded(self, filter, hold))
        return self.transactions[-1]

    def holds_elsewhere(self) -> bool:
        return self._holds


ACCESS = (
    "smtpd_recipient_restrictions = check_recipient_access inline:{ "
    "{r@bar.org=REDIRECT target@bar.org} {b@bar.org=BCC copy@bar.org} "
    "{f@bar.org=FILTER smtp:[127.0.0.1]:10025} {h@bar.org=HOLD} }, permit_mynetworks, "
    "reject_unauth_destination\n"
)


async def _dialogue(tmp_path: Path, rcpts: list[str], backend: RecordingBackend) -> list[bytes]:
    text = (
        "myhostname = mx.example.org\nmynetworks = 127.0.0.1/32\nrelay_domains = bar.org\n"
        "relayhost = [127.0.0.1]:9\nsmtpd_peername_lookup = no\n" + ACCESS
    )
    settings, _ = parse_settings(text, str(tmp_path / "main.cf"), hostname="mx.example.org")
    plan, diagnostics = build_plan(settings, strict_tables=True)
    assert plan is not None, [str(d) for d in diagnostics]
    machine = SmtpMachine(
        plan=plan,
        config=ServiceConfig.from_settings(settings),
        backend=backend,
        anvil=LocalCounters(),
        log=_Log(),
        address="192.0.2.1",
        queue_ids=lambda: "QID",
    )
    out: list[bytes] = []
    await machine.open()
    machine.greet()
    lines = ["EHLO c.example", "MAIL FROM:<s@example.net>", *(f"RCPT TO:<{r}>" for r in rcpts)]
    for line in [*lines, "DATA"]:
        machine.receive(line.encode() + b"\r\n")
        out += [e for e in await machine.advance() if isinstance(e, bytes)]
    machine.receive(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    out += [e for e in await machine.advance() if isinstance(e, bytes)]
    return out


class _Log:
    def info(self, text: str) -> None:
        pass

    def warning(self, text: str) -> None:
        pass


async def test_redirect_replaces_every_recipient_with_the_first_as_orcpt(tmp_path: Path) -> None:
    backend = RecordingBackend()
    out = await _dialogue(tmp_path, ["x@bar.org", "r@bar.org"], backend)
    assert out[-1] == b"250 2.0.0 Ok: queued as R1\r\n"
    first, final = backend.transactions
    assert first.aborted and first.recipients == [("x@bar.org", [])]
    assert final.recipients == [("target@bar.org", ["ORCPT=rfc822;x@bar.org"])]
    assert final.message is not None and b"for <" not in final.message.split(b"\r\n\r\n")[0]


async def test_bcc_adds_a_recipient_in_the_same_transaction(tmp_path: Path) -> None:
    backend = RecordingBackend()
    await _dialogue(tmp_path, ["b@bar.org", "x@bar.org"], backend)
    final = backend.transactions[-1]
    assert [r for r, _ in final.recipients] == ["b@bar.org", "x@bar.org", "copy@bar.org"]
    assert final.message is not None


@pytest.mark.parametrize(("holds_elsewhere", "header"), [(False, True), (True, False)])
async def test_hold_goes_to_the_hold_host_or_gets_the_header(
    tmp_path: Path, holds_elsewhere: bool, header: bool
) -> None:
    backend = RecordingBackend(holds_elsewhere)
    await _dialogue(tmp_path, ["h@bar.org"], backend)
    final = backend.transactions[-1]
    assert final.hold is holds_elsewhere
    assert final.message is not None
    assert final.message.startswith(b"X-Smtpgate-Hold: unknown[192.0.2.1]\r\n") is header


async def test_filter_sends_every_recipient_to_the_filter_hop(tmp_path: Path) -> None:
    backend = RecordingBackend()
    await _dialogue(tmp_path, ["f@bar.org", "x@bar.org"], backend)
    [only] = backend.transactions  # no lock-step RCPT to relayhost once FILTER is known
    assert only.filter == "smtp:[127.0.0.1]:10025"
    assert [r for r, _ in only.recipients] == ["f@bar.org", "x@bar.org"]
