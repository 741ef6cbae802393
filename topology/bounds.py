"""The limits of the route exchange: how big each field, message and table may get.

Every value a peer sends is held against these before it reaches the table, so a peer can
neither make a node hold unbounded data nor push numbers that win every comparison. Two of
them repeat limits of the overlay frames (``router.wire.overlay_frames``), which topology
may not import; ``tests/test_topology_bounds.py`` keeps them equal.
"""

from __future__ import annotations

MAX_ID_LENGTH = 48
"""Characters in a node id, station identity, destination or path element (frames: 48)."""

MAX_PATH_LENGTH = 16
"""Elements of an announced path: the overlay hop limit (frames: ``MAX_HOPS``), since a
frame to the destination crosses one link per element."""

RESERVED_IDS = ("CSMS", "*")
"""Never a node id, so never a path element; ``"*"`` is not a destination either."""

MAX_PRIORITY = 65_535
MAX_WEIGHT = 65_535
"""Priority and weight are 0..65535, the 16-bit fields of RFC 2782."""

MAX_SEQUENCE = 2**63 - 1
"""Sequence numbers are 0..2**63-1: wall-clock milliseconds for millions of years."""

MAX_SEQUENCE_JUMP = 2**32
"""How far an unsigned claim may run ahead of the previous claim the same peer made for the
same origin and destination (about 50 days of milliseconds, the unit origins start from)."""

MAX_TIMEOUT_S = 2**31 - 1
"""A route's ``timeout`` in seconds: above 0, at most RFC 2181's largest TTL."""

MAX_SIGNATURES = 4
"""Signatures per route: one per key the origin is rolling over between, with room."""

SIGNATURE_MEMBERS = frozenset({"keyId", "value", "algorithm", "timestamp"})
"""The members a signature entry may have, each a string; ``value`` is required."""

MAX_SIGNATURE_MEMBER = 1_024
"""Characters in one member of a signature entry (an ECDSA P-384 value is 140 in base64)."""

MAX_ENTRIES_PER_MESSAGE = 10_000
"""Routes plus withdrawals accepted in one message (a node sends at most 5,000)."""

MAX_PARTS = 1_000_000
"""``parts`` of a full sync: the table cap, at one route per message."""

DEFAULT_MAX_ROUTES_PER_PEER = 200_000
"""Routes the table holds from one peer by default."""

DEFAULT_MAX_ROUTES = 1_000_000
"""Routes learned from all peers together that the table holds by default."""
