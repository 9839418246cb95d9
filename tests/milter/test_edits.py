"""End-of-message edits: Postfix's counting of headers, its body replacement, the envelope."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.milter import edits
from smtpgate.milter.protocol import (
    AddHeader,
    AddRcpt,
    ChgFrom,
    ChgHeader,
    DelRcpt,
    InsHeader,
    ReplBody,
)

MESSAGE = (
    b"Received: from a by b\r\n"
    b"Subject: one\r\n"
    b"X-Tag: first\r\n"
    b"  folded\r\n"
    b"x-tag: second\r\n"
    b"\r\n"
    b"body line 1\r\n"
    b"body line 2\r\n"
)


@pytest.mark.parametrize(
    "content",
    [
        MESSAGE,
        b"",
        b"Subject: no body\r\n",
        b"Subject: no line end",
        b"Subject: x\r\n\r\n",
        b"no headers at all\r\n",
        b"Subject: x\r\nnot a header line\r\n",
        b"Subject: bare LF\n\nbody\n",
        b"\tcontinuation first\r\nSubject: x\r\n",
    ],
)
def test_parse_then_render_gives_the_same_bytes(content: bytes) -> None:
    assert edits.parse(content).render() == content


@given(st.binary(max_size=300))
def test_render_is_the_identity_on_anything(content: bytes) -> None:
    assert edits.parse(content).render() == content


def test_parse() -> None:
    message = edits.parse(MESSAGE)
    assert [h.name for h in message.headers] == [b"Received", b"Subject", b"X-Tag", b"x-tag"]
    assert message.separator == b"\r\n"
    assert message.body == b"body line 1\r\nbody line 2\r\n"
    assert edits.parse(b"Subject: x\r\nnot a header\r\n").body == b"not a header\r\n"
    # Postfix's header syntax: blanks may stand before the colon, not inside the label.
    assert edits.header_label_length(b"Subject : x") == 7
    assert edits.header_label_length(b"Sub ject: x") == 0
    assert edits.header_label_length(b": x") == 0
    assert edits.header_label_length(b"S\xe9: x") == 0


def test_the_value_a_milter_receives() -> None:
    headers = edits.parse(MESSAGE).headers
    # One space after the colon goes (Sendmail); folded lines are joined by LF.
    assert headers[2].milter_value() == b"first\n  folded"
    assert headers[2].milter_value(leading_space=True) == b" first\n  folded"
    assert edits.parse(b"X:\tvalue\r\n").headers[0].milter_value() == b"\tvalue"
    assert edits.parse(b"X :  two\r\n").headers[0].milter_value() == b" two"
    assert edits.parse(b"X:\r\n").headers[0].milter_value() == b""


def test_add_header_goes_after_the_last() -> None:
    out = edits.apply(MESSAGE, [AddHeader(b"X-Spam", b"Yes")])
    assert out == MESSAGE.replace(b"second\r\n\r\n", b"second\r\nX-Spam: Yes\r\n\r\n")
    # HDR_LEADSPC: the milter sends its own leading space.
    out = edits.apply(MESSAGE, [AddHeader(b"X-Spam", b" Yes")], leading_space=True)
    assert b"X-Spam: Yes\r\n\r\n" in out
    assert edits.apply(b"Subject: x", [AddHeader(b"X", b"1")]) == b"Subject: x\r\nX: 1\r\n"


def test_insert_header_counts_every_header() -> None:
    first = edits.apply(MESSAGE, [InsHeader(0, b"DKIM-Signature", b"v=1")])
    assert first.startswith(b"DKIM-Signature: v=1\r\nReceived: from a by b\r\n")
    second = edits.apply(MESSAGE, [InsHeader(1, b"X-New", b"2")])
    assert second.startswith(b"Received: from a by b\r\nX-New: 2\r\nSubject: one\r\n")
    # Past the end: appended.
    past = edits.apply(MESSAGE, [InsHeader(99, b"X-New", b"3")])
    assert past == edits.apply(MESSAGE, [AddHeader(b"X-New", b"3")])
    # Our own Received: counts for insertions, hidden or not (Sendmail compatibility).
    hidden = edits.apply(MESSAGE, [InsHeader(0, b"X-New", b"4")], hidden=1)
    assert hidden.startswith(b"X-New: 4\r\nReceived:")


def test_change_header_counts_by_name_case_insensitively() -> None:
    out = edits.apply(MESSAGE, [ChgHeader(2, b"X-TAG", b"changed")])
    assert b"X-Tag: first\r\n  folded\r\nX-TAG: changed\r\n\r\n" in out
    out = edits.apply(MESSAGE, [ChgHeader(1, b"x-tag", b"new\n\tfold")])
    assert b"Subject: one\r\nx-tag: new\r\n\tfold\r\nx-tag: second\r\n" in out
    # Index 0 is index 1 (Sendmail 8 compatibility).
    assert edits.apply(MESSAGE, [ChgHeader(0, b"Subject", b"two")]) == edits.apply(
        MESSAGE, [ChgHeader(1, b"Subject", b"two")]
    )
    # Not there: appended (Postfix cleanup_upd_header).
    out = edits.apply(MESSAGE, [ChgHeader(3, b"X-Tag", b"third")])
    assert out.endswith(b"x-tag: second\r\nX-Tag: third\r\n\r\nbody line 1\r\nbody line 2\r\n")


def test_a_hidden_header_is_not_counted_for_changes() -> None:
    # smtpgate's own Received: is hidden; the milter's Received #1 is the client's.
    content = b"Received: ours\r\nReceived: theirs\r\n\r\nb\r\n"
    out = edits.apply(content, [ChgHeader(1, b"Received", b"changed")], hidden=1)
    assert out == b"Received: ours\r\nReceived: changed\r\n\r\nb\r\n"
    out = edits.apply(content, [ChgHeader(1, b"Received", b"")], hidden=1)
    assert out == b"Received: ours\r\n\r\nb\r\n"
    message = edits.parse(content, hidden=1)
    assert [h.raw for h in message.visible_headers()] == [b"Received: theirs\r\n"]


def test_delete_header() -> None:
    out = edits.apply(MESSAGE, [ChgHeader(1, b"X-Tag", b"")])
    assert b"folded" not in out and b"x-tag: second\r\n" in out
    # Not there: nothing happens.
    assert edits.apply(MESSAGE, [ChgHeader(5, b"X-Tag", b"")]) == MESSAGE
    assert edits.apply(MESSAGE, [ChgHeader(1, b"Nope", b"")]) == MESSAGE


def test_a_value_cannot_end_the_headers() -> None:
    out = edits.apply(MESSAGE, [AddHeader(b"X-Bad", b"a\r\n\r\nInjected: b\nc")])
    assert b"X-Bad: a\r\n\tInjected: b\r\n\tc\r\n\r\nbody line 1" in out
    assert edits.valid_header_name(b"X-Good")
    for bad in (b"", b"X Bad", b"X:Bad", b"X\r\nY", b"\xc3\xa9"):
        assert not edits.valid_header_name(bad)


def test_replace_body_as_postfix_stores_it() -> None:
    out = edits.apply(MESSAGE, [ReplBody(b"new 1\r\nnew"), ReplBody(b" 2\nlast")])
    assert out.endswith(b"x-tag: second\r\n\r\nnew 1\r\nnew 2\r\nlast\r\n")
    assert edits.apply(MESSAGE, [ReplBody(b"")]).endswith(b"second\r\n\r\n")
    assert edits.apply(b"Subject: x", [ReplBody(b"b\r\n")]) == b"Subject: x\r\n\r\nb\r\n"
    # A CR that is not before LF stays.
    assert edits.apply(b"S: x\r\n\r\n", [ReplBody(b"a\rb\r\n")]) == b"S: x\r\n\r\na\rb\r\n"


def test_the_body_a_milter_receives_ends_with_a_line_end() -> None:
    assert edits.parse(b"S: x\r\n\r\nno end").milter_body() == b"no end\r\n"
    assert edits.parse(b"S: x\r\n\r\n").milter_body() == b""
    assert edits.parse(MESSAGE).milter_body() == b"body line 1\r\nbody line 2\r\n"


def test_envelope_edits_in_order() -> None:
    warnings: list[str] = []
    envelope = edits.EnvelopeEdits()
    envelope.apply(ChgFrom("<new@x>", "RET=HDRS SIZE=5 ENVID=abc"), warnings.append, "QID")
    envelope.apply(AddRcpt("<one@x>"), warnings.append, "QID")
    envelope.apply(
        AddRcpt("Two <two@x>", "NOTIFY=NEVER ORCPT=rfc822;two@x BODY=8BITMIME", True),
        warnings.append,
        "QID",
    )
    envelope.apply(DelRcpt("<one@x>"), warnings.append, "QID")
    envelope.apply(DelRcpt("old@x"), warnings.append, "QID")
    envelope.apply(AddRcpt("<old@x>"), warnings.append, "QID")
    envelope.apply(AddRcpt("<>"), warnings.append, "QID")
    assert envelope.sender == ("new@x", ("RET=HDRS", "ENVID=abc"))
    assert envelope.add_recipients == [
        ("two@x", ("NOTIFY=NEVER", "ORCPT=rfc822;two@x")),
        ("old@x", ()),
    ]
    assert envelope.delete_recipients == ["one@x", "old@x"]
    assert warnings == [
        'Ignoring bad ESMTP parameter "SIZE=5" in SMFI_CHGFROM request',
        'QID: ignoring ESMTP argument from Milter or header/body_checks: "BODY=8BITMIME"',
        "QID: ignoring attempt from Milter to add null recipient",
    ]


def test_external_address() -> None:
    assert edits.external_address(" <a@b> ") == "a@b"
    assert edits.external_address("Name <a@b>") == "a@b"
    assert edits.external_address("a@b") == "a@b"
    assert edits.external_address("<>") == ""
