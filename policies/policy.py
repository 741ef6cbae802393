"""The policy file language: TOML in, a frozen :class:`Policy` out, or every mistake at once.

A policy names public keys and the roles they carry (``[[keys]]``) and a list of rules
(``[[rules]]``) evaluated first-match, with ``default`` for messages no rule matches;
docs/signatures.md and INTERFACES.md describe every field. Each mistake is reported with
the file, the line and the field (``rules[2].require.count``); tomllib gives no
positions, so the lines are found by reading the TOML text alongside.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from policies.jws import Certificate, CertificateError, load_certificate
from policies.signatures import (
    MAX_SIGNATURES,
    KeyFormatError,
    PublicKey,
    algorithm_of,
    key_id_of,
    load_public_key,
    public_key_from_key_id,
)

__all__ = [
    "DIRECTION_CHOICES",
    "MESSAGE_KINDS",
    "KeyEntry",
    "Outcome",
    "Policy",
    "PolicyError",
    "PolicyProblem",
    "RateLimit",
    "Requirement",
    "Rule",
    "check_policy",
    "load_policy",
    "parse_policy",
]

DIRECTION_CHOICES = ("to-station", "from-station", "any")
#: What a rule can cover: CALL and SEND are "call", CALLRESULT is "result", CALLERROR "error".
MESSAGE_KINDS = ("call", "result", "error")
_MAX_AGE_LIMIT_S = 7 * 24 * 3600.0


class Outcome(enum.StrEnum):
    """What happens to a message: delivered, refused with a CALLERROR, or silently dropped."""

    FORWARD = "forward"
    REJECT = "reject"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One ``[[keys]]`` entry: a public key, its short name and its roles."""

    id: str
    key_id: str
    roles: frozenset[str]
    algorithm: str
    # the WWCP-form key; None for an entry given by ``certificate`` with a key that form
    # cannot use (RSA)
    public_key: PublicKey | None = field(compare=False, repr=False)
    line: int | None = None
    # ``certificate = "file.pem"``: verifies OCPP 2.1 Signed Messages (JWS), found by its
    # x5t#S256 thumbprint, and the WWCP form too when its key is P-256
    certificate: Certificate | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Requirement:
    """``require``: how many distinct keys carrying one of ``roles`` must have signed, how freshly.

    An empty ``roles`` accepts any key of the policy.
    """

    roles: frozenset[str] = frozenset()
    count: int = 1
    max_age_s: float = 300.0

    def describe(self) -> str:
        """E.g. ``a signature from a key with role admin``."""
        if self.count == 1:
            who = "a key" if self.roles else "a key of the policy"
            what = "a signature"
        else:
            who = "distinct keys" if self.roles else "distinct keys of the policy"
            what = f"{self.count} signatures"
        if self.roles:
            return f"{what} from {who} with role {' or '.join(sorted(self.roles))}"
        return f"{what} from {who}"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate``: at most ``per_source`` messages per ``per_s`` seconds from each source."""

    per_source: int
    per_s: float
    then: Outcome = Outcome.REJECT


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rules]]`` entry."""

    name: str
    then: Outcome
    actions: tuple[str, ...] = ("*",)
    direction: str = "any"
    sources: tuple[str, ...] = ("*",)
    messages: tuple[str, ...] = ("call",)
    require: Requirement | None = None
    sign: bool = False
    rate: RateLimit | None = None
    validate_schema: bool | None = None  # None: the policy's setting
    line: int | None = None
    #: ``payload = { "a.b" = value or [values] }``: each dotted path through the payload's
    #: objects must hold one of its values (for a Signed Message: the signed payload)
    payload: tuple[tuple[tuple[str, ...], tuple[PayloadValue, ...]], ...] = ()


PayloadValue = str | int | float | bool
MAX_PAYLOAD_PATH = 8  # objects deep: OCPP payloads nest less


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, checked policy file."""

    default: Outcome
    keys: tuple[KeyEntry, ...] = ()
    rules: tuple[Rule, ...] = ()
    validate_schema: bool = False
    clock_skew_s: float = 60.0
    file: str = "<policy>"

    @property
    def replay_horizon_s(self) -> float:
        """How long a signature stays acceptable under the most lenient rule."""
        ages = [r.require.max_age_s for r in self.rules if r.require is not None]
        return max(ages, default=0.0)

    @property
    def uses_schemas(self) -> bool:
        """Whether any message may be validated against the OCPP schemas."""
        return self.validate_schema or any(r.validate_schema for r in self.rules)


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One mistake in a policy file, located."""

    file: str
    line: int | None
    key: str
    problem: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"


