"""End-to-end signatures carried inside OCPP payloads (WWCP E2E Security field names).

A payload carries ``"signatures": [{"keyId", "value", "algorithm", "timestamp", ...}]``.
Each signature covers the RFC 8785 canonical form of an envelope that binds the payload
(without ``signatures``) to the action, the direction and the signature's own metadata;
docs/signatures.md gives the exact construction. Signatures are independent: adding one
leaves the others valid, and each is verified on its own.

Nothing here raises because of what a peer sent: every malformed entry becomes a
:class:`RejectedSignature` with a reason. Exceptions are for the caller's own mistakes
(an unknown direction, a key file that is not a key).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from policies.canonical import CanonicalError, canonicalize

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DIRECTIONS",
    "MAX_SIGNATURES",
    "OPTIONAL_FIELDS",
    "PURPOSE",
    "KeyFormatError",
    "PrivateKey",
    "PublicKey",
    "RejectedSignature",
    "SignedContent",
    "SigningKey",
    "VerifiedSignature",
    "algorithm_of",
    "check_signature",
    "format_timestamp",
    "key_id_of",
    "load_public_key",
    "parse_timestamp",
    "public_key_from_key_id",
    "sign_payload",
    "signature_entries",
    "signed_content",
    "verify_signatures",
    "without_signatures",
]

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

#: Signature algorithms by their WWCP names.
ALGORITHMS = ("secp256r1", "secp384r1", "ed25519")
DEFAULT_ALGORITHM = "secp256r1"
DIRECTIONS = ("to-station", "from-station")
#: Domain separation: these signatures cannot be mistaken for any other use of the key.
PURPOSE = "ocpp-e2e-signature/1"
#: A payload with more signatures than this is refused as a whole.
MAX_SIGNATURES = 16
#: Optional members of a signature entry; when present they are signed too.
OPTIONAL_FIELDS = ("name", "description", "signingMethod", "encodingMethod")

_FIELD = "signatures"
_CURVES: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}
_HASHES: dict[str, ec.ECDSA] = {
    "secp256r1": ec.ECDSA(hashes.SHA256()),
    "secp384r1": ec.ECDSA(hashes.SHA384()),
}
_P256_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
# Generous bounds on the text of one entry; real values are far smaller (a P-384 key id
# is 160 characters, a P-384 signature at most 140). They keep a hostile entry cheap.
_MAX_KEY_ID = 512
_MAX_VALUE = 256
_MAX_TEXT = 1024
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(?:[Zz]|\+00:00)"
)


class KeyFormatError(ValueError):
    """A key (file, PEM text or key id) that cannot be used for these signatures."""


# --- keys ----------------------------------------------------------------------------


def algorithm_of(key: PublicKey | PrivateKey) -> str:
    """The signature algorithm a key is used with (``secp256r1``, ``secp384r1``, ``ed25519``)."""
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name in _CURVES:
            return key.curve.name
        raise KeyFormatError(f"curve {key.curve.name} is not supported "
                             f"(use {', '.join(ALGORITHMS)})")
    raise KeyFormatError(f"a {type(key).__name__} is not supported (use {', '.join(ALGORITHMS)})")


def key_id_of(public_key: PublicKey) -> str:
    """The key id: base64 of the public key's SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def _supported_public(key: object) -> PublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise KeyFormatError(f"a {type(key).__name__} is not supported "
                             f"(use {', '.join(ALGORITHMS)})")
    algorithm_of(key)
    return key


