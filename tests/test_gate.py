"""The firewall gate (router.relay.gate) with plain calls: no sockets, no node.

Gates are built the way the node builds them, ``Gate.from_config`` over a config parsed
by ``router.config.parse`` that names a policy file and, where a rule signs, a node key.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policies import (
    Decision,
    Firewall,
    Outcome,
    PolicyError,
    SigningKey,
    VerifiedSignature,
    sign_payload,
    verify_signatures,
)
from router.config import Config, parse
from router.relay.gate import (
    RECENT_DECISIONS,
    Gate,
    GateError,
    Verdict,
    audit_lines,
    with_body,
)
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
    SEND,
    Frame,
    encode_frame,
)

ADMIN = SigningKey.generate()
VIEWER = SigningKey.generate("ed25519")
NODE = SigningKey.generate()

ADMIN_RULE = "admin commands need an admin signature"
READ_ONLY_RULE = "secondaries are read-only"
SHADOW_RULE = "shadow is silenced"
RESULT_RULE = "no answers to GetVariables"
ERROR_RULE = "errors about firmware are signed"
SIGN_RULE = "meter values are countersigned"

POLICY = textwrap.dedent(f"""\
    default = "forward"

    [[keys]]
    id = "ops"
    public_key = "{ADMIN.key_id}"
    roles = ["admin"]

    [[keys]]
    id = "viewer"
    public_key = "{VIEWER.key_id}"
    roles = ["viewer"]

    [[rules]]
    name = "{READ_ONLY_RULE}"
    sources = ["analytics"]
    direction = "to-station"
    then = "reject"

    [[rules]]
    name = "{SHADOW_RULE}"
    sources = ["shadow"]
    then = "drop"

    [[rules]]
    name = "{ADMIN_RULE}"
    actions = ["Reset"]
    direction = "to-station"
    require = {{ roles = ["admin"], max_age_s = 300 }}
    then = "forward"

    [[rules]]
    name = "{RESULT_RULE}"
    actions = ["GetVariables"]
    direction = "from-station"
    messages = ["result"]
    then = "reject"

    [[rules]]
    name = "{ERROR_RULE}"
    actions = ["UpdateFirmware"]
    messages = ["error"]
    require = {{ roles = ["admin"] }}
    then = "forward"
""")

SIGNING_POLICY = textwrap.dedent(f"""\
    default = "forward"

    [[keys]]
    id = "ops"
    public_key = "{ADMIN.key_id}"
    roles = ["admin"]

    [[rules]]
    name = "{SIGN_RULE}"
    actions = ["MeterValues"]
    direction = "from-station"
    messages = ["call", "error"]
    then = "forward"
    sign = true

    [[rules]]
    name = "admin resets are countersigned"
    actions = ["Reset"]
    direction = "to-station"
    require = {{ roles = ["admin"] }}
    then = "forward"
    sign = true
""")

REJECT_BY_DEFAULT = textwrap.dedent("""\
    default = "reject"

    [[rules]]
    name = "heartbeats pass"
    actions = ["Heartbeat"]
    then = "forward"
