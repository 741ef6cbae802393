"""Small helpers shared by the benchmark processes (no third-party imports)."""

from __future__ import annotations

import gc
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def raise_nofile_limit(wanted: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit).

    Children inherit the limit, so the orchestrator calling this covers the node too.
    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def emit(event: str, **fields: Any) -> None:
    """Write one JSON line on stdout (the control channel to the orchestrator)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def stop_process(proc: subprocess.Popen[Any], wait_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``wait_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_results(results: object, name: str, path: str | None) -> Path:
    """Write a run's figures as JSON to ``path``, or to bench/results/<name>-<time>.json;
    says where on stderr."""
    out = Path(path) if path else (Path(__file__).resolve().parent / "results"
                                   / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written to {out}", file=sys.stderr)
    return out


class GcPauses:
    """Collector passes of this process that took at least ``min_ms`` of wall time: a
    bench helper's own pauses stall every station it serves, in both scenarios alike, so
    they are reported beside the figures they may have shaped."""

    def __init__(self, min_ms: float = 20.0,
                 on_pause: Callable[[int, float], None] | None = None) -> None:
        self.min_ms = min_ms
        self.pauses: list[tuple[int, float]] = []  # (generation, ms)
        self._started = 0.0
        self.on_pause = on_pause  # told of each long pause as it ends
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1e3
        if ms >= self.min_ms:
            self.pauses.append((info["generation"], round(ms, 1)))
            if self.on_pause is not None:
                self.on_pause(info["generation"], ms)

    def take(self) -> list[tuple[int, float]]:
        """The pauses since the last call."""
        pauses, self.pauses = self.pauses, []
        return pauses
