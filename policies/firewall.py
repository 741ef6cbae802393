"""The OCPP firewall: a policy applied to one message at a time, sans-IO.

:meth:`Firewall.decide` takes what the node knows about a message (action, direction,
source, payload, the time) and returns a :class:`Decision`. Rules are tried in order;
the first whose action, direction, source and message kind match decides, and a rule
with ``require`` that is not satisfied rejects (it never falls through to later rules).
Answers (CALLRESULT, CALLERROR) that no rule names are forwarded: they answer a CALL the
firewall already let through. The firewall keeps two pieces of state, both bounded: the
replay memory and the per-rule rate limit buckets. :meth:`Firewall.explain` evaluates
without touching either.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from policies.canonical import CanonicalError, canonicalize
from policies.jws import Certificate, inner_action, unwrap, verify_jws
from policies.policy import KeyEntry, Outcome, Policy, Requirement, Rule
from policies.ratelimit import RateLimiter
from policies.replay import ReplayCache
from policies.schemas import SchemaValidator
from policies.signatures import (
    DIRECTIONS,
    MAX_SIGNATURES,
    RejectedSignature,
    SignedContent,
    check_signature,
    signature_entries,
    without_signatures,
)

__all__ = ["Decision", "Explanation", "Firewall"]

_KINDS = ("call", "result", "error")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one message, which rule said so and why.

    ``rule`` is None when the policy's default (or the answers-pass rule) decided.
    ``key_ids`` names the policy keys whose signatures satisfied ``require``. When
    ``sign`` is true the node adds its own signature before forwarding;
    ``canonical_payload`` then holds the canonical payload bytes to sign with
    (:func:`policies.signatures.sign_payload` takes them), so nothing is computed twice.
    """

    outcome: Outcome
    rule: str | None
    reason: str
    key_ids: tuple[str, ...] = ()
    sign: bool = False
    canonical_payload: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def forwarded(self) -> bool:
        """Whether the message goes on."""
        return self.outcome is Outcome.FORWARD


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision with its rule's line and why each earlier rule did not match."""

    decision: Decision
    line: int | None
    skipped: tuple[str, ...]


_ABSENT = object()  # not there: a payload field, or the payload before it was read


