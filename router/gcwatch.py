"""How long the cyclic garbage collector stops the node, by generation.

Every collection stops the whole process: each station's frames wait for it. A full
collection walks every tracked object, and a node holding thousands of stations holds
millions, so its pauses are what a station sees as tail latency. :class:`GcWatch` times
each collection through ``gc.callbacks`` into per-generation histograms (exported as
``ocpp_router_gc_pause_seconds``) and logs the long ones (``gc_pause``, rate-limited).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from router.logs import log_event
from router.stats import Histogram

log = logging.getLogger("router.gc")

#: A pause at least this long is logged (at most one line a second).
LONG_PAUSE_NS = 20_000_000


class GcWatch:
    """Times garbage collections while installed (``with GcWatch() as watch:``)."""

    __slots__ = ("_cpu_started", "_last_log", "_started", "long_pauses", "pauses")

    def __init__(self) -> None:
        self.pauses = [Histogram() for _ in range(3)]  # by generation
        self.long_pauses = 0
        self._started = self._cpu_started = 0
        self._last_log = 0.0

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_: object) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter_ns()
            self._cpu_started = time.thread_time_ns()
            return
        pause = time.perf_counter_ns() - self._started
        generation = info.get("generation", 2)
        self.pauses[generation if 0 <= generation <= 2 else 2].record(pause)
        if pause >= LONG_PAUSE_NS:
            self.long_pauses += 1
            now = time.monotonic()
            if now - self._last_log >= 1.0:
                self._last_log = now
                # cpu_ms: the collector's own work; the rest of ms, time the machine gave
                # to other processes or other guests
                cpu = time.thread_time_ns() - self._cpu_started
                log_event(log, logging.INFO, "gc_pause", generation=generation,
                          ms=round(pause / 1e6, 1), cpu_ms=round(cpu / 1e6, 1),
                          collected=info.get("collected"), long_pauses=self.long_pauses)