""")


def node_config(directory: Path, policy: str | None = None, *, key: str | None = None,
                audit: str = "audit/firewall.jsonl") -> Config:
    """A parsed node config in ``directory``, naming a policy file and a node key."""
    node = '[node]\nid = "gate-test"\n'
    if key is not None:
        node += f'key = "{key}"\n'
    text = node + textwrap.dedent("""
        [listen]
        port = 0
        security_profile = 0

        [[stations]]
        match = "*"

        [[backends]]
        name = "main"
        url = "ws://127.0.0.1:9100/ocpp"
        """)
    if policy is not None:
        (directory / "policy.toml").write_text(policy)
        text += f'\n[policy]\nfile = "policy.toml"\naudit_log = "{audit}"\n'
    return parse(text, str(directory / "node.toml"), directory)


def write_node_key(directory: Path, key: SigningKey = NODE) -> str:
    (directory / "node.pem").write_bytes(key.private_pem())
    return "node.pem"


def signed(payload: dict[str, Any], action: str, direction: str,
           *keys: SigningKey) -> dict[str, Any]:
    out = payload
    for key in keys:
        out = sign_payload(out, action, direction, key, time.time())
    return out


def call(message_id: str, action: str, payload: dict[str, Any]) -> tuple[Frame, str]:
    frame = Frame(CALL, message_id, action=action, payload=payload)
    return frame, encode_frame(frame)


def check(gate: Gate, frame: Frame, text: str | None, action: str | None, *,
          direction: str = "to-station", source: str = "main", version: str = "ocpp2.0.1",
          keep: bool = True) -> Verdict:
    return gate.check(frame, text, action, direction, source, version, keep)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    made = Gate.from_config(node_config(tmp_path, POLICY))
    yield made
    made.close()


# --- without a policy -------------------------------------------------------------------


def test_without_a_policy_every_frame_is_forwarded_untouched(tmp_path: Path) -> None:
    gate = Gate.from_config(node_config(tmp_path))
    assert gate.firewall is None and gate.node_key is None
    frames = [
        Frame(CALL, "c-1", action="Reset", payload={"type": "Immediate"}),
        Frame(SEND, "s-1", action="NotifyPeriodicEventStream", payload={"id": 1}),
        Frame(CALLRESULT, "c-1", payload={"status": "Accepted"}),
        Frame(CALLERROR, "c-2", code="GenericError", description="no", details={"x": 1}),
        Frame(CALLRESULTERROR, "c-3", code="InternalError", description="", details={}),
    ]
    for frame in frames:
        for keep in (True, False):
            text = encode_frame(frame)
            verdict = check(gate, frame, text, frame.action or "Reset", keep=keep,
                            version="ocpp2.1")
            assert verdict.forward
            assert verdict.frame is frame
            assert verdict.text is text  # the very same object: forwarded byte for byte
            assert verdict.refusal is None and verdict.decision is None
            # text None stays None (the link encodes the frame)
            assert check(gate, frame, None, "Reset", keep=keep).text is None
    assert gate.decisions == {}
    assert not (tmp_path / "audit").exists()  # nothing to audit without a policy
    gate.close()  # nothing to close: no error


def test_without_a_policy_signatures_are_still_removed_for_standard_peers(
    tmp_path: Path,
) -> None:
    gate = Gate.from_config(node_config(tmp_path))
    payload = signed({"type": "Immediate"}, "Reset", "to-station", ADMIN)
    frame, text = call("c-1", "Reset", payload)

    stripped = check(gate, frame, text, "Reset", keep=False)
    assert stripped.forward
    assert stripped.frame.payload == {"type": "Immediate"}
    assert stripped.frame.id == "c-1" and stripped.frame.action == "Reset"
    assert stripped.text is None  # changed: the link re-encodes it
    assert "signatures" in frame.payload  # the original frame is not touched

    kept = check(gate, frame, text, "Reset", keep=True)
    assert kept.frame is frame and kept.text is text


def test_a_node_key_alone_loads_without_a_policy(tmp_path: Path) -> None:
    gate = Gate.from_config(node_config(tmp_path, key=write_node_key(tmp_path)))
    assert gate.firewall is None
    assert gate.node_key is not None and gate.node_key.key_id == NODE.key_id


# --- reject, drop, default --------------------------------------------------------------


def test_a_reject_rule_refuses_names_the_rule_counts_and_audits(
    gate: Gate, tmp_path: Path,
) -> None:
    frame, text = call("r-1", "SetVariables", {"setVariableData": []})
    verdict = check(gate, frame, text, "SetVariables", source="analytics")
    assert not verdict.forward
    assert verdict.refusal is not None
    assert verdict.refusal.startswith(f"refused by policy rule '{READ_ONLY_RULE}': ")
    assert verdict.refusal.endswith("says reject")
    assert verdict.decision is not None
    assert verdict.decision.outcome is Outcome.REJECT
    assert verdict.decision.rule == READ_ONLY_RULE
    assert gate.decisions[(READ_ONLY_RULE, "reject")] == 1

    [entry] = audit_lines(tmp_path / "audit" / "firewall.jsonl")
    assert entry["outcome"] == "reject"
    assert entry["rule"] == READ_ONLY_RULE
    assert entry["source"] == "analytics"
    assert entry["action"] == "SetVariables"
    assert entry["direction"] == "to-station"
    assert entry["message_id"] == "r-1"
    assert entry["message_type"] == CALL
    assert entry["key_ids"] == []
    assert entry["reason"] == verdict.decision.reason
    assert entry["ts"].endswith("Z")

    # the same CALL from the primary backend is not this rule's business
    assert check(gate, frame, text, "SetVariables", source="main").forward
    assert gate.decisions[(READ_ONLY_RULE, "reject")] == 1
    assert gate.decisions[("default", "forward")] == 1


def test_a_drop_rule_is_audited_as_a_drop(gate: Gate, tmp_path: Path) -> None:
    frame, text = call("d-1", "Heartbeat", {})
    verdict = check(gate, frame, text, "Heartbeat", direction="from-station", source="shadow")
    assert not verdict.forward
    assert verdict.decision is not None and verdict.decision.outcome is Outcome.DROP
    assert verdict.refusal == f"refused by policy rule '{SHADOW_RULE}': " \
                              f"rule '{SHADOW_RULE}' says drop"
    assert gate.decisions == {(SHADOW_RULE, "drop"): 1}
    [entry] = audit_lines(tmp_path / "audit" / "firewall.jsonl")
    assert (entry["outcome"], entry["rule"], entry["source"], entry["action"],
            entry["direction"], entry["message_id"]) == (
        "drop", SHADOW_RULE, "shadow", "Heartbeat", "from-station", "d-1")


def test_the_default_is_counted_and_audited_as_default(tmp_path: Path) -> None:
    gate = Gate.from_config(node_config(tmp_path, REJECT_BY_DEFAULT))
    beat, beat_text = call("b-1", "Heartbeat", {})
    boot, boot_text = call("b-2", "BootNotification", {"reason": "PowerUp"})

    assert check(gate, beat, beat_text, "Heartbeat", direction="from-station").forward
    refused = check(gate, boot, boot_text, "BootNotification", direction="from-station",
                    source="CS-1")
    assert not refused.forward
    assert refused.refusal == ("refused by policy rule 'default': "
                               "no rule matches; the default is reject")
    assert refused.decision is not None and refused.decision.rule is None

    # an answer no rule names passes, counted under the default too
    answer = Frame(CALLRESULT, "x-1", payload={"status": "Accepted"})
    assert check(gate, answer, None, "Reset", direction="from-station").forward

    assert gate.decisions == {("heartbeats pass", "forward"): 1, ("default", "reject"): 1,
                              ("default", "forward"): 1}
    gate.close()
    entries = audit_lines(tmp_path / "audit" / "firewall.jsonl")
    assert [(e["rule"], e["outcome"], e["message_id"], e["source"]) for e in entries] == [
        ("default", "reject", "b-2", "CS-1")]


def test_forwarded_frames_are_counted_but_not_audited(gate: Gate, tmp_path: Path) -> None:
    for number in range(3):
        frame, text = call(f"h-{number}", "Heartbeat", {})
        verdict = check(gate, frame, text, "Heartbeat", direction="from-station")
        assert verdict.forward and verdict.frame is frame and verdict.text is text
        assert verdict.decision is not None and verdict.decision.outcome is Outcome.FORWARD
    assert gate.decisions == {("default", "forward"): 3}
    assert audit_lines(tmp_path / "audit" / "firewall.jsonl") == []


def test_the_last_refusals_and_drops_are_kept_in_a_bounded_ring(gate: Gate) -> None:
    beat, beat_text = call("f-1", "Heartbeat", {})
    assert check(gate, beat, beat_text, "Heartbeat", direction="from-station").forward
    assert list(gate.recent) == []  # a forward is counted, not kept
    for number in range(RECENT_DECISIONS + 7):
        frame, text = call(f"r-{number}", "SetVariables", {"setVariableData": []})
        assert not check(gate, frame, text, "SetVariables", source="analytics").forward
    dropped, dropped_text = call("d-last", "Heartbeat", {})
    check(gate, dropped, dropped_text, "Heartbeat", direction="from-station", source="shadow")

    assert len(gate.recent) == RECENT_DECISIONS == 50
    # the oldest went first; the newest is last, with what the admin's table shows
    assert [e["message_id"] for e in gate.recent][:2] == ["r-8", "r-9"]
    last = gate.recent[-1]
    assert (last["outcome"], last["rule"], last["action"], last["source"],
            last["direction"]) == ("drop", SHADOW_RULE, "Heartbeat", "shadow", "from-station")
    assert last["ts"].endswith("Z")
    assert gate.decisions[(READ_ONLY_RULE, "reject")] == RECENT_DECISIONS + 7


def test_the_audit_log_is_appended_to_across_gates(tmp_path: Path) -> None:
    frame, text = call("r-1", "Reset", {"type": "Immediate"})
    for _ in range(2):
        gate = Gate.from_config(node_config(tmp_path, POLICY))
        assert not check(gate, frame, text, "Reset").forward
        gate.close()
    entries = audit_lines(tmp_path / "audit" / "firewall.jsonl")
    assert [(e["rule"], e["message_id"]) for e in entries] == [(ADMIN_RULE, "r-1")] * 2


def test_a_frame_with_no_action_known_skips_the_firewall(gate: Gate, tmp_path: Path) -> None:
    # an answer the node cannot match to a CALL: the session drops it; the gate decides nothing
    answer = Frame(CALLRESULT, "unknown", payload={"status": "Accepted"})
    verdict = check(gate, answer, '[3,"unknown",{"status":"Accepted"}]', None,
                    source="analytics")
    assert verdict.forward and verdict.decision is None and verdict.frame is answer
    assert gate.decisions == {}
    assert audit_lines(tmp_path / "audit" / "firewall.jsonl") == []


# --- required signatures ----------------------------------------------------------------


def test_a_rule_requiring_an_admin_signature(gate: Gate, tmp_path: Path) -> None:
    reset = {"type": "Immediate", "evseId": 1}

    frame, text = call("r-unsigned", "Reset", reset)
    unsigned = check(gate, frame, text, "Reset")
    assert not unsigned.forward
    assert unsigned.refusal is not None
    assert unsigned.refusal.startswith(f"refused by policy rule '{ADMIN_RULE}': ")
    assert "not signed" in unsigned.refusal

    frame, text = call("r-viewer", "Reset", signed(reset, "Reset", "to-station", VIEWER))
    viewer = check(gate, frame, text, "Reset")
    assert not viewer.forward
    assert viewer.refusal is not None and "lacks role admin" in viewer.refusal

    # signed for another direction: the signature does not verify here
    frame, text = call("r-wrong", "Reset", signed(reset, "Reset", "from-station", ADMIN))
    assert not check(gate, frame, text, "Reset").forward

    admin_payload = signed(reset, "Reset", "to-station", ADMIN)
    frame, text = call("r-admin", "Reset", admin_payload)
    admitted = check(gate, frame, text, "Reset", keep=True)
    assert admitted.forward
    assert admitted.frame is frame and admitted.text is text  # kept: byte for byte
    assert admitted.decision is not None and admitted.decision.key_ids == ("ops",)

    frame, text = call("r-replay", "Reset", admin_payload)
    replayed = check(gate, frame, text, "Reset")
    assert not replayed.forward
    assert replayed.refusal is not None and "replayed" in replayed.refusal

    assert gate.decisions == {(ADMIN_RULE, "reject"): 4, (ADMIN_RULE, "forward"): 1}
    entries = audit_lines(tmp_path / "audit" / "firewall.jsonl")
    assert [(e["message_id"], e["rule"], e["outcome"]) for e in entries] == [
        ("r-unsigned", ADMIN_RULE, "reject"),
        ("r-viewer", ADMIN_RULE, "reject"),
        ("r-wrong", ADMIN_RULE, "reject"),
        ("r-replay", ADMIN_RULE, "reject"),
    ]


def test_signatures_are_removed_for_a_peer_that_does_not_keep_them(gate: Gate) -> None:
    reset = {"type": "OnIdle", "evseId": 2}
    frame, text = call("r-1", "Reset", signed(reset, "Reset", "to-station", ADMIN))
    verdict = check(gate, frame, text, "Reset", keep=False)
    assert verdict.forward
    assert verdict.frame.payload == reset
    assert "signatures" not in verdict.frame.payload
    assert verdict.text is None  # the link encodes the stripped frame
    assert (verdict.frame.type, verdict.frame.id, verdict.frame.action) == (CALL, "r-1", "Reset")
    assert len(frame.payload["signatures"]) == 1  # the caller's frame is unchanged


def test_signatures_are_kept_for_a_peer_that_keeps_them(gate: Gate) -> None:
    payload = signed({"type": "OnIdle"}, "Reset", "to-station", ADMIN)
    frame, text = call("r-1", "Reset", payload)
    verdict = check(gate, frame, text, "Reset", keep=True)
    assert verdict.forward and verdict.frame is frame and verdict.text is text
    assert verdict.frame.payload["signatures"] == payload["signatures"]


# --- counter-signing --------------------------------------------------------------------


def test_a_sign_rule_countersigns_with_the_node_key(tmp_path: Path) -> None:
    gate = Gate.from_config(node_config(tmp_path, SIGNING_POLICY, key=write_node_key(tmp_path)))
    meter = {"evseId": 1, "meterValue": [{"timestamp": "2026-01-01T00:00:00Z",
                                          "sampledValue": [{"value": 4321}]}]}
    frame, text = call("m-1", "MeterValues", meter)
    verdict = check(gate, frame, text, "MeterValues", direction="from-station", source="CS-1",
                    keep=True)
    assert verdict.forward
    assert verdict.text is None  # a new payload: the link encodes it
    assert verdict.decision is not None and verdict.decision.sign
    forwarded = verdict.frame.payload
    assert {k: v for k, v in forwarded.items() if k != "signatures"} == meter
    [result] = verify_signatures(forwarded, "MeterValues", "from-station", time.time())
    assert isinstance(result, VerifiedSignature)
    assert result.key_id == NODE.key_id
    assert "signatures" not in frame.payload  # the original is untouched
    assert gate.decisions == {(SIGN_RULE, "forward"): 1}
    gate.close()


def test_countersigning_keeps_the_senders_signature_valid(tmp_path: Path) -> None:
    gate = Gate.from_config(node_config(tmp_path, SIGNING_POLICY, key=write_node_key(tmp_path)))
    reset = {"type": "Immediate"}
    frame, text = call("r-1", "Reset", signed(reset, "Reset", "to-station", ADMIN))
    verdict = check(gate, frame, text, "Reset", keep=True)
    assert verdict.forward
    results = verify_signatures(verdict.frame.payload, "Reset", "to-station", time.time())
    assert all(isinstance(r, VerifiedSignature) for r in results)
    assert [r.key_id for r in results if isinstance(r, VerifiedSignature)] == [
        ADMIN.key_id, NODE.key_id]
    gate.close()


def test_a_countersigned_frame_is_stripped_for_a_peer_that_does_not_keep_signatures(
    tmp_path: Path,
) -> None:
    gate = Gate.from_config(node_config(tmp_path, SIGNING_POLICY, key=write_node_key(tmp_path)))
    frame, text = call("m-1", "MeterValues", {"evseId": 1, "meterValue": []})
    verdict = check(gate, frame, text, "MeterValues", direction="from-station", keep=False)
    assert verdict.forward
    assert verdict.frame.payload == {"evseId": 1, "meterValue": []}
    assert verdict.text is None
    assert gate.decisions == {(SIGN_RULE, "forward"): 1}
    gate.close()


def test_a_sign_rule_without_a_node_key_is_a_gate_error(tmp_path: Path) -> None:
    with pytest.raises(GateError) as info:
        Gate.from_config(node_config(tmp_path, SIGNING_POLICY))
    message = str(info.value)
    assert "sign = true" in message and "[node] key" in message
    assert str(tmp_path / "policy.toml") in message
    assert not (tmp_path / "audit").exists()  # refused before opening the audit log


@pytest.mark.parametrize("problem", ["not a key", "missing", "public key"])
def test_an_unreadable_node_key_is_a_gate_error_naming_node_key(
    tmp_path: Path, problem: str,
) -> None:
    key = write_node_key(tmp_path)
    config = node_config(tmp_path, SIGNING_POLICY, key=key)  # parsed while the file is fine
    path = tmp_path / key
    if problem == "not a key":
        path.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    elif problem == "missing":
        path.unlink()
    else:
        path.write_bytes(NODE.public_pem())
    with pytest.raises(GateError) as info:
        Gate.from_config(config)
    assert str(info.value).startswith(f"node.key {path}: ")


def test_an_unreadable_node_key_is_a_gate_error_even_without_a_policy(tmp_path: Path) -> None:
    config = node_config(tmp_path, key=write_node_key(tmp_path))
    (tmp_path / "node.pem").write_text("nonsense")
    with pytest.raises(GateError, match=r"^node\.key "):
        Gate.from_config(config)


def test_a_broken_policy_file_is_a_policy_error_naming_file_and_line(tmp_path: Path) -> None:
    config = node_config(tmp_path, 'default = "forward"\n\n[[rules]]\nthen = "maybe"\n')
    with pytest.raises(PolicyError) as info:
        Gate.from_config(config)
    assert f"{tmp_path / 'policy.toml'}:3" in str(info.value)


# --- answers and errors -----------------------------------------------------------------


def test_answers_are_checked_under_the_action_of_their_call(gate: Gate, tmp_path: Path) -> None:
    answer = Frame(CALLRESULT, "g-1", payload={"getVariableResult": []})
    text = encode_frame(answer)

    refused = check(gate, answer, text, "GetVariables", direction="from-station", source="CS-1")
    assert not refused.forward
    assert refused.refusal is not None
    assert refused.refusal.startswith(f"refused by policy rule '{RESULT_RULE}': ")

    # the same answer to another CALL: no rule names it, answers pass
    other = check(gate, answer, text, "GetBaseReport", direction="from-station", source="CS-1")
    assert other.forward and other.frame is answer and other.text is text

    # the rule covers results only, so a CALL GetVariables is not refused by it
    frame, call_text = call("g-2", "GetVariables", {"getVariableData": []})
    assert check(gate, frame, call_text, "GetVariables", direction="from-station").forward

    assert gate.decisions == {(RESULT_RULE, "reject"): 1, ("default", "forward"): 2}
    [entry] = audit_lines(tmp_path / "audit" / "firewall.jsonl")
    assert (entry["rule"], entry["action"], entry["message_type"], entry["message_id"],
            entry["direction"], entry["source"]) == (
        RESULT_RULE, "GetVariables", CALLRESULT, "g-1", "from-station", "CS-1")


class RecordingFirewall(Firewall):
    """A firewall that remembers the message kind of each decision."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kinds: list[str] = []

    def decide(self, *args: Any, **kwargs: Any) -> Decision:
        self.kinds.append(kwargs["message"])
        return super().decide(*args, **kwargs)


