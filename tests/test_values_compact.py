"""The compact-text shortcut of ``parse_json`` decides exactly as the full, hooked parse.

``parse_json`` first reads a text with orjson and accepts it when writing the value back
gives the same bytes; everything else takes the strict standard-library parse. These
tests hold the shortcut to the full parse on generated texts, compact and spaced, with
duplicate keys, integers at and past the 64-bit limits, escapes and non-ASCII text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.values import (
    MAX_INT,
    MIN_INT,
    UnfitValue,
    _compact,
    _parse,
    parse_json,
    value_flaw,
)


def _full(text: str) -> tuple[str, Any]:
    """What the strict parse alone says: ("ok", value), ("unfit", reason) or ("error", "")."""
    try:
        value = _parse(text)
    except UnfitValue as exc:
        return ("unfit", str(exc))
    except ValueError:
        return ("error", "")
    flaw = value_flaw(value)
    return ("unfit", flaw) if flaw else ("ok", value)


def _fast(text: str) -> tuple[str, Any]:
    try:
        value, flaw = parse_json(text)
    except ValueError:
        return ("error", "")
    return ("unfit", flaw) if flaw else ("ok", value)


def _same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    # 1 == 1.0 == True: compare the types as well, through repr
    return a[0] == b[0] and (a[0] != "ok" or repr(a[1]) == repr(b[1]))


scalars = (st.none() | st.booleans() | st.integers(MIN_INT - 5, MAX_INT + 5)
           | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text())
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, derandomize=True)
@given(values, st.booleans(), st.booleans())
def test_the_shortcut_agrees_with_the_full_parse(value: Any, compact: bool,
                                                 ascii_only: bool) -> None:
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(value, separators=separators, ensure_ascii=ascii_only)
    assert _same(_fast(text), _full(text))


@settings(max_examples=200, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "a:", ""]), scalars), min_size=2,
                max_size=5))
def test_duplicate_keys_in_compact_text_are_refused(pairs: list[tuple[str, Any]]) -> None:
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}"
                          for k, v in pairs) + "}"
    assert _same(_fast(text), _full(text))
    if len({k for k, _ in pairs}) < len(pairs):
        assert _fast(text)[0] == "unfit"


@pytest.mark.parametrize("text", [
    '{"n":18446744073709551615}', '{"n":18446744073709551616}',
    '{"n":-9223372036854775808}', '{"n":-9223372036854775809}',
    '{"n":-0}', '{"n":1E2}', '{"n":1e400}', '{"a":"\\u003a","a":1}', '{"a":"\\ud800"}',
    '{"a":"\\u00e9"}', '{"a":"é"}', '[1] ', 'null', '"x"', '{"a":1}x', '[NaN]',
])
def test_edge_cases_agree(text: str) -> None:
    assert _same(_fast(text), _full(text))


def test_the_shortcut_takes_compact_text_and_only_that() -> None:
    compact = '[2,"m1","MeterValues",{"connectorId":1,"meterValue":[{"sampledValue":[]}]}]'
    assert _compact(compact) == json.loads(compact)
    for other in (compact.replace(",", ", "), '{"n":18446744073709551616}', '{"a":1,"a":2}',
                  '{"a":"\\u00e9"}'):
        assert _compact(other) is None