class PolicyError(Exception):
    """A policy file that cannot be used; ``problems`` lists every mistake found."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


# --- finding lines in the TOML text ----------------------------------------------------

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE_HEADER = re.compile(rf"\s*\[\s*({_DOTTED})\s*\]")
_KEY_LINE = re.compile(rf"\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_PART)

_Path = tuple[str | int, ...]


def _parts(dotted: str) -> list[str]:
    return [p[1:-1] if p[:1] in "\"'" else p for p in _PART_RE.findall(dotted)]


class _Lines:
    """Where each table and key of a TOML document starts, by its path (arrays indexed)."""

    def __init__(self, text: str) -> None:
        self.marks: list[tuple[_Path, int]] = []
        counts: dict[_Path, int] = {}
        table: _Path = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if match := _ARRAY_HEADER.match(line):
                parts = _parts(match.group(1))
                parent = self._resolve(parts[:-1], counts)
                array = (*parent, parts[-1])
                counts[array] = counts.get(array, 0) + 1
                table = (*array, counts[array] - 1)
                self.marks.append((table, number))
            elif match := _TABLE_HEADER.match(line):
                table = self._resolve(_parts(match.group(1)), counts)
                self.marks.append((table, number))
            elif match := _KEY_LINE.match(line):
                self.marks.append(((*table, *_parts(match.group(1))), number))
                rest = line[match.end():]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote

    @staticmethod
    def _resolve(parts: list[str], counts: dict[_Path, int]) -> _Path:
        resolved: list[str | int] = []
        for part in parts:
            resolved.append(part)
            seen = counts.get(tuple(resolved))
            if seen:
                resolved.append(seen - 1)
        return tuple(resolved)

    def find(self, path: _Path) -> int | None:
        """The line of the longest recorded prefix of ``path``."""
        best, best_len = None, -1
        for mark, number in self.marks:
            if len(mark) > best_len and path[: len(mark)] == mark:
                best, best_len = number, len(mark)
        return best


def _key_text(path: _Path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# --- checking values -----------------------------------------------------------------


class _Checker:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = _Lines(text)
        self.problems: list[PolicyProblem] = []

    def fail(self, path: _Path, problem: str) -> None:
        self.problems.append(PolicyProblem(self.file, self.lines.find(path), _key_text(path),
                                           problem))

    def table(self, raw: Any, path: _Path, allowed: Iterable[str]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.fail(path, "must be a table")
            return None
        allowed = tuple(allowed)
        for name in raw:
            if name not in allowed:
                self.fail((*path, name), f"unknown field (known: {', '.join(allowed)})")
        return raw

    def string(self, t: dict[str, Any], path: _Path, name: str, *, required: bool = False,
               choices: tuple[str, ...] | None = None, max_len: int = 200) -> str | None:
        if name not in t:
            if required:
                what = f" ({' | '.join(choices)})" if choices else ""
                self.fail((*path, name), f"missing{what}")
            return None
        value = t[name]
        if not isinstance(value, str) or not value.strip():
            self.fail((*path, name), "must be a non-empty string")
            return None
        if len(value) > max_len:
            self.fail((*path, name), f"longer than {max_len} characters")
            return None
        if choices is not None and value not in choices:
            self.fail((*path, name), f"must be one of {', '.join(choices)} (got {value!r})")
            return None
        return value

    def strings(self, t: dict[str, Any], path: _Path, name: str,
                default: tuple[str, ...]) -> tuple[str, ...]:
        if name not in t:
            return default
        value = t[name]
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v for v in value)):
            self.fail((*path, name), "must be a non-empty array of non-empty strings")
            return default
        return tuple(value)

    def number(self, t: dict[str, Any], path: _Path, name: str, default: float,
               low: float, high: float, *, integer: bool = False) -> float:
        if name not in t:
            return default
        value = t[name]
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            self.fail((*path, name), f"must be {kind} from {low:g} to {high:g} (got {value!r})")
            return default
        return value

    def boolean(self, t: dict[str, Any], path: _Path, name: str) -> bool | None:
        if name not in t:
            return None
        value = t[name]
        if not isinstance(value, bool):
            self.fail((*path, name), f"must be true or false (got {value!r})")
            return None
        return value


# --- the file --------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and check a policy file; :class:`PolicyError` lists every mistake."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError([PolicyProblem(file, None, "", f"cannot read: {reason}")]) from None
    return parse_policy(text, file, Path(path).resolve().parent)


def check_policy(path: str | Path) -> list[PolicyProblem]:
    """Every mistake in a policy file (empty when it is usable)."""
    try:
        load_policy(path)
    except PolicyError as exc:
        return exc.problems
    return []


def parse_policy(text: str, file: str = "<policy>", root: Path | None = None) -> Policy:
    """Check policy TOML text; key paths are relative to ``root`` (default: the cwd)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        raise PolicyError([PolicyProblem(file, line, "", f"not valid TOML: {exc}")]) from None
    c = _Checker(file, text)
    c.table(raw, (), ("default", "keys", "rules", "validate_schema", "clock_skew_s"))
    default = c.string(raw, (), "default", required=True,
                       choices=tuple(o.value for o in Outcome))
    validate = c.boolean(raw, (), "validate_schema") or False
    skew = c.number(raw, (), "clock_skew_s", 60.0, 0.0, 3600.0)
    before = len(c.problems)
    keys = _keys(c, raw.get("keys", []), root or Path.cwd())
    # with a key unusable, which roles exist is unknown: do not pile up role complaints
    keys_complete = len(c.problems) == before
    rules = _rules(c, raw.get("rules", []), keys, keys_complete)
    policy = Policy(Outcome(default) if default else Outcome.REJECT, keys, rules, validate,
                    float(skew), file)
    if policy.uses_schemas:
        from policies.schemas import SchemaUnavailable, SchemaValidator

        try:
            SchemaValidator()
        except SchemaUnavailable as exc:
            where: _Path = ("validate_schema",)
            if not validate:  # then a rule asked for it: name the first one
                where = next(("rules", i, "validate_schema") for i, r in enumerate(rules)
                             if r.validate_schema)
            c.fail(where, str(exc))
    if c.problems:
        raise PolicyError(sorted(c.problems, key=lambda p: p.line or 0))
    return policy


