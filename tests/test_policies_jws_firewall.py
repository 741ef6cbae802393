"""Signed Messages (JWS) in the firewall: certificate keys in the policy, rules that name
the plain action, roles, replay, and what a JWS cannot do (be counter-signed, count twice).
JWS made by hand with ``cryptography`` (tests/test_policies_jws.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import Firewall, Outcome, PolicyError
from policies.policy import parse_policy
from tests.test_policies_jws import CALLRESULT, NOW, Signer

T = NOW.timestamp()


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {"admin": Signer(cn="admin"), "operator": Signer("RS256", cn="operator"),
            "dso": Signer(cn="dso")}


def policy(tmp_path: Path, signers: dict[str, Signer], rules: str) -> Firewall:
    keys = ""
    for name, signer in signers.items():
        (tmp_path / f"{name}.pem").write_bytes(signer.pem)
        role = {"admin": "admin", "operator": "admin", "dso": "dso"}[name]
        keys += f'[[keys]]\nid = "{name}"\ncertificate = "{name}.pem"\nroles = ["{role}"]\n\n'
    text = f'default = "forward"\n\n{keys}{rules}'
    return Firewall(parse_policy(text, "p.toml", tmp_path))


RESET_RULE = '''[[rules]]
name = "reset-needs-admin"
actions = ["Reset"]
direction = "to-station"
then = "forward"
require = { roles = ["admin"] }
'''


def test_a_signed_reset_by_an_admin_certificate_passes_the_plain_rule(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    fw = policy(tmp_path, signers, RESET_RULE)
    for name in ("admin", "operator"):  # ES256 and RS256 certificates
        decision = fw.decide("Reset-Signed", "to-station", "csms", signers[name].reset(), T)
        assert decision.outcome is Outcome.FORWARD, decision
        assert decision.rule == "reset-needs-admin" and decision.key_ids == (name,)


def test_refusals_name_the_rule(tmp_path: Path, signers: dict[str, Signer]) -> None:
    fw = policy(tmp_path, signers, RESET_RULE)
    cases = {
        "unsigned": ("Reset", {"type": "Immediate"}),
        "wrong role": ("Reset-Signed", signers["dso"].reset()),
        "other action": ("Reset-Signed", signers["admin"].reset(OCPPAction="UnlockConnector")),
        "stranger": ("Reset-Signed", Signer().reset()),
    }
    for what, (action, payload) in cases.items():
        decision = fw.decide(action, "to-station", "csms", payload, T)
        assert decision.outcome is Outcome.REJECT, what
        assert decision.rule == "reset-needs-admin", what
    assert "lacks role" in fw.decide("Reset-Signed", "to-station", "csms",
                                     signers["dso"].reset(), T).reason


def test_the_same_jws_twice_is_a_replay_whatever_the_message_id(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    fw = policy(tmp_path, signers, RESET_RULE)
    signed = signers["admin"].reset()
    assert fw.decide("Reset-Signed", "to-station", "csms", signed, T).outcome is Outcome.FORWARD
    again = fw.decide("Reset-Signed", "to-station", "csms", signed, T + 1)
    assert again.outcome is Outcome.REJECT and "replayed" in again.reason
    # explain() records nothing, so it does not make the next message a replay
    fresh = signers["admin"].reset()
    assert fw.explain("Reset-Signed", "to-station", "csms", fresh, T).decision.forwarded
    assert fw.decide("Reset-Signed", "to-station", "csms", fresh, T).forwarded


def test_signed_answers_can_be_required(tmp_path: Path, signers: dict[str, Signer]) -> None:
    rules = RESET_RULE + '''
[[rules]]
name = "reset-answer-signed"
actions = ["Reset"]
direction = "from-station"
messages = ["result"]
then = "forward"
require = { roles = ["dso", "admin"] }
'''
    fw = policy(tmp_path, signers, rules)
    answer = signers["dso"].sign(b'{"status":"Accepted"}', OCPPAction="Reset",
                                 OCPPMessageTypedId=CALLRESULT)
    ok = fw.decide("Reset-Signed", "from-station", "CS-1", answer, T, message="result")
    assert ok.outcome is Outcome.FORWARD, ok
    plain = fw.decide("Reset-Signed", "from-station", "CS-1", {"status": "Accepted"}, T,
                      message="result")
    assert plain.outcome is Outcome.REJECT and plain.rule == "reset-answer-signed"


def test_what_a_jws_cannot_do(tmp_path: Path, signers: dict[str, Signer]) -> None:
    rules = '''[[rules]]
name = "two-admins"
actions = ["Reset"]
then = "forward"
require = { roles = ["admin"], count = 2 }
'''
    fw = policy(tmp_path, signers, rules)
    two = fw.decide("Reset-Signed", "to-station", "csms", signers["admin"].reset(), T)
    assert two.outcome is Outcome.REJECT and "carries one signature" in two.reason


def test_certificate_keys_are_checked_when_the_policy_loads(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    (tmp_path / "junk.pem").write_text("nope\n")
    (tmp_path / "a.pem").write_bytes(signers["admin"].pem)
    for body, problem in (
            ('certificate = "junk.pem"', "not a PEM certificate"),
            ('certificate = "missing.pem"', "missing.pem"),
            ('certificate = "a.pem"\npublic_key = "a.pem"', "not both")):
        with pytest.raises(PolicyError, match=problem):
            parse_policy(f'default = "forward"\n[[keys]]\nid = "k"\n{body}\nroles = ["x"]\n',
                         "p.toml", tmp_path)
    with pytest.raises(PolicyError, match="same certificate"):
        parse_policy('default = "forward"\n[[keys]]\nid = "a"\ncertificate = "a.pem"\n'
                     '[[keys]]\nid = "b"\ncertificate = "a.pem"\n', "p.toml", tmp_path)


def test_a_signed_send_binds_type_6(tmp_path: Path, signers: dict[str, Signer]) -> None:
    """SEND (2.1) is signed with OCPPMessageTypedId 6; the gate passes the frame's type."""
    rules = '''[[rules]]
name = "notifications signed"
actions = ["NotifyPeriodicEventStream"]
then = "forward"
require = { roles = ["dso"] }
'''
    fw = policy(tmp_path, signers, rules)
    send = signers["dso"].sign(b'{"id":1,"pending":0,"basetime":"2026-11-27T12:00:00Z",'
                               b'"data":[]}', OCPPAction="NotifyPeriodicEventStream",
                               OCPPMessageTypedId=6)
    action = "NotifyPeriodicEventStream-Signed"
    ok = fw.decide(action, "from-station", "CS-1", send, T, message_type=6)
    assert ok.outcome is Outcome.FORWARD, ok
    as_call = fw.explain(action, "from-station", "CS-1", send, T).decision
    assert as_call.outcome is Outcome.REJECT and "message type" in as_call.reason


