"""RFC 8785 (JSON Canonicalization Scheme) bytes of a JSON value, fast.

JCS differs from ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
in exactly three places: object members are ordered by UTF-16 code units (Python sorts by
code points, which differs only for characters above U+FFFF), numbers are written in the
ECMAScript shortest form (``1`` not ``1.0``, ``1e+21``, ``0.000001``, ``1e-7``), and
integers must be written as the IEEE double they are. String escaping is the
same. :func:`canonicalize` lets a C encoder do the work (orjson, or the standard library's
where orjson cannot: NaN, a null, integers beyond 64 bits) and inspects its output for the
three differences: number tokens written differently are rewritten in place, and only a
document whose member order may differ (or whose string boundaries are unclear) is
rebuilt by the reference serializer :func:`canonicalize_reference`, which implements the
RFC directly.

Input is a JSON value as :func:`json.loads` returns it (dicts with ``str`` keys, lists,
str, int, float, bool, None); tuples count as arrays. Integers beyond 2**53 that no
double holds exactly, NaN, infinities, lone surrogates and anything else that has no JCS
form raise :class:`CanonicalError`. (Non-string keys, which ``json.loads`` never
produces, are refused by the reference path but written as ``json.dumps`` writes them by
the fast path; so are a UUID and an Enum, which orjson writes as their value.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from json.encoder import encode_basestring

import orjson

__all__ = ["MAX_DEPTH", "CanonicalError", "canonicalize", "canonicalize_reference"]

#: Deeper documents are refused rather than risking the interpreter's recursion limit.
MAX_DEPTH = 256

_SAFE_INT = 2**53 - 1

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"),
    check_circular=False,
)

# Spotting the differences in the encoder's output must cost little next to encoding, so
# it runs on bytes with C-speed substring tests. A number token always follows ':', '['
# or ',' and is followed by ',', ']' or '}'. Suspect, on the token text: an integral
# float ("5.0"), an exponent ("1e-05", "1.5e+16"), 16 or more digits (maybe beyond
# 2**53 - 1). Strings can raise false alarms, which cost a closer look; they cannot
# hide a real number token.
_DIGITS_AND_SIGN = bytes.maketrans(b"123456789+", b"000000000-")  # "1.5e+16" -> "0.0e-00"
_CLOSERS = bytes.maketrans(b"]}", b",,")  # "5.0]" -> "5.0,"
_SIXTEEN_DIGITS = b"0" * 16
# The closer look: suspect number tokens, where a number token can be.
_SUSPECT_TOKEN = re.compile(
    r"[:,\[](-?(?:\d+\.0|\d+(?:\.\d+)?e[-+]\d+|\d{16,}(?:\.\d+)?))(?=[,\]}])"
)
# UTF-8 lead bytes of characters above U+FFFF, where code point order and UTF-16 order
# disagree.
_ASTRAL_LEAD = re.compile(rb"[\xf0-\xf4]")


class CanonicalError(ValueError):
    """The value has no RFC 8785 canonical form (NaN, huge integer, lone surrogate, ...)."""


def canonicalize(value: object) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value."""
    if type(value) is str:
        return _encode_utf8(encode_basestring(value))
    if not isinstance(value, (dict, list)):
        return canonicalize_reference(value)
    try:
        raw = orjson.dumps(value, option=_ORJSON_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        raw = b"null"  # an integer beyond 64 bits, a lone surrogate, a key not a str...
    if b"null" in raw:
        # orjson writes NaN and infinities as null: the standard encoder refuses them (and
        # anything else orjson would not write), and a real null costs only the slower path
        return _by_standard_encoder(value)
    return _checked(raw, value)


# orjson (C) writes the same text as the standard encoder below, a tenth of the time, but
# for exponents ("1e-7" where Python writes "1e-07"; ECMAScript's form anyway, and either
# is rewritten below) and NaN and infinities (as null). Dataclasses, datetimes and
# subclasses are left to the standard encoder, which refuses them.
_ORJSON_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
                   | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS)


def _by_standard_encoder(value: object) -> bytes:
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        # TypeError: a type JSON does not have; ValueError: NaN or infinity.
        raise CanonicalError(f"not canonicalizable: {exc}") from None
    return _checked(_encode_utf8(text), value)


