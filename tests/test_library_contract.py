"""The private names of libraries that smtpgate's code or tests rely on still exist.

docs/architecture.md ("Private names of libraries we rely on") lists them; an upgrade that
removes one fails here, by name, instead of somewhere deep in a test backend.
"""

from __future__ import annotations

import inspect

from aiosmtpd.smtp import SMTP


def test_aiosmtpd_names_used_by_the_test_backend() -> None:
    assert inspect.iscoroutinefunction(SMTP._handle_client)
    assert callable(SMTP._set_rset_state)
    assert isinstance(SMTP.line_length_limit, int)  # documented; the sink sets it


def test_aiosmtpd_keeps_its_stream_reader_as_reader() -> None:
    # set by SMTP._cb_client_connected; the test backend reads DATA content from it
    assert "self._reader = reader" in inspect.getsource(SMTP._cb_client_connected)


def test_smtpgate_itself_imports_neither_aiosmtplib_nor_aiosmtpd_in_the_front_end() -> None:
    import smtpgate.relay.client as client
    import smtpgate.smtpd as smtpd

    for module in (smtpd, client):
        source = inspect.getsource(module)
        assert "import aiosmtplib" not in source and "from aiosmtplib" not in source
        assert "from aiosmtpd" not in source and "import aiosmtpd" not in source
