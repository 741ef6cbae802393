"""The node's JWS verifier (policies/jws.py) against joserfc, an independent JOSE
implementation: whatever the node accepts, joserfc accepts with the same payload, and a
JWS joserfc makes for chapter 7 the node accepts. Inputs are valid Signed Messages and
hypothesis' mutations of them (one character changed, header members added or changed)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.registry import HeaderParameter

from policies.jws import JWS_ALGORITHMS, Certificate, VerifiedJws, verify_jws
from tests.test_policies_jws import CALL, NOW, Signer, b64u, known

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_ANY = HeaderParameter("chapter 7", lambda _: None)
_REGISTRY = jws.JWSRegistry(header_registry={"OCPPAction": _ANY, "OCPPMessageTypedId": _ANY,
                                             "OCPPMessageTypeId": _ANY},
                            algorithms=list(JWS_ALGORITHMS), strict_check_header=False)


def joserfc_payload(payload: dict[str, Any], certs: dict[str, Certificate]) -> object:
    """What joserfc makes of the message: its payload, or None when it refuses it."""

    def resolve(member: Any) -> Any:
        cert = certs.get(member.headers().get("x5t#S256"))
        if cert is None:
            raise JoseError("unknown key")
        return cert.jwk

    try:
        signed = jws.deserialize_json(dict(payload),  # type: ignore[arg-type]
                                      resolve, algorithms=list(JWS_ALGORITHMS),
                                      registry=_REGISTRY)
        return json.loads(signed.payload)
    except (JoseError, ValueError, TypeError, KeyError):
        return None


SIGNERS = {alg: (Signer(alg, library="cryptography"), Signer(alg, library="joserfc"))
           for alg in JWS_ALGORITHMS}
CERTS = known(*(s for pair in SIGNERS.values() for s in pair))

_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3))
_payloads = st.dictionaries(st.text(ALPHABET, min_size=1, max_size=6), _values, max_size=4)
_extra_header = st.dictionaries(
    st.sampled_from(["kid", "typ", "cty", "crit", "b64", "alg", "OCPPAction",
                     "OCPPMessageTypedId", "OCPPMessageTypeId", "x5t#S256", "zip"]),
    _values | st.sampled_from([["OCPPAction"], ["exp"], "none", "HS256", "Reset", 2]),
    max_size=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alg=st.sampled_from(JWS_ALGORITHMS), by_joserfc=st.booleans(), inner=_payloads,
       extra=_extra_header, part=st.sampled_from(["", "protected", "payload", "signature"]),
       at=st.integers(0, 10_000), char=st.sampled_from(ALPHABET + "=+/. "))
def test_what_the_node_accepts_joserfc_accepts_too(alg: str, by_joserfc: bool,
                                                   inner: dict[str, Any], extra: dict[str, Any],
                                                   part: str, at: int, char: str) -> None:
    signer = SIGNERS[alg][by_joserfc]
    header = {"OCPPAction": "Reset", "OCPPMessageTypedId": CALL, **extra}
    try:
        signed = signer.sign(json.dumps(inner).encode(), **header)
    except (JoseError, ValueError, TypeError):
        return  # joserfc would not make it; the hand-made twin covers the header
    if part:
        text = signed[part]
        i = at % (len(text) + 1)
        signed = dict(signed, **{part: text[:i] + char + text[i + 1:]})
    ours = verify_jws(signed, "Reset-Signed", CALL, CERTS, NOW.timestamp())
    if isinstance(ours, VerifiedJws):
        assert joserfc_payload(signed, CERTS) == ours.payload == inner


@pytest.mark.parametrize("alg", JWS_ALGORITHMS)
def test_a_chapter_7_message_made_by_joserfc_is_accepted_by_both(alg: str) -> None:
    signed = SIGNERS[alg][True].reset()
    ours = verify_jws(signed, "Reset-Signed", CALL, CERTS, NOW.timestamp())
    assert isinstance(ours, VerifiedJws), ours
    assert joserfc_payload(signed, CERTS) == ours.payload == {"type": "Immediate"}


def test_the_known_differences_are_the_node_being_stricter() -> None:
    """Each of these joserfc accepts and the node refuses, on purpose (docs/signatures.md)."""
    signer = SIGNERS["ES256"][False]
    valid = signer.reset()
    header = json.loads(base64.urlsafe_b64decode(valid["protected"] + "=="))
    twice = b64u((json.dumps(header)[:-1] + ', "OCPPAction": "Reset"}').encode())
    high_s_free = {  # nothing here changes what was signed, only how it is written
        "duplicate header name": dict(valid, protected=twice),
        "OCPPAction also unprotected": dict(valid, header={"OCPPAction": "Reset"}),
    }
    for name, message in high_s_free.items():
        ours = verify_jws(message, "Reset-Signed", CALL, CERTS, NOW.timestamp())
        assert not isinstance(ours, VerifiedJws), name