def public_key_from_key_id(key_id: str) -> PublicKey:
    """The public key a key id names; :class:`KeyFormatError` when it names none."""
    try:
        der = base64.b64decode(key_id, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("not base64") from None
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFormatError("not a DER SubjectPublicKeyInfo public key") from None
    return _supported_public(key)


def load_public_key(pem: bytes) -> PublicKey:
    """A public key from PEM (a private key is refused: policies hold public keys only)."""
    if b"PRIVATE KEY" in pem:
        raise KeyFormatError("holds a private key; give the public key "
                             "(`ocpp-router keys public --key FILE`)")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFormatError("not a PEM public key") from None
    return _supported_public(key)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key ready to sign: its algorithm and key id worked out once."""

    private_key: PrivateKey
    algorithm: str
    key_id: str

    @classmethod
    def from_private_key(cls, private_key: PrivateKey) -> SigningKey:
        """Wrap a private key object (P-256, P-384 or Ed25519)."""
        return cls(private_key, algorithm_of(private_key), key_id_of(private_key.public_key()))

    @classmethod
    def generate(cls, algorithm: str = DEFAULT_ALGORITHM) -> SigningKey:
        """A fresh key for ``algorithm``."""
        if algorithm == "ed25519":
            return cls.from_private_key(ed25519.Ed25519PrivateKey.generate())
        if algorithm not in _CURVES:
            raise KeyFormatError(f"unknown algorithm {algorithm!r} (use {', '.join(ALGORITHMS)})")
        return cls.from_private_key(ec.generate_private_key(_CURVES[algorithm]))

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        """Load an unencrypted PEM private key (PKCS#8 or SEC1)."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except TypeError:
            raise KeyFormatError("is encrypted; give an unencrypted private key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise KeyFormatError("not a PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise KeyFormatError(f"a {type(key).__name__} is not supported "
                                 f"(use {', '.join(ALGORITHMS)})")
        return cls.from_private_key(key)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, message: bytes) -> bytes:
        """The raw signature of ``message``: DER for ECDSA, 64 bytes for Ed25519."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(message)
        return self.private_key.sign(message, _HASHES[self.algorithm])


# --- time ----------------------------------------------------------------------------


def format_timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-22T10:00:00.000Z``."""
    seconds, millis = divmod(round(now * 1000), 1000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis:03d}Z"


def parse_timestamp(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 UTC timestamp (``Z`` or ``+00:00``); None if it is not one."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction = match.groups()
    midnight = _midnight(year, month, day)
    if midnight is None or int(hour) > 23 or int(minute) > 59 or int(second) > 59:
        return None
    return (midnight + int(hour) * 3600 + int(minute) * 60 + int(second)
            + (float(fraction) if fraction else 0.0))


@functools.lru_cache(maxsize=64)
def _midnight(year: str, month: str, day: str) -> float | None:
    # signatures of one day share their date: the calendar check runs once for it
    try:
        return datetime(int(year), int(month), int(day), tzinfo=UTC).timestamp()
    except ValueError:
        return None


# --- what is signed --------------------------------------------------------------------


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")


def without_signatures(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The payload as signed: every member but ``signatures``."""
    if _FIELD not in payload:
        return payload
    return {k: v for k, v in payload.items() if k != _FIELD}


_PURPOSE_PART = b',"purpose":' + canonicalize(PURPOSE) + b',"signature":'


@functools.lru_cache(maxsize=512)
def _head_part(action: str, direction: str) -> bytes:
    # a handful of actions signed over and over; the cache is bounded for the rest
    return (b'{"action":' + canonicalize(action) + b',"direction":' + canonicalize(direction)
            + b',"payload":')


@dataclass(frozen=True, slots=True)
class SignedContent:
    """A payload bound to its action and direction: the part every signature shares.

    The payload is canonicalized once; :meth:`signing_input` adds one signature's
    metadata, so several signatures on one frame cost one canonicalization.
    """

    action: str
    direction: str
    canonical_payload: bytes
    _head: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        head = b"".join((_head_part(self.action, self.direction), self.canonical_payload,
                         _PURPOSE_PART))
        object.__setattr__(self, "_head", head)

    def signing_input(self, entry: Mapping[str, Any]) -> bytes:
        """The exact bytes a signature entry signs (its ``value`` member left out).

        Equal to ``canonicalize({"action", "direction", "payload", "purpose",
        "signature"})``; written out directly because the members' order is fixed.
        """
        meta = {k: v for k, v in entry.items() if k != "value"}
        return self._head + canonicalize(meta) + b"}"


def signed_content(payload: Mapping[str, Any], action: str, direction: str) -> SignedContent:
    """Canonicalize a payload (without ``signatures``) for signing or verifying.

    Raises :class:`~policies.canonical.CanonicalError` when the payload has no canonical
    form, and ``ValueError`` for an unknown direction.
    """
    _check_direction(direction)
    return SignedContent(action, direction, canonicalize(without_signatures(payload)))


def sign_payload(
    payload: Mapping[str, Any],
    action: str,
    direction: str,
    key: SigningKey,
    now: float,
    *,
    name: str | None = None,
    description: str | None = None,
    signing_method: str | None = None,
    encoding_method: str | None = None,
    canonical_payload: bytes | None = None,
) -> dict[str, Any]:
    """A copy of ``payload`` with one more signature appended; earlier ones stay valid.

    ``canonical_payload`` may pass the canonical bytes of this payload without
    ``signatures`` when already known (a firewall :class:`Decision` carries them).
    Raises ``ValueError`` if ``signatures`` is not an array or is already full.
    """
    _check_direction(direction)
    existing = payload.get(_FIELD, [])
    if not isinstance(existing, list):
        raise ValueError("the payload's signatures member is not an array")
    if len(existing) >= MAX_SIGNATURES:
        raise ValueError(f"the payload already carries {MAX_SIGNATURES} signatures")
    if canonical_payload is None:
        canonical_payload = canonicalize(without_signatures(payload))
    content = SignedContent(action, direction, canonical_payload)
    entry: dict[str, Any] = {
        "keyId": key.key_id,
        "algorithm": key.algorithm,
        "timestamp": format_timestamp(now),
    }
    for field_name, text in zip(OPTIONAL_FIELDS,
                                (name, description, signing_method, encoding_method),
                                strict=True):
        if text is not None:
            entry[field_name] = text
    value = base64.b64encode(key.sign(content.signing_input(entry))).decode("ascii")
    signed = dict(payload)
    signed[_FIELD] = [*existing, {"keyId": entry["keyId"], "value": value, **entry}]
    return signed


# --- verification ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedSignature:
    """A signature whose value checks out against its key, fresh enough to count."""

    index: int
    key_id: str
    algorithm: str
    timestamp: float
    name: str | None
    #: SHA-256 of the signed bytes: what replay protection remembers.
    digest: bytes


@dataclass(frozen=True, slots=True)
class RejectedSignature:
    """A signature entry (or, with ``index`` None, the whole array) refused, and why."""

    index: int | None
    reason: str
    key_id: str | None = None

    def __str__(self) -> str:
        where = "signatures" if self.index is None else f"signature {self.index}"
        return f"{where}: {self.reason}"


def signature_entries(payload: object) -> list[Any] | RejectedSignature:
    """The raw ``signatures`` array of a payload (empty when absent), or why it is unusable."""
    if type(payload) is not dict and not isinstance(payload, Mapping):
        return RejectedSignature(None, "the payload is not a JSON object")
    entries = payload.get(_FIELD, [])
    if not isinstance(entries, list):
        return RejectedSignature(None, "signatures is not an array")
    if len(entries) > MAX_SIGNATURES:
        return RejectedSignature(None, f"{len(entries)} signatures (at most {MAX_SIGNATURES})")
    return entries


class _Refused(Exception):
    """Internal: the reason one entry is refused (never leaves this module)."""


def _text(entry: Mapping[str, Any], name: str, limit: int) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise _Refused(f"{name} is missing or not a non-empty string")
    if len(value) > limit:
        raise _Refused(f"{name} is longer than {limit} characters")
    return value


def _optional_text(entry: Mapping[str, Any], name: str, limit: int) -> str | None:
    return _text(entry, name, limit) if name in entry else None


def check_signature(
    entry: object,
    index: int,
    content: SignedContent,
    now: float,
    *,
    public_key: PublicKey | None = None,
    key_algorithm: str | None = None,
    max_age_s: float | None = None,
    max_skew_s: float = 60.0,
) -> VerifiedSignature | RejectedSignature:
    """Verify one signature entry against ``content``; never raises for a peer's input.

    ``public_key``, when given, is the key the caller already resolved from the entry's
    ``keyId`` (a policy's key registry), with its ``key_algorithm`` when known; otherwise
    the key is decoded from ``keyId``.
    A timestamp more than ``max_skew_s`` ahead of ``now``, or older than ``max_age_s``,
    is refused.
    """
    key_id: str | None = None
    try:
        if type(entry) is not dict and not isinstance(entry, Mapping):
            raise _Refused("is not a JSON object")
        key_id = _text(entry, "keyId", _MAX_KEY_ID)
        return _check(entry, index, key_id, content, now, public_key, key_algorithm,
                      max_age_s, max_skew_s)
    except _Refused as refused:
        return RejectedSignature(index, str(refused), key_id)
    except Exception as exc:  # a peer's bytes must never take the node down
        return RejectedSignature(index, f"unverifiable ({type(exc).__name__})", key_id)


def _check(
    entry: Mapping[str, Any],
    index: int,
    key_id: str,
    content: SignedContent,
    now: float,
    public_key: PublicKey | None,
    key_algorithm: str | None,
    max_age_s: float | None,
    max_skew_s: float,
) -> VerifiedSignature:
    value_text = _text(entry, "value", _MAX_VALUE)
    algorithm = _optional_text(entry, "algorithm", 32) or DEFAULT_ALGORITHM
    if algorithm not in ALGORITHMS:
        raise _Refused(f"unknown algorithm {algorithm!r}")
    stamp_text = _text(entry, "timestamp", 64)
    name = _optional_text(entry, "name", _MAX_TEXT)
    for field_name in OPTIONAL_FIELDS[1:]:
        _optional_text(entry, field_name, _MAX_TEXT)
    stamp = parse_timestamp(stamp_text)
    if stamp is None:
        raise _Refused("timestamp is not an RFC 3339 UTC time")
    if stamp - now > max_skew_s:
        raise _Refused(f"timestamp is {stamp - now:.0f} s in the future")
    if max_age_s is not None and now - stamp > max_age_s:
        raise _Refused(f"expired: signed {now - stamp:.0f} s ago (max_age_s {max_age_s:g})")
    if public_key is None:
        try:
            public_key = public_key_from_key_id(key_id)
        except KeyFormatError as exc:
            raise _Refused(f"keyId is unusable: {exc}") from None
        key_algorithm = None
    if key_algorithm is None:
        try:
            key_algorithm = algorithm_of(public_key)
        except KeyFormatError as exc:
            raise _Refused(str(exc)) from None
    if key_algorithm != algorithm:
        raise _Refused(f"algorithm {algorithm} does not match the key ({key_algorithm})")
    try:
        signature = base64.b64decode(value_text, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused("value is not base64") from None
    try:
        message = content.signing_input(entry)
    except CanonicalError as exc:
        raise _Refused(f"signature metadata has no canonical form: {exc}") from None
    digest = hashlib.sha256(message).digest()  # what replay memory keys on
    try:
        if algorithm == "secp256r1":  # the digest is the hash ECDSA signs: hash once
            public_key.verify(signature, digest, _P256_PREHASHED)  # type: ignore[call-arg]
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            public_key.verify(signature, message, _HASHES[algorithm])
    except (InvalidSignature, ValueError):
        raise _Refused("does not verify") from None
    return VerifiedSignature(index, key_id, algorithm, stamp, name, digest)


def verify_signatures(
    payload: Mapping[str, Any],
    action: str,
    direction: str,
    now: float,
    *,
    max_age_s: float | None = None,
    max_skew_s: float = 60.0,
) -> list[VerifiedSignature | RejectedSignature]:
    """Verify every signature on a payload, each on its own, keys taken from their ``keyId``.

    One result per entry, in order; a single :class:`RejectedSignature` with ``index``
    None when the array as a whole is unusable. An unsigned payload gives ``[]``.
    """
    _check_direction(direction)
    entries = signature_entries(payload)
    if isinstance(entries, RejectedSignature):
        return [entries]
    if not entries:
        return []
    try:
        content = signed_content(payload, action, direction)
    except CanonicalError as exc:
        return [RejectedSignature(None, f"the payload has no canonical form: {exc}")]
    return [check_signature(entry, i, content, now, max_age_s=max_age_s, max_skew_s=max_skew_s)
            for i, entry in enumerate(entries)]
