"""OCPP 2.1 Signed Messages (Part 4 chapter 7): verifying a flattened JWS payload.

A signed message keeps its MessageTypeId and MessageId; its action is ``<Action>-Signed``
and its payload is the flattened JWS JSON serialization of the original payload. The
protected header carries ``OCPPAction`` (the plain action) and the message type, spelled
``OCPPMessageTypedId`` in the published text (``OCPPMessageTypeId`` is read too), and
SHOULD carry ``x5t#S256``, the base64url SHA-256 of the signing certificate's DER, which
is how the key is found here. Algorithms: ES256, RS256, RS384 (§7.3).

Verification follows RFC 7515 §5.2 for the one serialization and three algorithms chapter
7 uses; the signature arithmetic is ``cryptography``'s. joserfc, a maintained JOSE library,
signs here (:func:`sign_jws`) and checks this verifier in the tests; it verified here
before and cost about twice as much per message over the same ECDSA check
(``bench/firewall.py`` prints both). On top of RFC 7515 this module checks what chapter 7
binds: the header fields against the frame, the certificate by thumbprint and its validity
period, and the inner payload under the same value rules as a frame
(:mod:`policies.values`). The header binds neither the message id, nor the station, nor a
time: replay is the caller's job, keyed by :attr:`VerifiedJws.digest`, which one signed
message has in exactly one spelling (strict base64url, the low-s form of an ECDSA
signature, an RSA signature as long as its modulus).

Nothing here raises because of what a peer sent: every refusal is a
:class:`~policies.signatures.RejectedSignature` with a reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey
from joserfc.registry import HeaderParameter

from policies.signatures import RejectedSignature
from policies.values import parse_json

__all__ = [
    "JWS_ALGORITHMS",
    "SIGNED_SUFFIX",
    "Certificate",
    "CertificateError",
    "VerifiedJws",
    "inner_action",
    "load_certificate",
    "self_signed_certificate",
    "sign_jws",
    "unwrap",
    "verify_jws",
]

SIGNED_SUFFIX = "-Signed"
JWS_ALGORITHMS = ("ES256", "RS256", "RS384")
TYPE_FIELDS = ("OCPPMessageTypedId", "OCPPMessageTypeId")  # published spelling first
MAX_JWS_CHARS = 1 << 20  # a whole frame is bounded by the link; this bounds the parts

_REGISTRY = jws.JWSRegistry(
    header_registry={
        "OCPPAction": HeaderParameter("the OCPP action signed", "str", required=True),
        "OCPPMessageTypedId": HeaderParameter("the OCPP message type", "int"),
        "OCPPMessageTypeId": HeaderParameter("the OCPP message type", "int"),
    },
    algorithms=JWS_ALGORITHMS,
)


class CertificateError(ValueError):
    """A certificate file that cannot be used (the operator's mistake, not a peer's)."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """A signer's X.509 certificate as the firewall uses it."""

    x5t: str  # base64url (no padding) SHA-256 of the DER: the JWS ``x5t#S256``
    subject: str
    not_before: float  # POSIX seconds
    not_after: float
    jwk: ECKey | RSAKey
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def load_certificate(pem: bytes) -> Certificate:
    """A PEM certificate with a P-256 or RSA key; CertificateError otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        key: ECKey | RSAKey = ECKey.import_key(public)
    elif isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048:
        key = RSAKey.import_key(public)
    else:
        raise CertificateError("the certificate's key is neither P-256 nor RSA of 2048 bits "
                               "or more (ES256, RS256, RS384)")
    der = cert.public_bytes(serialization.Encoding.DER)
    return Certificate(
        x5t=_b64url(hashlib.sha256(der).digest()),
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        jwk=key,
        public_key=public,
    )


def self_signed_certificate(private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                            common_name: str, now: float, days: int) -> bytes:
    """A self-signed X.509 certificate (PEM) for a signer's key, valid from ``now`` (POSIX
    seconds, less a minute for clocks behind) for ``days``: for trying Signed Messages out.
    Production signers get theirs from the operator's PKI."""
    if days < 1:
        raise ValueError("a certificate must be valid for at least one day")
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
    start = datetime.fromtimestamp(now - 60, UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + timedelta(days=days))
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(private_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class VerifiedJws:
    """A signed message that checks out: its inner action and payload, and its signer."""

    action: str
    #: the original payload; None when the caller did not ask for it to be read
    payload: dict[str, Any] | None
    algorithm: str
    x5t: str
    #: SHA-256 of the signed bytes and the canonical signature: what replay protection
    #: remembers (the same message re-spelled has the same digest).
    digest: bytes


def sign_jws(payload: Mapping[str, Any], action: str, message_type: int, certificate: bytes,
             private_key: bytes, algorithm: str | None = None) -> dict[str, str]:
    """The flattened JWS of ``payload`` for a ``<action>-Signed`` frame (Part 4 chapter 7).

    ``certificate`` and ``private_key`` are PEM; ``algorithm`` defaults to ES256 for a P-256
    key and RS256 for RSA. Raises CertificateError or ValueError for unusable inputs.
    """
    cert = load_certificate(certificate)
    key: ECKey | RSAKey
    if isinstance(cert.jwk, ECKey):
        key, algorithm = ECKey.import_key(private_key), algorithm or "ES256"
        if algorithm != "ES256":
            raise ValueError(f"a P-256 key signs ES256, not {algorithm}")
    else:
        key, algorithm = RSAKey.import_key(private_key), algorithm or "RS256"
        if algorithm not in ("RS256", "RS384"):
            raise ValueError(f"an RSA key signs RS256 or RS384, not {algorithm}")
    if key.as_dict(private=False) != cert.jwk.as_dict(private=False):
        raise ValueError("the private key does not belong to the certificate")
    header = {"alg": algorithm, "OCPPAction": action, "OCPPMessageTypedId": message_type,
              "x5t#S256": cert.x5t}
    body = json.dumps(dict(payload), separators=(",", ":"), ensure_ascii=False).encode()
    signed = jws.serialize_json({"protected": header}, body, key, algorithms=JWS_ALGORITHMS,
                                registry=_REGISTRY)
    return {name: str(value) for name, value in signed.items()}


def inner_action(action: str) -> str | None:
    """``Reset`` for ``Reset-Signed``; None for an action that is not a signed one."""
    if action.endswith(SIGNED_SUFFIX) and len(action) > len(SIGNED_SUFFIX):
        return action[: -len(SIGNED_SUFFIX)]
    return None


class _Refused(Exception):
    """Internal: why a JWS is refused (never leaves this module)."""


_REQUIRED_MEMBERS = frozenset(("protected", "payload", "signature"))
#: Header parameters read here; each must be integrity protected, so none may appear in
#: the unprotected ``header`` member.
_INTERPRETED = frozenset(("alg", "crit", "b64", "x5t#S256", "OCPPAction", *TYPE_FIELDS))
#: What a ``crit`` list may name: the chapter 7 extensions, all understood here.
_UNDERSTOOD = frozenset(("OCPPAction", *TYPE_FIELDS))
#: The order n of the P-256 group (FIPS 186-4 D.1.2.3, SEC 2 §2.4.2).
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: RFC 7515 §4.1 registered parameters this module does not use, and the JSON type each must
#: have: a JWS that misstates one is malformed, whoever reads it.
_REGISTERED_TYPES: dict[str, type] = {"kid": str, "typ": str, "cty": str, "x5u": str,
                                      "jku": str, "x5t": str, "x5c": list, "jwk": dict}
_HASHES = {"ES256": hashes.SHA256(), "RS256": hashes.SHA256(), "RS384": hashes.SHA384()}
# made once (building one per message costs a few us); ES256 verifies the hash the replay
# digest is made from, so the signed bytes are hashed once
_ES256_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
_PKCS1 = padding.PKCS1v15()


def verify_jws(
    payload: object,
    action: str,
    message_type: int,
    certificates: Mapping[str, Certificate],
    now: float,
    read_payload: bool = True,
) -> VerifiedJws | RejectedSignature:
    """Verify the payload of a ``<Action>-Signed`` frame of type ``message_type``.

    ``action`` is the frame's action (with the suffix); ``certificates`` maps ``x5t#S256``
    thumbprints to the signers the policy knows; ``now`` is POSIX time.

    With ``read_payload`` the original payload is parsed too, under the frames' value rules
    (a JWS whose payload breaks them is refused). Without it, what was signed stays opaque
    bytes: the firewall's gate, which reads the payload only where a rule looks into it or
    a receiver needs it unwrapped, and both of those parse it strictly themselves.
    """
    try:
        return _verify(payload, action, message_type, certificates, now, read_payload)
    except _Refused as refused:
        return RejectedSignature(0, str(refused))
    except Exception as exc:  # a peer's bytes must never take the node down
        return RejectedSignature(0, f"unverifiable JWS ({type(exc).__name__})")


def _verify(payload: object, action: str, message_type: int,
            certificates: Mapping[str, Certificate], now: float,
            read_payload: bool) -> VerifiedJws:
    # RFC 7515 §7.2.2 (flattened JSON) and §5.2 (validation), held to what chapter 7 uses.
    # The signature itself is checked by ``cryptography``; joserfc, measured against this
    # in bench/firewall.py, costs more per message beside the same ECDSA check while
    # checking less, and serves the tests as an independent verifier
    # (tests/test_jws_interop.py).
    plain = inner_action(action)
    if plain is None:
        raise _Refused(f"{action!r} is not a signed action (<Action>{SIGNED_SUFFIX})")
    if not isinstance(payload, Mapping):
        raise _Refused("the payload is not a JSON object")
    names = payload.keys()
    if not names >= _REQUIRED_MEMBERS or len(names) > 3 + ("header" in names):
        raise _Refused("the payload is not a flattened JWS (protected, payload, signature)")
    protected_text, body_text, signature_text = (
        payload["protected"], payload["payload"], payload["signature"])
    if not (type(protected_text) is str and type(body_text) is str
            and type(signature_text) is str and len(protected_text) <= MAX_JWS_CHARS
            and len(body_text) <= MAX_JWS_CHARS and len(signature_text) <= MAX_JWS_CHARS):
        for name in ("protected", "payload", "signature"):
            value = payload[name]
            if not isinstance(value, str) or len(value) > MAX_JWS_CHARS:
                raise _Refused(f"{name} is not a string of at most {MAX_JWS_CHARS} "
                               "characters")
    header = _json_object(_b64url_decode(protected_text, "protected"), "protected header")
    unprotected = payload.get("header", {})
    if not isinstance(unprotected, Mapping):
        raise _Refused("header is not a JSON object")
    for name in unprotected:
        if name in header or name in _INTERPRETED:
            raise _Refused(f"JWS refused: {str(name)[:40]!r} in the unprotected header "
                           "(it must be in the protected header, once)")
    algorithm = header.get("alg")
    if algorithm not in JWS_ALGORITHMS:
        raise _Refused(f"JWS refused: alg {str(algorithm)[:20]!r} is not one of "
                       f"{', '.join(JWS_ALGORITHMS)}")
    _check_critical(header)
    if not _REGISTERED_TYPES.keys().isdisjoint(header):
        for name, kind in _REGISTERED_TYPES.items():
            if name in header and not isinstance(header[name], kind):
                raise _Refused(f"JWS refused: the header parameter {name} is not a "
                               f"{'string' if kind is str else 'JSON ' + kind.__name__}")
    if header.get("b64", True) is not True:
        raise _Refused("JWS refused: an unencoded payload (b64) is not a chapter 7 message")
    thumbprint = header.get("x5t#S256")
    if not isinstance(thumbprint, str):
        raise _Refused("the protected header names no signing certificate (x5t#S256)")
    cert = certificates.get(thumbprint)
    if cert is None:
        raise _Refused(f"unknown signing certificate x5t#S256={thumbprint[:64]!r}")
    if header.get("OCPPAction") != plain:
        raise _Refused(f"OCPPAction {str(header.get('OCPPAction'))[:60]!r} is not "
                       f"the frame's action {plain!r}")
    stated = False
    for name in TYPE_FIELDS:  # either spelling, or both: each must be the frame's type
        if name in header:
            value = header[name]
            if type(value) is not int or value != message_type:
                stated = False
                break
            stated = True
    if not stated:
        raise _Refused(f"the protected header's message type ({'/'.join(TYPE_FIELDS)}) is "
                       f"not {message_type}")
    if not cert.not_before <= now <= cert.not_after:
        raise _Refused(f"the signing certificate ({cert.subject}) is outside its validity "
                       "period")
    if read_payload:
        body = _b64url_decode(body_text, "payload")  # also: the text is ASCII
    else:
        _check_b64url(body_text, "payload")  # the same checks, without decoding
    signing_input = f"{protected_text}.{body_text}".encode("ascii")
    signed_hash = hashlib.sha256(signing_input).digest()
    canonical_signature = _check_signature(cert, algorithm, signing_input, signed_hash,
                                           _b64url_decode(signature_text, "signature"))
    inner = _json_object(body, "signed payload") if read_payload else None
    # what replay protection remembers: the signed bytes and the signature in the one
    # spelling that verifies them (an ECDSA (r, s) also verifies as (r, n - s))
    digest = hashlib.sha256(signed_hash + b"." + canonical_signature).digest()
    return VerifiedJws(plain, inner, algorithm, cert.x5t, digest)


def _check_critical(header: Mapping[str, Any]) -> None:
    if "crit" not in header:
        return
    crit = header["crit"]
    if not isinstance(crit, list) or not crit or len(set(map(str, crit))) != len(crit):
        raise _Refused("JWS refused: crit is not a list of distinct names")
    for name in crit:
        if name not in _UNDERSTOOD or name not in header:
            raise _Refused(f"JWS refused: the critical header parameter {str(name)[:40]!r} "
                           "is not understood here")


def _check_signature(cert: Certificate, algorithm: str, signing_input: bytes,
                     signed_hash: bytes, signature: bytes) -> bytes:
    """Check the signature (``signed_hash``: the SHA-256 of ``signing_input``); its
    canonical bytes (ECDSA: the low-s form) on success."""
    key = cert.public_key
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if algorithm != "ES256":
                raise _Refused(f"JWS refused: alg {algorithm} with a P-256 certificate")
            if len(signature) != 64:  # RFC 7518 §3.4: R and S, 32 octets each
                raise _Refused("JWS refused: an ES256 signature is 64 octets")
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signed_hash, _ES256_PREHASHED)
            return signature[:32] + min(s, _P256_ORDER - s).to_bytes(32, "big")
        if algorithm == "ES256":
            raise _Refused("JWS refused: alg ES256 with an RSA certificate")
        if len(signature) != (key.key_size + 7) // 8:  # RFC 8017 §8.2.2: k octets exactly
            raise _Refused(f"JWS refused: an {algorithm} signature is as long as the modulus")
        key.verify(signature, signing_input, _PKCS1, _HASHES[algorithm])
        return signature
    except InvalidSignature:
        raise _Refused("JWS refused: the signature does not verify") from None


