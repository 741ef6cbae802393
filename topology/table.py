"""The route table: candidate routes per destination and the choice of the best one.

A path-vector table. Each peer contributes at most one route per destination (its own
best, as it announced it); the node's own destinations are local routes with peer ``""``.
The table knows nothing about links, messages or clocks: times are passed in as numbers
and the only randomness is the injected ``random.Random``.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from topology.bounds import (
    DEFAULT_MAX_ROUTES,
    DEFAULT_MAX_ROUTES_PER_PEER,
    MAX_ID_LENGTH,
    MAX_PATH_LENGTH,
    MAX_PRIORITY,
    MAX_SEQUENCE,
    MAX_SEQUENCE_JUMP,
    MAX_WEIGHT,
)
from topology.feed import ChangeFeed

LOCAL = ""
"""The ``peer`` of a route this node originates itself."""

DEFAULT_MAX_PATH_LENGTH = MAX_PATH_LENGTH


@dataclass(frozen=True, slots=True)
class Route:
    """One way to reach ``destination``: through ``peer`` along ``path`` (origin first).

    ``path`` runs from the origin to the neighbour the route was learned from, so its last
    element is ``peer``; local routes have ``peer == ""`` and an empty path.
    ``signatures`` are the origin's signatures over its claim, carried so the route can be
    re-announced verifiably; they take no part in equality. ``verified``: the session
    checked one of them against a trusted key of the origin; only verified claims are
    compared by sequence number across peers (see :meth:`RouteTable.learn`).
    """

    destination: str
    peer: str
    path: tuple[str, ...]
    distance: int
    priority: int
    weight: int
    origin: str
    sequence: int
    expires_at: float
    timeout: float | None = None
    signatures: tuple[Mapping[str, Any], ...] = field(default=(), compare=False)
    verified: bool = False

    @property
    def is_local(self) -> bool:
        """True for a destination this node originates itself."""
        return self.peer == LOCAL


class Verdict(enum.Enum):
    """What :meth:`RouteTable.learn` did with an announcement; true only for ``LEARNED``.

    The value says why, for a log line. ``LOOP`` and ``STALE`` are ordinary in a
    path-vector protocol; the others mean the peer sent something no honest node sends
    (or that this node will not hold), and the session reports them.
    """

    LEARNED = "learned"
    INVALID = ("invalid: its path does not run from the origin to the peer or repeats a "
               "node, or a field is out of bounds")
    LOOP = "its path passes this node or is too long"
    STALE = "an older verified claim than one held for the same origin"
    OWN_ORIGIN = "it claims this node as its origin"
    OWN_DESTINATION = "it is a route to this node's own id"
    SEQUENCE_JUMP = "its unsigned sequence number jumps too far past the peer's last claim"
    PEER_CAP = "the per-peer route cap is reached"
    TABLE_CAP = "the table's route cap is reached"

    def __bool__(self) -> bool:
        return self is _LEARNED


# Looking up an enum member costs as much as a dict insert on Python 3.11; learn() runs
# once per route of a full sync.
_LEARNED = Verdict.LEARNED


@dataclass(slots=True)
class TableStats:
    """Counters an operator reads to see what the table refused and why.

    ``refused_cap`` counts refusals by either cap, ``refused_table_cap`` those by the
    table-wide one; ``refused_by_peer`` counts cap refusals per peer.
    """

    learned: int = 0
    rejected_invalid: int = 0
    rejected_loop: int = 0
    ignored_stale: int = 0
    refused_cap: int = 0
    expired: int = 0
    refused_by_peer: dict[str, int] = field(default_factory=dict)
    refused_table_cap: int = 0
    refused_sequence_jump: int = 0
    rejected_own: int = 0


def weighted_choice(routes: Sequence[Route], rng: random.Random) -> Route:
    """Pick one of equally good ``routes`` at random in proportion to weight (RFC 2782 style).

    A weight of 0 is chosen only when no route with a positive weight is left, and then
    uniformly. The order of ``routes`` must be deterministic for draws to be repeatable.
    """
    if not routes:
        raise ValueError("weighted_choice needs at least one route")
    positive = [route for route in routes if route.weight > 0]
    if not positive:
        return routes[rng.randrange(len(routes))]
    if len(positive) == 1:
        return positive[0]
    # Integer tickets keep the draw exact; a float draw would bias large weights slightly.
    ticket = rng.randrange(sum(route.weight for route in positive))
    for route in positive:
        ticket -= route.weight
        if ticket < 0:
            return route
    raise AssertionError("unreachable: ticket below the total weight")


def announced_alike(a: Route | None, b: Route | None) -> bool:
    """Whether ``a`` and ``b`` would be announced the same (expiry and signatures aside)."""
    if a is None or b is None:
        return a is b
    return a is b or (
        a.peer == b.peer
        and a.path == b.path
        and a.priority == b.priority
        and a.weight == b.weight
        and a.origin == b.origin
        and a.sequence == b.sequence
        and a.timeout == b.timeout
    )


class RouteTable:
    """Path-vector route table of one node: learn, withdraw, expire and choose routes.

    Selection (see :meth:`best`): a local route first; then the lowest distance; then the
    lowest priority value; then a weighted random draw with the injected RNG among the
    routes still tied. The draw is made when the candidates change, not on every lookup,
    so all frames for one destination keep one path (OCPP-J needs them in order) and
    announcements do not flap; a tied best route is kept while it stays in the top tier.

    Bounded: at most ``max_routes_per_peer`` routes from one peer and ``max_routes``
    learned routes in all (local routes do not count); a new destination beyond a cap is
    refused, and nothing already held is dropped for it.
    """

    __slots__ = (
        "_best",
        "_feeds",
        "_heap",
        "_next_sequence",
        "_own_feed",
        "_rng",
        "_route_count",
        "_routes",
        "_via",
        "max_path_length",
        "max_routes",
        "max_routes_per_peer",
        "max_sequence_jump",
        "node_id",
        "stats",
    )

    def __init__(
        self,
        node_id: str,
        *,
        rng: random.Random,
        max_routes_per_peer: int = DEFAULT_MAX_ROUTES_PER_PEER,
        max_routes: int = DEFAULT_MAX_ROUTES,
        max_path_length: int = DEFAULT_MAX_PATH_LENGTH,
        max_sequence_jump: int = MAX_SEQUENCE_JUMP,
        first_sequence: int = 1,
    ) -> None:
        """``first_sequence`` should grow across restarts (e.g. wall-clock milliseconds),
        so that a restarted node's claims are never older than ones still in circulation."""
        if not node_id:
            raise ValueError("node_id must not be empty")
        if max_routes_per_peer < 0 or max_routes < 0:
            raise ValueError("max_routes_per_peer and max_routes must be >= 0")
        if not 1 <= max_path_length <= MAX_PATH_LENGTH:
            # Longer paths would be sent on, and every peer would reject those messages.
            raise ValueError(f"max_path_length must be 1..{MAX_PATH_LENGTH}")
        if max_sequence_jump < 0 or not 0 <= first_sequence <= MAX_SEQUENCE:
            raise ValueError(f"need max_sequence_jump >= 0 and first_sequence 0..{MAX_SEQUENCE}")
        self.node_id = node_id
        self.max_routes_per_peer = max_routes_per_peer
        self.max_routes = max_routes
        self.max_path_length = max_path_length
        self.max_sequence_jump = max_sequence_jump
        self.stats = TableStats()
        self._rng = rng
        self._next_sequence = first_sequence
        # destination -> peer -> route; one route per peer because a peer announces only
        # its own best route, and a new announcement replaces the previous one.
        self._routes: dict[str, dict[str, Route]] = {}
        self._best: dict[str, Route] = {}
        # peer -> destinations, as an insertion-ordered dict so that dropping a peer
        # reselects in a repeatable order (a set's order depends on the hash seed).
        self._via: dict[str, dict[str, None]] = {}
        self._route_count = 0
        self._heap: list[tuple[float, str, str]] = []
        self._own_feed = ChangeFeed()
        self._feeds: list[ChangeFeed] = [self._own_feed]

    # -- local destinations ------------------------------------------------------------

    def originate(
        self, destination: str, *, priority: int = 0, weight: int = 1
    ) -> Route:
        """Claim ``destination`` as reachable here (own id, a station, ``"CSMS"``).

        Re-originating with the same attributes is a no-op; different attributes make a
        new claim with a new sequence number.
        """
        if not 0 < len(destination) <= MAX_ID_LENGTH:
            raise ValueError(f"destination must be 1-{MAX_ID_LENGTH} characters, "
                             f"not {destination!r}")
        if not 0 <= weight <= MAX_WEIGHT or not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority and weight of {destination!r} must be "
                             f"0..{MAX_PRIORITY}, not {priority} and {weight}")
        current = self._routes.get(destination, {}).get(LOCAL)
        if current is not None and current.priority == priority and current.weight == weight:
            return current
        route = Route(destination, LOCAL, (), 0, priority, weight, self.node_id,
                      self._take_sequence(), math.inf)
        self._store(route, current)
        self._reselect(destination)
        return route

    def withdraw_local(self, destination: str) -> bool:
        """Stop claiming ``destination``; returns whether it was claimed."""
        if not self._remove(destination, LOCAL):
            return False
        self._reselect(destination)
        return True

    def _take_sequence(self) -> int:
        sequence = self._next_sequence
        if sequence > MAX_SEQUENCE:
            raise OverflowError("this node has used up its sequence numbers")
        self._next_sequence += 1
        return sequence

    # -- learned routes ----------------------------------------------------------------

    def learn(
        self,
        peer: str,
        destination: str,
        path: Sequence[str],
        priority: int,
        weight: int,
        origin: str,
        sequence: int,
        expires_at: float,
        *,
        timeout: float | None = None,
        signatures: tuple[Mapping[str, Any], ...] = (),
        verified: bool = False,
    ) -> Verdict:
        """Take ``peer``'s route to ``destination``; the verdict is true if it was learned.

        Refused, table unchanged: a path that is empty, repeats a node or does not run from
        ``origin`` to ``peer``, a field out of bounds; a route to this node's own id; a new
        destination beyond a cap. Refused, and withdrawing the peer's previous route to
        the destination (the peer no longer uses it): this node's own claim; a path through
        this node or longer than ``max_path_length`` (a loop); a stale claim; an unverified
        claim more than ``max_sequence_jump`` ahead of the peer's last for the same origin.

        Sequence numbers order claims across peers only when both are ``verified`` (their
        origin's signature checked): an older one is then stale, and a newer one removes
        the older ones of other peers. Unverified claims never touch another peer's routes.
        """
        path = tuple(path)
        if (
            not path
            or not peer
            or not destination
            or len(destination) > MAX_ID_LENGTH
            or path[-1] != peer
            or path[0] != origin
            or not 0 <= weight <= MAX_WEIGHT
            or not 0 <= priority <= MAX_PRIORITY
            or not 0 <= sequence <= MAX_SEQUENCE
            or len(set(path)) != len(path)
        ):
            self.stats.rejected_invalid += 1
            return Verdict.INVALID
        node_id = self.node_id
        if destination == node_id:
            self.stats.rejected_own += 1
            return Verdict.OWN_DESTINATION
        if origin == node_id:
            self.stats.rejected_own += 1
            self._implicit_withdraw(destination, peer)
            return Verdict.OWN_ORIGIN
        candidates = self._routes.get(destination)
        if node_id in path or len(path) > self.max_path_length:
            self.stats.rejected_loop += 1
            self._implicit_withdraw(destination, peer)
            return Verdict.LOOP
        existing = candidates.get(peer) if candidates is not None else None
        if verified:
            if candidates is not None:
                for held in candidates.values():
                    if held.verified and held.origin == origin and held.sequence > sequence:
                        self.stats.ignored_stale += 1
                        self._implicit_withdraw(destination, peer)
                        return Verdict.STALE
        elif (
            existing is not None
            and existing.origin == origin
            and sequence - existing.sequence > self.max_sequence_jump
        ):
            self.stats.refused_sequence_jump += 1
            self._implicit_withdraw(destination, peer)
            return Verdict.SEQUENCE_JUMP
        if existing is None and (
            len(self._via.get(peer, ())) >= self.max_routes_per_peer
            or self._route_count - len(self._via.get(LOCAL, ())) >= self.max_routes
        ):
            return self._refuse_for_cap(peer)
        route = Route(destination, peer, path, len(path), priority, weight, origin, sequence,
                      expires_at, timeout, signatures, verified)
        self.stats.learned += 1
        if existing is not None and existing == route and existing.signatures == signatures:
            return _LEARNED
        if verified and candidates is not None:
            # A newer claim by the same origin supersedes the older ones other peers still
            # carry; they will re-announce once the newer claim reaches them. Only proven
            # claims may do so: an unverified number could be any peer's invention.
            stale = [held.peer for held in candidates.values()
                     if held.peer != peer and held.verified and held.origin == origin
                     and held.sequence < sequence]
            for stale_peer in stale:
                self._remove(destination, stale_peer)
        self._store(route, existing)
        self._reselect(destination)
        return _LEARNED

    def _refuse_for_cap(self, peer: str) -> Verdict:
        stats = self.stats
        stats.refused_cap += 1
        stats.refused_by_peer[peer] = stats.refused_by_peer.get(peer, 0) + 1
        if len(self._via.get(peer, ())) >= self.max_routes_per_peer:
            return Verdict.PEER_CAP
        stats.refused_table_cap += 1
        return Verdict.TABLE_CAP

    def _implicit_withdraw(self, destination: str, peer: str) -> None:
        if self._remove(destination, peer):
            self._reselect(destination)

    def withdraw(self, peer: str, destination: str) -> bool:
        """Forget ``peer``'s route to ``destination``; returns whether there was one."""
        if not peer or not self._remove(destination, peer):
            return False
        self._reselect(destination)
        return True

    def drop_peer(self, peer: str) -> set[str]:
        """Withdraw every route learned from ``peer`` at once (its link went down).

        Returns the destinations whose best route changed.
        """
        if not peer:
            return set()
        destinations = self._via.pop(peer, None)
        if not destinations:
            return set()
        changed: set[str] = set()
        for destination in destinations:
            candidates = self._routes[destination]
            del candidates[peer]
            self._route_count -= 1
            if not candidates:
                del self._routes[destination]
            if self._reselect(destination):
                changed.add(destination)
        return changed

    def expire(self, now: float) -> set[str]:
        """Remove routes whose ``expires_at`` is at or before ``now``.

        Returns the destinations whose best route changed.
        """
        changed: set[str] = set()
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires_at, destination, peer = heapq.heappop(heap)
            route = self._routes.get(destination, {}).get(peer)
            # The heap is pruned lazily: an entry counts only if the route is unchanged.
            if route is None or route.expires_at != expires_at:
                continue
            self._remove(destination, peer)
            self.stats.expired += 1
            if self._reselect(destination):
                changed.add(destination)
        return changed

    def next_expiry(self) -> float | None:
        """When the next route expires (for the caller's timer), or None."""
        heap = self._heap
        while heap:
            expires_at, destination, peer = heap[0]
            route = self._routes.get(destination, {}).get(peer)
            if route is not None and route.expires_at == expires_at:
                return expires_at
            heapq.heappop(heap)
        return None

    def attach_signatures(
        self, route: Route, signatures: tuple[Mapping[str, Any], ...]
    ) -> Route:
        """Store the origin's signatures on ``route`` (if it is still held) and return it.

        Lets every session reuse one signature per local claim instead of signing again.
        """
        candidates = self._routes.get(route.destination)
        held = candidates.get(route.peer) if candidates is not None else None
        if held is None or held != route:
            return route
        signed = Route(held.destination, held.peer, held.path, held.distance, held.priority,
                       held.weight, held.origin, held.sequence, held.expires_at, held.timeout,
                       signatures, held.verified)
        assert candidates is not None
        candidates[route.peer] = signed
        if self._best.get(route.destination) is held:
            self._best[route.destination] = signed
        return signed

    # -- lookups -----------------------------------------------------------------------

    def best(self, destination: str) -> Route | None:
        """The chosen route to ``destination``, or None if it is unreachable."""
        return self._best.get(destination)

    def candidates(self, destination: str) -> list[Route]:
        """Every route to ``destination``, the best first, then in order of preference."""
        routes = self._routes.get(destination)
        if not routes:
            return []
        best = self._best[destination]
        rest = sorted(
            (route for route in routes.values() if route is not best),
            key=lambda r: (not r.is_local, r.distance, r.priority, -r.weight, r.peer),
        )
        return [best, *rest]

    def destinations(self) -> list[str]:
        """Every destination with at least one route (a repeatable order, not sorted)."""
        return list(self._best)

    def routes_via(self, peer: str) -> list[Route]:
        """The routes learned from ``peer`` (``""``: the local ones)."""
        return [self._routes[destination][peer] for destination in self._via.get(peer, ())]

    def peers(self) -> list[str]:
        """Peers that currently contribute at least one route."""
        return [peer for peer, destinations in self._via.items() if peer and destinations]

    @property
    def route_count(self) -> int:
        """Number of candidate routes held, over all destinations and peers."""
        return self._route_count

    def __len__(self) -> int:
        """Number of reachable destinations."""
        return len(self._best)

    def __contains__(self, destination: object) -> bool:
        return destination in self._best

    def __iter__(self) -> Iterator[Route]:
        """The best route of every reachable destination."""
        return iter(list(self._best.values()))

    # -- changes -----------------------------------------------------------------------

    def watch(self) -> ChangeFeed:
        """A new feed of best-route changes, for one consumer (one exchange session)."""
        feed = ChangeFeed()
        self._feeds.append(feed)
        return feed

    def unwatch(self, feed: ChangeFeed) -> None:
        """Stop recording changes into ``feed``."""
        if feed in self._feeds and feed is not self._own_feed:
            self._feeds.remove(feed)

    def take_changes(self) -> set[str]:
        """Destinations whose best route changed since the last call (the runtime's feed)."""
        return self._own_feed.take()

    # -- internals ---------------------------------------------------------------------

    def _store(self, route: Route, replaced: Route | None) -> None:
        destination, peer = route.destination, route.peer
        self._routes.setdefault(destination, {})[peer] = route
        if replaced is None:
            self._via.setdefault(peer, {})[destination] = None
            self._route_count += 1
        if route.expires_at != math.inf:
            heapq.heappush(self._heap, (route.expires_at, destination, peer))
            if len(self._heap) > 4 * self._route_count + 1024:
                self._compact_heap()

    def _compact_heap(self) -> None:
        # Refreshed routes leave superseded heap entries behind; rebuild when they dominate.
        self._heap = [
            (route.expires_at, route.destination, route.peer)
            for routes in self._routes.values()
            for route in routes.values()
            if route.expires_at != math.inf
        ]
        heapq.heapify(self._heap)

    def _remove(self, destination: str, peer: str) -> bool:
        candidates = self._routes.get(destination)
        if candidates is None or peer not in candidates:
            return False
        del candidates[peer]
        if not candidates:
            del self._routes[destination]
        via = self._via[peer]
        del via[destination]
        if not via:
            del self._via[peer]
        self._route_count -= 1
        return True

    def _reselect(self, destination: str) -> bool:
        """Choose the best route again; returns whether what is announced changed."""
        old = self._best.get(destination)
        candidates = self._routes.get(destination)
        if not candidates:
            if old is None:
                return False
            del self._best[destination]
            self._mark(destination)
            return True
        new = self._choose(candidates, old)
        self._best[destination] = new
        if announced_alike(old, new):
            return False
        self._mark(destination)
        return True

    def _choose(self, candidates: dict[str, Route], old: Route | None) -> Route:
        local = candidates.get(LOCAL)
        if local is not None:
            return local
        if len(candidates) == 1:
            return next(iter(candidates.values()))
        top = min((route.distance, route.priority) for route in candidates.values())
        tier = [route for route in candidates.values()
                if (route.distance, route.priority) == top]
        if len(tier) == 1:
            return tier[0]
        if old is not None:
            kept = candidates.get(old.peer)
            if kept is not None and (kept.distance, kept.priority) == top and (
                kept.weight > 0 or all(route.weight == 0 for route in tier)
            ):
                return kept
        tier.sort(key=lambda route: route.peer)
        return weighted_choice(tier, self._rng)

    def _mark(self, destination: str) -> None:
        for feed in self._feeds:
            feed.add(destination)
