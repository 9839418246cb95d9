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


def test_prometheus_client_histogram_keeps_one_value_per_bucket() -> None:
    # smtpgate.metrics flushes histogram observations kept in memory by adding to these
    from prometheus_client import Histogram

    child = Histogram("contract_seconds", "x", ["a"], registry=None, buckets=(1.0, 2.0)).labels("b")
    child._buckets[1].inc(3)
    child._sum.inc(4.5)
    samples = {(s.name, s.labels.get("le")): s.value for s in child._samples()}
    assert samples[("_bucket", "1.0")] == 0 and samples[("_bucket", "2.0")] == 3
    assert samples[("_bucket", "+Inf")] == 3 and samples[("_sum", None)] == 4.5


def test_smtpgate_itself_imports_neither_aiosmtplib_nor_aiosmtpd_in_the_front_end() -> None:
    import smtpgate.relay.client as client
    import smtpgate.smtpd as smtpd

    for module in (smtpd, client):
        source = inspect.getsource(module)
        assert "import aiosmtplib" not in source and "from aiosmtplib" not in source
        assert "from aiosmtpd" not in source and "import aiosmtpd" not in source
