"""Structured logs: one JSON object per line on stderr, secrets never written.

Call sites log an *event* name plus fields: ``log_event(logger, INFO, "station_connected",
station="CS-1")``. Field names that look like secrets are redacted on the way out, so a
careless call site cannot leak a password or an Authorization header.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_SECRET_KEYS = frozenset({"password", "authorization", "password_hash", "secret", "token"})
_REDACTED = "[redacted]"


class JsonLineFormatter(logging.Formatter):
    """Formats a record as a JSON line with ``ts``, ``level``, ``logger``, ``event``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line["event"] = record.getMessage()
            for key, value in fields.items():
                line[key] = _REDACTED if key.lower() in _SECRET_KEYS else value
        else:
            line["event"] = "message"
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    """Send the ``router`` loggers to ``stream`` (stderr) as JSON lines at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger("router")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one event with structured fields (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})
