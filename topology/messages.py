"""NotifyNetworkTopology payloads: build them, parse and validate them, sign and verify claims.

The runtime wraps a payload in an overlay SEND frame
``[6, dest, path, id, "NotifyNetworkTopology", payload]``. A payload (field names after
WWCP_OCPP, plus what a routing protocol needs)::

    {"networkTopologyInformation": {
        "routingNode": "node-B",            # the sender: routes below are reachable via it
        "kind": "update",                   # "full" | "update" | "keepalive"
        "routes": [{"destinationId": "st-1", "priority": 0, "weight": 1,
                    "timeout": 300,         # optional, seconds the route stays valid
                    "path": ["node-A", "node-B"],   # origin first, sender last
                    "sequence": 7,          # the origin's, grows with each new claim
                    "signatures": [{"keyId": ..., "value": ..., "algorithm": ...,
                                    "timestamp": ...}]}],   # the origin's, optional
        "withdrawn": ["st-9"],              # destinations no longer reachable via sender
        "part": 1, "parts": 3,              # kind "full" only: chunk i of n
        "notBefore": "...", "notAfter": "..."}}     # optional RFC 3339, carried as given

Signatures are per route and by the route's origin (``path[0]``), because relays pass
each origin's claim on unchanged while the path grows one hop at a time; see
:func:`claim_bytes` for what exactly is signed. Unknown fields are ignored, so later
versions can add some; every known field is bounded (:mod:`topology.bounds`), and a
payload that breaks a bound is malformed as a whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from topology.bounds import (
    MAX_ENTRIES_PER_MESSAGE,
    MAX_ID_LENGTH,
    MAX_PARTS,
    MAX_PATH_LENGTH,
    MAX_PRIORITY,
    MAX_SEQUENCE,
    MAX_SIGNATURE_MEMBER,
    MAX_SIGNATURES,
    MAX_TIMEOUT_S,
    MAX_WEIGHT,
    RESERVED_IDS,
    SIGNATURE_MEMBERS,
)

ACTION = "NotifyNetworkTopology"
KINDS = ("full", "update", "keepalive")

JSONDict = dict[str, Any]
SignFn = Callable[[bytes], Mapping[str, Any]]
"""Signs bytes with this node's key; returns {keyId, value, algorithm, timestamp}."""
VerifyFn = Callable[[str, bytes, Mapping[str, Any]], bool]
"""Checks a signature by the given origin over the bytes against that origin's trusted key."""


class TopologyMessageError(ValueError):
    """A NotifyNetworkTopology payload is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"NotifyNetworkTopology {field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class RouteAnnouncement:
    """One route in a payload: ``destination`` reachable along ``path`` (origin first)."""

    destination: str
    path: tuple[str, ...]
    priority: int
    weight: int
    sequence: int
    timeout: float | None = None
    signatures: tuple[Mapping[str, Any], ...] = ()

    @property
    def origin(self) -> str:
        """The node that claims the destination (first on the path)."""
        return self.path[0]


@dataclass(frozen=True, slots=True)
class TopologyMessage:
    """A parsed, validated NotifyNetworkTopology payload."""

    routing_node: str
    kind: str
    routes: tuple[RouteAnnouncement, ...] = ()
    withdrawn: tuple[str, ...] = ()
    part: int | None = None
    parts: int | None = None
    not_before: str | None = None
    not_after: str | None = None


# -- building ---------------------------------------------------------------------------


def route_entry(
    destination: str,
    path: Sequence[str],
    priority: int,
    weight: int,
    sequence: int,
    *,
    timeout: float | None = None,
    signatures: Iterable[Mapping[str, Any]] = (),
) -> JSONDict:
    """One element of ``routes[]`` as a JSON-ready dict."""
    entry: JSONDict = {
        "destinationId": destination,
        "priority": priority,
        "weight": weight,
        "path": list(path),
        "sequence": sequence,
    }
    if timeout is not None:
        entry["timeout"] = timeout
    sigs = [dict(signature) for signature in signatures]
    if sigs:
        entry["signatures"] = sigs
    return entry


def build_payload(
    routing_node: str,
    kind: str,
    routes: Sequence[JSONDict] = (),
    withdrawn: Sequence[str] = (),
    *,
    part: int | None = None,
    parts: int | None = None,
    not_before: str | None = None,
    not_after: str | None = None,
) -> JSONDict:
    """A NotifyNetworkTopology payload from entries made by :func:`route_entry`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    info: JSONDict = {"routingNode": routing_node, "kind": kind, "routes": list(routes)}
    if withdrawn:
        info["withdrawn"] = list(withdrawn)
    if kind == "full":
        if part is None or parts is None:
            raise ValueError("a full-sync payload needs part and parts")
        info["part"] = part
        info["parts"] = parts
    if not_before is not None:
        info["notBefore"] = not_before
    if not_after is not None:
        info["notAfter"] = not_after
    return {"networkTopologyInformation": info}


