"""Firewall semantics: first match, default, require, reject/drop, sign, replay, rate limits."""

from __future__ import annotations

import base64
import copy
import textwrap
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.firewall import Decision, Firewall
from policies.policy import Outcome, parse_policy
from policies.ratelimit import RateLimiter
from policies.replay import ReplayCache
from policies.signatures import (
    SigningKey,
    VerifiedSignature,
    sign_payload,
    verify_signatures,
)

NOW = 1_795_341_600.0
OPS = SigningKey.generate()
SECOPS = SigningKey.generate("secp384r1")
VIEWER = SigningKey.generate("ed25519")
STRANGER = SigningKey.generate()
NODE = SigningKey.generate()

POLICY = textwrap.dedent(f"""\
    default = "reject"

    [[keys]]
    id = "ops"
    public_key = "{OPS.key_id}"
    roles = ["admin"]

    [[keys]]
    id = "secops"
    public_key = "{SECOPS.key_id}"
    roles = ["admin", "firmware"]

    [[keys]]
    id = "viewer"
    public_key = "{VIEWER.key_id}"
    roles = ["read"]

    [[rules]]
    name = "secondaries are read-only"
    sources = ["analytics", "billing-*"]
    direction = "to-station"
    then = "reject"

    [[rules]]
    name = "shadow is silenced"
    sources = ["shadow"]
    then = "drop"

    [[rules]]
    name = "firmware needs two admins"
    actions = ["UpdateFirmware"]
    direction = "to-station"
    require = {{ roles = ["admin"], count = 2, max_age_s = 600 }}
    then = "forward"

    [[rules]]
    name = "admin commands"
    actions = ["Reset", "Set*"]
    direction = "to-station"
    require = {{ roles = ["admin"], max_age_s = 300 }}
    then = "forward"

    [[rules]]
    name = "any policy key"
    actions = ["GetLog"]
    direction = "to-station"
    require = {{ max_age_s = 60 }}
    then = "forward"

    [[rules]]
    name = "metering is countersigned"
    actions = ["MeterValues", "TransactionEvent"]
    direction = "from-station"
    sign = true
    then = "forward"

    [[rules]]
    name = "heartbeats are limited"
    actions = ["Heartbeat"]
    direction = "from-station"
    rate = {{ per_source = 3, per_s = 10 }}
    then = "forward"

    [[rules]]
    name = "boot"
    actions = ["BootNotification", "StatusNotification"]
    direction = "from-station"
    then = "forward"

    [[rules]]
    name = "answers to Reset are checked"
    actions = ["Reset"]
    messages = ["result"]
    direction = "from-station"
    rate = {{ per_source = 1, per_s = 60, then = "drop" }}
    then = "forward"
    """)


def firewall(text: str = POLICY, **kwargs: Any) -> Firewall:
    return Firewall(parse_policy(text, "fw.toml"), **kwargs)


def signed(payload: dict[str, Any], action: str, *keys: SigningKey, at: float = NOW,
           direction: str = "to-station") -> dict[str, Any]:
    for key in keys:
        payload = sign_payload(payload, action, direction, key, at)
    return payload


def decide(fw: Firewall, action: str, payload: Any, *, source: str = "main",
           direction: str = "to-station", at: float = NOW, **kwargs: Any) -> Decision:
    return fw.decide(action, direction, source, payload, at, **kwargs)


def test_first_match_decides_and_default_catches_the_rest() -> None:
    fw = firewall()
    # analytics matches the read-only rule before the admin rule could look at signatures
    d = decide(fw, "Reset", signed({"type": "Immediate"}, "Reset", OPS), source="analytics")
    assert (d.outcome, d.rule) == (Outcome.REJECT, "secondaries are read-only")
    assert "says reject" in d.reason
    d = decide(fw, "Reset", {}, source="billing-eu")
    assert d.rule == "secondaries are read-only"
    d = decide(fw, "Heartbeat", {}, source="CS-1", direction="from-station")
    assert (d.outcome, d.rule) == (Outcome.FORWARD, "heartbeats are limited")
    d = decide(fw, "Authorize", {"idToken": {}}, source="CS-1", direction="from-station")
    assert (d.outcome, d.rule) == (Outcome.REJECT, None)
    assert d.reason == "no rule matches; the default is reject"
    d = decide(fw, "BootNotification", {}, source="CS-1", direction="to-station")
    assert d.rule is None  # direction matters