class _Globs:
    """A list of shell-style patterns, matched fast: exact names by set, the rest by one regex."""

    __slots__ = ("_exact", "_regex", "everything", "patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.everything = "*" in patterns
        self._exact = frozenset(p for p in patterns if not any(ch in p for ch in "*?["))
        globs = [fnmatch.translate(p) for p in patterns if p not in self._exact]
        self._regex = re.compile("|".join(f"(?:{g})" for g in globs)) if globs else None

    def match(self, text: str) -> bool:
        return (self.everything or text in self._exact
                or (self._regex is not None and self._regex.match(text) is not None))

    def __str__(self) -> str:
        return ", ".join(self.patterns)


class _Compiled:
    """A rule with its matchers built and its rate limiter (the rule's only state)."""

    __slots__ = ("actions", "directions", "kinds", "limiter", "rule", "sources", "validate")

    def __init__(self, rule: Rule, policy: Policy, max_sources: int) -> None:
        self.rule = rule
        self.actions = _Globs(rule.actions)
        self.sources = _Globs(rule.sources)
        self.directions = frozenset(DIRECTIONS if rule.direction == "any" else (rule.direction,))
        self.kinds = frozenset(rule.messages)
        self.limiter = (RateLimiter(rule.rate.per_source, rule.rate.per_s, max_sources)
                        if rule.rate is not None else None)
        self.validate = (rule.validate_schema if rule.validate_schema is not None
                         else policy.validate_schema)

    def mismatch(self, action: str, direction: str, source: str, kind: str) -> str | None:
        if kind not in self.kinds:
            return f"a {kind} message; the rule covers {', '.join(self.rule.messages)}"
        if direction not in self.directions:
            return f"direction {direction}; the rule covers {self.rule.direction}"
        if not self.actions.match(action):
            return f"action {action} is not in [{self.actions}]"
        if not self.sources.match(source):
            return f"source {source} is not in [{self.sources}]"
        return None

    def payload_mismatch(self, body: object) -> str | None:
        """Why ``body`` (the payload, or a Signed Message's signed payload) does not hold
        the rule's ``payload`` values; None when it does."""
        for steps, values in self.rule.payload:
            found: object = body
            for step in steps:
                found = found.get(step, _ABSENT) if isinstance(found, dict) else \
                    _ABSENT
            name = ".".join(steps)
            if found is _ABSENT:
                return f"the payload has no {name}"
            # 1 is not true, nor "1" 1: types must agree as well as values
            if not any(type(found) is type(v) and found == v for v in values):
                return f"the payload's {name} is {_short_value(found)}, not one of the rule's"
        return None


def _short_value(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Firewall:
    """A policy with its state: decides what happens to each message.

    ``replay_capacity`` bounds the replay memory (signed messages remembered at once);
    ``rate_sources`` bounds the sources tracked per rate-limited rule. ``schemas`` may
    share one :class:`SchemaValidator`; by default one is made if the policy validates.
    """

    __slots__ = ("_by_der", "_by_key_id", "_by_x5t", "_certificates", "_horizon",
                 "_read_signed", "_replay", "_rules", "_schemas", "policy")

    def __init__(
        self,
        policy: Policy,
        *,
        replay_capacity: int = 100_000,
        rate_sources: int = 10_000,
        schemas: SchemaValidator | None = None,
    ) -> None:
        self.policy = policy
        self._rules = tuple(_Compiled(r, policy, rate_sources) for r in policy.rules)
        self._replay = ReplayCache(replay_capacity)
        self._horizon = policy.replay_horizon_s
        wwcp = [k for k in policy.keys if k.public_key is not None]
        self._by_key_id: dict[str, KeyEntry] = {k.key_id: k for k in wwcp}
        self._by_der: dict[bytes, KeyEntry] = {base64.b64decode(k.key_id): k for k in wwcp}
        # OCPP 2.1 Signed Messages: signers by their certificate's x5t#S256
        self._by_x5t: dict[str, KeyEntry] = {k.certificate.x5t: k for k in policy.keys
                                             if k.certificate is not None}
        self._certificates: dict[str, Certificate] = {
            x5t: k.certificate for x5t, k in self._by_x5t.items() if k.certificate is not None}
        # A Signed Message's payload is read (strictly: no duplicate keys, the value rules
        # of policies.values) when a rule looks into payloads. Then a payload a rule could
        # not read is refused by the signature check of a later rule too, so an ambiguous
        # payload cannot slip past a payload rule to a laxer rule below it. With no payload
        # rule the firewall interprets nothing inside the JWS, and what was signed stays
        # opaque bytes for the receiver to read (and an unwrap to parse, strictly).
        self._read_signed = any(c.rule.payload for c in self._rules)
        if schemas is None and policy.uses_schemas:
            schemas = SchemaValidator()
        self._schemas = schemas

    @property
    def replay_memory(self) -> int:
        """How many signed messages the replay memory holds now."""
        return len(self._replay)

    def decide(
        self,
        action: str,
        direction: str,
        source: str,
        payload: object,
        now: float,
        *,
        message: str = "call",
        ocpp_version: str | None = None,
        message_type: int | None = None,
    ) -> Decision:
        """Decide one message; records its signatures (replay) and its rate-limit token.

        ``message`` is ``"call"`` (CALL and SEND), ``"result"`` or ``"error"``; for an
        answer, ``action`` is the action of the CALL it answers. ``ocpp_version`` (the
        link's subprotocol, e.g. ``"ocpp2.0.1"``) enables schema validation where the
        policy asks for it; without it payloads are not validated. ``message_type`` is the
        frame's MessageTypeId where the caller knows it: a Signed Message binds it (a SEND
        is 6); by default 2 for a call, 3 for a result.
        """
        return self._evaluate(action, direction, source, payload, now, message, ocpp_version,
                              True, None, message_type)[0]

    def explain(
        self,
        action: str,
        direction: str,
        source: str,
        payload: object,
        now: float,
        *,
        message: str = "call",
        ocpp_version: str | None = None,
        message_type: int | None = None,
    ) -> Explanation:
        """Like :meth:`decide`, without recording anything, and saying which rules were passed."""
        skipped: list[str] = []
        decision, line = self._evaluate(action, direction, source, payload, now, message,
                                        ocpp_version, False, skipped, message_type)
        return Explanation(decision, line, tuple(skipped))

    # --- evaluation ----------------------------------------------------------------------

    def _evaluate(
        self,
        action: str,
        direction: str,
        source: str,
        payload: object,
        now: float,
        kind: str,
        version: str | None,
        record: bool,
        skipped: list[str] | None,
        message_type: int | None = None,
    ) -> tuple[Decision, int | None]:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, "
                             f"not {direction!r}")
        if kind not in _KINDS:
            raise ValueError(f"message must be one of {', '.join(_KINDS)}, not {kind!r}")
        # rules name the plain action: "Reset" covers "Reset-Signed" (Part 4 chapter 7)
        signed = inner_action(action)
        matched = signed or action
        body: object = _ABSENT
        for compiled in self._rules:
            why_not = compiled.mismatch(matched, direction, source, kind)
            if why_not is None and compiled.rule.payload:
                if body is _ABSENT:
                    # a Signed Message's rules look at what was signed; the rule's require
                    # then verifies the signature over these very bytes
                    body = unwrap(payload) if signed is not None else payload
                why_not = compiled.payload_mismatch(body)
            if why_not is None:
                decision = self._apply(compiled, action, direction, source, payload, now, kind,
                                       version, record, message_type)
                return decision, compiled.rule.line
            if skipped is not None:
                where = f" (line {compiled.rule.line})" if compiled.rule.line else ""
                skipped.append(f"rule {compiled.rule.name!r}{where}: {why_not}")
        if kind != "call":
            outcome, reason = Outcome.FORWARD, "no rule names this answer; answers pass"
        else:
            outcome = self.policy.default
            reason = f"no rule matches; the default is {outcome.value}"
        if outcome is Outcome.FORWARD and self.policy.validate_schema and kind != "error":
            problem = self._schema_problem(action, kind, payload, version)
            if problem is not None:
                return Decision(Outcome.REJECT, None, problem), None
        return Decision(outcome, None, reason), None

    def _apply(
        self,
        compiled: _Compiled,
        action: str,
        direction: str,
        source: str,
        payload: object,
        now: float,
        kind: str,
        version: str | None,
        record: bool,
        message_type: int | None = None,
    ) -> Decision:
        rule = compiled.rule
        if compiled.limiter is not None and not compiled.limiter.allow(source, now,
                                                                       record=record):
            assert rule.rate is not None
            return Decision(rule.rate.then, rule.name,
                            f"rate limit: more than {rule.rate.per_source} per "
                            f"{rule.rate.per_s:g} s from {source}")
        if rule.then is not Outcome.FORWARD:
            return Decision(rule.then, rule.name, f"rule {rule.name!r} says {rule.then.value}")
        if compiled.validate and kind != "error":
            problem = self._schema_problem(action, kind, payload, version)
            if problem is not None:
                return Decision(Outcome.REJECT, rule.name, problem)
        canonical: bytes | None = None
        key_names: tuple[str, ...] = ()
        if rule.require is not None:
            verdict = self._requirement(rule, action, direction, payload, now, record, kind,
                                        message_type)
            if isinstance(verdict, str):
                return Decision(Outcome.REJECT, rule.name, verdict)
            canonical, key_names = verdict
        if rule.sign and inner_action(action) is not None:
            return Decision(Outcome.REJECT, rule.name, "cannot countersign a signed message "
                            "(JWS): its payload is the signer's")
        if rule.sign:
            problem = _countersign_problem(payload)
            if problem is not None:
                return Decision(Outcome.REJECT, rule.name, f"cannot countersign: {problem}")
            if canonical is None:
                assert isinstance(payload, Mapping)
                try:
                    canonical = canonicalize(without_signatures(payload))
                except CanonicalError as exc:
                    return Decision(Outcome.REJECT, rule.name,
                                    f"cannot countersign: the payload has no canonical form "
                                    f"({exc})")
        reason = f"rule {rule.name!r} forwards"
        if key_names:
            reason += f" (signed by {', '.join(key_names)})"
        return Decision(Outcome.FORWARD, rule.name, reason, key_names, rule.sign, canonical)

    def _schema_problem(self, action: str, kind: str, payload: object,
                        version: str | None) -> str | None:
        if version is None or self._schemas is None or inner_action(action) is not None:
            return None  # a signed message's payload is a JWS: its signature is the check
        plain = without_signatures(payload) if isinstance(payload, Mapping) else payload
        problem = self._schemas.validate(version, action, kind, plain)
        return None if problem is None else f"schema: {problem}"

    def _lookup(self, entry: object) -> KeyEntry | None:
        if not isinstance(entry, Mapping):
            return None
        key_id = entry.get("keyId")
        if not isinstance(key_id, str):
            return None
        known = self._by_key_id.get(key_id)
        if known is None and len(key_id) <= 1024:
            # the same key written another way (line breaks, other padding bits)
            try:
                known = self._by_der.get(base64.b64decode(key_id))
            except (binascii.Error, ValueError):
                return None
        return known

    def _requirement(
        self,
        rule: Rule,
        action: str,
        direction: str,
        payload: object,
        now: float,
        record: bool,
        kind: str = "call",
        message_type: int | None = None,
    ) -> tuple[bytes, tuple[str, ...]] | str:
        """The canonical payload and the counted key names, or why ``require`` fails."""
        require = rule.require
        assert require is not None
        if inner_action(action) is not None:
            if message_type is None:
                message_type = 3 if kind == "result" else 2
            return self._jws_requirement(require, action, message_type, payload, now, record)
        entries = signature_entries(payload)
        if isinstance(entries, RejectedSignature):
            return f"needs {require.describe()}; {entries}"
        if not entries:
            return f"needs {require.describe()}; the message is not signed"
        assert isinstance(payload, Mapping)
        try:
            content = SignedContent(action, direction, canonicalize(without_signatures(payload)))
        except CanonicalError as exc:
            return f"needs {require.describe()}; the payload has no canonical form ({exc})"
        counted: dict[str, float] = {}  # key name -> signature timestamp
        digests: list[tuple[bytes, float]] = []
        notes: list[str] = []
        for index, entry in enumerate(entries):
            key = self._lookup(entry)
            if key is None:
                notes.append(f"signature {index}: key not in the policy")
                continue
            if key.id in counted:
                continue
            if require.roles and not key.roles & require.roles:
                notes.append(f"signature {index}: key {key.id} lacks role "
                             f"{' or '.join(sorted(require.roles))}")
                continue
            result = check_signature(entry, index, content, now, public_key=key.public_key,
                                     key_algorithm=key.algorithm, max_age_s=require.max_age_s,
                                     max_skew_s=self.policy.clock_skew_s)
            if isinstance(result, RejectedSignature):
                notes.append(f"signature {index} (key {key.id}): {result.reason}")
                continue
            if self._replay.seen(result.digest, now):
                notes.append(f"signature {index} (key {key.id}): replayed")
                continue
            counted[key.id] = result.timestamp
            digests.append((result.digest, result.timestamp))
            if len(counted) >= require.count:
                break
        if len(counted) < require.count:
            return f"needs {require.describe()}, found {len(counted)}: {'; '.join(notes)}"
        if record:
            horizon = self._horizon
            if self._replay.room(now) < len(digests):
                return (f"needs {require.describe()}; the replay memory is full "
                        f"({self._replay.capacity} recent signatures), so new ones are "
                        "refused until old ones expire")
            for digest, stamp in digests:
                self._replay.add(digest, stamp + horizon, now)
        return content.canonical_payload, tuple(counted)

    def _jws_requirement(self, require: Requirement, action: str, message_type: int,
                         payload: object, now: float,
                         record: bool) -> tuple[bytes, tuple[str, ...]] | str:
        """``require`` met by an OCPP 2.1 Signed Message: one JWS, one signer."""
        if require.count > 1:
            return (f"needs {require.describe()}; a signed message (JWS) carries one "
                    "signature")
        result = verify_jws(payload, action, message_type, self._certificates, now,
                            read_payload=self._read_signed)
        if isinstance(result, RejectedSignature):
            return f"needs {require.describe()}; {result.reason}"
        key = self._by_x5t[result.x5t]
        if require.roles and not key.roles & require.roles:
            return (f"needs {require.describe()}; the signing certificate ({key.id}) lacks "
                    f"role {' or '.join(sorted(require.roles))}")
        if self._replay.seen(result.digest, now):
            return f"needs {require.describe()}; the signature was seen before (replayed)"
        if record:
            if self._replay.room(now) < 1:
                return (f"needs {require.describe()}; the replay memory is full "
                        f"({self._replay.capacity} recent signatures)")
            self._replay.add(result.digest, now + max(self._horizon, require.max_age_s), now)
        return b"", (key.id,)


def _countersign_problem(payload: object) -> str | None:
    if not isinstance(payload, Mapping):
        return "the payload is not a JSON object"
    entries = signature_entries(payload)
    if isinstance(entries, RejectedSignature):
        return entries.reason
    if len(entries) >= MAX_SIGNATURES:
        return f"the payload already carries {MAX_SIGNATURES} signatures"
    return None
