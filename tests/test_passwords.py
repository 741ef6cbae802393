"""Unit tests of password hashing."""

from __future__ import annotations

import pytest

from router.passwords import (
    HashFormatError,
    VerifiedCache,
    hash_password,
    parse_hash,
    verify_password,
)


def test_hash_verifies_only_the_right_password() -> None:
    encoded = hash_password("s3cret", n=2**4)
    assert encoded.startswith("scrypt$16$8$1$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("S3cret", encoded)
    assert hash_password("s3cret", n=2**4) != encoded  # salted


@pytest.mark.parametrize("bad", ["", "plain", "scrypt$x$8$1$AA==$AA==", "scrypt$3$8$1$AA==$AA==",
                                 "scrypt$16$8$1$!!$AA=="])
def test_malformed_hashes_are_refused(bad: str) -> None:
    with pytest.raises(HashFormatError):
        parse_hash(bad)


def test_cache_holds_no_clear_passwords_and_is_bounded() -> None:
    cache = VerifiedCache(size=2)
    cache.add("pw1", "h")
    assert cache.hit("pw1", "h")
    assert not cache.hit("pw2", "h")
    cache.add("pw2", "h")
    cache.add("pw3", "h")
    assert not cache.hit("pw1", "h")
    assert all(b"pw" not in key for key in cache._seen)