def test_each_message_type_is_decided_as_its_kind(gate: Gate) -> None:
    assert gate.firewall is not None
    recording = RecordingFirewall(gate.firewall.policy)
    gate.firewall = recording
    for frame in (Frame(CALL, "1", action="Heartbeat", payload={}),
                  Frame(SEND, "2", action="NotifyPeriodicEventStream", payload={}),
                  Frame(CALLRESULT, "3", payload={}),
                  Frame(CALLERROR, "4", code="GenericError", description="", details={}),
                  Frame(CALLRESULTERROR, "5", code="GenericError", description="",
                        details={})):
        assert check(gate, frame, None, "Heartbeat", direction="from-station",
                     version="ocpp2.1").forward
    assert recording.kinds == ["call", "call", "result", "error", "error"]


def test_an_error_frame_is_checked_on_its_details(gate: Gate, tmp_path: Path) -> None:
    details = {"reason": "flash full"}
    error = Frame(CALLERROR, "u-1", code="InternalError", description="failed", details=details)
    refused = check(gate, error, encode_frame(error), "UpdateFirmware", direction="from-station")
    assert not refused.forward
    assert refused.refusal is not None
    assert refused.refusal.startswith(f"refused by policy rule '{ERROR_RULE}': ")
    assert "not signed" in refused.refusal

    signed_details = signed(details, "UpdateFirmware", "from-station", ADMIN)
    error = Frame(CALLERROR, "u-2", code="InternalError", description="failed",
                  details=signed_details)
    kept = check(gate, error, encode_frame(error), "UpdateFirmware", direction="from-station",
                 keep=True)
    assert kept.forward and kept.frame is error

    # other details: the same ones signed in the same millisecond would be a replay
    retry = {"reason": "flash full", "attempt": 2}
    error = Frame(CALLERROR, "u-3", code="InternalError", description="failed",
                  details=signed(retry, "UpdateFirmware", "from-station", ADMIN))
    stripped = check(gate, error, encode_frame(error), "UpdateFirmware",
                     direction="from-station", keep=False)
    assert stripped.forward and stripped.text is None
    assert stripped.frame.details == retry
    assert stripped.frame.payload is None
    assert (stripped.frame.code, stripped.frame.description) == ("InternalError", "failed")

    [entry] = audit_lines(tmp_path / "audit" / "firewall.jsonl")
    assert (entry["message_id"], entry["message_type"], entry["rule"]) == (
        "u-1", CALLERROR, ERROR_RULE)


