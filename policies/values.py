"""JSON values every hop carries unchanged, and a strict parser that keeps to them.

A value passes when JSON and msgpack both carry it without change, so that any link can
send it on and any receiver reads what the sender meant: no duplicate object keys (a
receiver that keeps the first sees another value than one that keeps the last), no NaN or
infinities, no lone surrogates, no integers beyond 64 bits, no nesting deeper than
:data:`MAX_DEPTH`. Frame decoders (``router.wire``) and the payload inside a signed
message (:mod:`policies.jws`) are held to the same rules.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

__all__ = ["MAX_DEPTH", "MAX_INT", "MIN_INT", "UnfitValue", "encodable", "parse_json",
           "unique_keys", "value_flaw"]

#: The integers msgpack holds (int64 and uint64); JSON itself sets no limit.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
_MAX_INT_DIGITS = len(str(MIN_INT))  # the sign included
#: How deep arrays and objects may nest in a frame, its own array included. msgpack packs
#: no deeper than 511 levels and JSON encoding recurses, so a value nested 600 deep would
#: decode, then fail in the writer of the link it goes out on. OCPP payloads nest less than
#: 10 deep; the limit is generous so that texts up to 512 characters need no count.
MAX_DEPTH = 256


class UnfitValue(Exception):
    """Well-formed JSON or msgpack holding a value the node must not pass on; raised while
    parsing, turned into a :class:`FrameError` by the decoders."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """An object from its key-value pairs (a parser's hook), refusing a key that appears
    twice: a receiver that keeps the first sees another value than one that keeps the last."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise UnfitValue(f"an object holds the key {_short(key)} twice")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python reads NaN and Infinity unless told not to


def _json_int(digits: str) -> int:
    if len(digits) < _MAX_INT_DIGITS - 1:  # up to 18 digits: no need to compare
        return int(digits)
    # the length first: converting thousands of digits takes quadratic time
    if len(digits) <= _MAX_INT_DIGITS:
        value = int(digits)
        if MIN_INT <= value <= MAX_INT:
            return value
    raise UnfitValue(f"the integer {_short(digits)[1:-1]} does not fit in 64 bits")


def _json_float(digits: str) -> float:
    value = float(digits)
    if math.isinf(value):  # 1e400 would travel on as Infinity, which is not JSON
        raise UnfitValue(f"the number {_short(digits)[1:-1]} is too large for a float")
    return value


def _stand_in_int(digits: str) -> int:
    # the value is refused anyway; this spares converting thousands of digits
    if len(digits) <= _MAX_INT_DIGITS:
        return int(digits)
    return MIN_INT - 1 if digits.startswith("-") else MAX_INT + 1


# The checks run inside the C parser, as hooks. On a 300-byte MeterValues (4 objects, 2
# integers) they add about 18,000 instructions to the parse; a walk over the decoded value
# would add 30,000, a regex scan of the text for long runs of digits 50,000 (callgrind).
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=unique_keys, parse_constant=_no_constant,
                                parse_int=_json_int, parse_float=_json_float)
# Reads an unfit text once more, for the message id and type to answer with.
_LENIENT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_int=_stand_in_int)


def encodable(text: str) -> bool:
    """Whether a str holds no lone surrogate, so that it encodes to UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def value_flaw(value: Any) -> str | None:
    """Why ``value`` cannot travel unchanged as both JSON and msgpack, or None if it can.

    A dict cannot show a duplicate key any more: parsers refuse those with
    :func:`unique_keys` as their object hook.
    """
    level = [value]
    for _ in range(MAX_DEPTH):  # one level of nesting at a time
        deeper: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is str:
                # isascii() costs nothing; only a non-ASCII str can hold a surrogate
                if not item.isascii() and not encodable(item):
                    return f"the string {_short(item)} holds a lone surrogate"
            elif kind is dict:
                for key in item:
                    if type(key) is not str:
                        return f"an object key must be a string, not {type(key).__name__}"
                    if not key.isascii() and not encodable(key):
                        return f"the key {_short(key)} holds a lone surrogate"
                deeper.extend(item.values())
            elif kind is list:
                deeper.extend(item)
            elif kind is int:
                if not MIN_INT <= item <= MAX_INT:
                    return f"the integer {_short(item)} does not fit in 64 bits"
            elif kind is float:
                if not math.isfinite(item):
                    return f"the number {item} is not JSON"
            elif item is not None and kind is not bool:
                return f"a value of type {kind.__name__} is not JSON"
        if not deeper:
            return None
        level = deeper
    return f"arrays and objects nest deeper than {MAX_DEPTH} levels"


def _parse(text: str) -> Any:
    try:
        value, end = _STRICT_JSON.raw_decode(text)
    except json.JSONDecodeError:
        return _STRICT_JSON.decode(text)  # space before the value, or not JSON: decode() says
    if end != len(text):
        return _STRICT_JSON.decode(text)  # space after the value, or something else
    return value


def _may_hold_surrogate(text: str) -> bool:
    # Text that is valid UTF-8 (all a link delivers) makes one only from an escape, and
    # "\u00e9" and its kind need no walk.
    if "\\" in text and ("\\ud" in text or "\\uD" in text):
        return True
    if text.isascii():
        return False
    try:
        text.encode("latin-1")  # a copy, when all characters are Latin-1 (é, ü, ß...)
    except UnicodeEncodeError:
        return not encodable(text)
    return False


def _may_nest_too_deep(text: str) -> bool:
    # Each level takes two characters at least, so most frames skip counting brackets.
    return len(text) > 2 * MAX_DEPTH and text.count("[") + text.count("{") > MAX_DEPTH


def _compact(text: str) -> Any:
    """The value of ``text`` when it is exactly what orjson writes for that value, else
    None (also for ``null`` itself, which the full parse then reads).

    Most peers send compact JSON (the ``ocpp`` package, JavaScript's ``JSON.stringify``,
    Jackson, Gson): for those, parsing with orjson and writing the value back is a third of
    the hooked parse below (4 against 10 us on a 370-byte MeterValues), and equal text
    proves the value fit. A duplicate key would be missing from the text written back, an
    integer beyond 64 bits (which orjson reads as a float) or a float beyond the double
    range would be written otherwise, NaN and lone surrogates are not read at all. Any
    other text, equal in meaning but not in bytes (spaces after separators, ``\\u``
    escapes, ``1E2``), takes the full parse: correct, and about 4 us slower.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None  # not JSON, or not fit: the full parse says which, and why
    try:
        same = orjson.dumps(value) == text.encode("utf-8")
    except (orjson.JSONEncodeError, UnicodeEncodeError):
        return None
    return value if same else None


def parse_json(text: str) -> tuple[Any, str | None]:
    """Parse JSON text: the value, and why it must not be passed on (None when it may).
    Text that is not JSON at all, NaN included, raises ValueError."""
    if type(text) is not str:
        # a str subclass (the node's text that came compressed): orjson reads none
        text = str(text)
    value = _compact(text)
    if value is not None:
        return value, value_flaw(value) if _may_nest_too_deep(text) else None
    try:
        value = _parse(text)
    except UnfitValue as exc:
        return _LENIENT_JSON.decode(text), str(exc)  # ValueError when not JSON at all
    # most texts are short ASCII without a backslash: the first line settles them
    if ("\\" in text or not text.isascii() or len(text) > 2 * MAX_DEPTH) and (
        _may_hold_surrogate(text) or _may_nest_too_deep(text)
    ):
        return value, value_flaw(value)
    return value, None
