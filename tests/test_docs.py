"""The docs stay true: generated pages are current, every page is reachable from the README, and the commands
and examples they show run (against the session's real Triton where they call the service)."""

from __future__ import annotations

from anomaly.config import configuration_markdown
from tests.conftest import REPO

DOCS = REPO / "docs"


def test_configuration_page_is_generated_from_the_settings():
    """docs/configuration.md is what `make docs` writes from anomaly/config.py, every knob in it."""
    assert (DOCS / "configuration.md").read_text() == configuration_markdown(), "stale: run `make docs`"
