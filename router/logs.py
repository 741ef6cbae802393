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
_OWN_KEYS = frozenset({"ts", "level", "logger", "event"})  # every line's, set by the formatter


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
                if key in _OWN_KEYS:
                    key += "_"  # the line's own time, level, logger and event stay as they are
                line[key] = _REDACTED if key.lower() in _SECRET_KEYS else value
        else:
            line["event"] = "message"
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class BufferedLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines into the stream's buffer and leaves flushing to :meth:`flush` (called
    a few times a second by the process that owns the stream), except for warnings and
    errors, which go out at once. Info lines (one per station connecting) cost a write
    system call each otherwise: a tenth of a node's CPU in a connect storm."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)


def setup(level: str = "info", stream: TextIO | None = None, *,
          buffered: bool = False) -> None:
    """Send the ``router`` loggers to ``stream`` (stderr) as JSON lines at ``level``.

    ``buffered``: info lines wait in a 64 KiB buffer for :func:`flush` (the caller flushes
    periodically); warnings and errors are written at once.
    """
    if buffered:
        target = stream or open(  # noqa: SIM115  (lives as long as the process)
            sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", closefd=False)
        handler: logging.StreamHandler = BufferedLineHandler(target)  # type: ignore[type-arg]
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger("router")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def flush() -> None:
    """Write out what the ``router`` log handlers hold (a buffered setup's lines)."""
    for handler in logging.getLogger("router").handlers:
        handler.flush()


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one event with structured fields (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})