def test_drop() -> None:
    d = decide(firewall(), "GetVariables", {}, source="shadow")
    assert (d.outcome, d.rule, d.forwarded) == (Outcome.DROP, "shadow is silenced", False)


def test_require_admin_signature() -> None:
    fw = firewall()
    unsigned = decide(fw, "Reset", {"type": "Immediate"})
    assert (unsigned.outcome, unsigned.rule) == (Outcome.REJECT, "admin commands")
    assert unsigned.reason == ("needs a signature from a key with role admin; "
                               "the message is not signed")
    ok = decide(fw, "Reset", signed({"type": "Immediate"}, "Reset", OPS))
    assert (ok.outcome, ok.key_ids, ok.sign) == (Outcome.FORWARD, ("ops",), False)
    assert "signed by ops" in ok.reason
    wrong_role = decide(fw, "SetVariables", signed({"x": 1}, "SetVariables", VIEWER))
    assert wrong_role.outcome is Outcome.REJECT
    assert "key viewer lacks role admin" in wrong_role.reason
    unknown = decide(fw, "SetVariables", signed({"x": 1}, "SetVariables", STRANGER))
    assert "key not in the policy" in unknown.reason
    moved = decide(fw, "SetVariables", signed({"type": "Immediate"}, "Reset", OPS))
    assert "(key ops): does not verify" in moved.reason


def test_require_rejects_and_never_falls_through() -> None:
    """A failed require rejects even when a later rule would have let the message pass."""
    text = POLICY.replace('default = "reject"', 'default = "forward"') + textwrap.dedent("""
        [[rules]]
        name = "everything else"
        then = "forward"
        """)
    d = decide(firewall(text), "Reset", {"type": "Immediate"})
    assert (d.outcome, d.rule) == (Outcome.REJECT, "admin commands")


def test_expired_and_future_signatures_do_not_count() -> None:
    fw = firewall()
    old = decide(fw, "Reset", signed({"a": 1}, "Reset", OPS, at=NOW - 301))
    assert "expired: signed 301 s ago (max_age_s 300)" in old.reason
    future = decide(fw, "Reset", signed({"a": 1}, "Reset", OPS, at=NOW + 120))
    assert "in the future" in future.reason
    within_skew = decide(fw, "Reset", signed({"a": 1}, "Reset", OPS, at=NOW + 30))
    assert within_skew.forwarded


def test_count_needs_distinct_keys() -> None:
    fw = firewall()
    payload = {"firmware": {"location": "https://fw.example/1.bin"}}
    one = decide(fw, "UpdateFirmware", signed(payload, "UpdateFirmware", OPS))
    assert one.outcome is Outcome.REJECT and "found 1" in one.reason
    same_key_twice = decide(fw, "UpdateFirmware", signed(payload, "UpdateFirmware", OPS, OPS))
    assert same_key_twice.outcome is Outcome.REJECT
    two = decide(fw, "UpdateFirmware", signed(payload, "UpdateFirmware", OPS, SECOPS))
    assert two.forwarded and set(two.key_ids) == {"ops", "secops"}
    mixed = decide(fw, "UpdateFirmware",
                   signed(payload, "UpdateFirmware", STRANGER, VIEWER, OPS, SECOPS, at=NOW + 1))
    assert mixed.forwarded