def _checked(raw: bytes, value: object) -> bytes:
    """An encoder's UTF-8 output where it is JCS, else its numbers rewritten or the
    document rebuilt."""
    if not raw.isascii() and _ASTRAL_LEAD.search(raw) is not None:
        return canonicalize_reference(value)  # member order may differ: rebuild
    shape = raw.translate(_DIGITS_AND_SIGN)
    if (b".0," in raw.translate(_CLOSERS) or b"0e-" in shape or _SIXTEEN_DIGITS in shape):
        return _fix_numbers(raw.decode("utf-8"), value)
    return raw


def _fix_numbers(text: str, value: object) -> bytes:
    """Rewrite the number tokens the encoder wrote differently from ECMAScript."""
    if '\\"' in text:
        # an escaped quote (or a string ending in a backslash) hides where strings end
        return canonicalize_reference(value)
    pieces: list[str] = []
    done = 0  # text[:done] is in pieces
    quotes, counted = 0, 0  # '"' in text[:counted]
    for match in _SUSPECT_TOKEN.finditer(text):
        start, end = match.span(1)
        quotes += text.count('"', counted, start)
        counted = start
        if quotes % 2:
            continue  # inside a string: a false alarm
        token = match.group(1)
        if "." in token or "e" in token:
            fixed = _number(float(token))
        else:
            number = int(token)
            fixed = token if -_SAFE_INT <= number <= _SAFE_INT else _big_integer(number)
        pieces.append(text[done:start])
        pieces.append(fixed)
        done = end
    pieces.append(text[done:])
    return _encode_utf8("".join(pieces))


def canonicalize_reference(value: object) -> bytes:
    """RFC 8785 bytes by a direct walk of the value: the slow path, and the spec in code."""
    parts: list[str] = []
    _write(value, parts, 0)
    return _encode_utf8("".join(parts))


def _encode_utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalError("a string holds a lone surrogate (not Unicode text)") from None


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _write(value: object, parts: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CanonicalError(f"nested deeper than {MAX_DEPTH} levels")
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(encode_basestring(value))
    elif isinstance(value, int):
        if -_SAFE_INT <= value <= _SAFE_INT:
            parts.append(str(int(value)))
        else:
            parts.append(_big_integer(int(value)))
    elif isinstance(value, float):
        parts.append(_number(value))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalError(f"object key {key!r} is not a string")
        parts.append("{")
        first = True
        for key in sorted(value, key=_utf16_key):
            if not first:
                parts.append(",")
            first = False
            parts.append(encode_basestring(key))
            parts.append(":")
            _write(value[key], parts, depth + 1)
        parts.append("}")
    elif isinstance(value, (list, tuple)):
        parts.append("[")
        for i, item in enumerate(value):
            if i:
                parts.append(",")
            _write(item, parts, depth + 1)
        parts.append("]")
    else:
        raise CanonicalError(f"a {type(value).__name__} is not a JSON value")


def _big_integer(n: int) -> str:
    # JSON numbers are doubles. An integer a double holds exactly is written as that
    # double; any other would be silently rounded by every JCS implementation, so two
    # different payloads would sign alike: refuse it.
    try:
        as_double = float(n)
    except OverflowError:
        as_double = float("inf")
    if as_double != n:
        raise CanonicalError(f"integer {n} has no exact JSON number form (beyond 2**53)")
    return _number(as_double)


def _number(x: float) -> str:
    """ECMAScript Number::toString of a finite double (ECMA-262, as RFC 8785 3.2.2.3 asks)."""
    if x != x or x in (float("inf"), float("-inf")):
        raise CanonicalError(f"{x} is not a JSON number")
    if x == 0:
        return "0"  # also -0
    sign = "-" if x < 0 else ""
    # repr gives the shortest digit string that round-trips, which is the digit string
    # ECMAScript asks for; only the layout (where the point goes, when to use an
    # exponent) differs, and is redone here.
    mantissa, _, exp_text = repr(abs(x)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exp_text) if exp_text else 0)  # value = 0.<digits> * 10**point
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    significant = significant.rstrip("0")
    k, n = len(significant), point
    if k <= n <= 21:
        return sign + significant + "0" * (n - k)
    if 0 < n <= 21:
        return f"{sign}{significant[:n]}.{significant[n:]}"
    if -6 < n <= 0:
        return f"{sign}0.{'0' * -n}{significant}"
    exponent = n - 1
    exp_part = f"e{'+' if exponent >= 0 else '-'}{abs(exponent)}"
    if k == 1:
        return sign + significant + exp_part
    return f"{sign}{significant[0]}.{significant[1:]}{exp_part}"
