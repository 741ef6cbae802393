"""Structured log events of one ``router`` logger, collected for unit tests.

``logs.setup()`` may have set ``propagate = False``, which pytest's caplog misses, so the
handler is attached to the logger itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


class Events(logging.Handler):
    """Each record's event name and its ``fields``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((record.getMessage(), dict(getattr(record, "fields", {}))))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


@contextlib.contextmanager
def events_of(logger_name: str) -> Iterator[Events]:
    """Collect the events of ``logger_name`` (at DEBUG) while the block runs."""
    logger = logging.getLogger(logger_name)
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
