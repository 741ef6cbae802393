"""OCPP 2.1 Signed Messages (Part 4 chapter 7): verifying a flattened JWS payload.

A signed message keeps its MessageTypeId and MessageId; its action is ``<Action>-Signed``
and its payload is the flattened JWS JSON serialization of the original payload. The
protected header carries ``OCPPAction`` (the plain action) and the message type, spelled
``OCPPMessageTypedId`` in the published text (``OCPPMessageTypeId`` is read too), and
SHOULD carry ``x5t#S256``, the base64url SHA-256 of the signing certificate's DER, which
is how the key is found here. Algorithms: ES256, RS256, RS384 (§7.3).

Parsing and signature checking are joserfc's (a maintained JOSE library; measured in
``bench/firewall.py`` against ``cryptography`` alone). This module adds what chapter 7
binds: the header fields against the frame, the certificate by thumbprint and its
validity period, and the inner payload under the same value rules as a frame (no
duplicate keys, no NaN). The header binds neither the message id, nor the station, nor a
time: replay is the caller's job, keyed by :attr:`VerifiedJws.digest`.

Nothing here raises because of what a peer sent: every refusal is a
:class:`~policies.signatures.RejectedSignature` with a reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from joserfc.registry import HeaderParameter

from policies.signatures import RejectedSignature

__all__ = [
    "JWS_ALGORITHMS",
    "SIGNED_SUFFIX",
    "Certificate",
    "CertificateError",
    "VerifiedJws",
    "inner_action",
    "load_certificate",
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


@dataclass(frozen=True, slots=True)
class VerifiedJws:
    """A signed message that checks out: its inner action and payload, and its signer."""

    action: str
    payload: dict[str, Any]
    algorithm: str
    x5t: str
    #: SHA-256 of the JWS signature: what replay protection remembers.
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


def verify_jws(
    payload: object,
    action: str,
    message_type: int,
    certificates: Mapping[str, Certificate],
    now: float,
) -> VerifiedJws | RejectedSignature:
    """Verify the payload of a ``<Action>-Signed`` frame of type ``message_type``.

    ``action`` is the frame's action (with the suffix); ``certificates`` maps ``x5t#S256``
    thumbprints to the signers the policy knows; ``now`` is POSIX time.
    """
    try:
        return _verify(payload, action, message_type, certificates, now)
    except _Refused as refused:
        return RejectedSignature(0, str(refused))
    except Exception as exc:  # a peer's bytes must never take the node down
        return RejectedSignature(0, f"unverifiable JWS ({type(exc).__name__})")


def _verify(payload: object, action: str, message_type: int,
            certificates: Mapping[str, Certificate], now: float) -> VerifiedJws:
    plain = inner_action(action)
    if plain is None:
        raise _Refused(f"{action!r} is not a signed action (<Action>{SIGNED_SUFFIX})")
    if not isinstance(payload, Mapping):
        raise _Refused("the payload is not a JSON object")
    if set(payload) - {"protected", "payload", "signature", "header"} or not {
            "protected", "payload", "signature"} <= set(payload):
        raise _Refused("the payload is not a flattened JWS (protected, payload, signature)")
    for name in ("protected", "payload", "signature"):
        value = payload[name]
        if not isinstance(value, str) or len(value) > MAX_JWS_CHARS:
            raise _Refused(f"{name} is not a string of at most {MAX_JWS_CHARS} characters")
    if "header" in payload and not isinstance(payload["header"], Mapping):
        raise _Refused("header is not a JSON object")
    chosen: list[Certificate] = []

    def resolve(guest: Any) -> ECKey | RSAKey:
        # the protected header decides which certificate verifies: x5t#S256 only
        header = guest.headers()
        thumbprint = header.get("x5t#S256")
        if not isinstance(thumbprint, str):
            raise _Refused("the protected header names no signing certificate (x5t#S256)")
        cert = certificates.get(thumbprint)
        if cert is None:
            raise _Refused(f"unknown signing certificate x5t#S256={thumbprint[:64]!r}")
        chosen.append(cert)
        return cert.jwk

    try:
        signed = jws.deserialize_json(cast("jws.FlattenedJSONSerialization", dict(payload)),
                                      resolve, algorithms=JWS_ALGORITHMS, registry=_REGISTRY)
    except JoseError as exc:
        raise _Refused(f"JWS refused: {exc.error}: {exc.description}") from None
    header = signed.headers()
    protected: dict[str, Any] = dict(signed.member.protected or {})
    cert = chosen[-1]
    if protected.get("x5t#S256") != cert.x5t:
        raise _Refused("x5t#S256 must be in the protected header")
    if protected.get("OCPPAction") != plain:
        raise _Refused(f"OCPPAction {str(protected.get('OCPPAction'))[:60]!r} is not "
                       f"the frame's action {plain!r}")
    types = [protected[name] for name in TYPE_FIELDS if name in protected]
    if not types or any(t != message_type or type(t) is not int for t in types):
        raise _Refused(f"the protected header's message type is not {message_type}")
    if not cert.not_before <= now <= cert.not_after:
        raise _Refused(f"the signing certificate ({cert.subject}) is outside its validity "
                       "period")
    inner = _json_object(signed.payload)
    return VerifiedJws(plain, inner, str(header["alg"]), cert.x5t,
                       hashlib.sha256(str(payload["signature"]).encode()).digest())


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
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        return _json_object(raw)
    except (ValueError, _Refused):
        return None


def _json_object(data: bytes) -> dict[str, Any]:
    """The signed payload as a JSON object, under the frames' value rules."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _Refused(f"the signed payload has the key {key[:40]!r} twice")
            out[key] = value
        return out

    def no_constant(name: str) -> Any:
        raise _Refused(f"the signed payload holds {name}, which is not JSON")

    def finite(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):  # 1e999 parses as inf
            raise _Refused("the signed payload holds a number JSON cannot carry")
        return number

    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=unique,
                           parse_constant=no_constant, parse_float=finite)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refused("the signed payload is not JSON") from None
    if not isinstance(value, dict):
        raise _Refused("the signed payload is not a JSON object")
    return value


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