def test_an_error_frame_is_countersigned_in_its_details(tmp_path: Path) -> None:
    gate = Gate.from_config(node_config(tmp_path, SIGNING_POLICY, key=write_node_key(tmp_path)))
    error = Frame(CALLERROR, "m-1", code="GenericError", description="meter busy",
                  details={"evseId": 1})
    verdict = check(gate, error, encode_frame(error), "MeterValues", direction="from-station",
                    keep=True)
    assert verdict.forward and verdict.text is None
    assert verdict.frame.payload is None
    assert verdict.frame.type == CALLERROR
    assert (verdict.frame.code, verdict.frame.description) == ("GenericError", "meter busy")
    [result] = verify_signatures(verdict.frame.details, "MeterValues", "from-station",
                                 time.time())
    assert isinstance(result, VerifiedSignature) and result.key_id == NODE.key_id
    gate.close()


# --- with_body, close, audit_lines ------------------------------------------------------


def test_with_body_replaces_the_payload_or_an_errors_details() -> None:
    call_frame = Frame(CALL, "1", action="Reset", payload={"a": 1})
    assert with_body(call_frame, {"b": 2}) == Frame(CALL, "1", action="Reset", payload={"b": 2})
    send = Frame(SEND, "2", action="X", payload={"a": 1})
    assert with_body(send, {"c": 3}).payload == {"c": 3}
    result = Frame(CALLRESULT, "3", payload={"a": 1})
    assert with_body(result, {}).payload == {}
    for mtype in (CALLERROR, CALLRESULTERROR):
        error = Frame(mtype, "4", code="GenericError", description="d", details={"a": 1})
        changed = with_body(error, {"z": 0})
        assert changed.details == {"z": 0}
        assert changed.payload is None
        assert (changed.type, changed.id, changed.code, changed.description) == (
            mtype, "4", "GenericError", "d")
        assert error.details == {"a": 1}  # frames are immutable: a new one is made
    assert call_frame.payload == {"a": 1}


