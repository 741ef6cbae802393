"""End-to-end signatures: what they bind, and that garbage is refused with a reason."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policies.canonical import canonicalize
from policies.signatures import (
    ALGORITHMS,
    MAX_SIGNATURES,
    KeyFormatError,
    RejectedSignature,
    SigningKey,
    VerifiedSignature,
    format_timestamp,
    key_id_of,
    load_public_key,
    parse_timestamp,
    public_key_from_key_id,
    sign_payload,
    signed_content,
    verify_signatures,
)

NOW = 1_795_341_600.0  # 2026-11-22T10:00:00Z
KEYS = {alg: SigningKey.generate(alg) for alg in ALGORITHMS}
P256 = KEYS["secp256r1"]
VECTORS = json.loads((Path(__file__).parent / "vectors" / "e2e-signatures.json")
                     .read_text("utf-8"))


def verified(results: list[VerifiedSignature | RejectedSignature]) -> list[VerifiedSignature]:
    return [r for r in results if isinstance(r, VerifiedSignature)]


def only_rejections(results: list[VerifiedSignature | RejectedSignature]) -> list[str]:
    assert results, "expected at least one result"
    assert all(isinstance(r, RejectedSignature) for r in results), results
    return [r.reason for r in results if isinstance(r, RejectedSignature)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sign_then_verify_each_algorithm(algorithm: str) -> None:
    key = KEYS[algorithm]
    signed = sign_payload({"type": "Immediate"}, "Reset", "to-station", key, NOW, name="ops")
    assert signed["type"] == "Immediate"
    entry = signed["signatures"][0]
    assert entry["keyId"] == key.key_id and entry["algorithm"] == algorithm
    assert entry["timestamp"] == "2026-11-22T10:00:00.000Z" and entry["name"] == "ops"
    (result,) = verify_signatures(json.loads(json.dumps(signed)), "Reset", "to-station", NOW)
    assert isinstance(result, VerifiedSignature)
    assert (result.key_id, result.algorithm, result.timestamp, result.name) == \
        (key.key_id, algorithm, NOW, "ops")


def test_signing_leaves_earlier_signatures_valid_and_the_input_untouched() -> None:
    payload = {"evseId": 1, "meterValue": [{"timestamp": "2026-11-22T09:59:00Z",
                                            "sampledValue": [{"value": 16.0}]}]}
    original = copy.deepcopy(payload)
    once = sign_payload(payload, "MeterValues", "from-station", KEYS["ed25519"], NOW)
    twice = sign_payload(once, "MeterValues", "from-station", P256, NOW + 1)
    thrice = sign_payload(twice, "MeterValues", "from-station", KEYS["secp384r1"], NOW + 2)
    assert payload == original and len(once["signatures"]) == 1
    results = verify_signatures(thrice, "MeterValues", "from-station", NOW + 3)
    assert [r.index for r in verified(results)] == [0, 1, 2]


json_leaf = (st.none() | st.booleans() | st.integers(-(10**9), 10**9)
             | st.floats(allow_nan=False, allow_infinity=False, width=32) | st.text(max_size=8))
json_tree = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "signatures"),
                           json_tree, min_size=1, max_size=5)


def _containers(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        found.append(path)
        for key, item in value.items():
            found += _containers(item, (*path, key))
    elif isinstance(value, list):
        found.append(path)
        for i, item in enumerate(value):
            found += _containers(item, (*path, i))
    return found


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.data())
def test_any_change_to_the_content_fails_verification(payload: dict[str, Any],
                                                      data: st.DataObject) -> None:
    signed = sign_payload(payload, "DataTransfer", "to-station", P256, NOW)
    tampered = copy.deepcopy(signed)
    body = {k: v for k, v in tampered.items() if k != "signatures"}
    path = data.draw(st.sampled_from(_containers(body)))
    container = _at(tampered, path)
    if isinstance(container, dict) and container and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(container)))
        if data.draw(st.booleans()):
            del container[key]
        else:
            container[key] = data.draw(json_tree)
    elif isinstance(container, dict):
        container[data.draw(st.text(min_size=1, max_size=5))] = data.draw(json_tree)
    elif container and data.draw(st.booleans()):
        container[data.draw(st.integers(0, len(container) - 1))] = data.draw(json_tree)
    else:
        container.append(data.draw(json_tree))
    assume(canonicalize({k: v for k, v in tampered.items() if k != "signatures"})
           != canonicalize(payload))
    reasons = only_rejections(verify_signatures(tampered, "DataTransfer", "to-station", NOW))
    assert reasons == ["does not verify"]


@settings(max_examples=60, deadline=None)
@given(payloads, st.randoms(use_true_random=False), st.integers(0, 4))
def test_member_order_and_whitespace_do_not_matter(payload: dict[str, Any], rnd: Any,
                                                   indent: int) -> None:
    signed = sign_payload(payload, "DataTransfer", "from-station", KEYS["ed25519"], NOW)

    def shuffled(value: Any) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            rnd.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v) for v in value]
        return value

    text = json.dumps(shuffled(signed), indent=indent or None, ensure_ascii=bool(indent % 2))
    results = verify_signatures(json.loads(text), "DataTransfer", "from-station", NOW)
    assert len(verified(results)) == 1


@settings(max_examples=40, deadline=None)
@given(payloads, st.sampled_from(["Reset", "UpdateFirmware", "DataTransfer", "reset", ""]),
       st.sampled_from(["to-station", "from-station"]))
def test_a_signature_cannot_move_to_another_action_or_direction(
        payload: dict[str, Any], action: str, direction: str) -> None:
    signed = sign_payload(payload, "Reset", "to-station", P256, NOW)
    results = verify_signatures(signed, action, direction, NOW)
    if (action, direction) == ("Reset", "to-station"):
        assert len(verified(results)) == 1
    else:
        assert only_rejections(results) == ["does not verify"]


def test_metadata_is_bound_too() -> None:
    signed = sign_payload({"a": 1}, "Reset", "to-station", P256, NOW, description="weekly")
    for field, value in (("timestamp", "2026-11-22T10:00:01.000Z"), ("description", "other"),
                         ("name", "added"), ("keyId", KEYS["ed25519"].key_id)):
        tampered = copy.deepcopy(signed)
        tampered["signatures"][0][field] = value
        assert only_rejections(verify_signatures(tampered, "Reset", "to-station", NOW))


def test_freshness_is_checked_against_now() -> None:
    signed = sign_payload({"a": 1}, "Reset", "to-station", P256, NOW)
    assert verified(verify_signatures(signed, "Reset", "to-station", NOW + 300, max_age_s=300))
    (late,) = only_rejections(verify_signatures(signed, "Reset", "to-station", NOW + 301,
                                                max_age_s=300))
    assert late.startswith("expired")
    (early,) = only_rejections(verify_signatures(signed, "Reset", "to-station", NOW - 61))
    assert "in the future" in early
    assert verified(verify_signatures(signed, "Reset", "to-station", NOW - 59))


def _entry(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"keyId": P256.key_id, "value": "MEUCIQ==",
                            "algorithm": "secp256r1", "timestamp": "2026-11-22T10:00:00Z"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def _other_curve_key_id(curve: ec.EllipticCurve) -> str:
    public = ec.generate_private_key(curve).public_key()
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


@pytest.mark.parametrize(("entry", "reason"), [
    ("not an object", "is not a JSON object"),
    ([1, 2], "is not a JSON object"),
    (_entry(keyId=None), "keyId is missing"),
    (_entry(keyId=7), "keyId is missing or not a non-empty string"),
    (_entry(keyId="!!not base64!!"), "keyId is unusable: not base64"),
    (_entry(keyId="QUJD"), "keyId is unusable: not a DER"),
    (_entry(keyId="A" * 600), "keyId is longer than"),
    (_entry(keyId=_other_curve_key_id(ec.SECP256K1())), "curve secp256k1 is not supported"),
    (_entry(keyId=_other_curve_key_id(ec.SECP384R1())), "does not match the key (secp384r1)"),
    (_entry(value=None), "value is missing"),
    (_entry(value="%%%"), "value is not base64"),
    (_entry(value="MEUCIQ=="), "does not verify"),
    (_entry(value=""), "value is missing or not a non-empty string"),
    (_entry(algorithm="rsa-sha256"), "unknown algorithm"),
    (_entry(algorithm=None, keyId=KEYS["ed25519"].key_id), "does not match the key (ed25519)"),
    (_entry(timestamp="yesterday"), "not an RFC 3339 UTC time"),
    (_entry(timestamp="2026-11-22T10:00:00+01:00"), "not an RFC 3339 UTC time"),
    (_entry(timestamp="2026-13-40T10:00:00Z"), "not an RFC 3339 UTC time"),
    (_entry(timestamp=None), "timestamp is missing"),
    (_entry(name=12), "name is missing or not a non-empty string"),
    (_entry(description="x" * 5000), "description is longer than"),
    (_entry(extra=float("nan")), "signature metadata has no canonical form"),
])
def test_garbage_entries_are_refused_with_a_reason(entry: object, reason: str) -> None:
    (result,) = verify_signatures({"type": "Hard", "signatures": [entry]}, "Reset", "to-station",
                                  NOW)
    assert isinstance(result, RejectedSignature) and result.index == 0
    assert reason in result.reason, result.reason


def test_truncated_and_mangled_der_is_refused() -> None:
    signed = sign_payload({"a": 1}, "Reset", "to-station", P256, NOW)
    raw = base64.b64decode(signed["signatures"][0]["value"])
    for broken in (raw[:-1], raw[:8], raw[:1], raw + b"\x00", b"\x30" + raw[1:4],
                   bytes(len(raw)), raw[::-1]):
        tampered = copy.deepcopy(signed)
        tampered["signatures"][0]["value"] = base64.b64encode(broken).decode()
        assert only_rejections(verify_signatures(tampered, "Reset", "to-station", NOW)) == \
            ["does not verify"]


def test_whole_array_problems_are_one_rejection() -> None:
    for payload, reason in (({"signatures": {}}, "not an array"),
                            ({"signatures": "x"}, "not an array"),
                            ({"signatures": [{}] * (MAX_SIGNATURES + 1)}, "at most 16"),
                            ({"n": float("nan"), "signatures": [{}]}, "no canonical form")):
        (result,) = verify_signatures(payload, "Reset", "to-station", NOW)
        assert isinstance(result, RejectedSignature) and result.index is None
        assert reason in result.reason
    assert verify_signatures({"a": 1}, "Reset", "to-station", NOW) == []
    assert verify_signatures({"signatures": []}, "Reset", "to-station", NOW) == []
    with pytest.raises(ValueError, match="direction"):
        verify_signatures({}, "Reset", "sideways", NOW)


huge = st.integers(-(2**70), 2**70)
garbage = st.recursive(
    st.none() | st.booleans() | huge | st.floats() | st.text(max_size=30)
    | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["keyId", "value", "algorithm", "timestamp", "name", "x"]), inner,
        max_size=6),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(garbage, max_size=20), json_tree)
def test_hypothesis_garbage_never_raises(entries: list[Any], content: Any) -> None:
    results = verify_signatures({"c": content, "signatures": entries}, "Reset", "to-station",
                                NOW, max_age_s=300)
    assert all(isinstance(r, RejectedSignature) for r in results)
    if len(entries) > MAX_SIGNATURES:
        assert len(results) == 1


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["keyId", "value", "algorithm", "timestamp"]), garbage)
def test_one_garbage_field_in_a_real_signature_is_refused(field: str, value: Any) -> None:
    signed = sign_payload({"a": 1}, "Reset", "to-station", P256, NOW)
    entry = signed["signatures"][0]
    assume(entry[field] != value)
    entry[field] = value
    if field == "algorithm" and value == "secp256r1":
        return
    assert only_rejections(verify_signatures(signed, "Reset", "to-station", NOW))


def test_ecdsa_malleated_signature_signs_the_same_bytes() -> None:
    """(r, n - s) is valid too; replay protection keys on the signed bytes, not on value."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    signed = sign_payload({"a": 1}, "Reset", "to-station", P256, NOW)
    r, s = decode_dss_signature(base64.b64decode(signed["signatures"][0]["value"]))
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    twin = copy.deepcopy(signed)
    twin["signatures"][0]["value"] = base64.b64encode(encode_dss_signature(r, n - s)).decode()
    (a,) = verify_signatures(signed, "Reset", "to-station", NOW)
    (b,) = verify_signatures(twin, "Reset", "to-station", NOW)
    assert isinstance(a, VerifiedSignature) and isinstance(b, VerifiedSignature)
    assert a.digest == b.digest


