"""docs/protocol.md stays true: every JSON example in it decodes with the code it specifies.

Each fenced ```json block is an overlay frame (``router.wire.overlay_frames.from_list``), a batch of
frames, or a NotifyNetworkTopology payload (``topology.messages.parse_payload``). Signed
routes in the examples verify against their key id, the claim bytes shown in ```text
blocks are exactly what ``topology.messages.claim_bytes`` produces, and the constants
table agrees with the code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from policies import public_key_from_key_id
from router.overlay.trust import route_verifier
from router.wire import overlay_frames as overlay
from topology.exchange import DEFAULT_MAX_ROUTES_PER_MESSAGE
from topology.messages import ACTION, check_signatures, claim_bytes, parse_payload
from topology.table import DEFAULT_MAX_PATH_LENGTH

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[a-z]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```",
                    re.DOTALL | re.MULTILINE)


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = DOC.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        if match.group("lang") == lang:
            line = text.count("\n", 0, match.start()) + 1
            found.append((line, match.group("body")))
    return found


JSON_BLOCKS = _blocks("json")


def _classify(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], list):
        return "batch"
    if isinstance(value, list):
        return "frame"
    if isinstance(value, dict) and "networkTopologyInformation" in value:
        return "topology"
    return "unknown"


def _check_topology(payload: Any) -> Any:
    message = parse_payload(payload)
    for route in message.routes:
        if not route.signatures:
            continue
        # The examples are signed with the RFC 8032 test key; trust it for the origin.
        key_id = route.signatures[0]["keyId"]
        verify = route_verifier({route.origin: public_key_from_key_id(key_id)})
        assert check_signatures(verify, route) is None, f"signature of {route} does not verify"
    return message


def _check_frame(raw: Any) -> overlay.OverlayFrame:
    frame = overlay.from_list(raw)
    assert len(frame.path) <= overlay.MAX_HOPS
    if frame.type == overlay.SEND and frame.action == ACTION:
        _check_topology(frame.payload)
    if frame.action == "OverlayStationConnect":
        assert frame.type == overlay.CALL and frame.dest == overlay.ANYCAST_CSMS
        subprotocols = frame.payload["subprotocols"]
        assert subprotocols and all(isinstance(p, str) for p in subprotocols)
        assert set(frame.payload) <= {"subprotocols", "authorization"}
    if frame.action == "OverlayStationDisconnect":
        assert frame.type == overlay.SEND
        assert isinstance(frame.payload["code"], int)
        assert isinstance(frame.payload.get("reason", ""), str)
    return frame


@pytest.mark.parametrize(("line", "body"), JSON_BLOCKS, ids=[f"line{n}" for n, _ in JSON_BLOCKS])
def test_json_example_decodes(line: int, body: str) -> None:
    value = json.loads(body)
    kind = _classify(value)
    assert kind != "unknown", f"protocol.md line {line}: not a frame, batch or topology payload"
    if kind == "frame":
        _check_frame(value)
    elif kind == "batch":
        for item in value:
            _check_frame(item)
        # a batch is what decode_msgpack accepts as one binary message
        assert len(value) <= 10_000
    else:
        _check_topology(value)


def test_every_json_fence_is_checked() -> None:
    assert len(JSON_BLOCKS) == DOC.read_text(encoding="utf-8").count("```json")


def test_examples_cover_every_frame_type_and_topology_kind() -> None:
    types: set[int] = set()
    kinds: set[str] = set()
    batches = 0
    for _, body in JSON_BLOCKS:
        value = json.loads(body)
        kind = _classify(value)
        frames = value if kind == "batch" else [value] if kind == "frame" else []
        batches += kind == "batch"
        for raw in frames:
            frame = overlay.from_list(raw)
            types.add(frame.type)
            if frame.type == overlay.SEND and frame.action == ACTION:
                kinds.add(parse_payload(frame.payload).kind)
        if kind == "topology":
            kinds.add(parse_payload(value).kind)
    assert types == {overlay.CALL, overlay.CALLRESULT, overlay.CALLERROR,
                     overlay.CALLRESULTERROR, overlay.SEND, overlay.CHANNEL_DATA}
    assert kinds == {"full", "update", "keepalive"}
    assert batches >= 1


def test_signed_examples_exist_and_claim_bytes_are_exact() -> None:
    signed = 0
    for _, body in JSON_BLOCKS:
        value = json.loads(body)
        kind = _classify(value)
        payload = value[5] if kind == "frame" and value[4] == ACTION else (
            value if kind == "topology" else None)
        if payload is not None:
            signed += sum(1 for route in parse_payload(payload).routes if route.signatures)
    assert signed >= 2

    claims = [body.strip() for _, body in _blocks("text") if '"destinationId"' in body]
    assert claims, "protocol.md shows no claim bytes"
    for text in claims:
        claim = json.loads(text)
        expected = claim_bytes(claim["origin"], claim["destinationId"], claim["priority"],
                               claim["weight"], claim["sequence"], claim["timeout"])
        assert text.encode("utf-8") == expected


def test_constants_table_matches_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")

    def row(name: str) -> str:
        match = re.search(rf"^\| {re.escape(name)}[^|]* \| (?P<value>[^|]+) \|$", text,
                          re.MULTILINE)
        assert match, f"constants table has no row {name!r}"
        return match.group("value").strip()

    assert row("hop limit") == str(overlay.MAX_HOPS)
    assert row("node id, station identity") == f"1-{overlay.MAX_NODE_ID} characters"
    assert row("route path length limit") == str(DEFAULT_MAX_PATH_LENGTH)
    assert row("routes + withdrawals per") == f"at most {DEFAULT_MAX_ROUTES_PER_MESSAGE:,} sent"