def test_require_without_roles_accepts_any_policy_key() -> None:
    fw = firewall()
    assert decide(fw, "GetLog", signed({"log": 1}, "GetLog", VIEWER)).forwarded
    assert not decide(fw, "GetLog", signed({"log": 2}, "GetLog", STRANGER)).forwarded


def test_replay_is_refused_the_second_time() -> None:
    fw = firewall()
    message = signed({"type": "Immediate"}, "Reset", OPS)
    assert decide(fw, "Reset", message).forwarded
    again = decide(fw, "Reset", copy.deepcopy(message), at=NOW + 10)
    assert again.outcome is Outcome.REJECT and "(key ops): replayed" in again.reason
    # a fresh signature on the same content is a new message
    assert decide(fw, "Reset", signed({"type": "Immediate"}, "Reset", OPS, at=NOW + 1),
                  at=NOW + 10).forwarded
    # once it would be expired anyway, it is forgotten, and still refused (as expired)
    late = decide(fw, "Reset", message, at=NOW + 700)
    assert "expired" in late.reason
    assert fw.replay_memory <= 2


def test_replay_cannot_be_dodged_by_malleating_ecdsa() -> None:
    fw = firewall()
    message = signed({"type": "Immediate"}, "Reset", OPS)
    assert decide(fw, "Reset", message).forwarded
    twin = copy.deepcopy(message)
    r, s = decode_dss_signature(base64.b64decode(twin["signatures"][0]["value"]))
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    twin["signatures"][0]["value"] = base64.b64encode(encode_dss_signature(r, n - s)).decode()
    assert "replayed" in decide(fw, "Reset", twin).reason


def test_replay_is_refused_up_to_the_last_acceptable_instant() -> None:
    fw = firewall()
    message = signed({"type": "Immediate"}, "Reset", OPS)
    assert decide(fw, "Reset", message).forwarded
    # 600 s is the policy's longest max_age_s; 300 s this rule's: both edges hold
    assert "replayed" in decide(fw, "Reset", message, at=NOW + 300).reason
    assert "expired" in decide(fw, "Reset", message, at=NOW + 300.001).reason


def test_replay_memory_outlives_the_strictest_rule() -> None:
    """A signature accepted under a 300 s rule is remembered for the policy's longest max_age."""
    text = POLICY.replace('actions = ["Reset", "Set*"]', 'actions = ["Set*"]') + textwrap.dedent("""
        [[rules]]
        name = "resets from core"
        actions = ["Reset"]
        sources = ["core"]
        require = { roles = ["admin"], max_age_s = 600 }
        then = "forward"
        [[rules]]
        name = "resets from main"
        actions = ["Reset"]
        sources = ["main"]
        require = { roles = ["admin"], max_age_s = 30 }
        then = "forward"
        """)
    fw = firewall(text)
    message = signed({"type": "Immediate"}, "Reset", OPS)
    assert decide(fw, "Reset", message, source="main").forwarded
    assert "replayed" in decide(fw, "Reset", message, source="core", at=NOW + 100).reason


def test_replay_memory_is_bounded_and_fails_closed() -> None:
    fw = firewall(replay_capacity=2)
    for i in range(2):
        assert decide(fw, "Reset", signed({"n": i}, "Reset", OPS)).forwarded
    full = decide(fw, "Reset", signed({"n": 9}, "Reset", OPS))
    assert full.outcome is Outcome.REJECT and "replay memory is full" in full.reason
    # after max_age_s the old digests are forgotten and there is room again
    assert decide(fw, "Reset", signed({"n": 9}, "Reset", OPS, at=NOW + 700), at=NOW + 700) \
        .forwarded


