"""The firewall gate: where a policy's decisions meet the frames of a session.

Every CALL, SEND and answer passes the gate once, where it enters the node. The
sans-IO :class:`policies.Firewall` decides; the gate applies the decision: answers a
refused CALL with CALLERROR ``SecurityError`` naming the rule, counts and audits refusals
and drops (JSON lines), counter-signs with the node's key where a rule says ``sign``,
and removes ``signatures`` before a frame reaches a standard peer that does not keep
them (standard OCPP 2.x peers refuse unknown fields).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from policies import Decision, Firewall, Outcome, SigningKey, load_policy, sign_payload
from policies.jws import inner_action, unwrap
from policies.signatures import without_signatures
from router.config import Config
from router.logs import log_event
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
    SEND,
    Frame,
)

log = logging.getLogger("router.gate")

_MESSAGE_KIND = {CALL: "call", SEND: "call", CALLRESULT: "result"}
RECENT_DECISIONS = 50  # refusals and drops kept for the admin's live picture
_SHOWN = 200  # characters of each text field kept with them


class GateError(Exception):
    """The policy or the node key named by the config cannot be used."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the session does with one frame: forward ``frame``, or refuse it."""

    forward: bool
    frame: Frame  # the frame to forward (maybe re-signed or stripped); unused when refused
    text: str | None  # its text if unchanged and known, else None (the link encodes it)
    refusal: str | None = None  # for a refused CALL: the SecurityError description
    decision: Decision | None = None


def with_body(frame: Frame, body: Any) -> Frame:
    """The frame with a new payload (details, for the two error types)."""
    if frame.type in (CALLERROR, CALLRESULTERROR):
        return frame._replace(details=body)
    return frame._replace(payload=body)


def _strip(frame: Frame, payload: Any) -> Any:
    """The payload (CALL, SEND, CALLRESULT) or details (errors) without signatures."""
    return without_signatures(payload) if isinstance(payload, dict) else payload


def _unwrapped(verdict: Verdict) -> Verdict:
    frame = verdict.frame
    if frame.type not in (CALL, SEND, CALLRESULT):
        return verdict
    inner = unwrap(frame.payload)
    if inner is None:
        return verdict  # not a JWS after all: as it came
    if frame.type == CALLRESULT:
        return Verdict(True, frame._replace(payload=inner), None, None, verdict.decision)
    plain = inner_action(frame.action or "")
    return Verdict(True, frame._replace(action=plain, payload=inner), None, None,
                   verdict.decision)


class Gate:
    """Applies a policy to a node's frames; one per node, shared by its sessions."""

    def __init__(self, firewall: Firewall | None, node_key: SigningKey | None,
                 audit: IO[str] | None) -> None:
        self.firewall = firewall
        self.node_key = node_key
        self._audit = audit
        self.decisions: Counter[tuple[str, str]] = Counter()  # (rule, outcome) -> count
        # the last refusals and drops, newest last (forwards are only counted: no per-frame work)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)

    @classmethod
    def from_config(cls, config: Config) -> Gate:
        """Load the policy, the node key (if a rule signs) and open the audit log."""
        node_key = None
        if config.node.key is not None:
            try:
                node_key = SigningKey.from_pem(config.node.key.read_bytes())
            except Exception as exc:
                raise GateError(f"node.key {config.node.key}: {exc}") from None
        if config.policy is None:
            return cls(None, node_key, None)
        policy = load_policy(config.policy.file)  # raises PolicyError naming file and line
        if any(rule.sign for rule in policy.rules) and node_key is None:
            raise GateError(f"{config.policy.file}: a rule has sign = true but [node] key "
                            "names no signing key")
        audit_log = config.policy.audit_log
        try:
            audit_log.parent.mkdir(parents=True, exist_ok=True)
            audit = audit_log.open("a", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise GateError(f"policy.audit_log {audit_log}: cannot open for appending: "
                            f"{exc.strerror or exc}") from None
        return cls(Firewall(policy), node_key, audit)

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()

    def check(
        self, frame: Frame, text: str | None, action: str | None, direction: str, source: str,
        version: str | None, keep_signatures: bool, unwrap_signed: bool = False,
    ) -> Verdict:
        """Decide one frame entering the node and prepare what goes out.

        With ``unwrap_signed`` the receiver does not implement OCPP 2.1 Signed Messages:
        a ``<Action>-Signed`` CALL (or a signed answer) goes on as the plain action and
        the original payload."""
        verdict = self._check(frame, text, action, direction, source, version,
                              keep_signatures)
        if unwrap_signed and verdict.forward and action is not None \
                and inner_action(action) is not None:
            return _unwrapped(verdict)
        return verdict

    def _check(
        self, frame: Frame, text: str | None, action: str | None, direction: str, source: str,
        version: str | None, keep_signatures: bool,
    ) -> Verdict:
        payload = frame.details if frame.type in (CALLERROR, CALLRESULTERROR) else frame.payload
        decision = None
        if self.firewall is not None and action is not None:
            now = time.time()
            decision = self.firewall.decide(
                action, direction, source, payload, now,
                message=_MESSAGE_KIND.get(frame.type, "error"), ocpp_version=version,
                message_type=frame.type,
            )
            rule = decision.rule or "default"
            self.decisions[(rule, decision.outcome.value)] += 1
            if decision.outcome is not Outcome.FORWARD:
                self._record(decision, frame, action, direction, source)
                description = f"refused by policy rule {rule!r}: {decision.reason}"
                return Verdict(False, frame, text, description, decision)
            if decision.sign and self.node_key is not None and isinstance(payload, dict):
                payload = sign_payload(payload, action, direction, self.node_key, now,
                                       canonical_payload=decision.canonical_payload)
                if not keep_signatures:
                    payload = _strip(frame, payload)
                return Verdict(True, with_body(frame, payload), None, None, decision)
        if not keep_signatures and isinstance(payload, dict) and "signatures" in payload:
            return Verdict(True, with_body(frame, _strip(frame, payload)), None, None, decision)
        return Verdict(True, frame, text, None, decision)

    def _record(self, decision: Decision, frame: Frame, action: str, direction: str,
                source: str) -> None:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "outcome": decision.outcome.value,
            "rule": decision.rule or "default",
            "reason": decision.reason,
            "source": source,
            "action": action,
            "direction": direction,
            "message_type": frame.type,
            "message_id": frame.id,
            "key_ids": list(decision.key_ids),
        }
        # what a peer chose (an action, a reason quoting it) is kept for the admin cut short:
        # 50 refused CALLs with 64 KiB action names would be megabytes on every look
        self.recent.append({k: v[:_SHOWN] if isinstance(v, str) else v
                            for k, v in entry.items()})
        # the log line has its own time stamp, to the millisecond; the audit entry's is for
        # the audit file
        log_event(log, logging.WARNING, "policy_" + decision.outcome.value,
                  **{k: v for k, v in entry.items() if k != "ts"})
        if self._audit is not None:
            self._audit.write(json.dumps(entry) + "\n")


    def audit(self, event: str, fields: dict[str, Any]) -> None:
        """An entry in the audit log that is not a policy decision (a channel opened,
        refused or closed, with the bytes it moved); nothing without a ``[policy]``."""
        if self._audit is not None:
            entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "event": event, **fields}
            self._audit.write(json.dumps(entry) + "\n")


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The audit log's entries (for tests and tools)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
