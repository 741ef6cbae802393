"""The cyclic garbage collector and the node: its pauses timed, long-lived objects kept out
of its way.

Every collection stops the whole process: each station's frames wait for it. A station
session holds some fifty objects the collector tracks (its tasks' coroutines, cancel
scopes, sets), alive for as long as the station stays. When thousands of stations connect
within seconds, hundreds of thousands of such objects pile up in the young generations;
and when old sessions end, their freed objects count against the young generation's
allocation count, so the next young collection can find 200,000 objects to walk and stop
the node for 100-450 ms (bench/fleet.py, 9,000 stations, 2026-11-27).

:class:`GcWatch` times each collection through ``gc.callbacks`` into per-generation
histograms (``ocpp_router_gc_pause_seconds``) and logs the long ones (``gc_pause``).
:class:`GcHousekeeper` freezes (``gc.freeze()``) what the sessions that arrived in the last
second allocated, so the collector never walks long-lived session objects; and, because a
frozen object that becomes cyclic garbage is only freed once unfrozen, it sweeps (unfreeze,
one full collection, freeze) once enough sessions have come and gone, preferably while the
population is quiet. In a burst of sessions coming and going it holds automatic
collections off altogether (:meth:`GcHousekeeper.step`).
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


class GcHousekeeper:
    """Keeps the young generations small by freezing survivors, sweeps after churn.

    :meth:`tick` runs about once a second and freezes what survived the young
    collections of that second, so no collection ever walks more than a second's
    survivors: neither the objects of sessions
    that arrived, nor the long-lived objects a running session replaces now and then
    (a replaced object frees an old one, which lowers the young generation's allocation
    count, so without this its list grows unseen until one collection walks it all).
    Frozen objects are still freed by reference counting; only those that end up in a
    reference cycle wait for a sweep (unfreeze, one full collection, freeze). A sweep is
    due once enough sessions have ended, or ``max_wait_s`` after the last one (cycles
    also come from traffic: a quiet node's young collections are rare, so most of its
    young cycles get frozen); it runs while the population is quiet, or ``max_delay_s``
    after it became due: under steady churn (stations leaving and dialling again all day)
    the population is never quiet.

    A sweep stops the node (about 0.5 s at 2,000 stations, 1.7 s at 9,000), and ended
    sessions no longer leave cycles behind (router/net/wslink.break_cycles): a sweep that
    finds fewer than ``fruitless`` objects doubles the departures and the time the next one
    waits for, up to ``max_backoff`` times; one that finds more starts over. So a node
    that makes no cycles is rarely stopped, and one that makes them is swept as before
    (bench/soak.py: 30 minutes of churn, sweeps finding 0 objects). Sans clock: ``now``
    is an argument.
    """

    __slots__ = ("_arrivals", "_backoff", "_changed_at", "_departures", "_held", "_last_sweep",
                 "_population", "_steps", "_steps_at_tick", "_sweep_due_since",
                 "busy_steps", "fruitless", "held_seconds", "max_backoff", "max_delay_s",
                 "max_wait_s", "quiet_s", "sweep_fraction", "sweep_min", "sweeps")

    def __init__(self, *, sweep_min: int = 1000, sweep_fraction: float = 0.5,
                 quiet_s: float = 30.0, max_wait_s: float = 3600.0,
                 max_delay_s: float = 300.0, fruitless: int = 1000,
                 max_backoff: int = 16, busy_steps: int = 100) -> None:
        self.sweep_min = sweep_min
        self.busy_steps = busy_steps
        self._steps = self._steps_at_tick = 0  # session steps (see :meth:`step`)
        self._held = False  # automatic collections held off for a burst
        self.held_seconds = 0  # ticks that found them held
        self.sweep_fraction = sweep_fraction
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self.max_delay_s = max_delay_s
        self.fruitless = fruitless
        self.max_backoff = max_backoff
        self._backoff = 1  # doubled by each sweep that found (almost) nothing
        self.sweeps = 0
        self._arrivals = 0
        self._population = 0
        self._departures = 0  # sessions ended since the last sweep
        self._changed_at = 0.0
        self._last_sweep: float | None = None  # the first tick counts as one
        self._sweep_due_since: float | None = None

    def tick(self, now: float, arrivals: int, population: int) -> str:
        """One look: ``arrivals`` is the number of sessions ever started, ``population``
        the number running; returns ``"freeze"`` or ``"sweep"``."""
        new = arrivals - self._arrivals
        # sessions that ended since the last tick: the running count fell short of arrivals
        ended = max(0, self._population + new - population)
        self._arrivals, self._population = arrivals, population
        # the burst is over: collections resume after this tick's freeze (which also
        # zeroes the allocation count, so none starts at once over a burst's objects)
        resume = self._held and self._steps - self._steps_at_tick < self.busy_steps
        if self._held:
            self.held_seconds += 1
        self._steps_at_tick = self._steps
        if new or ended:
            self._changed_at = now
        self._departures += ended
        if self._last_sweep is None:
            self._last_sweep = now
        backoff = self._backoff
        due = (self._departures >= backoff * max(self.sweep_min, self.sweep_fraction * population)
               or now - self._last_sweep >= backoff * self.max_wait_s)
        if due:
            if self._sweep_due_since is None:
                self._sweep_due_since = now
            if (now - self._changed_at >= self.quiet_s
                    or now - self._sweep_due_since >= self.max_delay_s):
                self._sweep(now - self._changed_at)
                self._last_sweep = now
                self._resume(resume)
                return "sweep"
        # the young survivors out of every later collection's walk; young garbage cycles
        # were (mostly) collected by the threshold collections of the last second
        gc.freeze()
        self._resume(resume)
        return "freeze"

    def _resume(self, resume: bool) -> None:
        if resume:
            self._held = False
            gc.enable()
            log_event(log, logging.INFO, "gc_resumed", held_s=self.held_seconds)

    def step(self) -> None:
        """A session started, one of its links ended, or it ended. At ``busy_steps`` such
        steps within a tick, automatic collections are held off until a tick finds the
        burst over.

        When thousands of sessions end at once (a carrier outage, the closing half of a
        reconnect storm), their freed objects lower the young generation's allocation
        count while their wind-downs allocate live ones: the young list grew to 100,000
        objects between two collections, and each walk of it stopped the node for
        40-160 ms, finding nothing (bench/fleet.py, 4,000 stations, 2026-11-28). What is
        young in a burst is the sessions' live state: the tick freezes it, and the rare
        cycle among it waits for the sweep the departures make due.
        """
        self._steps += 1
        if not self._held and self._steps - self._steps_at_tick >= self.busy_steps:
            self._held = True
            self.held_seconds = 0
            gc.disable()
            log_event(log, logging.INFO, "gc_held", steps=self.busy_steps)

    def __enter__(self) -> GcHousekeeper:
        return self

    def __exit__(self, *_: object) -> None:
        if self._held:
            self._held = False
            gc.enable()

    def _sweep(self, quiet_for: float) -> None:
        started = time.perf_counter_ns()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.sweeps += 1
        self._backoff = (min(self._backoff * 2, self.max_backoff)
                         if collected < self.fruitless else 1)
        log_event(log, logging.INFO, "gc_sweep",
                  ms=round((time.perf_counter_ns() - started) / 1e6, 1), collected=collected,
                  sessions_ended=self._departures, quiet_s=round(quiet_for, 1),
                  sweeps=self.sweeps, next_after=self._backoff)
        self._departures = 0
        self._sweep_due_since = None