def test_sign_carries_canonical_bytes_and_countersigning_keeps_signatures_valid() -> None:
    fw = firewall()
    reading = {"evseId": 1, "meterValue": [{"timestamp": "2026-11-22T09:59:00Z",
                                            "sampledValue": [{"value": 16.0}]}]}
    from_station = signed(reading, "MeterValues", VIEWER, direction="from-station")
    d = decide(fw, "MeterValues", from_station, source="CS-1", direction="from-station")
    assert d.forwarded and d.sign and d.canonical_payload is not None
    out = sign_payload(from_station, "MeterValues", "from-station", NODE, NOW,
                       canonical_payload=d.canonical_payload)
    results = verify_signatures(out, "MeterValues", "from-station", NOW)
    assert [type(r) for r in results] == [VerifiedSignature, VerifiedSignature]
    assert out["signatures"][1]["keyId"] == NODE.key_id


@pytest.mark.parametrize(("payload", "reason"), [
    ([1, 2], "the payload is not a JSON object"),
    ({"signatures": "x"}, "signatures is not an array"),
    ({"signatures": [{}] * 16}, "already carries 16"),
    ({"n": float("nan")}, "no canonical form"),
])
def test_payloads_that_cannot_be_countersigned_are_rejected(payload: Any, reason: str) -> None:
    d = decide(firewall(), "MeterValues", payload, source="CS-1", direction="from-station")
    assert d.outcome is Outcome.REJECT and d.rule == "metering is countersigned"
    assert reason in d.reason and not d.sign


def test_rate_limit_per_source() -> None:
    fw = firewall()
    def beat(source: str) -> Decision:
        return decide(fw, "Heartbeat", {}, source=source, direction="from-station")

    assert all(beat("CS-1").forwarded for _ in range(3))
    limited = beat("CS-1")
    assert (limited.outcome, limited.rule) == (Outcome.REJECT, "heartbeats are limited")
    assert limited.reason == "rate limit: more than 3 per 10 s from CS-1"
    assert beat("CS-2").forwarded  # per source
    # 3 per 10 s refills one token every 3.33 s
    assert decide(fw, "Heartbeat", {}, source="CS-1", direction="from-station",
                  at=NOW + 3.4).forwarded
    assert not decide(fw, "Heartbeat", {}, source="CS-1", direction="from-station",
                      at=NOW + 3.5).forwarded


def test_answers_pass_unless_a_rule_names_them() -> None:
    fw = firewall()
    d = decide(fw, "Authorize", {"idTokenInfo": {}}, direction="to-station", message="result")
    assert (d.outcome, d.rule) == (Outcome.FORWARD, None)
    e = decide(fw, "Heartbeat", {}, direction="to-station", message="error")
    assert d.forwarded and e.forwarded
    first = decide(fw, "Reset", {"status": "Accepted"}, source="CS-1",
                   direction="from-station", message="result")
    second = decide(fw, "Reset", {"status": "Accepted"}, source="CS-1",
                    direction="from-station", message="result")
    assert first.rule == second.rule == "answers to Reset are checked"
    assert first.forwarded and second.outcome is Outcome.DROP


def test_explain_names_the_rule_and_the_rules_passed_over_without_recording() -> None:
    fw = firewall()
    message = signed({"type": "Immediate"}, "Reset", OPS)
    for _ in range(2):
        explanation = fw.explain("Reset", "to-station", "main", message, NOW)
        assert explanation.decision.forwarded and explanation.decision.rule == "admin commands"
        assert explanation.line == 36
    assert explanation.skipped == (
        "rule 'secondaries are read-only' (line 18): source main is not in "
        "[analytics, billing-*]",
        "rule 'shadow is silenced' (line 24): source main is not in [shadow]",
        "rule 'firmware needs two admins' (line 29): action Reset is not in [UpdateFirmware]",
    )
    assert fw.replay_memory == 0
    assert decide(fw, "Reset", message).forwarded  # explain did not burn the signature


