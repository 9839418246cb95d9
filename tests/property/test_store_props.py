"""The streaming DATA reader and the message store, on arbitrary input split anywhere.

The reader hands the store complete lines, transparency removed and the false ends of a
bare LF dropped, line by line: for any content and any split of it into reads, the store
holds exactly what the whole-message functions (:func:`unstuff` of
:func:`drop_false_ends`) make of it, the end is found at the same place, and the flags
(NUL, bare LF) say what the functions say of the whole.  The store gives the same bytes
back whether it kept them in memory or spooled them to a file.
"""

from __future__ import annotations

import tempfile

from hypothesis import given
from hypothesis import strategies as st

from smtpgate.smtp.data import END_OF_DATA, DotReader, drop_false_ends, has_bare_lf, unstuff
from smtpgate.smtp.store import Message, MessageStore

PIECES = st.sampled_from(
    [
        b"a",
        b"x y",
        b".",
        b"..",
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\n.",
        b"\n.",
        b".\r\n",
        b"\0",
        b"\r\n\r\n",
    ]
)
CONTENT = st.lists(PIECES, max_size=40).map(b"".join)
CUTS = st.lists(st.integers(min_value=0, max_value=200), max_size=8)


def expected(stream: bytes) -> tuple[bytes, bytes] | None:
    """The content and the rest after the end, as the whole-message functions make it."""
    buffer = b"\r\n" + stream
    end = buffer.find(END_OF_DATA)
    if end < 0:
        return None
    raw = buffer[2 : end + 2]
    return unstuff(drop_false_ends(raw)), buffer[end + len(END_OF_DATA) :]


def spool() -> tempfile._TemporaryFileWrapper[bytes]:
    return tempfile.TemporaryFile()  # type: ignore[return-value]


@given(CONTENT, CUTS, st.sampled_from([0, 3, 1 << 20]))
def test_reader_equals_whole_message_functions(content: bytes, cuts: list[int], bound: int) -> None:
    stream = content + b"\r\n.\r\nQUIT\r\n"
    want = expected(stream)
    assert want is not None
    store = MessageStore(bound, spool)
    reader = DotReader(store)
    rest = None
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if rest is not None or not start <= cut <= len(stream):
            continue
        rest = reader.feed(bytearray(stream[start:cut]))
        start = cut
    assert rest is not None
    rest += stream[start:]
    body, after = want
    assert reader.content() == body
    assert rest == after
    assert store.size == len(body)
    assert store.nul == (b"\0" in body)
    assert store.bare_lf == has_bare_lf(body)
    assert store.spooled == (bound < len(body))
    store.close()


@given(st.lists(CONTENT, max_size=6), st.sampled_from([0, 5, 1 << 20]))
def test_store_gives_back_what_it_took(pieces: list[bytes], bound: int) -> None:
    store = MessageStore(bound, spool)
    for piece in pieces:
        store.append(piece)
    whole = b"".join(pieces)
    assert b"".join(store.chunks(size=7)) == whole
    assert all(len(chunk) <= 7 for chunk in store.chunks(size=7))
    assert b"".join(store.chunks(3)) == whole[3:]
    assert store.bare_lf == has_bare_lf(whole)
    assert store.nul == (b"\0" in whole)
    head = store.head()
    assert whole.startswith(head)
    head_bytes, rest = Message(b"R: x\r\n", store).split_head()
    assert head_bytes + rest.to_bytes() == b"R: x\r\n" + whole
    store.close()
