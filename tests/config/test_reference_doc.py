"""docs/configuration.md is generated from the parameter table and must not drift."""

from pathlib import Path

from smtpgate.config import PARAMETERS
from smtpgate.config.reference import render_reference

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_committed_reference_matches_the_code():
    assert DOC.read_text() == render_reference(), "run `make docs` and commit the result"


def test_every_parameter_is_documented():
    text = DOC.read_text()
    missing = [name for name in PARAMETERS if f"| `{name}` |" not in text]
    assert missing == []