def test_vectors_reproduce() -> None:
    secret = bytes.fromhex(VECTORS["ed25519_secret_key_hex"])
    ed = SigningKey.from_private_key(ed25519.Ed25519PrivateKey.from_private_bytes(secret))
    for vector in VECTORS["vectors"]:
        sent = json.loads(vector["payload_as_sent"])
        entry = sent["signatures"][-1]
        content = signed_content(sent, vector["action"], vector["direction"])
        assert content.signing_input(entry).decode() == vector["signed_bytes_utf8"]
        (result,) = verify_signatures(sent, vector["action"], vector["direction"],
                                      VECTORS["now"])
        assert isinstance(result, VerifiedSignature)
        if vector["deterministic"]:
            value = base64.b64encode(ed.sign(vector["signed_bytes_utf8"].encode())).decode()
            assert value == entry["value"]


def test_keys_load_and_refuse_clearly() -> None:
    pem = P256.public_pem()
    assert key_id_of(public_key_from_key_id(P256.key_id)) == key_id_of(load_public_key(pem)) \
        == P256.key_id
    assert SigningKey.from_pem(P256.private_pem()).key_id == P256.key_id
    with pytest.raises(KeyFormatError, match="private key"):
        load_public_key(P256.private_pem())
    with pytest.raises(KeyFormatError):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFormatError, match="not a PEM private key"):
        SigningKey.from_pem(b"hello")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    with pytest.raises(KeyFormatError, match="not supported"):
        SigningKey.from_pem(rsa_pem)
    encrypted = P256.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(KeyFormatError, match="encrypted"):
        SigningKey.from_pem(encrypted)
    with pytest.raises(KeyFormatError, match="unknown algorithm"):
        SigningKey.generate("rsa")


