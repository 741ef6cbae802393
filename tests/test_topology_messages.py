"""NotifyNetworkTopology payloads: building, parsing, validation and the signed bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topology import (
    RouteAnnouncement,
    TopologyMessage,
    TopologyMessageError,
    build_payload,
    check_signatures,
    claim_bytes,
    parse_payload,
    route_entry,
    sign_claim,
)


def test_build_and_parse_round_trip_through_json() -> None:
    payload = build_payload(
        "B", "full",
        [route_entry("st1", ["A", "B"], 0, 3, 7, timeout=30,
                     signatures=[{"keyId": "A", "value": "xx"}])],
        ["st9"], part=2, parts=2, not_before="2026-01-01T00:00:00Z")
    parsed = parse_payload(json.loads(json.dumps(payload)))
    assert parsed == TopologyMessage(
        routing_node="B", kind="full",
        routes=(RouteAnnouncement("st1", ("A", "B"), 0, 3, 7, 30,
                                  ({"keyId": "A", "value": "xx"},)),),
        withdrawn=("st9",), part=2, parts=2, not_before="2026-01-01T00:00:00Z")
    assert parsed.routes[0].origin == "A"


def test_wwcp_field_names_are_used() -> None:
    payload = build_payload("B", "update", [route_entry("st1", ["B"], 1, 2, 3)])
    info = payload["networkTopologyInformation"]
    assert info["routingNode"] == "B"
    assert set(info["routes"][0]) == {"destinationId", "priority", "weight", "path",
                                      "sequence"}


def test_unknown_fields_are_ignored_and_kind_defaults_to_update() -> None:
    parsed = parse_payload({"networkTopologyInformation": {
        "routingNode": "A", "customData": {"vendorId": "x"},
        "routes": [{"destinationId": "s", "priority": 0, "weight": 1, "path": ["A"],
                    "sequence": 0, "extra": True}]}})
    assert parsed.kind == "update" and len(parsed.routes) == 1


def _info(**fields: Any) -> dict[str, Any]:
    return {"networkTopologyInformation": {"routingNode": "A", **fields}}


def _route(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"destinationId": "s", "priority": 0, "weight": 1, "path": ["A"],
                            "sequence": 1}
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([], "payload"),
        ({}, "networkTopologyInformation"),
        ({"networkTopologyInformation": {"routingNode": ""}}, "routingNode"),
        (_info(kind="full"), "part"),
        (_info(kind="full", part=3, parts=2), "part"),
        (_info(kind="keepalive", withdrawn=["s"]), "kind"),
        (_info(routes={}), "routes"),
        (_info(withdrawn=[1]), "withdrawn"),
        (_info(routes=[1]), "routes[0]"),
        (_info(routes=[_route(destinationId="")]), "routes[0].destinationId"),
        (_info(routes=[_route(priority=True)]), "routes[0].priority"),
        (_info(routes=[_route(priority=1.5)]), "routes[0].priority"),
        (_info(routes=[_route(weight=-1)]), "routes[0].weight"),
        (_info(routes=[_route(sequence=None)]), "routes[0].sequence"),
        (_info(routes=[_route(path=[])]), "routes[0].path"),
        (_info(routes=[_route(path=["A", ""])]), "routes[0].path"),
        (_info(routes=[_route(path=["A", "B", "A"])]), "routes[0].path"),
        (_info(routes=[_route(timeout=0)]), "routes[0].timeout"),
        (_info(routes=[_route(timeout="5")]), "routes[0].timeout"),
        (_info(routes=[_route(signatures={"value": "x"})]), "routes[0].signatures"),
        (_info(notAfter=5), "notAfter"),
    ],
)
def test_malformed_payloads_name_the_field(payload: object, field: str) -> None:
    with pytest.raises(TopologyMessageError) as caught:
        parse_payload(payload)
    assert field in caught.value.field
    assert field in str(caught.value)


def test_build_refuses_what_parse_would_refuse() -> None:
    with pytest.raises(ValueError):
        build_payload("A", "gossip")
    with pytest.raises(ValueError):
        build_payload("A", "full")


def test_claim_bytes_are_canonical_json_without_path_and_signatures() -> None:
    data = claim_bytes("A", "stätion", 1, 2, 3, None)
    assert data == ('{"destinationId":"stätion","origin":"A","priority":1,"sequence":3,'
                    '"timeout":null,"weight":2}').encode()


def test_sign_and_check_signatures() -> None:
    def sign(data: bytes) -> dict[str, str]:
        return {"keyId": "A", "value": data.hex(), "algorithm": "test", "timestamp": "t"}

    def verify(origin: str, data: bytes, signature: Any) -> bool:
        return bool(origin == "A" and signature["value"] == data.hex())

    signatures = sign_claim(sign, "A", "st", 0, 1, 4)
    good = RouteAnnouncement("st", ("A", "B"), 0, 1, 4, None, signatures)
    assert check_signatures(verify, good) is None
    bumped = RouteAnnouncement("st", ("A", "B"), 0, 1, 5, None, signatures)
    assert "does not verify" in (check_signatures(verify, bumped) or "")
    unsigned = RouteAnnouncement("st", ("A", "B"), 0, 1, 4)
    assert "no signature" in (check_signatures(verify, unsigned) or "")
    with pytest.raises(TypeError):
        sign_claim(lambda data: {"value": 5}, "A", "st", 0, 1, 4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["destinationId", "priority", "weight", "path",
                                       "sequence", "timeout", "signatures", "kind",
                                       "routes", "withdrawn", "routingNode", "part",
                                       "parts", "x"]), children, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.just("networkTopologyInformation"), json_values) | json_values)
def test_parse_accepts_or_raises_topology_message_error_only(payload: object) -> None:
    try:
        parsed = parse_payload(payload)
    except TopologyMessageError:
        return
    for route in parsed.routes:
        assert route.path and len(set(route.path)) == len(route.path)
        assert route.weight >= 0 and route.sequence >= 0


def test_a_bad_field_is_named_even_when_the_others_are_unusual() -> None:
    with pytest.raises(TopologyMessageError) as caught:
        parse_payload(_info(routes=[_route(timeout=2.5, signatures="x")]))
    assert caught.value.field.endswith("routes[0].signatures")
    parsed = parse_payload(_info(routes=[_route(timeout=2.5, signatures=[])]))
    assert parsed.routes[0].timeout == 2.5 and parsed.routes[0].signatures == ()
