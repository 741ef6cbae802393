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


def test_the_cache_grows_to_one_password_per_station_entry() -> None:
    cache = VerifiedCache(size=2)
    cache.fit(3)  # three [[stations]] entries
    for password in ("pw1", "pw2", "pw3"):
        cache.add(password, "h")
    assert all(cache.hit(password, "h") for password in ("pw1", "pw2", "pw3"))
    cache.fit(1)  # never below the size it was made with
    cache.add("pw4", "h")
    assert not cache.hit("pw1", "h") and cache.hit("pw4", "h")
