"""Reading values out of parsed TOML while collecting every mistake with its line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from router.config.model import ConfigProblem

# --- locating keys in the source text, so errors can name a line ------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEYLINE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _find_line(text: str, key: str) -> int | None:
    """Best-effort line of ``table.key`` or ``array[i].key`` in the TOML source."""
    m = re.fullmatch(r"([A-Za-z0-9_-]+)(?:\[(\d+)\])?(?:\.([A-Za-z0-9_-]+))?.*", key)
    if not m:
        return None
    table, index, leaf = m.group(1), m.group(2), m.group(3)
    want = int(index) if index is not None else 0
    seen: dict[str, int] = {}
    inside = False
    header_line = None
    for number, raw in enumerate(text.splitlines(), start=1):
        h = _HEADER.match(raw)
        if h:
            name = h.group(2)
            count = seen.get(name, -1) + 1
            seen[name] = count
            inside = name == table and (h.group(1) == "[" or count == want)
            if inside:
                header_line = number
            continue
        if inside and leaf:
            k = _KEYLINE.match(raw)
            if k and k.group(1) == leaf:
                return number
    if header_line is None and leaf is None:
        # a top-level key such as ``default``
        for number, raw in enumerate(text.splitlines(), start=1):
            if _HEADER.match(raw):
                break
            k = _KEYLINE.match(raw)
            if k and k.group(1) == table:
                return number
    return header_line


class Checker:
    """Collects problems while reading values out of the parsed TOML."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text
        self.problems: list[ConfigProblem] = []

    def fail(self, key: str, problem: str) -> None:
        self.problems.append(ConfigProblem(self.file, key, _find_line(self.text, key), problem))

    def table(self, raw: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(key, "must be a table")
            return {}
        for name in raw:
            if name not in allowed:
                self.fail(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(allowed))})")
        return raw

    def tables(self, raw: dict[str, Any], key: str) -> list[Any]:
        """The entries of an optional array of tables (``[[key]]``); none if it is not one."""
        items = raw.get(key, [])
        if not isinstance(items, list):
            self.fail(key, f"must be an array of tables ([[{key}]])")
            return []
        return items

    def string(
        self, t: dict[str, Any], base: str, name: str, default: str | None = None,
        required: bool = False,
    ) -> str | None:
        value = t.get(name, default)
        if value is None:
            if required:
                self.fail(f"{base}.{name}", "is required")
            return None
        if not isinstance(value, str):
            self.fail(f"{base}.{name}", f"must be a string, not {type(value).__name__}")
            return default
        return value

    def integer(
        self, t: dict[str, Any], base: str, name: str, default: int, lo: int, hi: int
    ) -> int:
        value = t.get(name, default)
        if type(value) is not int:
            self.fail(f"{base}.{name}", f"must be an integer, not {type(value).__name__}")
            return default
        if not lo <= value <= hi:
            self.fail(f"{base}.{name}", f"must be between {lo} and {hi}, not {value}")
            return default
        return value

    def number(
        self, t: dict[str, Any], base: str, name: str, default: float, lo: float, hi: float
    ) -> float:
        value = t.get(name, default)
        if type(value) not in (int, float):
            self.fail(f"{base}.{name}", f"must be a number, not {type(value).__name__}")
            return default
        if not lo <= value <= hi:
            self.fail(f"{base}.{name}", f"must be between {lo} and {hi}, not {value}")
            return default
        return float(value)

    def boolean(self, t: dict[str, Any], base: str, name: str, default: bool) -> bool:
        value = t.get(name, default)
        if type(value) is not bool:
            self.fail(f"{base}.{name}", f"must be true or false, not {type(value).__name__}")
            return default
        return value

    def strings(
        self, t: dict[str, Any], base: str, name: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        value = t.get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(f"{base}.{name}", "must be a list of non-empty strings")
            return default
        return tuple(value)

    def path(
        self, t: dict[str, Any], base: str, name: str, root: Path, must_exist: bool
    ) -> Path | None:
        value = self.string(t, base, name)
        if value is None:
            return None
        resolved = (root / value) if not os.path.isabs(value) else Path(value)
        if must_exist and not resolved.is_file():
            self.fail(f"{base}.{name}", f"file not found: {resolved}")
        return resolved

