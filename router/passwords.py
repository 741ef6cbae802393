"""Password hashes for station credentials: scrypt, in a self-describing string.

Format: ``scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>``. Verification is slow on
purpose (tens of milliseconds), so the runtime calls it off the event loop and remembers
recent successes (see :class:`VerifiedCache`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections import OrderedDict

_N, _R, _P = 2**14, 8, 1
_DKLEN = 32


class HashFormatError(ValueError):
    """A configured password hash is not in the ``scrypt$...`` format."""


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """Hash a password with a fresh random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=_DKLEN)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """Split a hash string into its parameters; raises HashFormatError with the reason."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise HashFormatError("expected scrypt$<n>$<r>$<p>$<salt>$<hash>")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise HashFormatError("n, r, p must be integers and salt, hash base64") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or not salt or not digest:
        raise HashFormatError("n must be a power of two above 1, r and p positive")
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of a password against a hash string."""
    n, r, p, salt, digest = parse_hash(encoded)
    try:
        candidate = hashlib.scrypt(
            password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=2**27
        )
    except ValueError:
        return False
    return hmac.compare_digest(candidate, digest)


class VerifiedCache:
    """Remembers recently verified (hash, password) pairs so reconnect storms stay cheap.

    Keys are a SHA-256 over both, so the cache never holds a password in clear.
    """

    def __init__(self, size: int = 4096) -> None:
        self._least = self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def fit(self, entries: int) -> None:
        """Room for one password per ``[[stations]]`` entry (each has one hash, and only
        a verified pair is remembered), so that after a carrier outage every station of a
        large node reconnects without a hash check, not just the last 4,096."""
        self._size = max(self._least, entries)

    @staticmethod
    def _key(password: str, encoded: str) -> bytes:
        return hashlib.sha256(encoded.encode() + b"\0" + password.encode()).digest()

    def hit(self, password: str, encoded: str) -> bool:
        key = self._key(password, encoded)
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        return False

    def add(self, password: str, encoded: str) -> None:
        self._seen[self._key(password, encoded)] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
