"""Schema validation against the official OCPP schemas shipped in the ocpp package."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.schemas import SchemaUnavailable, SchemaValidator


def test_validates_by_version_action_and_kind() -> None:
    schemas = SchemaValidator()
    assert schemas.validate("ocpp2.0.1", "Reset", "call", {"type": "Immediate"}) is None
    assert schemas.validate("ocpp2.0.1", "Reset", "result", {"status": "Accepted"}) is None
    assert schemas.validate("ocpp1.6", "Reset", "call", {"type": "Hard"}) is None
    problem = schemas.validate("ocpp2.1", "Reset", "call", {"type": "Hard"})
    assert problem is not None and problem.startswith("ResetRequest.json: ")
    assert schemas.validate("ocpp2.0.1", "Reset", "call", [1]) is not None


def test_action_names_from_peers_never_reach_the_file_system() -> None:
    schemas = SchemaValidator()
    for action in ("../../../etc/passwd", "Reset/../Reset", "", "NoSuchAction"):
        assert schemas.validate("ocpp1.6", action, "call", {}) == \
            f"{action} is not an action of ocpp1.6"
    assert "no official schemas" in str(schemas.validate("ocpp3", "Reset", "call", {}))


def test_preload_compiles_a_whole_version() -> None:
    assert SchemaValidator().preload("ocpp1.6") >= 50  # requests and responses
    with pytest.raises(ValueError):
        SchemaValidator().preload("ocpp9")


def test_missing_package_is_a_clear_error(tmp_path: Path) -> None:
    empty = SchemaValidator(tmp_path)
    assert empty.validate("ocpp2.0.1", "Reset", "call", {}) == \
        "Reset is not an action of ocpp2.0.1"
    assert issubclass(SchemaUnavailable, RuntimeError)


def test_validation_leaves_the_payload_as_it_came() -> None:
    # TransactionEventRequest gives "offline" a default; fastjsonschema writes defaults into
    # the payload unless told not to, and the node forwards payloads unchanged (a WWCP
    # signature over the payload would no longer verify after an inserted member)
    payload = {"eventType": "Started", "timestamp": "2026-11-27T10:00:00Z",
               "triggerReason": "Authorized", "seqNo": 0,
               "transactionInfo": {"transactionId": "T1"}}
    before = repr(payload)
    assert SchemaValidator().validate("ocpp2.0.1", "TransactionEvent", "call", payload) is None
    assert repr(payload) == before