def test_timestamps_round_trip() -> None:
    assert format_timestamp(NOW + 0.0004) == "2026-11-22T10:00:00.000Z"
    assert format_timestamp(NOW + 0.9996) == "2026-11-22T10:00:01.000Z"
    assert parse_timestamp("2026-11-22T10:00:00.250Z") == NOW + 0.25
    assert parse_timestamp("2026-11-22t10:00:00+00:00") == NOW
    assert parse_timestamp("2026-11-22 10:00:00Z") is None
    # the calendar and the clock are checked: no 29 February 2026, no 24:00, no leap second
    for impossible in ("2026-02-29T10:00:00Z", "2026-11-22T24:00:00Z",
                       "2026-11-22T23:60:00Z", "2026-12-31T23:59:60Z", "2026-13-01T00:00:00Z",
                       "2026-00-10T00:00:00Z"):
        assert parse_timestamp(impossible) is None, impossible
    assert parse_timestamp("2024-02-29T00:00:00Z") == 1709164800.0


def test_signing_refuses_what_it_cannot_sign() -> None:
    with pytest.raises(ValueError, match="not an array"):
        sign_payload({"signatures": {}}, "Reset", "to-station", P256, NOW)
    with pytest.raises(ValueError, match="already carries"):
        sign_payload({"signatures": [{}] * MAX_SIGNATURES}, "Reset", "to-station", P256, NOW)
    with pytest.raises(ValueError, match="direction"):
        sign_payload({}, "Reset", "up", P256, NOW)


def test_sha384_is_used_for_p384() -> None:
    key = KEYS["secp384r1"]
    signed = sign_payload({"a": 1}, "Reset", "to-station", key, NOW)
    message = signed_content(signed, "Reset", "to-station").signing_input(signed["signatures"][0])
    public = key.private_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(base64.b64decode(signed["signatures"][0]["value"]), message,
                  ec.ECDSA(hashes.SHA384()))
