"""router/logs.py: JSON lines, secrets redacted, and the buffered handler `run` uses."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from router import logs
from router.logs import log_event


class CountingStream(io.StringIO):
    """A text stream that counts how often it was flushed (each flush a write call)."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def restore_router_logger() -> Iterator[None]:
    root = logging.getLogger("router")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


@pytest.mark.usefixtures("restore_router_logger")
def test_buffered_info_lines_wait_for_flush_warnings_do_not() -> None:
    stream = CountingStream()
    logs.setup("info", stream, buffered=True)
    log = logging.getLogger("router.test")
    for n in range(100):
        log_event(log, logging.INFO, "station_connected", station=f"CS-{n}")
    assert stream.flushes == 0  # a hundred lines, no write call of their own
    log_event(log, logging.WARNING, "fanout_overflow", subscriber="s")
    assert stream.flushes == 1
    logs.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 101 and lines[0]["station"] == "CS-0"
    assert lines[-1]["event"] == "fanout_overflow" and lines[-1]["level"] == "warning"


@pytest.mark.usefixtures("restore_router_logger")
def test_secrets_are_redacted_either_way() -> None:
    for buffered in (False, True):
        stream = CountingStream()
        logs.setup("info", stream, buffered=buffered)
        log_event(logging.getLogger("router.test"), logging.INFO, "dial", password="hunter2",
                  url="ws://x")
        logs.flush()
        line = json.loads(stream.getvalue())
        assert line["password"] == "[redacted]" and line["url"] == "ws://x"


@pytest.mark.usefixtures("restore_router_logger")
def test_a_field_cannot_replace_the_lines_own_time_level_logger_or_event() -> None:
    stream = CountingStream()
    logs.setup("info", stream, buffered=False)
    # log_event's own parameters cannot be fields; a record made by hand shows the rule
    fields = {"ts": "2026-01-01T00:00:00Z", "level": "info", "logger": "x", "event": "forged",
              "rule": "r"}
    logging.getLogger("router.test").warning("policy_reject", extra={"fields": fields})
    line = json.loads(stream.getvalue())
    assert line["ts"].endswith("Z") and line["ts"] != "2026-01-01T00:00:00Z"
    assert len(line["ts"]) == len("2026-11-28T07:00:00.123Z")  # to the millisecond
    assert (line["level"], line["logger"], line["event"]) == ("warning", "router.test",
                                                               "policy_reject")
    assert (line["ts_"], line["level_"], line["logger_"], line["event_"], line["rule"]) == (
        "2026-01-01T00:00:00Z", "info", "x", "forged", "r")