def test_schema_validation_per_rule_and_per_policy() -> None:
    text = POLICY.replace('name = "boot"', 'name = "boot"\nvalidate_schema = true')
    fw = firewall(text)
    boot = {"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}}
    assert decide(fw, "BootNotification", boot, source="CS-1", direction="from-station",
                  ocpp_version="ocpp2.0.1").forwarded
    signed_boot = signed(boot, "BootNotification", VIEWER, direction="from-station")
    assert decide(fw, "BootNotification", signed_boot, source="CS-1", direction="from-station",
                  ocpp_version="ocpp2.0.1").forwarded  # signatures are not schema members
    bad = decide(fw, "BootNotification", {"reason": "PowerUp"}, source="CS-1",
                 direction="from-station", ocpp_version="ocpp2.0.1")
    assert bad.outcome is Outcome.REJECT and bad.reason.startswith(
        "schema: BootNotificationRequest.json:")
    v16 = decide(fw, "BootNotification", {"chargePointModel": "M", "chargePointVendor": "V"},
                 source="CS-1", direction="from-station", ocpp_version="ocpp1.6")
    assert v16.forwarded
    unknown = decide(fw, "StatusNotification", {}, source="CS-1", direction="from-station",
                     ocpp_version="ocpp9")
    assert "no official schemas" in unknown.reason
    # without a version nothing is validated
    assert decide(fw, "BootNotification", {"reason": "PowerUp"}, source="CS-1",
                  direction="from-station").forwarded
    policy_wide = firewall('default = "forward"\nvalidate_schema = true\n')
    assert not decide(policy_wide, "Reset", {"type": "Sideways"},
                      ocpp_version="ocpp2.1").forwarded
    assert decide(policy_wide, "Reset", {"status": "Accepted"}, message="result",
                  direction="from-station", ocpp_version="ocpp2.1").forwarded
    assert not decide(policy_wide, "NoSuchAction", {}, ocpp_version="ocpp2.1").forwarded


def test_caller_mistakes_raise() -> None:
    with pytest.raises(ValueError, match="direction"):
        decide(firewall(), "Reset", {}, direction="down")
    with pytest.raises(ValueError, match="message"):
        decide(firewall(), "Reset", {}, message="reply")


def test_replay_cache_forgets_by_bucket() -> None:
    cache = ReplayCache(capacity=10, bucket_s=10)
    assert cache.add(b"a", 105.0, 100.0) and cache.add(b"b", 125.0, 100.0)
    assert cache.seen(b"a", 104.0) and cache.seen(b"a", 105.0)
    assert not cache.seen(b"a", 105.001)
    assert cache.room(111.0) == 9  # a's bucket [100, 110) is gone
    assert cache.seen(b"b", 111.0)
    assert cache.add(b"old", 50.0, 111.0) and len(cache) == 1  # already expired: not kept


def test_rate_limiter_is_bounded() -> None:
    limiter = RateLimiter(1, 60.0, max_sources=3)
    for source in ("a", "b", "c", "d"):
        assert limiter.allow(source, 0.0)
    assert len(limiter) == 3
    assert limiter.allow("a", 1.0)  # "a" was evicted, least recently used
    assert not limiter.allow("d", 1.0)
    assert not limiter.allow("d", 2.0, record=False) and len(limiter) == 3


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["Reset", "SetVariables", "UpdateFirmware", "MeterValues", "Heartbeat",
                        "GetLog", "X"]),
       st.sampled_from(["to-station", "from-station"]),
       st.sampled_from(["main", "analytics", "CS-1", "shadow"]),
       st.sampled_from(["call", "result", "error"]),
       st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["signatures", "keyId", "value", "a"]),
                                      inner, max_size=4), max_leaves=10))
def test_any_message_gets_a_decision_never_an_exception(
        action: str, direction: str, source: str, kind: str, payload: Any) -> None:
    decision = decide(firewall_for_fuzz, action, payload, source=source, direction=direction,
                      message=kind, ocpp_version="ocpp2.0.1")
    assert decision.outcome in Outcome


firewall_for_fuzz = firewall(POLICY.replace('name = "boot"', 'name = "boot"\n'
                                                              "validate_schema = true"))