# -- signing ----------------------------------------------------------------------------


def claim_bytes(
    origin: str,
    destination: str,
    priority: int,
    weight: int,
    sequence: int,
    timeout: float | None = None,
) -> bytes:
    """The bytes an origin signs for one route: the announcement without ``signatures``.

    That is the route entry with its hop-by-hop ``path`` reduced to the origin (path[0]),
    since every relay extends the path (the last hop is checked against the authenticated
    link instead, and the rest of the path is not covered by any signature). For now the
    canonical form is ``json.dumps(sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` in UTF-8; an interoperable node must reproduce it byte for byte
    (JCS, RFC 8785, would be the portable successor, notably for float timeouts).
    """
    claim: JSONDict = {
        "destinationId": destination,
        "origin": origin,
        "priority": priority,
        "sequence": sequence,
        "timeout": timeout,
        "weight": weight,
    }
    return json.dumps(claim, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def sign_claim(
    sign: SignFn,
    origin: str,
    destination: str,
    priority: int,
    weight: int,
    sequence: int,
    timeout: float | None = None,
) -> tuple[JSONDict, ...]:
    """Sign one local claim with ``sign``; returns the ``signatures`` list for its entry."""
    signature = sign(claim_bytes(origin, destination, priority, weight, sequence, timeout))
    if not isinstance(signature, Mapping) or not isinstance(signature.get("value"), str):
        raise TypeError("sign() must return a signature dict with a string 'value'")
    return (dict(signature),)


def check_signatures(verify: VerifyFn, route: RouteAnnouncement) -> str | None:
    """None if one of ``route``'s signatures verifies for its origin, else the reason."""
    if not route.signatures:
        return f"route to {route.destination!r}: no signature by origin {route.origin!r}"
    data = claim_bytes(route.origin, route.destination, route.priority, route.weight,
                       route.sequence, route.timeout)
    for signature in route.signatures:
        if verify(route.origin, data, signature):
            return None
    return (f"route to {route.destination!r}: signature does not verify against a trusted "
            f"key of origin {route.origin!r}")


# -- parsing ----------------------------------------------------------------------------

# RFC 3339 date-time in UTC or with an offset; [0-9] because \d also matches other digits.
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{1,9})?"
    r"(?:Z|[+-]([0-9]{2}):([0-9]{2}))")


def _encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form (JSON's ``\\ud800`` escapes make lone surrogates,
    which claim_bytes and the encoders of the link could not write)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_id(value: object) -> TypeGuard[str]:
    return (type(value) is str and 0 < len(value) <= MAX_ID_LENGTH
            and (value.isascii() or _encodable(value)))


def _node_id(value: object, field: str) -> str:
    if _is_id(value) and value not in RESERVED_IDS:
        return value
    raise TopologyMessageError(
        field, f"must be a node id (a string of 1-{MAX_ID_LENGTH} characters, not "
               f"{' or '.join(map(repr, RESERVED_IDS))}), not {_show(value)}")


def _show(value: object) -> str:
    """``value`` for an error message, cut short: a peer decides how long it is."""
    if isinstance(value, str) and len(value) > 50:
        return f"{value[:40]!r}... ({len(value)} characters)"
    if isinstance(value, list | dict):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


