"""The policy file language: what parses, and errors that name file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.policy import (
    Outcome,
    PolicyError,
    PolicyProblem,
    Requirement,
    check_policy,
    load_policy,
    parse_policy,
)
from policies.signatures import SigningKey

ROOT = Path(__file__).resolve().parent.parent
OPS = SigningKey.generate()
AUDIT = SigningKey.generate("ed25519")


def problems(text: str, tmp_path: Path | None = None) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(textwrap.dedent(text), "p.toml", tmp_path)
    return caught.value.problems


def one(text: str, tmp_path: Path | None = None) -> str:
    (problem,) = problems(text, tmp_path)
    return str(problem)


@pytest.mark.parametrize("name", ["edge-gateway", "admin-signed-commands",
                                  "read-only-secondaries"])
def test_example_policies_pass(name: str) -> None:
    path = ROOT / "examples" / "policies" / f"{name}.toml"
    assert check_policy(path) == []
    policy = load_policy(path)
    assert policy.rules and policy.file == str(path)


def test_a_full_policy_parses(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ops.pub.pem").write_bytes(OPS.public_pem())
    policy = parse_policy(textwrap.dedent(f"""\
        default = "drop"
        clock_skew_s = 5
        [[keys]]
        id = "ops"
        public_key = "keys/ops.pub.pem"
        roles = ["admin"]
        [[keys]]
        id = "audit"
        public_key = "{AUDIT.key_id}"
        roles = ["admin", "audit"]
        [[rules]]
        name = "admin"
        actions = ["Reset", "Set*"]
        direction = "to-station"
        sources = ["main", "core-*"]
        require = {{ roles = ["admin"], count = 2, max_age_s = 60 }}
        then = "forward"
        [[rules]]
        name = "meter"
        messages = ["call", "result"]
        rate = {{ per_source = 10, per_s = 1, then = "drop" }}
        sign = true
        then = "forward"
        """), "p.toml", tmp_path)
    assert policy.default is Outcome.DROP and policy.clock_skew_s == 5
    assert [k.id for k in policy.keys] == ["ops", "audit"]
    assert policy.keys[0].key_id == OPS.key_id and policy.keys[1].algorithm == "ed25519"
    admin, meter = policy.rules
    assert admin.require == Requirement(frozenset({"admin"}), 2, 60.0)
    assert admin.sources == ("main", "core-*") and admin.line == 11
    assert meter.direction == "any" and meter.actions == ("*",) and meter.sign
    assert meter.rate is not None and meter.rate.then is Outcome.DROP
    assert policy.replay_horizon_s == 60


@pytest.mark.parametrize(("text", "expected"), [
    ('default = "allow"\n', "p.toml:1: default: must be one of forward, reject, drop"),
    ("[[rules]]\nname = 'x'\nthen = 'forward'\n", "p.toml: default: missing"),
    ('default = "reject"\nvalidate_schema = "yes"\n', "p.toml:2: validate_schema: must be true"),
    ('default = "reject"\nclock_skew_s = -1\n', "p.toml:2: clock_skew_s: must be a number"),
    ('default = "reject"\ncolour = 1\n', "p.toml:2: colour: unknown field"),
    ('default = "reject"\n\n[[rules]]\nname = "a"\nthen = "forward"\n\n[[rules]]\n'
     'name = "b"\nactoins = ["Reset"]\nthen = "forward"\n',
     "p.toml:9: rules[1].actoins: unknown field"),
    ('default = "reject"\n[[rules]]\nname = "a"\n', "p.toml:2: rules[0].then: missing"),
    ('default = "reject"\n[[rules]]\nthen = "forward"\n', "p.toml:2: rules[0].name: missing"),
    ('default = "reject"\n[[rules]]\nname = "a"\nthen = "pass"\n',
     "p.toml:4: rules[0].then: must be one of forward, reject, drop (got 'pass')"),
    ('default = "reject"\n[[rules]]\nname = "a"\ndirection = "up"\nthen = "drop"\n',
     "p.toml:4: rules[0].direction: must be one of to-station, from-station, any"),
    ('default = "reject"\n[[rules]]\nname = "a"\nactions = "Reset"\nthen = "drop"\n',
     "p.toml:4: rules[0].actions: must be a non-empty array of non-empty strings"),
    ('default = "reject"\n[[rules]]\nname = "a"\nactions = []\nthen = "drop"\n',
     "p.toml:4: rules[0].actions: must be a non-empty array"),
    ('default = "reject"\n[[rules]]\nname = "a"\nmessages = ["answer"]\nthen = "drop"\n',
     "p.toml:4: rules[0].messages: 'answer' is not one of call, result, error"),
    ('default = "reject"\n[[rules]]\nname = "a"\nsign = "yes"\nthen = "forward"\n',
     "p.toml:4: rules[0].sign: must be true or false"),
    ('default = "reject"\n[[rules]]\nname = "a"\nthen = "forward"\n'
     'rate = { per_source = 0, per_s = 1 }\n',
     "p.toml:5: rules[0].rate.per_source: must be an integer from 1"),
    ('default = "reject"\n[[rules]]\nname = "a"\nthen = "forward"\n'
     'rate = { per_source = 5, per_s = 1, then = "forward" }\n',
     "p.toml:5: rules[0].rate.then: must be one of reject, drop"),
    ('default = "reject"\n[[rules]]\nname = "a"\nthen = "forward"\nrate = 5\n',
     "p.toml:5: rules[0].rate: must be a table"),
    ('default = "reject"\n[[rules]]\nname = "a"\nthen = "reject"\nsign = true\n',
     "p.toml:5: rules[0].sign: only a rule that forwards can sign"),
    ('default = "reject"\nrules = 3\n', "p.toml:2: rules: must be an array of tables"),
    ('default = "reject"\n[[rules]]\nname = "a"\nthen = "drop"\n[[rules]]\nname = "a"\n'
     'then = "drop"\n', "p.toml:6: rules[1].name: duplicate rule name 'a'"),
])
def test_mistakes_name_file_line_and_field(text: str, expected: str) -> None:
    assert one(text).startswith(expected), one(text)


def test_requirement_mistakes(tmp_path: Path) -> None:
    head = f'default = "reject"\n[[keys]]\nid = "ops"\npublic_key = "{OPS.key_id}"\n' \
           'roles = ["admin"]\n[[rules]]\nname = "r"\nthen = "forward"\n'
    assert one(head + 'require = { roles = ["admn"] }\n').startswith(
        "p.toml:9: rules[0].require.roles: no key in [[keys]] carries role 'admn'")
    assert one(head + 'require = { roles = ["admin"], count = 2 }\n').startswith(
        "p.toml:9: rules[0].require.count: 2 distinct keys needed but only 1 key(s) qualify")
    assert one(head + "require = { count = 0 }\n").startswith(
        "p.toml:9: rules[0].require.count: must be an integer from 1 to 16 (got 0)")
    assert one(head + "require = { max_age_s = 0 }\n").startswith(
        "p.toml:9: rules[0].require.max_age_s: must be a number")
    assert one(head + "require = { role = ['admin'] }\n").startswith(
        "p.toml:9: rules[0].require.role: unknown field")
    reject = head.replace('then = "forward"', 'then = "reject"')
    assert one(reject + "require = { count = 1 }\n").startswith(
        "p.toml:9: rules[0].require: only a rule that forwards can require signatures")
    # a sub-table written as its own header is located too
    assert one(head + "[rules.require]\nroles = ['admin']\ncount = 'two'\n").startswith(
        "p.toml:11: rules[0].require.count: must be an integer")


def test_key_mistakes(tmp_path: Path) -> None:
    (tmp_path / "private.pem").write_bytes(OPS.private_pem())
    (tmp_path / "junk.pem").write_text("hello")
    head = 'default = "reject"\n\n[[keys]]\nid = "k"\n'
    assert one(head + 'public_key = "missing.pem"\n', tmp_path).startswith(
        "p.toml:5: keys[0].public_key: missing.pem: No such file or directory")
    assert "holds a private key" in one(head + 'public_key = "private.pem"\n', tmp_path)
    assert "junk.pem: not a PEM public key" in one(head + 'public_key = "junk.pem"\n', tmp_path)
    assert one(head + 'roles = ["a"]\n', tmp_path).startswith("p.toml:3: keys[0].public_key: "
                                                             "missing")
    twice = (head + f'public_key = "{OPS.key_id}"\n[[keys]]\nid = "k"\n'
             f'public_key = "{OPS.key_id}"\n')
    found = [str(p) for p in problems(twice, tmp_path)]
    assert found[0].startswith("p.toml:7: keys[1].id: duplicate key id 'k'")
    assert found[1].startswith("p.toml:8: keys[1].public_key: the same key as 'k'")


def test_every_mistake_is_reported_at_once() -> None:
    found = problems('default = "x"\n[[rules]]\nname = "a"\nthen = "y"\ndirection = "z"\n')
    assert [p.key for p in found] == ["default", "rules[0].then", "rules[0].direction"]
    assert [p.line for p in found] == [1, 4, 5]


def test_toml_syntax_errors_give_the_line() -> None:
    text = 'default = "reject"\n[[rules]]\nname = "a\n'
    assert one(text).startswith("p.toml:3: not valid TOML")


def test_unreadable_file(tmp_path: Path) -> None:
    (problem,) = check_policy(tmp_path / "none.toml")
    assert str(problem).endswith("cannot read: No such file or directory")


def test_multiline_arrays_and_strings_do_not_confuse_lines() -> None:
    text = ('default = "reject"\n[[rules]]\nname = """multi\nthen = "not a key"\n"""\n'
            'actions = [\n  "Reset",\n  "X",\n]\nthen = "bogus"\n')
    assert one(text).startswith("p.toml:10: rules[0].then: must be one of")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_parses_or_fails_with_problems(text: str) -> None:
    try:
        parse_policy(text, "p.toml")
    except PolicyError as exc:
        assert exc.problems and all(str(p).startswith("p.toml") for p in exc.problems)


def test_schema_validation_without_the_ocpp_package_is_a_policy_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("policies.schemas.schema_root", lambda: None)
    text = 'default = "forward"\n[[rules]]\nname = "r"\nvalidate_schema = true\nthen = "forward"\n'
    assert one(text).startswith("p.toml:4: rules[0].validate_schema: schema validation needs "
                                "the `ocpp` package")
    assert one('default = "forward"\nvalidate_schema = true\n').startswith(
        "p.toml:2: validate_schema: schema validation needs")
