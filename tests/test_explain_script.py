"""``explain --script``: a typed dialogue becomes the writes a client makes."""

from __future__ import annotations

from smtpgate.smtp.explain import script_writes


def test_one_write_per_command_and_the_message_as_one() -> None:
    text = "EHLO a.example\nMAIL FROM:<s@x.org>\nRCPT TO:<r@bar.org>\n"
    text += "DATA\nSubject: x\n\nhi\n.\nQUIT\n"
    assert script_writes(text) == [
        b"EHLO a.example\r\n",
        b"MAIL FROM:<s@x.org>\r\n",
        b"RCPT TO:<r@bar.org>\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\nhi\r\n.\r\n",
        b"QUIT\r\n",
    ]


def test_a_message_without_its_dot_is_sent_as_it_is() -> None:
    assert script_writes("DATA\nSubject: x\n") == [b"DATA\r\n", b"Subject: x\r\n"]
