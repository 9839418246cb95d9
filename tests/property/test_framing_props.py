"""The framing fast path: content that ``plain_content`` passes is its own wire form.

The server skips unstuffing, line-end normalisation and restuffing for such content; this
checks, on arbitrary bytes, that the fast path decides only when the slow path would have
changed nothing, and gives the same wire bytes.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from smtpgate.relay import frame_data, plain_content
from smtpgate.smtp.data import unstuff as _unstuff

PIECES = st.sampled_from([b"a", b"x y", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\0"])
CONTENT = st.lists(PIECES, max_size=40).map(b"".join)


def _crlf(content: bytes) -> bytes:
    return re.sub(rb"(?<!\r)\n", b"\r\n", content)


@given(CONTENT)
def test_plain_content_is_its_own_wire_form(content: bytes) -> None:
    slow = frame_data(_crlf(_unstuff(content)))
    if plain_content(content):
        assert _unstuff(content) == content
        assert _crlf(content) == content
        assert frame_data(content, plain=True) == slow
    else:  # something to do: a bare CR or LF, or a line that starts with a dot
        assert (
            content.startswith(b".")
            or b"\n." in content
            or re.search(rb"\r(?!\n)|(?<!\r)\n", content)
        )


def test_plain_content_examples() -> None:
    assert plain_content(b"")
    assert plain_content(b"Subject: x\r\n\r\nbody.\r\n")
    assert not plain_content(b".leading dot\r\n")
    assert not plain_content(b"a\r\n.b\r\n")
    assert not plain_content(b"bare\nlf\r\n")
    assert not plain_content(b"bare\rcr\r\n")
    assert not plain_content(b"\n\r")  # as many CRs as LFs, but no CRLF
