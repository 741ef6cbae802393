"""Firewall benchmark: what the policy costs per frame, sans-IO (no sockets, one process).

Measured in one run, per frame, on a ~700-byte OCPP 2.0.1 TransactionEvent payload:

* ``frame json``: ``json.loads`` + ``json.dumps`` of the frame (what forwarding does anyway);
* ``decide, no signatures``: a policy decision by a rule without ``require``;
* ``decide + verify 1 sig``: a rule requiring one admin signature (P-256), each frame
  carrying a fresh signature (so replay protection records every one);
* ``decide + verify + countersign``: the same plus the node's own signature (P-256);
* ``decide + schema``: a rule with ``validate_schema = true`` (compiled validator);
* canonicalization of the payload: the fast path, the reference serializer and the
  pure-Python ``rfc8785`` package, with and without floats that force the slow path;
* the raw ECDSA P-256 verify and sign, for scale.

    .venv/bin/python bench/firewall.py               # ~10 s
    .venv/bin/python bench/firewall.py --frames 500  # quicker
    .venv/bin/python bench/firewall.py --json out.json

Figures are medians over ``--repeats`` runs of ``--frames`` frames each, in microseconds
per frame. Aim (issue 4): verifying one signature adds <= 100 us per frame.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from policies import (
    Firewall,
    SigningKey,
    canonicalize,
    canonicalize_reference,
    parse_policy,
    sign_payload,
)
from policies.jws import Certificate, load_certificate, verify_jws

AIM_VERIFY_US = 100.0
NOW = 1_795_341_600.0


def transaction_event(seq: int, integral_floats: bool = False) -> dict[str, Any]:
    """A realistic ~700-byte TransactionEvent (OCPP 2.0.1) payload."""
    energy = 12345.0 if integral_floats else 12345.6
    return {
        "eventType": "Updated",
        "timestamp": "2026-11-22T10:00:00.000Z",
        "triggerReason": "MeterValuePeriodic",
        "seqNo": seq,
        "transactionInfo": {"transactionId": "b7c1f0a2-5e3d-4c8b-9f61-2d7a8e4b1c90",
                            "chargingState": "Charging"},
        "evse": {"id": 1, "connectorId": 1},
        "idToken": {"idToken": "04A2B3C4D5E6F7", "type": "ISO14443"},
        "meterValue": [{
            "timestamp": "2026-11-22T10:00:00.000Z",
            "sampledValue": [
                {"value": energy, "context": "Sample.Periodic",
                 "measurand": "Energy.Active.Import.Register", "location": "Outlet",
                 "unitOfMeasure": {"unit": "Wh", "multiplier": 0}},
                {"value": 7.2, "measurand": "Power.Active.Import",
                 "unitOfMeasure": {"unit": "kW", "multiplier": 0}},
                {"value": 230.4, "measurand": "Voltage", "phase": "L1-N"},
                {"value": 55, "measurand": "SoC", "location": "EV"},
            ],
        }],
    }


def policy_text(admin: SigningKey) -> str:
    return f"""
default = "reject"

[[keys]]
id = "ops"
public_key = "{admin.key_id}"
roles = ["admin"]

[[rules]]
name = "secondaries are read-only"
sources = ["analytics"]
direction = "to-station"
then = "reject"

[[rules]]
name = "plain"
actions = ["TransactionEvent"]
sources = ["CS-plain"]
then = "forward"

[[rules]]
name = "signed"
actions = ["TransactionEvent"]
sources = ["CS-signed"]
require = {{ roles = ["admin"], count = 1, max_age_s = 300 }}
then = "forward"

[[rules]]
name = "countersigned"
actions = ["TransactionEvent"]
sources = ["CS-counter"]
require = {{ roles = ["admin"], count = 1, max_age_s = 300 }}
sign = true
then = "forward"

