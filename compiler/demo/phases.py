"""The demo's phase lines: each phase's start and its time, in the log and in the results.

A first run takes minutes; "done in N s" per phase (as the compile stages print) shows a user
where they go, and `demo-results.json` keeps the same figures.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class Phases:
    """Timed phases, in the order run: {title: seconds}."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, title: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("demo: %s …", title)
        yield
        took = time.perf_counter() - start
        self.seconds[title] = round(took, 1)
        logger.info("demo: %s done in %.1f s", title, took)