def test_close_closes_the_audit_log(tmp_path: Path) -> None:
    gate = Gate.from_config(node_config(tmp_path, POLICY))
    frame, text = call("r-1", "Reset", {"type": "Immediate"})
    assert not check(gate, frame, text, "Reset").forward
    audit = gate._audit
    assert audit is not None and not audit.closed
    gate.close()
    assert audit.closed
    gate.close()  # closing twice is harmless
    assert [e["message_id"] for e in audit_lines(tmp_path / "audit" / "firewall.jsonl")] == [
        "r-1"]


def test_the_audit_log_defaults_to_the_state_directory(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(POLICY)
    config = parse(textwrap.dedent("""\
        [node]
        id = "gate-test"
        state_dir = "var/state"

        [listen]
        port = 0
        security_profile = 0

        [[stations]]
        match = "*"

        [[backends]]
        name = "main"
        url = "ws://127.0.0.1:9100/ocpp"

        [policy]
        file = "policy.toml"
        """), str(tmp_path / "node.toml"), tmp_path)
    gate = Gate.from_config(config)
    frame, text = call("r-1", "Reset", {"type": "Immediate"})
    check(gate, frame, text, "Reset")
    gate.close()
    [entry] = audit_lines(tmp_path / "var" / "state" / "audit.jsonl")
    assert entry["rule"] == ADMIN_RULE


def test_audit_lines_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"rule": "a"}\n\n   \n{"rule": "b"}\n')
    assert audit_lines(path) == [{"rule": "a"}, {"rule": "b"}]


