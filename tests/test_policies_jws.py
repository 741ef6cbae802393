"""OCPP 2.1 Signed Messages (policies/jws.py), verified against JWS made by two other
implementations than the node's verifier: by hand with ``cryptography`` (which can also
forge what a library would refuse to make) and by joserfc, a maintained JOSE library. So
these tests show interoperability as well as the refusals Part 4 chapter 7 calls for."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from policies.jws import (
    Certificate,
    CertificateError,
    VerifiedJws,
    inner_action,
    load_certificate,
    verify_jws,
)
from policies.signatures import RejectedSignature

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CALL, CALLRESULT = 2, 3
RESET = {"type": "Immediate"}


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Signer:
    """A key and its self-signed certificate, signing JWS the long way or with joserfc."""

    def __init__(self, alg: str = "ES256", cn: str = "admin", days: int = 30,
                 starts: datetime = NOW - timedelta(days=1), library: str = "cryptography"
                 ) -> None:
        self.alg, self.library = alg, library
        if alg == "ES256":
            self.key: Any = ec.generate_private_key(ec.SECP256R1())
        else:
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(starts).not_valid_after(starts + timedelta(days=days))
                .sign(self.key, hashes.SHA256()))
        self.pem = cert.public_bytes(serialization.Encoding.PEM)
        self.x5t = b64u(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())

    def sign(self, payload: bytes, **header: Any) -> dict[str, str]:
        if self.library == "joserfc":
            return self._sign_joserfc(payload, header)
        protected = b64u(json.dumps({"alg": self.alg, "x5t#S256": self.x5t, **header}).encode())
        signing_input = f"{protected}.{b64u(payload)}".encode()
        if self.alg == "ES256":
            r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            digest = hashes.SHA256() if self.alg == "RS256" else hashes.SHA384()
            raw = self.key.sign(signing_input, padding.PKCS1v15(), digest)
        return {"protected": protected, "payload": b64u(payload), "signature": b64u(raw)}

    def _sign_joserfc(self, payload: bytes, header: dict[str, Any]) -> dict[str, str]:
        from joserfc import jws
        from joserfc.jwk import ECKey, RSAKey
        from joserfc.registry import HeaderParameter

        pem = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        key = ECKey.import_key(pem) if self.alg == "ES256" else RSAKey.import_key(pem)
        extensions = {name: HeaderParameter(name, lambda _: None) for name in header}
        registry = jws.JWSRegistry(header_registry=extensions, algorithms=[self.alg])
        signed = jws.serialize_json({"protected": {"alg": self.alg, "x5t#S256": self.x5t,
                                                   **header}},
                                    payload, key, algorithms=[self.alg], registry=registry)
        return {name: str(value) for name, value in signed.items()}

    def reset(self, **header: Any) -> dict[str, str]:
        header = {"OCPPAction": "Reset", "OCPPMessageTypedId": CALL, **header}
        return self.sign(json.dumps(RESET).encode(), **header)


def known(*signers: Signer) -> dict[str, Certificate]:
    return {c.x5t: c for c in (load_certificate(s.pem) for s in signers)}


def verify(jws_payload: object, signers: dict[str, Certificate], action: str = "Reset-Signed",
           mtype: int = CALL, now: datetime = NOW) -> VerifiedJws | RejectedSignature:
    return verify_jws(jws_payload, action, mtype, signers, now.timestamp())


@pytest.fixture(scope="module")
def admin() -> Signer:
    return Signer()


@pytest.mark.parametrize("library", ["cryptography", "joserfc"])
@pytest.mark.parametrize("alg", ["ES256", "RS256", "RS384"])
def test_each_allowed_algorithm_verifies(alg: str, library: str) -> None:
    signer = Signer(alg, library=library)
    result = verify(signer.reset(), known(signer))
    assert isinstance(result, VerifiedJws), result
    assert (result.action, result.payload, result.algorithm) == ("Reset", RESET, alg)
    assert result.x5t == signer.x5t


def test_the_type_field_is_read_in_both_spellings(admin: Signer) -> None:
    unpublished = admin.sign(json.dumps(RESET).encode(), OCPPAction="Reset",
                             OCPPMessageTypeId=CALL)
    assert isinstance(verify(unpublished, known(admin)), VerifiedJws)
    answer = admin.sign(b'{"status":"Accepted"}', OCPPAction="Reset", OCPPMessageTypedId=3)
    result = verify(answer, known(admin), mtype=CALLRESULT)
    assert isinstance(result, VerifiedJws) and result.payload == {"status": "Accepted"}


def refusal(result: VerifiedJws | RejectedSignature) -> str:
    assert isinstance(result, RejectedSignature), result
    return result.reason


def test_a_tampered_payload_is_refused(admin: Signer) -> None:
    signed = admin.reset()
    signed["payload"] = b64u(b'{"type":"OnIdle"}')
    assert "JWS refused" in refusal(verify(signed, known(admin)))


def test_alg_none_and_algorithms_outside_the_list_are_refused(admin: Signer) -> None:
    forged = dict(admin.reset())
    header = {"alg": "none", "x5t#S256": admin.x5t, "OCPPAction": "Reset",
              "OCPPMessageTypedId": CALL}
    forged["protected"] = b64u(json.dumps(header).encode())
    forged["signature"] = ""
    assert "JWS refused" in refusal(verify(forged, known(admin)))
    header["alg"] = "HS256"
    forged["protected"] = b64u(json.dumps(header).encode())
    assert "JWS refused" in refusal(verify(forged, known(admin)))


def test_an_unknown_critical_header_is_refused(admin: Signer) -> None:
    signed = admin.reset(crit=["exp"], exp=0)
    assert refusal(verify(signed, known(admin)))


def test_the_header_must_match_the_frame(admin: Signer) -> None:
    assert "OCPPAction" in refusal(verify(admin.reset(OCPPAction="UnlockConnector"),
                                          known(admin)))
    assert "message type" in refusal(verify(admin.reset(), known(admin), mtype=CALLRESULT))
    assert "OCPPMessageTypedId" in refusal(verify(admin.reset(OCPPMessageTypedId="2"),
                                                  known(admin)))
    assert "not a signed action" in refusal(verify(admin.reset(), known(admin), action="Reset"))


def test_the_signer_must_be_known_and_valid_now(admin: Signer) -> None:
    stranger = Signer()
    assert "unknown signing certificate" in refusal(verify(stranger.reset(), known(admin)))
    no_thumbprint = admin.sign(json.dumps(RESET).encode(), OCPPAction="Reset",
                               OCPPMessageTypedId=CALL, **{"x5t#S256": None})
    assert refusal(verify(no_thumbprint, known(admin)))
    expired = Signer(starts=NOW - timedelta(days=60), days=30)
    assert "validity period" in refusal(verify(expired.reset(), known(expired)))
    future = Signer(starts=NOW + timedelta(days=1))
    assert "validity period" in refusal(verify(future.reset(), known(future)))


def test_the_same_message_by_another_key_with_the_same_thumbprint_fails(admin: Signer) -> None:
    impostor = Signer()
    impostor.x5t = admin.x5t  # claims the admin's certificate
    assert "JWS refused" in refusal(verify(impostor.reset(), known(admin)))


@pytest.mark.parametrize("inner", [b'{"a":1,"a":2}', b'{"a":NaN}', b'{"a":1e999}', b"[1]",
                                   b"not json", b"\xff"])
def test_the_signed_payload_follows_the_frames_value_rules(admin: Signer, inner: bytes) -> None:
    signed = admin.sign(inner, OCPPAction="Reset", OCPPMessageTypedId=CALL)
    assert "signed payload" in refusal(verify(signed, known(admin)))


@pytest.mark.parametrize("payload", [None, [], "x", {}, {"protected": "a", "payload": "b"},
                                     {"protected": 1, "payload": "b", "signature": "c"},
                                     {"protected": "a", "payload": "b", "signature": "c",
                                      "extra": 1},
                                     {"protected": "!!", "payload": "b", "signature": "c"}])
def test_malformed_payloads_are_refused_not_raised(admin: Signer, payload: object) -> None:
    assert refusal(verify(payload, known(admin)))


def test_replay_digest_is_the_signature(admin: Signer) -> None:
    first, second = verify(admin.reset(), known(admin)), verify(admin.reset(), known(admin))
    assert isinstance(first, VerifiedJws) and isinstance(second, VerifiedJws)
    assert first.digest != second.digest or admin.alg != "ES256"  # ECDSA is randomized
    same = admin.reset()
    again = [verify(same, known(admin)) for _ in range(2)]
    assert all(isinstance(r, VerifiedJws) for r in again)
    assert again[0].digest == again[1].digest  # type: ignore[union-attr]


def test_inner_action_and_certificate_errors() -> None:
    assert inner_action("Reset-Signed") == "Reset"
    assert inner_action("Reset") is None and inner_action("-Signed") is None
    with pytest.raises(CertificateError):
        load_certificate(b"not a certificate")
    small = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p384")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(small.public_key()).serial_number(1)
            .not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1))
            .sign(small, hashes.SHA384()))
    with pytest.raises(CertificateError, match="P-256"):
        load_certificate(cert.public_bytes(serialization.Encoding.PEM))


# --- one signed message, one spelling: what replay protection relies on -------------------

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_the_other_ecdsa_spelling_of_a_signature_has_the_same_digest(admin: Signer) -> None:
    # (r, n - s) verifies as well as (r, s): a replay keyed on the signature's text would
    # let the same command through twice
    signed = admin.reset()
    raw = _unb64u(signed["signature"])
    s = int.from_bytes(raw[32:], "big")
    twin = dict(signed, signature=b64u(raw[:32] + (P256_ORDER - s).to_bytes(32, "big")))
    first, second = verify(signed, known(admin)), verify(twin, known(admin))
    assert isinstance(first, VerifiedJws) and isinstance(second, VerifiedJws)
    assert first.digest == second.digest


def test_a_signature_is_exactly_as_long_as_its_algorithm_says() -> None:
    for signer in (Signer("ES256"), Signer("RS256")):
        signed = signer.reset()
        padded = dict(signed, signature=b64u(b"\0" + _unb64u(signed["signature"])))
        assert "octets" in refusal(verify(padded, known(signer))) or \
            "as long as the modulus" in refusal(verify(padded, known(signer)))


@pytest.mark.parametrize("respell", [
    lambda t: t + "=" * (-len(t) % 4) if len(t) % 4 else t + "==",  # padding
    lambda t: t.replace("-", "+").replace("_", "/") + "+",  # the other alphabet
    lambda t: t[:-1] + {"A": "B", "Q": "R", "g": "h", "w": "x"}.get(t[-1], t[-1]),  # stray bits
    lambda t: t[:10] + "\n" + t[10:],  # a character outside the alphabet
])
def test_base64url_has_one_spelling(admin: Signer, respell: Any) -> None:
    signed = admin.reset()
    changed = dict(signed, signature=respell(signed["signature"]))
    if changed["signature"] == signed["signature"]:
        pytest.skip("this signature's text has no such variant")
    assert "base64url" in refusal(verify(changed, known(admin)))
    # a non-ASCII character in the payload member is refused as such, not as a crash
    accented = dict(signed, payload=signed["payload"][:-1] + "é")
    assert "base64url" in refusal(verify(accented, known(admin)))


def test_header_names_appear_once_and_interpreted_ones_are_protected(admin: Signer) -> None:
    signed = admin.reset()
    header = json.loads(_unb64u(signed["protected"]))
    text = json.dumps(header)[:-1] + ', "OCPPAction": "UnlockConnector"}'
    twice = dict(signed, protected=b64u(text.encode()))
    assert "twice" in refusal(verify(twice, known(admin)))
    for name in ("alg", "x5t#S256", "OCPPAction", "crit"):
        assert "unprotected header" in refusal(verify(dict(signed, header={name: "x"}),
                                                      known(admin)))
    assert isinstance(verify(dict(signed, header={"kid": "ops"}), known(admin)), VerifiedJws)


def test_crit_may_name_only_the_chapter_7_parameters(admin: Signer) -> None:
    assert isinstance(verify(admin.reset(crit=["OCPPAction"]), known(admin)), VerifiedJws)
    for crit in ([], ["OCPPAction", "OCPPAction"], ["b64"], "OCPPAction"):
        assert "crit" in refusal(verify(admin.reset(crit=crit), known(admin)))


def test_an_unencoded_payload_and_a_key_of_another_type_are_refused(admin: Signer) -> None:
    assert "b64" in refusal(verify(admin.reset(b64=False), known(admin)))
    rsa_signer = Signer("RS256")
    mixed = rsa_signer.reset()
    header = dict(json.loads(_unb64u(mixed["protected"])), alg="ES256")
    mixed["protected"] = b64u(json.dumps(header).encode())
    assert "RSA certificate" in refusal(verify(mixed, known(rsa_signer)))


def test_without_reading_the_payload_stays_opaque_and_the_rest_is_checked(
        admin: Signer) -> None:
    ambiguous = admin.sign(b'{"type":"Immediate","type":"OnIdle"}', OCPPAction="Reset",
                           OCPPMessageTypedId=CALL)
    assert "signed payload" in refusal(verify(ambiguous, known(admin)))
    opaque = verify_jws(ambiguous, "Reset-Signed", CALL, known(admin), NOW.timestamp(),
                        read_payload=False)
    assert isinstance(opaque, VerifiedJws) and opaque.payload is None
    for spelling in ("e30+", "e30=", "e3 0", "e3é0", "e31"):  # other alphabets, stray bits
        message = dict(admin.reset(), payload=spelling)
        assert "base64url" in refusal(verify_jws(message, "Reset-Signed", CALL, known(admin),
                                                 NOW.timestamp(), read_payload=False))
