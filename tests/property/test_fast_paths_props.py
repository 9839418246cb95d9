"""The command-line fast paths give what the character loops give.

``smtpd_tokens`` and ``parse_address`` split the usual lines (``MAIL FROM:<a@b>``,
``HELO name``, a plain address) with a regex; anything else goes through Postfix's
character-by-character rules. On arbitrary lines made of the characters that matter,
both ways must agree.
"""

from __future__ import annotations

import re
from unittest import mock

from hypothesis import example, given
from hypothesis import strategies as st

from smtpgate.smtp import syntax as smtpd
from smtpgate.smtp.syntax import _smtpd_tokens, parse_address, smtpd_tokens

PIECES = st.sampled_from(
    ["MAIL", "rcpt", " ", "\t", "  ", "FROM:", "from:", "TO:", "to:", ":", "<", ">", '"', "\\",
     "a", "b@c.d", "@", ",", ";", "(", ")", "SIZE=10", "\x0b", "\x1c", "é", ".", "="]
)  # fmt: skip
LINES = st.lists(PIECES, max_size=12).map("".join)


@given(LINES)
@example("MAIL FROM:<someone@qq.com>")
@example("RCPT TO: <foo@bar.org> NOTIFY=NEVER")
@example("mail from:<>")
@example("HELO client.example")
@example("MAIL FROM:<a@b>SIZE=1")
@example("MAIL FROM:<a b@c>")
def test_tokens_fast_path_equals_the_loop(line: str) -> None:
    assert smtpd_tokens(line) == _smtpd_tokens(line)


@given(LINES, st.booleans())
@example("<someone@qq.com>", False)
@example("<>", True)
@example("<@a,@b:c@d>", False)
@example("<a,b@c>", False)
def test_address_fast_path_equals_the_loop(text: str, allow_empty: bool) -> None:
    fast = parse_address(text, allow_empty=allow_empty)
    # A pattern that finds something in every string: every address takes the loop.
    with mock.patch.object(smtpd, "_ADDRESS_SPECIAL", re.compile("")):
        assert parse_address(text, allow_empty=allow_empty) == fast


def test_the_fast_paths_are_taken() -> None:
    """The usual lines do match the fast patterns (else the fast path is dead code)."""
    assert smtpd._PLAIN_COMMAND.fullmatch("HELO client.example")
    assert smtpd._PLAIN_MAIL_RCPT.fullmatch("MAIL FROM:<someone@qq.com> SIZE=100")
    assert smtpd._ADDRESS_SPECIAL.search("someone@qq.com") is None
