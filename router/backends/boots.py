"""The latest BootNotification per station, replayed first on a station's link to a
secondary (a standard CSMS expects a station to boot before anything else): bounded in
memory, and written to ``boots.json`` for restarts from a worker thread, never on the
event loop."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import trio

from router.logs import log_event

log = logging.getLogger("router.fanout")

# the boot cache keeps this many stations and characters of identity, subprotocol and
# payload (the least recently booted go first), and rewrites boots.json at most this often
BOOT_CACHE_MAX_STATIONS = 100_000
BOOT_CACHE_MAX_CHARS = 32 * 1024 * 1024
BOOT_FLUSH_EVERY_S = 5.0


class BootCache:
    """The latest BootNotification per station, for the replay that opens a station's link
    to a secondary: kept in memory, bounded, and written to ``boots.json`` (for restarts)
    by :meth:`run` from a worker thread, never on the event loop."""

    def __init__(self, path: Path, *, max_stations: int = BOOT_CACHE_MAX_STATIONS,
                 max_chars: int = BOOT_CACHE_MAX_CHARS,
                 flush_every_s: float = BOOT_FLUSH_EVERY_S) -> None:
        self.path = path
        self.max_stations = max_stations
        self.max_chars = max_chars
        self.flush_every_s = flush_every_s
        # least recently booted first: the order evictions take and boots.json keeps
        self._boots: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._chars = 0
        self._version = 0  # bumped by every change
        self._written = 0  # the version boots.json holds
        self._changed = trio.Event()
        self._write_lock = threading.Lock()  # the periodic flush and close() never overlap
        self._load()

    def _load(self) -> None:
        try:
            size = self.path.stat().st_size
            # a file from before the cache was bounded may be huge: not worth the memory
            if size > 8 * self.max_chars:
                raise ValueError(f"{size} bytes, more than a bounded cache writes")
            found = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(found, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log_event(log, logging.WARNING, "boot_cache_unreadable", path=str(self.path),
                      reason=str(exc))
            return
        for station, entry in found.items():
            if (isinstance(entry, list) and len(entry) == 2
                    and isinstance(entry[0], str) and isinstance(entry[1], str)):
                self._put(station, entry[0], entry[1])
        if len(self._boots) == len(found):
            self._written = self._version
        # else: pruned on the way in, and the file is rewritten pruned at the first flush

    @staticmethod
    def _cost(station: str, entry: tuple[str, str]) -> int:
        return len(station) + len(entry[0]) + len(entry[1])

    def _put(self, station: str, subprotocol: str, payload: str) -> None:
        old = self._boots.pop(station, None)
        if old is not None:
            self._chars -= self._cost(station, old)
        entry = (subprotocol, payload)
        self._boots[station] = entry
        self._chars += self._cost(station, entry)
        while len(self._boots) > self.max_stations or self._chars > self.max_chars:
            evicted, gone = self._boots.popitem(last=False)
            self._chars -= self._cost(evicted, gone)
        self._version += 1

    def remember(self, station: str, subprotocol: str, payload: str) -> None:
        """A station booted: keep its BootNotification (memory only; the primary path)."""
        if self._boots.get(station) == (subprotocol, payload):
            self._boots.move_to_end(station)  # still the latest: evicted last
            return
        self._put(station, subprotocol, payload)
        self._changed.set()

    def get(self, station: str) -> tuple[str, str] | None:
        """The station's latest (subprotocol, payload) or None."""
        return self._boots.get(station)

    def __len__(self) -> int:
        return len(self._boots)

    @property
    def dirty(self) -> bool:
        """Whether memory holds boots that boots.json does not."""
        return self._version != self._written

    def _write(self, entries: list[tuple[str, tuple[str, str]]]) -> None:
        """Replace boots.json atomically (blocking): a crash leaves the old or the new."""
        text = json.dumps({station: [sub, payload] for station, (sub, payload) in entries})
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._write_lock:
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise

    def _save(self, version: int, entries: list[tuple[str, tuple[str, str]]]) -> None:
        try:
            self._write(entries)
        except OSError as exc:  # logged; still dirty, so written again later
            log_event(log, logging.WARNING, "boot_cache_write_failed", path=str(self.path),
                      reason=str(exc))
        else:
            self._written = version

    async def flush(self) -> None:
        """Write what changed, from a worker thread."""
        if self.dirty:
            # a copy taken on the loop: the thread must not iterate a dict the loop changes
            await trio.to_thread.run_sync(self._save, self._version, list(self._boots.items()))

    async def run(self) -> None:
        """Write boots.json soon after a boot changed it, at most every ``flush_every_s``."""
        while True:
            while not self.dirty:
                self._changed = trio.Event()
                await self._changed.wait()
            await self.flush()
            await trio.sleep(self.flush_every_s)

    def close(self) -> None:
        """The last write, blocking: called once the tasks have stopped."""
        if self.dirty:
            self._save(self._version, list(self._boots.items()))