CURTAIL_RULES = '''[[rules]]
name = "curtailments need the dso"
actions = ["SetChargingProfile"]
direction = "to-station"
payload = { "chargingProfile.chargingProfilePurpose" = "ChargingStationExternalConstraints" }
require = { roles = ["dso"] }
then = "forward"

[[rules]]
name = "other profiles need an admin"
actions = ["SetChargingProfile"]
direction = "to-station"
require = { roles = ["admin", "dso"] }
then = "forward"
'''


def profile(purpose: object) -> dict[str, object]:
    return {"evseId": 0, "chargingProfile": {"id": 7, "stackLevel": 0,
                                             "chargingProfilePurpose": purpose}}


def test_a_rule_can_match_a_field_of_the_signed_payload(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    """``payload = {...}`` reads the payload, for a Signed Message the one it signs: a
    curtailment (ChargingStationExternalConstraints) needs the DSO; other profiles an admin."""
    import json

    fw = policy(tmp_path, signers, CURTAIL_RULES)

    def signed(by: str, purpose: object) -> dict[str, str]:
        return signers[by].sign(json.dumps(profile(purpose)).encode(),
                                OCPPAction="SetChargingProfile", OCPPMessageTypedId=2)

    def decide(by: str, purpose: object) -> tuple[Outcome, str | None]:
        d = fw.decide("SetChargingProfile-Signed", "to-station", "csms", signed(by, purpose), T)
        return d.outcome, d.rule

    curtail = "ChargingStationExternalConstraints"
    assert decide("dso", curtail) == (Outcome.FORWARD, "curtailments need the dso")
    assert decide("admin", curtail) == (Outcome.REJECT, "curtailments need the dso")
    assert decide("admin", "TxDefaultProfile") == (Outcome.FORWARD,
                                                   "other profiles need an admin")
    # types must agree; a missing field does not match; unsigned curtailments are refused
    assert decide("admin", ["ChargingStationExternalConstraints"])[1] == \
        "other profiles need an admin"
    unsigned = fw.decide("SetChargingProfile", "to-station", "csms", profile(curtail), T)
    assert (unsigned.outcome, unsigned.rule) == (Outcome.REJECT, "curtailments need the dso")
    why = fw.explain("SetChargingProfile", "to-station", "csms", {"evseId": 0}, T).skipped
    assert "the payload has no chargingProfile.chargingProfilePurpose" in why[0]


@pytest.mark.parametrize("payload", ['{ }', '"x"', '{ "" = 1 }', '{ "a..b" = 1 }',
                                     '{ "a" = [] }', '{ "a" = { b = 1 } }',
                                     '{ "a.b.c.d.e.f.g.h.i" = 1 }'])
def test_payload_conditions_are_checked(payload: str) -> None:
    text = f'''default = "forward"
[[rules]]
name = "r"
payload = {payload}
then = "forward"
'''
    with pytest.raises(PolicyError, match="payload"):
        parse_policy(text, "p.toml")


def test_a_p256_certificate_verifies_the_wwcp_form_too(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from policies import SigningKey, sign_payload

    fw = policy(tmp_path, signers, RESET_RULE)
    key = signers["admin"].key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signed = sign_payload({"type": "Immediate"}, "Reset", "to-station",
                          SigningKey.from_private_key(key), T)
    decision = fw.decide("Reset", "to-station", "csms", signed, T)
    assert decision.outcome is Outcome.FORWARD, decision
    assert decision.key_ids == ("admin",)


AMBIGUOUS = (b'{"evseId":0,"chargingProfile":{"id":7,"stackLevel":0,'
             b'"chargingProfilePurpose":"ChargingStationExternalConstraints",'
             b'"chargingProfilePurpose":"TxDefaultProfile"}}')


def test_an_ambiguous_signed_payload_cannot_slip_past_a_payload_rule(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    """A curtailment signed by an admin, spelled with the purpose twice: a receiver that
    keeps the first name reads a curtailment, which needs the DSO. The payload rule cannot
    read it; the laxer rule below must not forward it either."""
    fw = policy(tmp_path, signers, CURTAIL_RULES)
    signed = signers["admin"].sign(AMBIGUOUS, OCPPAction="SetChargingProfile",
                                   OCPPMessageTypedId=2)
    d = fw.decide("SetChargingProfile-Signed", "to-station", "csms", signed, T)
    assert (d.outcome, d.rule) == (Outcome.REJECT, "other profiles need an admin")
    assert "signed payload" in d.reason and "twice" in d.reason


def test_without_payload_rules_what_was_signed_stays_opaque(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    """No rule reads payloads: the signature and the header decide, the signed bytes go to
    the receiver as they are (docs/signatures.md)."""
    fw = policy(tmp_path, signers, RESET_RULE)
    signed = signers["admin"].sign(b'{"type":"Immediate","type":"OnIdle"}',
                                   OCPPAction="Reset", OCPPMessageTypedId=2)
    d = fw.decide("Reset-Signed", "to-station", "csms", signed, T)
    assert (d.outcome, d.rule, d.key_ids) == (Outcome.FORWARD, "reset-needs-admin", ("admin",))
    # the payload's base64url is still held to its one spelling
    respelled = dict(signers["admin"].reset(), payload="e30+")
    d = fw.decide("Reset-Signed", "to-station", "csms", respelled, T)
    assert d.outcome is Outcome.REJECT and "base64url" in d.reason