def _array(c: _Checker, raw: Any, name: str) -> list[Any]:
    if not isinstance(raw, list):
        c.fail((name,), f"must be an array of tables ([[{name}]])")
        return []
    return raw


def _keys(c: _Checker, raw: Any, root: Path) -> tuple[KeyEntry, ...]:
    entries: list[KeyEntry] = []
    names: set[str] = set()
    seen_keys: dict[str, str] = {}
    for i, item in enumerate(_array(c, raw, "keys")):
        path: _Path = ("keys", i)
        t = c.table(item, path, ("id", "public_key", "certificate", "roles", "description"))
        if t is None:
            continue
        key_name = c.string(t, path, "id", required=True, max_len=64)
        if key_name is not None and key_name in names:
            c.fail((*path, "id"), f"duplicate key id {key_name!r}")
        names.add(key_name or "")
        roles = c.strings(t, path, "roles", ())
        c.string(t, path, "description", max_len=1000)
        certificate: Certificate | None = None
        if "certificate" in t:
            if "public_key" in t:
                c.fail((*path, "certificate"), "give public_key or certificate, not both")
            cert_file = c.string(t, path, "certificate", required=True, max_len=4096)
            certificate = (_certificate(c, (*path, "certificate"), cert_file, root)
                           if cert_file else None)
            if certificate is None or key_name is None:
                continue
            if certificate.x5t in seen_keys:
                c.fail((*path, "certificate"), f"the same certificate as "
                                               f"{seen_keys[certificate.x5t]!r}")
                continue
            seen_keys[certificate.x5t] = key_name
            public = certificate.public_key
            wwcp = public if isinstance(public, ec.EllipticCurvePublicKey) else None
            entries.append(KeyEntry(key_name, key_id_of(wwcp) if wwcp else certificate.x5t,
                                    frozenset(roles),
                                    algorithm_of(wwcp) if wwcp else "JWS", wwcp,
                                    c.lines.find(path),
                                    certificate))
            continue
        source = c.string(t, path, "public_key", required=True, max_len=4096)
        public_key = _public_key(c, (*path, "public_key"), source, root) if source else None
        if public_key is None or key_name is None:
            continue
        key_id = key_id_of(public_key)
        if key_id in seen_keys:
            c.fail((*path, "public_key"), f"the same key as {seen_keys[key_id]!r}")
            continue
        seen_keys[key_id] = key_name
        entries.append(KeyEntry(key_name, key_id, frozenset(roles), algorithm_of(public_key),
                                public_key, c.lines.find(path)))
    return tuple(entries)


_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _certificate(c: _Checker, path: _Path, source: str, root: Path) -> Certificate | None:
    try:
        return load_certificate((root / source).read_bytes())
    except OSError as exc:
        c.fail(path, f"{source}: {exc.strerror or exc} (a PEM certificate, relative to the "
                     "policy)")
    except CertificateError as exc:
        c.fail(path, f"{source}: {exc}")
    return None


def _public_key(c: _Checker, path: _Path, source: str, root: Path) -> PublicKey | None:
    if _BASE64.fullmatch(source) and len(source) % 4 == 0:
        try:
            return public_key_from_key_id(source)
        except KeyFormatError:
            pass  # maybe a file name after all
    file = root / source
    try:
        data = file.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        c.fail(path, f"{source}: {reason} (a PEM file relative to the policy, or a base64 "
                     "key id)")
        return None
    try:
        return load_public_key(data)
    except KeyFormatError as exc:
        c.fail(path, f"{source}: {exc}")
        return None