[[rules]]
name = "schema"
actions = ["TransactionEvent"]
sources = ["CS-schema"]
validate_schema = true
then = "forward"
"""


def per_frame_us(run: Callable[[], None], frames: int, repeats: int,
                 setup: Callable[[], None] | None = None) -> float:
    """Median over ``repeats`` of the mean time per frame of ``run`` (which does ``frames``)."""
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - start) / frames / 1000.0)
    return statistics.median(samples)


def _jws_frames(payload: dict[str, Any], frames: int) -> tuple[list[dict[str, str]],
                                                               dict[str, Certificate]]:
    """Signed Messages of Part 4 chapter 7 (ES256, a certificate of its own), made with
    ``cryptography`` directly, as a station or CSMS would send them."""
    import base64
    import hashlib
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    from cryptography.x509.oid import NameOID

    def b64u(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench signer")])
    start = datetime.fromtimestamp(NOW, UTC) - timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(start)
            .not_valid_after(start + timedelta(days=30)).sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    header = {"alg": "ES256", "OCPPAction": "TransactionEvent", "OCPPMessageTypedId": 2,
              "x5t#S256": b64u(hashlib.sha256(der).digest())}
    protected = b64u(json.dumps(header).encode())
    body = b64u(json.dumps(payload, separators=(",", ":")).encode())
    out = []
    for _ in range(frames):
        r, s = decode_dss_signature(key.sign(f"{protected}.{body}".encode(),
                                             ec.ECDSA(hashes.SHA256())))
        out.append({"protected": protected, "payload": body,
                    "signature": b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))})
    loaded = load_certificate(cert.public_bytes(serialization.Encoding.PEM))
    return out, {loaded.x5t: loaded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames per run (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    frames, repeats = args.frames, args.repeats

    admin, node_key = SigningKey.generate(), SigningKey.generate()
    policy = parse_policy(policy_text(admin), "bench-policy.toml")
    payload = transaction_event(1)
    content_bytes = len(json.dumps(payload, separators=(",", ":")))
    frame = json.dumps([2, "19223201", "TransactionEvent", payload])
    # fresh signatures for every frame: replay protection sees each one once per firewall
    signed = [sign_payload(transaction_event(i), "TransactionEvent", "from-station", admin,
                           NOW) for i in range(frames)]
    signed_bytes = len(json.dumps(signed[0], separators=(",", ":")))

    state: dict[str, Firewall] = {}

    def fresh() -> None:
        state["fw"] = Firewall(policy)

    def frame_json() -> None:
        for _ in range(frames):
            json.dumps(json.loads(frame))

    def decide_plain() -> None:
        decide = state["fw"].decide
        for _ in range(frames):
            decide("TransactionEvent", "from-station", "CS-plain", payload, NOW)

    def decide_signed() -> None:
        decide = state["fw"].decide
        for message in signed:
            if not decide("TransactionEvent", "from-station", "CS-signed", message,
                          NOW).forwarded:
                raise SystemExit("bench: a signed frame was not forwarded")

    def decide_countersign() -> None:
        decide = state["fw"].decide
        for message in signed:
            d = decide("TransactionEvent", "from-station", "CS-counter", message, NOW)
            if not d.sign:
                raise SystemExit("bench: the countersign rule did not ask to sign")
            sign_payload(message, "TransactionEvent", "from-station", node_key, NOW,
                         canonical_payload=d.canonical_payload)

    def decide_schema() -> None:
        decide = state["fw"].decide
        for _ in range(frames):
            decide("TransactionEvent", "from-station", "CS-schema", payload, NOW,
                   ocpp_version="ocpp2.0.1")

    fresh()
    if not state["fw"].decide("TransactionEvent", "from-station", "CS-schema", payload, NOW,
                              ocpp_version="ocpp2.0.1").forwarded:
        raise SystemExit("bench: the payload does not pass its schema")

    results: dict[str, float] = {}
    results["frame json (loads + dumps)"] = per_frame_us(frame_json, frames, repeats)
    results["decide, no signatures"] = per_frame_us(decide_plain, frames, repeats, fresh)
    results["decide + verify 1 sig"] = per_frame_us(decide_signed, frames, repeats, fresh)
    results["decide + verify + countersign"] = per_frame_us(decide_countersign, frames, repeats,
                                                            fresh)
    results["decide + schema validation"] = per_frame_us(decide_schema, frames, repeats, fresh)

    floats = transaction_event(1, integral_floats=True)
    canon: dict[str, Callable[[Any], bytes]] = {"fast path": canonicalize,
                                                "reference": canonicalize_reference}
    try:
        import rfc8785

        canon["rfc8785 package"] = rfc8785.dumps
    except ImportError:
        pass
    for label, document in (("", payload), (" (integral float)", floats)):
        for name, function in canon.items():
            def run(function: Callable[[Any], bytes] = function,
                    document: Any = document) -> None:
                for _ in range(frames):
                    function(document)
            results[f"canonicalize: {name}{label}"] = per_frame_us(run, frames, repeats)

    raw = canonicalize(payload)
    p256 = ec.generate_private_key(ec.SECP256R1())
    signature = p256.sign(raw, ec.ECDSA(hashes.SHA256()))
    public = p256.public_key()

    def ecdsa_verify() -> None:
        for _ in range(frames):
            public.verify(signature, raw, ec.ECDSA(hashes.SHA256()))

    def ecdsa_sign() -> None:
        for _ in range(frames):
            p256.sign(raw, ec.ECDSA(hashes.SHA256()))

    jws_payloads, certs = _jws_frames(payload, frames)

    def jws_verify() -> None:
        for signed_jws in jws_payloads:
            verify_jws(signed_jws, "TransactionEvent-Signed", 2, certs, NOW)

    results["ECDSA P-256 verify alone"] = per_frame_us(ecdsa_verify, frames, repeats)
    results["OCPP 2.1 JWS verify (ES256, joserfc)"] = per_frame_us(jws_verify, frames, repeats)
    results["ECDSA P-256 sign alone"] = per_frame_us(ecdsa_sign, frames, repeats)

    added = results["decide + verify 1 sig"] - results["decide, no signatures"]
    print(f"firewall cost per frame: payload {content_bytes} bytes ({signed_bytes} signed), "
          f"{frames} frames x {repeats} runs, median, Python {sys.version.split()[0]}")
    width = max(len(k) for k in results)
    for name, value in results.items():
        print(f"  {name:<{width}}  {value:8.1f} us")
    jws_added = results["OCPP 2.1 JWS verify (ES256, joserfc)"]
    print(f"verifying one OCPP 2.1 JWS costs {jws_added:.1f} us per frame, "
          f"{jws_added - results['ECDSA P-256 verify alone']:.1f} us over the ECDSA verify "
          f"(aim <= {AIM_VERIFY_US:.0f} us added)")
    verdict = "ok" if added <= AIM_VERIFY_US else "OVER"
    print(f"verifying one signature adds {added:.1f} us per frame "
          f"(aim <= {AIM_VERIFY_US:.0f} us: {verdict})")
    speedup = results["canonicalize: rfc8785 package"] / results["canonicalize: fast path"] \
        if "canonicalize: rfc8785 package" in results else float("nan")
    print(f"canonical form: fast path {speedup:.1f}x faster than the rfc8785 package")
    if args.json:
        Path(args.json).write_text(json.dumps({"us_per_frame": results,
                                               "verify_adds_us": added,
                                               "payload_bytes": content_bytes}, indent=1))
    return 0 if added <= AIM_VERIFY_US else 1


if __name__ == "__main__":
    raise SystemExit(main())
