"""Per-source token buckets for a rule's ``rate = { per_source = N, per_s = S }``."""

from __future__ import annotations

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``per_source`` messages per ``per_s`` seconds from each source, with bursts.

    Each source has a bucket of ``per_source`` tokens refilled at ``per_source / per_s``
    per second. At most ``max_sources`` buckets are kept; the least recently used goes
    first (sources are authenticated stations, backends and nodes, so the bound is only
    reached by a deployment larger than it was sized for).
    """

    __slots__ = ("_buckets", "_capacity", "_rate", "max_sources")

    def __init__(self, per_source: int, per_s: float, max_sources: int = 10_000) -> None:
        if per_source < 1 or per_s <= 0 or max_sources < 1:
            raise ValueError("per_source and max_sources must be >= 1, per_s > 0")
        self._capacity = float(per_source)
        self._rate = per_source / per_s
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, as of)

    def __len__(self) -> int:
        return len(self._buckets)

    def tokens(self, source: str, now: float) -> float:
        """How many messages ``source`` may send at ``now`` (fractions count toward the next)."""
        state = self._buckets.get(source)
        if state is None:
            return self._capacity
        tokens, since = state
        return min(self._capacity, tokens + max(0.0, now - since) * self._rate)

    def allow(self, source: str, now: float, *, record: bool = True) -> bool:
        """Whether one more message from ``source`` fits at ``now``; counts it if ``record``."""
        state = self._buckets.get(source)
        if state is None:
            tokens = self._capacity
        else:
            tokens, since = state
            tokens = min(self._capacity, tokens + max(0.0, now - since) * self._rate)
        allowed = tokens >= 1.0
        if record:
            self._buckets.pop(source, None)  # re-inserted last: dict order is recency
            self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_sources:
                del self._buckets[next(iter(self._buckets))]
        return allowed
