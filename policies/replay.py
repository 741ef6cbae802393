"""Replay protection: each signed message is accepted once while it could still be accepted.

A signature is only acceptable while it is younger than the most lenient ``max_age_s``
of the policy, so it need only be remembered until then. Digests are kept in a dict
(digest -> expiry) and indexed by time bucket, so forgetting is a bucket at a time and
memory is bounded by the traffic of one ``max_age_s`` window, capped at ``capacity``.
When the cap is reached new signatures are refused rather than old ones forgotten:
forgetting early would reopen the replay window.
"""

from __future__ import annotations

import heapq
import math

__all__ = ["ReplayCache"]


class ReplayCache:
    """Digests of signed messages already accepted, each kept until it expires."""

    __slots__ = ("_bucket_s", "_buckets", "_expiry", "_heap", "capacity")

    def __init__(self, capacity: int = 100_000, bucket_s: float = 10.0) -> None:
        if capacity < 1 or bucket_s <= 0:
            raise ValueError("capacity must be >= 1 and bucket_s > 0")
        self.capacity = capacity
        self._bucket_s = bucket_s
        self._expiry: dict[bytes, float] = {}
        self._buckets: dict[int, list[bytes]] = {}
        self._heap: list[int] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, digest: bytes, now: float) -> bool:
        """Whether ``digest`` was accepted before and is still remembered at ``now``."""
        expiry = self._expiry.get(digest)
        # inclusive: a signature is still acceptable at exactly timestamp + max_age_s
        return expiry is not None and expiry >= now

    def room(self, now: float) -> int:
        """How many more digests fit at ``now`` (after forgetting expired ones)."""
        self._forget(now)
        return self.capacity - len(self._expiry)

    def add(self, digest: bytes, expires_at: float, now: float) -> bool:
        """Remember ``digest`` until ``expires_at``; False (nothing stored) when full."""
        self._forget(now)
        if expires_at < now:
            return True
        known = self._expiry.get(digest)
        if known is None and len(self._expiry) >= self.capacity:
            return False
        if known is not None and known >= expires_at:
            return True
        self._expiry[digest] = expires_at
        bucket = math.floor(expires_at / self._bucket_s)
        members = self._buckets.get(bucket)
        if members is None:
            self._buckets[bucket] = members = []
            heapq.heappush(self._heap, bucket)
        members.append(digest)
        return True

    def _forget(self, now: float) -> None:
        # a bucket holds expiries in [b * width, (b + 1) * width): all past once its end is
        while self._heap and (self._heap[0] + 1) * self._bucket_s <= now:
            for digest in self._buckets.pop(heapq.heappop(self._heap)):
                expiry = self._expiry.get(digest)
                if expiry is not None and expiry < now:
                    del self._expiry[digest]
