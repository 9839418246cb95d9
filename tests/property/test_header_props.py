"""Nothing a client sends reaches a header smtpgate writes unescaped.

On arbitrary text in every client-chosen part (HELO name, recipient, PREPEND text, and
the client name and address for good measure) the PREPEND lines and the Received: header
smtpgate puts above the message have no control byte (below 0x20, DEL, CR, LF) except
the CRLF that ends each line and the TAB that starts each continuation line of the
Received: header, and each line stays where it belongs (no line is added, none is empty).
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtpgate.policy.address import header_safe
from smtpgate.policy.model import ClientInfo
from smtpgate.smtp.data import received_header

# Control characters and Postfix's neuter characters drawn often, any Unicode besides.
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(max_codepoint=0x7F),
        st.sampled_from('\r\n\t\x00\x1b\x7f <>()\\";@'),
        st.characters(),
    ),
    max_size=40,
)
CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@settings(max_examples=300, deadline=None)
@given(
    helo=st.one_of(st.none(), TEXT.filter(bool)),
    name=TEXT,
    address=TEXT,
    recipients=st.lists(TEXT, min_size=1, max_size=2),
    prepend=st.lists(TEXT.map(lambda value: f"X-Tag: {value}"), max_size=2),
)
@example(helo="a\x1bb\x7f.test", name="unknown", address="127.0.0.2", recipients=["a@b"],
         prepend=["X-Helo: a\x1bb\x7f.test\r\nBcc: victim@example.org"])  # fmt: skip
def test_no_control_byte_from_a_client_in_a_header(
    helo: str | None, name: str, address: str, recipients: list[str], prepend: list[str]
) -> None:
    header = received_header(
        prepend=prepend,
        helo=helo,
        client=ClientInfo(address=address, name=name),
        hostname="mx.example.org",
        proto="ESMTP",
        queue_id="4XyZ1234",
        recipients=recipients,
        date="Mon, 1 Jan 2024 00:00:00 +0000",
    )
    assert header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    assert len(lines) == len(prepend) + 3
    received = lines[len(prepend) :]
    assert received[0].startswith(b"Received: from ")
    assert received[1].startswith(b"\tby mx.example.org (smtpgate) with ESMTP id 4XyZ1234")
    assert received[2].startswith(b"\t")
    for line in lines[: len(prepend)] + [received[0]] + [r[1:] for r in received[1:]]:
        assert line and not CONTROL.search(line), line
    # the HELO name is one word without comment or address syntax, as Postfix writes it
    if helo is not None:
        shown = received[0].removeprefix(b"Received: from ").split(b" (", 1)[0]
        assert not re.search(rb'[ <>()\\";@]', shown)


@given(TEXT, st.booleans())
def test_header_safe_keeps_printable_text(text: str, neuter: bool) -> None:
    out = header_safe(text, neuter=neuter)
    assert len(out) == len(text)
    kept = [a == b for a, b in zip(text, out, strict=True)]
    assert all(k or a in "\x7f" or a < " " or (neuter and a in ' <>()\\";@')
               for k, a in zip(kept, text, strict=True))  # fmt: skip