def _integer(value: object, field: str, minimum: int, maximum: int) -> int:
    # bool is an int subclass; true/false are not numbers on the wire.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyMessageError(field, f"must be an integer, not {_show(value)}")
    if not minimum <= value <= maximum:
        raise TopologyMessageError(field, f"must be {minimum}..{maximum}, not {_show(value)}")
    return value


def _timestamp(info: Mapping[str, Any], key: str) -> str | None:
    value = info.get(key)
    if value is None:
        return None
    match = _TIMESTAMP.fullmatch(value) if type(value) is str else None
    if match is not None:
        year, month, day, hour, minute, second, off_h, off_m = (
            int(group) if group is not None else 0 for group in match.groups())
        try:
            datetime(year, month, day, hour, minute, min(second, 59))  # 60: a leap second
        except ValueError:
            match = None
        else:
            if second > 60 or off_h > 23 or off_m > 59:
                match = None
    if match is None:
        raise TopologyMessageError(f"networkTopologyInformation.{key}",
                                   f"must be an RFC 3339 date-time, not {_show(value)}")
    return str(value)


def _signature_ok(signature: object) -> bool:
    if type(signature) is not dict or not signature.keys() <= SIGNATURE_MEMBERS:
        return False
    value = signature.get("value")
    return type(value) is str and value != "" and all(
        type(member) is str and len(member) <= MAX_SIGNATURE_MEMBER and (
            member.isascii() or _encodable(member))
        for member in signature.values())


def _route(raw: object, index: int) -> RouteAnnouncement:
    # The common, valid case is checked in one expression without building field names:
    # this runs once per route of a full sync. Anything odd goes to _route_error, which
    # finds the precise problem. ``type(x) is int`` also keeps JSON true/false out.
    if type(raw) is dict:
        destination = raw.get("destinationId")
        priority = raw.get("priority")
        weight = raw.get("weight")
        sequence = raw.get("sequence")
        path = raw.get("path")
        timeout = raw.get("timeout")
        signatures = raw.get("signatures")
        if (
            type(destination) is str
            and 0 < len(destination) <= MAX_ID_LENGTH
            and (destination.isascii() or _encodable(destination))
            and destination != "*"
            and type(priority) is int
            and 0 <= priority <= MAX_PRIORITY
            and type(weight) is int
            and 0 <= weight <= MAX_WEIGHT
            and type(sequence) is int
            and 0 <= sequence <= MAX_SEQUENCE
            and type(path) is list
            and 0 < len(path) <= MAX_PATH_LENGTH
            and all(type(hop) is str and 0 < len(hop) <= MAX_ID_LENGTH
                    and (hop.isascii() or _encodable(hop)) for hop in path)
            and len(set(path)) == len(path)
            and "CSMS" not in path
            and "*" not in path
            and (timeout is None
                 or (type(timeout) in (int, float) and 0 < timeout <= MAX_TIMEOUT_S))
            and (signatures is None or (type(signatures) is list
                                        and len(signatures) <= MAX_SIGNATURES
                                        and all(_signature_ok(sig) for sig in signatures)))
        ):
            return RouteAnnouncement(destination, tuple(path), priority, weight, sequence,
                                     timeout, tuple(signatures) if signatures else ())
    _route_error(raw, index)
    raise AssertionError("unreachable: _route_error raises")