def unwrap(payload: object) -> dict[str, Any] | None:
    """The original payload inside a flattened JWS, for a peer that does not implement
    chapter 7; None when there is none to give. It is not verified here: the firewall
    decided already whether the message goes on."""
    if not isinstance(payload, Mapping):
        return None
    encoded = payload.get("payload")
    if not isinstance(encoded, str) or len(encoded) > MAX_JWS_CHARS:
        return None
    try:
        return _json_object(_b64url_decode(encoded, "payload"), "signed payload")
    except _Refused:
        return None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object under the frames' value rules (:mod:`policies.values`)."""
    try:
        value, flaw = parse_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refused(f"the {what} is not JSON") from None
    if flaw is not None:
        raise _Refused(f"the {what} is unfit: {flaw}")
    if not isinstance(value, dict):
        raise _Refused(f"the {what} is not a JSON object")
    return value


#: base64url to the standard alphabet, for binascii's strict decoder
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
#: The last character of a canonical spelling, by the length modulo 4: it carries 4 (or 2)
#: bits of the final byte and zeros after them.
_LAST_CHAR = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


#: The base64url alphabet (RFC 4648 §5), as bytes.translate deletes it.
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _spelling(text: str, name: str) -> int:
    """The length and last character of the one spelling (no padding, no stray bits);
    the length modulo 4."""
    rest = len(text) % 4
    if rest == 1:
        raise _Refused(f"{name} is not base64url")
    if rest and text[-1] not in _LAST_CHAR[rest]:
        raise _Refused(f"{name} is not base64url in its canonical spelling")
    return rest


def _check_b64url(text: str, name: str) -> None:
    """What :func:`_b64url_decode` checks of ``text``, without making the bytes."""
    if not text.isascii() or text.encode("ascii").translate(None, _ALPHABET):
        raise _Refused(f"{name} is not base64url")
    _spelling(text, name)


def _b64url_decode(text: str, name: str) -> bytes:
    """RFC 7515 §2 base64url without padding, in its one spelling (no other alphabet, no
    stray bits), so that one signed message has one text."""
    if "=" in text or "+" in text or "/" in text:
        raise _Refused(f"{name} is not base64url")
    rest = _spelling(text, name)
    try:
        standard = text.encode("ascii").translate(_TO_STANDARD)
        return binascii.a2b_base64(standard + b"=" * (-rest % 4), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        raise _Refused(f"{name} is not base64url") from None


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
