"""The relay's framing (smtpgate.relay.wire) on arbitrary messages.

The relay is given the message as the client meant it (dots unstuffed, lines ending in
CRLF or a bare LF, lone CRs sent as spaces) and frames it itself. For any such message: the DATA
frame holds exactly one end of data, at its end; unstuffing it gives the message back
with its line ends normalised; the BDAT chunks carry the same normalised message, each
announced with its exact size; canonical content takes the fast path (no copy).
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from smtpgate.relay import bdat_chunks, frame_data
from smtpgate.relay.wire import canonical_lines, data_pieces

PIECES = st.sampled_from(
    [b"a", b"x y", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.", b"\r.\r", b"\0"]
)
MESSAGE = st.lists(PIECES, max_size=40).map(b"".join)


def normalised(message: bytes) -> bytes:
    """The message with every line end CRLF (a bare LF is one; a lone CR is not: it goes
    out as a space, as Postfix 3.7 sends it on)."""
    out = re.sub(rb"\r(?!\n)", b" ", re.sub(rb"(?<!\r)\n", b"\r\n", message))
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


def unstuff(frame: bytes) -> bytes:
    """What an RFC 5321 server stores from a DATA frame: up to the end, dots removed."""
    lines = frame[: -len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@given(MESSAGE)
def test_data_frame_round_trip(message: bytes) -> None:
    frame = frame_data(message)
    assert frame.endswith(b".\r\n")
    assert (b"\r\n" + frame).count(b"\r\n.\r\n") == 1  # the only end of data is the end
    assert re.search(rb"(?<!\r)\n", frame) is None  # no bare LF reaches the backend
    assert unstuff(frame) == normalised(message)


@given(MESSAGE, st.integers(min_value=1, max_value=16))
def test_bdat_chunks_carry_the_normalised_message(message: bytes, size: int) -> None:
    chunks = list(bdat_chunks(message, size))
    assert b"".join(bytes(chunk) for _, chunk in chunks) == normalised(message)
    for i, (line, chunk) in enumerate(chunks):
        last = i == len(chunks) - 1
        assert line == b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"")
        assert len(chunk) <= size


@given(MESSAGE)
def test_canonical_content_is_not_copied(message: bytes) -> None:
    body, end = data_pieces(message)
    canonical = (
        (not message or message.endswith(b"\r\n"))
        and message.count(b"\n") == message.count(b"\r\n") == message.count(b"\r")
        and not message.startswith(b".")
        and b"\n." not in message
    )
    assert (body is message) == canonical
    assert (canonical_lines(message) is message) == (normalised(message) == message)
    assert end == b".\r\n"


SPLITS = st.lists(st.integers(min_value=0, max_value=120), max_size=10)


def split(message: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if c <= len(message)}), len(message)]
    return [message[a:b] for a, b in zip(points, points[1:], strict=False)]


@given(MESSAGE, SPLITS)
def test_data_stream_equals_whole_frame(message: bytes, cuts: list[int]) -> None:
    """Framing the message in pieces, cut anywhere (a dot after a cut, CR | LF), gives
    the frame of the whole message."""
    from smtpgate.relay.wire import data_stream

    pieces = split(message, cuts)
    streamed = b"".join(data_stream(pieces)) + b".\r\n"
    assert streamed == frame_data(message)


@given(MESSAGE, SPLITS, st.integers(min_value=1, max_value=9))
def test_bdat_stream_equals_whole_chunks(message: bytes, cuts: list[int], size: int) -> None:
    from smtpgate.relay.wire import bdat_stream

    streamed = [(line, bytes(chunk)) for line, chunk in bdat_stream(split(message, cuts), size)]
    whole = [(line, bytes(chunk)) for line, chunk in bdat_chunks(message, size)]
    assert streamed == whole
