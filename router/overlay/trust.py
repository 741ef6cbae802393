"""Signing this node's route claims and checking other nodes' against ``[trust]``.

topology/ takes signing and verification as callables (it does no cryptography itself);
these build them from the node key and the trusted keys of the config.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from policies import (
    PublicKey,
    SigningKey,
    format_timestamp,
    key_id_of,
    load_public_key,
    public_key_from_key_id,
)
from router.config import TrustSection
from topology import SignFn, VerifyFn

_HASHES = {"secp256r1": hashes.SHA256(), "secp384r1": hashes.SHA384()}


def route_signer(key: SigningKey) -> SignFn:
    """Signs claim bytes with the node key, in the signature format of the payloads."""

    def sign(data: bytes) -> Mapping[str, Any]:
        return {"keyId": key.key_id, "value": base64.b64encode(key.sign(data)).decode(),
                "algorithm": key.algorithm, "timestamp": format_timestamp(time.time())}

    return sign


class TrustError(Exception):
    """A ``[trust]`` key cannot be used; the message names the node and the file."""


def load_trusted(trust: TrustSection) -> dict[str, PublicKey]:
    """node id -> public key, from PEM files or base64 key ids; raises TrustError."""
    keys: dict[str, PublicKey] = {}
    for node_id, source in trust.nodes:
        try:
            if source.endswith(".pem"):
                keys[node_id] = load_public_key(Path(source).read_bytes())
            else:
                keys[node_id] = public_key_from_key_id(source)
        except (OSError, ValueError, TypeError) as exc:
            raise TrustError(f"trust.nodes: {node_id}: cannot use {source}: {exc}") from None
    return keys


def route_verifier(trusted: dict[str, PublicKey]) -> VerifyFn:
    """True only for a valid signature by the origin's trusted key; never raises."""
    key_ids = {node: key_id_of(key) for node, key in trusted.items()}

    def verify(origin: str, data: bytes, signature: Mapping[str, Any]) -> bool:
        key = trusted.get(origin)
        if key is None or signature.get("keyId") != key_ids[origin]:
            return False
        try:
            value = base64.b64decode(str(signature.get("value", "")), validate=True)
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(value, data)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                algorithm = signature.get("algorithm")
                if algorithm not in _HASHES:
                    return False
                key.verify(value, data, ec.ECDSA(_HASHES[str(algorithm)]))
            else:
                return False
        except (InvalidSignature, ValueError, binascii.Error, TypeError):
            return False
        return True

    return verify