def _rules(c: _Checker, raw: Any, keys: tuple[KeyEntry, ...],
           keys_complete: bool) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    names: set[str] = set()
    for i, item in enumerate(_array(c, raw, "rules")):
        path: _Path = ("rules", i)
        t = c.table(item, path, ("name", "actions", "direction", "sources", "messages",
                                 "require", "then", "sign", "rate", "validate_schema",
                                 "payload"))
        if t is None:
            continue
        name = c.string(t, path, "name", required=True)
        if name is not None and name in names:
            c.fail((*path, "name"), f"duplicate rule name {name!r} (the audit log names rules)")
        names.add(name or "")
        then = c.string(t, path, "then", required=True, choices=tuple(o.value for o in Outcome))
        actions = c.strings(t, path, "actions", ("*",))
        direction = c.string(t, path, "direction", choices=DIRECTION_CHOICES) or "any"
        sources = c.strings(t, path, "sources", ("*",))
        messages = c.strings(t, path, "messages", ("call",))
        for kind in messages:
            if kind not in MESSAGE_KINDS:
                c.fail((*path, "messages"),
                       f"{kind!r} is not one of {', '.join(MESSAGE_KINDS)}")
        sign = c.boolean(t, path, "sign") or False
        validate = c.boolean(t, path, "validate_schema")
        require = (_requirement(c, t.get("require"), (*path, "require"), keys, keys_complete)
                   if "require" in t else None)
        rate = _rate(c, t.get("rate"), (*path, "rate")) if "rate" in t else None
        fields = _payload_fields(c, t["payload"], (*path, "payload")) if "payload" in t else ()
        if then is not None and then != Outcome.FORWARD:
            if require is not None:
                c.fail((*path, "require"), f"only a rule that forwards can require signatures "
                                           f"(this one says then = {then!r})")
            if sign:
                c.fail((*path, "sign"), f"only a rule that forwards can sign "
                                        f"(this one says then = {then!r})")
        if name is None or then is None:
            continue
        rules.append(Rule(name, Outcome(then), actions, direction, sources, messages, require,
                          sign, rate, validate, c.lines.find(path), fields))
    return tuple(rules)


def _payload_fields(c: _Checker, raw: Any, path: _Path) -> tuple[
        tuple[tuple[str, ...], tuple[PayloadValue, ...]], ...]:
    if not isinstance(raw, dict) or not raw:
        c.fail(path, 'must be a table of dotted paths and values, e.g. { "chargingProfile.'
                     'chargingProfilePurpose" = "ChargingStationExternalConstraints" }')
        return ()
    fields = []
    for dotted, value in raw.items():
        steps = tuple(dotted.split("."))
        if not all(steps) or len(steps) > MAX_PAYLOAD_PATH:
            c.fail(path, f"{dotted!r} is not a dotted path of 1 to {MAX_PAYLOAD_PATH} names")
            continue
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            c.fail(path, f"{dotted!r} must be a string, number or boolean, or a list of them")
            continue
        fields.append((steps, values))
    return tuple(fields)


def _requirement(c: _Checker, raw: Any, path: _Path, keys: tuple[KeyEntry, ...],
                 keys_complete: bool) -> Requirement | None:
    t = c.table(raw, path, ("roles", "count", "max_age_s"))
    if t is None:
        return None
    roles = frozenset(c.strings(t, path, "roles", ()))
    count = int(c.number(t, path, "count", 1, 1, MAX_SIGNATURES, integer=True))
    max_age = float(c.number(t, path, "max_age_s", 300.0, 1.0, _MAX_AGE_LIMIT_S))
    if not keys_complete:
        return Requirement(roles, count, max_age)
    carried = {role for k in keys for role in k.roles}
    for role in sorted(roles - carried):
        c.fail((*path, "roles"), f"no key in [[keys]] carries role {role!r}")
    eligible = [k for k in keys if not roles or k.roles & roles]
    if (not roles or roles <= carried) and len(eligible) < count:
        c.fail((*path, "count"), f"{count} distinct keys needed but only {len(eligible)} "
                                 "key(s) qualify")
    return Requirement(roles, count, max_age)


def _rate(c: _Checker, raw: Any, path: _Path) -> RateLimit | None:
    t = c.table(raw, path, ("per_source", "per_s", "then"))
    if t is None:
        return None
    if "per_source" not in t:
        c.fail((*path, "per_source"), "missing (how many messages per source)")
    per_source = int(c.number(t, path, "per_source", 1, 1, 1_000_000, integer=True))
    per_s = float(c.number(t, path, "per_s", 1.0, 0.001, 86400.0))
    then = c.string(t, path, "then", choices=(Outcome.REJECT.value, Outcome.DROP.value))
    return RateLimit(per_source, per_s, Outcome(then) if then else Outcome.REJECT)
