"""RFC 8785 canonicalization: the RFC's vectors, and the fast path against the rfc8785 package."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.canonical import CanonicalError, canonicalize, canonicalize_reference

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc8785.json").read_text("utf-8"))
SAFE = 2**53 - 1


@pytest.mark.parametrize("case", VECTORS["documents"], ids=lambda c: c["name"])
def test_rfc8785_documents(case: dict[str, str]) -> None:
    value = json.loads(case["input"])
    expected = case["expected"].encode("utf-8")
    assert canonicalize(value) == expected
    assert canonicalize_reference(value) == expected


@pytest.mark.parametrize("row", VECTORS["numbers"], ids=lambda r: r["ieee754"])
def test_rfc8785_numbers(row: dict[str, str | None]) -> None:
    bits = row["ieee754"]
    assert isinstance(bits, str)
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    expected = row["expected"]
    for document, wrap in ((value, "{}"), ([value], "[{}]"), ({"n": value}, '{{"n":{}}}')):
        if expected is None:
            with pytest.raises(CanonicalError):
                canonicalize(document)
        else:
            assert canonicalize(document) == wrap.format(expected).encode()


json_scalars = (st.none() | st.booleans() | st.integers(-SAFE, SAFE)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=5),
    max_leaves=25,
)
# numbers where the C encoder and ECMAScript disagree, and keys where UTF-16 order matters
tricky_numbers = st.sampled_from([0.0, -0.0, 1.0, 5e-324, 1e-7, 1e-6, 1e-5, 1e16, 1e21, 1e22,
                                  123.0, 2.0**53, 2.0**60, 9007199254740991, -9007199254740991,
                                  1234567890123456, 0.1, 1e300])
tricky_keys = st.sampled_from(["a", "\U0001f600", "\ufb33", "\u20ac", "\ue000", "\uffff", "",
                               "\U00010000", "1", "A"])


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fast_path_equals_the_library(value: Any) -> None:
    expected = rfc8785.dumps(value)
    assert canonicalize(value) == expected
    assert canonicalize_reference(value) == expected


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(tricky_keys, st.lists(tricky_numbers, max_size=3) | tricky_numbers,
                       min_size=1, max_size=6))
def test_tricky_keys_and_numbers_equal_the_library(value: dict[str, Any]) -> None:
    assert canonicalize(value) == rfc8785.dumps(value)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_reparsing_is_a_fixed_point(value: Any) -> None:
    """Whatever layout a relay gives the JSON, the canonical bytes come out the same."""
    once = canonicalize(value)
    spaced = json.dumps(value, indent=3, sort_keys=False, ensure_ascii=True)
    assert canonicalize(json.loads(spaced)) == once
    # canonical text read back as JSON numbers are meant to be read: as doubles
    assert canonicalize(json.loads(once, parse_int=float)) == once


def test_member_order_does_not_matter() -> None:
    assert canonicalize({"b": 1, "a": [2.0, {"y": None, "x": True}]}) == \
        canonicalize({"a": [2, {"x": True, "y": None}], "b": 1.0}) == \
        b'{"a":[2,{"x":true,"y":null}],"b":1}'


@pytest.mark.parametrize("value", [
    float("nan"), [float("inf")], {"x": float("-inf")}, 2**53 + 1, [-(2**53) - 1],
    {"big": 10**30}, [10**400],
    "\ud800", {"\udfff": 1}, ["a\ud83d"], {1: "x", "a": 2}, {"s": {1, 2}}, b"bytes",
    {"d": object()},
])
def test_values_without_a_canonical_form_are_refused(value: object) -> None:
    with pytest.raises(CanonicalError):
        canonicalize(value)
    with pytest.raises(CanonicalError):
        canonicalize_reference(value)


def test_big_integers_a_double_holds_exactly_are_written_as_that_double() -> None:
    assert canonicalize([2**53, -(2**53), 10**22, 2**60]) == \
        b"[9007199254740992,-9007199254740992,1e+22,1152921504606847000]"
    assert canonicalize([2**53]) == canonicalize([2.0**53])


def test_deep_nesting_is_refused_not_a_crash() -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(CanonicalError):
        canonicalize(deep)
    with pytest.raises(CanonicalError):
        canonicalize_reference(deep)


def test_strings_in_containers_that_look_like_numbers_stay_exact() -> None:
    # the fast path's number scan also sees text inside strings; only speed may differ
    value = {"a": ":1.0,", "b": ",12345678901234567", "c": "[1e+5", "d": ["x:2.0]"]}
    assert canonicalize(value) == rfc8785.dumps(value)


punctuation_text = st.text(alphabet=':,[]{}".0123456789e-+\\ ', max_size=12)
number_heavy = st.recursive(
    st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**60), 2**60)
    | punctuation_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(punctuation_text, inner,
                                                                max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(number_heavy)
def test_number_rewriting_is_not_fooled_by_strings(value: Any) -> None:
    """Strings full of quotes, escapes and number-like text next to floats that need rewriting."""
    try:
        expected = canonicalize_reference(value)
    except CanonicalError:
        with pytest.raises(CanonicalError):
            canonicalize(value)
        return
    assert canonicalize(value) == expected
    if not _has_big_int(value):
        assert expected == rfc8785.dumps(value)


def _has_big_int(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_big_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_big_int(v) for v in value)
    return type(value) is int and abs(value) > SAFE


def test_integral_floats_next_to_tricky_strings() -> None:
    value = {"a": ':1.0,', "n": [5.0, -0.0, 1e16, 1e-7], "q": 'say "2.0," ok', "z": 3.0}
    assert canonicalize(value) == rfc8785.dumps(value) == (
        b'{"a":":1.0,","n":[5,0,10000000000000000,1e-7],"q":"say \\"2.0,\\" ok","z":3}')
    plain = {"a": ':1.0,', "n": [5.0, 2e-9], "b": "[7.0]"}
    assert canonicalize(plain) == rfc8785.dumps(plain)


_FLAT_ALPHABET = [*'aZ09 _-:.+/="\\', "\x7f", "\x1f", "é", "\U0001f600"]
_flat_text = st.text(alphabet=st.sampled_from(_FLAT_ALPHABET), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_flat_text, _flat_text | st.integers(-3, 3), max_size=9))
def test_small_objects_of_strings_equal_the_library(value: dict[str, Any]) -> None:
    """The direct path for a signature's metadata: printable ASCII strings only, anything
    else (a quote, a backslash, a control character, DEL, non-ASCII, a number, more than 8
    members) takes the encoder, and the bytes are the same either way."""
    assert canonicalize(value) == rfc8785.dumps(value)
