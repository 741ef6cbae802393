"""Counters and a latency histogram the runtime updates on the hot path.

Plain integers and a fixed-bucket histogram: cheap enough to touch on every frame,
and read by the demo summary now and the admin endpoint's metrics later.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field


def _bounds() -> list[int]:
    # bucket upper bounds in nanoseconds: 1 us to ~60 s, 20 % apart
    out, b = [], 1000.0
    while b < 60e9:
        out.append(int(b))
        b *= 1.2
    return out


_BOUNDS = _bounds()
BOUNDS_NS: tuple[int, ...] = tuple(_BOUNDS)
"""Upper bounds (inclusive, nanoseconds) of the histogram buckets; one more bucket above."""


@dataclass(slots=True)
class Histogram:
    """Counts of durations in logarithmic buckets; percentiles are bucket upper bounds."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS) + 1))
    total: int = 0
    sum_ns: int = 0  # of every recorded duration: a Prometheus histogram's _sum

    def record(self, ns: int) -> None:
        self.counts[bisect_left(_BOUNDS, ns)] += 1
        self.total += 1
        self.sum_ns += ns

    def snapshot(self) -> list[int]:
        return list(self.counts)

    @staticmethod
    def percentile_of(counts: list[int], q: float) -> float | None:
        """The q-quantile (0..1) in seconds of a counts list, or None when empty."""
        n = sum(counts)
        if n == 0:
            return None
        rank = q * n
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            if seen >= rank and c:
                return (_BOUNDS[i] if i < len(_BOUNDS) else _BOUNDS[-1]) / 1e9
        return _BOUNDS[-1] / 1e9


@dataclass(slots=True)
class Stats:
    """What the node has done since it started."""

    frames_up: int = 0  # forwarded station -> backend
    frames_down: int = 0  # forwarded backend -> station
    answers_forwarded: int = 0  # CALLRESULT/CALLERROR that matched a pending CALL
    node_errors: int = 0  # CALLERRORs the node made itself
    dropped: int = 0  # frames dropped (unmatched answers, malformed answers)
    timeouts: int = 0
    stations_connected: int = 0
    stations_rejected: int = 0
    stations_replaced: int = 0
    handshakes_shed: int = 0  # connections answered 503: too many handshakes at once
    auth_limited: int = 0  # upgrades answered 429: too many failed authentications
    residence: Histogram = field(default_factory=Histogram)  # node time per forwarded frame
    # (direction, action) -> frames: CALLs and SENDs by their action, answers by the
    # action of the CALL they answer
    frames_by_action: Counter[tuple[str, str]] = field(default_factory=Counter)
    node_errors_by_code: Counter[str] = field(default_factory=Counter)
