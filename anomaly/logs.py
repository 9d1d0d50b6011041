"""One logging setup for every process the service starts (Triton's steps, export, entrypoint, handler)."""

from __future__ import annotations

import logging
import sys


def setup_logging(quiet: tuple[str, ...] = ()) -> None:
    """INFO to stderr as `LEVEL logger: message`, unless the process already configured logging; the
    `quiet` loggers (chatty libraries) only report errors."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