def test_an_audit_log_that_cannot_be_opened_is_a_gate_error(tmp_path: Path) -> None:
    # The node's callers (Node.reload on SIGHUP / POST /reload, `ocpp-router check`) treat
    # ConfigError, PolicyError and GateError as config mistakes; anything else escapes them.
    (tmp_path / "audit.jsonl").mkdir()  # the configured audit log is a directory
    config = node_config(tmp_path, POLICY, audit="audit.jsonl")
    with pytest.raises(GateError) as info:
        Gate.from_config(config)
    assert "audit" in str(info.value)


def test_signed_messages_are_unwrapped_for_a_peer_that_asks() -> None:
    """signed_messages = "unwrap": the plain action and the original payload go on, and a
    signed answer's payload likewise; "keep" leaves both as they came."""
    from tests.test_policies_jws import Signer

    signer = Signer()
    call = Frame(CALL, "m1", action="Reset-Signed", payload=signer.reset())
    gate = Gate(None, None, None)
    kept = gate.check(call, None, "Reset-Signed", "to-station", "csms", "ocpp2.1", False)
    assert kept.frame == call
    plain = gate.check(call, None, "Reset-Signed", "to-station", "csms", "ocpp1.6", False,
                       True)
    assert (plain.frame.action, plain.frame.payload) == ("Reset", {"type": "Immediate"})
    answer = Frame(CALLRESULT, "m1", payload=signer.sign(b'{"status":"Accepted"}',
                                                         OCPPAction="Reset",
                                                         OCPPMessageTypedId=3))
    unwrapped = gate.check(answer, None, "Reset-Signed", "from-station", "CS-1", "ocpp2.1",
                           False, True)
    assert unwrapped.frame.payload == {"status": "Accepted"}
    # something that is not a JWS goes on as it came
    odd = Frame(CALL, "m2", action="Odd-Signed", payload={"a": 1})
    assert gate.check(odd, None, "Odd-Signed", "to-station", "csms", "ocpp1.6", False,
                      True).frame == odd


def test_a_long_action_is_kept_cut_short_among_the_recent_refusals(gate: Gate) -> None:
    action = "X" * 70_000
    frame, text = call("long-1", action, {})
    assert not check(gate, frame, text, action, source="analytics").forward
    kept = gate.recent[-1]
    assert kept["action"] == action[:200] and len(kept["reason"]) <= 200
