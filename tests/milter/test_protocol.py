"""The milter codec: packets byte for byte, replies decoded, bad bytes refused (never a crash)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import MilterProtocolError
from smtpgate.milter import protocol as p
from tests.milter import fakemilter as f


def test_optneg_is_what_postfix_sends() -> None:
    # Postfix 3.7, milter_protocol = 6: version 6, every action, every v6 event flag.
    assert p.optneg(6, p.MTA_ACTIONS, p.PROTOCOL_EVENT_MASKS[6]) == (
        b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff"
    )
    assert p.PROTOCOL_EVENT_MASKS[2] == 0x7F
    assert p.PROTOCOL_EVENT_MASKS[4] == 0x37F


def test_commands() -> None:
    assert p.macro(b"C", [("j", "mx"), ("{daemon_name}", "x")]) == (
        struct.pack("!I", 23) + b"DCj\0mx\0{daemon_name}\0x\0"
    )
    assert p.macro(b"T", []) == b"\x00\x00\x00\x02DT"
    assert p.connect("mail.example", p.SMFIA_INET, 2525, "192.0.2.1") == (
        struct.pack("!I", 27) + b"Cmail.example\0" + b"4" + b"\x09\xdd" + b"192.0.2.1\0"
    )
    assert p.connect("localhost", p.SMFIA_UNKNOWN, 25, "x") == b"\x00\x00\x00\x0cClocalhost\0U"
    assert p.helo("c.example") == b"\x00\x00\x00\x0bHc.example\0"
    assert p.mail(["<a@b>", "SIZE=10"]) == b"\x00\x00\x00\x0fM<a@b>\0SIZE=10\0"
    assert p.rcpt(["<c@d>"]) == b"\x00\x00\x00\x07R<c@d>\0"
    assert p.data() == b"\x00\x00\x00\x01T"
    assert p.header(b"Subject", b"hi\n\tthere") == b"\x00\x00\x00\x13LSubject\0hi\n\tthere\0"
    assert p.eoh() == b"\x00\x00\x00\x01N"
    assert p.body(b"line\r\n") == b"\x00\x00\x00\x07Bline\r\n"
    assert p.bodyeob() == b"\x00\x00\x00\x01E"
    assert p.abort() == b"\x00\x00\x00\x01A"
    assert p.quit() == b"\x00\x00\x00\x01Q"
    assert p.quit_nc() == b"\x00\x00\x00\x01K"
    assert p.unknown("XYZZY") == b"\x00\x00\x00\x07UXYZZY\0"


def test_a_nul_inside_a_string_cannot_be_framed() -> None:
    assert p.helo("a\0b") == b"\x00\x00\x00\x05Ha?b\0"


def test_text_is_utf8_and_undecodable_bytes_go_back_as_they_came() -> None:
    assert p.helo("é") == b"\x00\x00\x00\x04H\xc3\xa9\0"
    assert p.helo(b"\xff".decode("utf-8", "surrogateescape")) == b"\x00\x00\x00\x03H\xff\0"
    assert p.helo("\ud800") == b"\x00\x00\x00\x03H?\0"


def decode_all(data: bytes) -> list[p.MilterReply]:
    decoder = p.Decoder()
    decoder.feed(data)
    out = []
    while (reply := decoder.next()) is not None:
        out.append(reply)
    assert decoder.buffered == 0
    return out


def test_every_reply() -> None:
    data = b"".join(
        [
            f.CONTINUE,
            f.ACCEPT,
            f.REJECT,
            f.TEMPFAIL,
            f.DISCARD,
            f.PROGRESS,
            f.SKIP,
            f.SHUTDOWN,
            f.replycode("550 5.7.1 no"),
            f.quarantine("why"),
            f.addheader("X-A", "1"),
            f.insheader(0, "X-B", "2"),
            f.chgheader(2, "X-C", ""),
            f.replbody(b"new\r\n"),
            f.addrcpt("<r@x>"),
            f.addrcpt("<r@x>", "NOTIFY=NEVER"),
            f.delrcpt("<d@x>"),
            f.chgfrom("<s@x>"),
            f.chgfrom("<s@x>", "RET=HDRS"),
            f.reply(b"f"),
            f.reply(b"Z", b"abc"),
        ]
    )
    assert decode_all(data) == [
        p.Continue(),
        p.Accept(),
        p.Reject(),
        p.Tempfail(),
        p.Discard(),
        p.Progress(),
        p.Skip(),
        p.Shutdown(),
        p.ReplyCode("550 5.7.1 no"),
        p.Quarantine("why"),
        p.AddHeader(b"X-A", b"1"),
        p.InsHeader(0, b"X-B", b"2"),
        p.ChgHeader(2, b"X-C", b""),
        p.ReplBody(b"new\r\n"),
        p.AddRcpt("<r@x>"),
        p.AddRcpt("<r@x>", "NOTIFY=NEVER", with_args=True),
        p.DelRcpt("<d@x>"),
        p.ChgFrom("<s@x>"),
        p.ChgFrom("<s@x>", "RET=HDRS"),
        p.Unknown(b"f", 0),
        p.Unknown(b"Z", 3),
    ]
    assert p.Unknown(b"f", 0).name == "SMFIR_CONN_FAIL"
    assert p.Unknown(b"Z", 3).name == "(unknown filter reply)"


def test_optneg_reply_with_macro_lists() -> None:
    data = struct.pack("!III", 6, 0x1FF, 0x100000)
    data += struct.pack("!I", p.SMFIM_ENVFROM) + b"{auth_authen} {mail_addr}\0"
    data += struct.pack("!I", 9) + b"x\0"
    (reply,) = decode_all(p.packet(b"O", data))
    assert reply == p.OptNeg(6, 0x1FF, 0x100000, {2: "{auth_authen} {mail_addr}"}, (9,))


def test_one_byte_at_a_time() -> None:
    data = f.addheader("X-Spam", "Yes") + f.CONTINUE
    decoder = p.Decoder()
    out = []
    for byte in data:
        decoder.feed(bytes([byte]))
        while (reply := decoder.next()) is not None:
            out.append(reply)
    assert out == [p.AddHeader(b"X-Spam", b"Yes"), p.Continue()]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x00\x00", "bad packet length: 0"),
        (b"\x7f\xff\xff\xff", f"unreasonable packet length: 2147483647 > {p.MAX_PACKET}"),
        (b"\x00\x00\x00\x02cx", "reply SMFIR_CONTINUE was followed by 1 data bytes"),
        (f.reply(b"h", b"X-A\0no-nul"), "missing string null terminator"),
        (f.reply(b"h", b"X-A\0"), "packet too short for string"),
        (f.reply(b"m", b"\0\0"), "input packet too short for network long"),
        (f.reply(b"-", b"a\0b\0"), "left-over data 2 bytes"),
    ],
)
def test_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(MilterProtocolError) as caught:
        decode_all(data)
    assert str(caught.value) == message


@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    decoder = p.Decoder(max_packet=1 << 16)
    decoder.feed(data)
    try:
        while decoder.next() is not None:
            pass
    except MilterProtocolError:
        pass