def _route_error(raw: object, index: int) -> None:
    where = f"networkTopologyInformation.routes[{index}]"
    if not isinstance(raw, dict):
        raise TopologyMessageError(where, f"must be an object, not {type(raw).__name__}")
    destination = raw.get("destinationId")
    if not _is_id(destination) or destination == "*":
        raise TopologyMessageError(
            f"{where}.destinationId",
            f"must be a string of 1-{MAX_ID_LENGTH} characters other than '*', "
            f"not {_show(destination)}")
    _integer(raw.get("priority"), f"{where}.priority", 0, MAX_PRIORITY)
    _integer(raw.get("weight"), f"{where}.weight", 0, MAX_WEIGHT)
    _integer(raw.get("sequence"), f"{where}.sequence", 0, MAX_SEQUENCE)
    path = raw.get("path")
    if not isinstance(path, list) or not 0 < len(path) <= MAX_PATH_LENGTH:
        raise TopologyMessageError(
            f"{where}.path", f"must be a list of 1-{MAX_PATH_LENGTH} node ids, not "
                             f"{_show(path) if not isinstance(path, list) else len(path)}")
    for hop in path:
        _node_id(hop, f"{where}.path")
    if len(set(path)) != len(path):
        raise TopologyMessageError(f"{where}.path", f"repeats a node: {path}")
    timeout = raw.get("timeout")
    if timeout is not None and (
        type(timeout) not in (int, float) or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise TopologyMessageError(
            f"{where}.timeout",
            f"must be a number of seconds above 0, at most {MAX_TIMEOUT_S}, not {_show(timeout)}")
    signatures = raw.get("signatures")
    if type(signatures) is not list or len(signatures) > MAX_SIGNATURES:
        raise TopologyMessageError(f"{where}.signatures",
                                   f"must be a list of at most {MAX_SIGNATURES} objects")
    raise TopologyMessageError(
        f"{where}.signatures",
        f"each must be an object of strings of at most {MAX_SIGNATURE_MEMBER} characters "
        f"with a non-empty value and no members but {sorted(SIGNATURE_MEMBERS)}")


def parse_payload(payload: object) -> TopologyMessage:
    """Validate a NotifyNetworkTopology payload; raises :class:`TopologyMessageError`."""
    if not isinstance(payload, dict):
        raise TopologyMessageError("payload", f"must be an object, not {type(payload).__name__}")
    info = payload.get("networkTopologyInformation")
    if not isinstance(info, dict):
        raise TopologyMessageError("networkTopologyInformation", "missing or not an object")
    routing_node = _node_id(info.get("routingNode"), "networkTopologyInformation.routingNode")
    kind = info.get("kind", "update")
    if kind not in KINDS:
        raise TopologyMessageError("networkTopologyInformation.kind",
                                   f"must be one of {list(KINDS)}, not {_show(kind)}")
    raw_routes = info.get("routes", [])
    if not isinstance(raw_routes, list):
        raise TopologyMessageError("networkTopologyInformation.routes", "must be a list")
    raw_withdrawn = info.get("withdrawn", [])
    if not isinstance(raw_withdrawn, list):
        raise TopologyMessageError("networkTopologyInformation.withdrawn", "must be a list")
    if len(raw_routes) + len(raw_withdrawn) > MAX_ENTRIES_PER_MESSAGE:
        raise TopologyMessageError(
            "networkTopologyInformation.routes",
            f"{len(raw_routes)} routes and {len(raw_withdrawn)} withdrawals are more than "
            f"{MAX_ENTRIES_PER_MESSAGE} in one message")
    for destination in raw_withdrawn:
        if not _is_id(destination):
            raise TopologyMessageError(
                "networkTopologyInformation.withdrawn",
                f"must hold ids of 1-{MAX_ID_LENGTH} characters, not {_show(destination)}")
    if kind == "keepalive" and (raw_routes or raw_withdrawn):
        raise TopologyMessageError("networkTopologyInformation.kind",
                                   "a keepalive carries no routes and no withdrawals")
    part = parts = None
    if kind == "full":
        part = _integer(info.get("part"), "networkTopologyInformation.part", 1, MAX_PARTS)
        parts = _integer(info.get("parts"), "networkTopologyInformation.parts", 1, MAX_PARTS)
        if part > parts:
            raise TopologyMessageError("networkTopologyInformation.part",
                                       f"part {part} is beyond parts {parts}")
    routes = tuple(_route(raw, index) for index, raw in enumerate(raw_routes))
    return TopologyMessage(
        routing_node=routing_node,
        kind=kind,
        routes=routes,
        withdrawn=tuple(raw_withdrawn),
        part=part,
        parts=parts,
        not_before=_timestamp(info, "notBefore"),
        not_after=_timestamp(info, "notAfter"),
    )
