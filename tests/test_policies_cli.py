"""keys / sign / policy commands as a user runs them: subprocesses, exit codes, messages."""

from __future__ import annotations

import argparse
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policies.signatures import VerifiedSignature, verify_signatures
from router.cli.policy_tools import COMMANDS, add_commands, check_policy_file, run_command

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router.cli.policy_tools", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 1, done.stderr


def test_keys_new_sign_verify_and_explain_round_trip(tmp_path: Path) -> None:
    key = tmp_path / "ops.pem"
    made = cli("keys", "new", "--out", str(key))
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.strip()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")

    again = cli("keys", "new", "--out", str(key))
    assert again.returncode == 2 and "already exists" in again.stderr
    no_traceback(again)

    public = cli("keys", "public", "--key", str(key), "--out", str(tmp_path / "ops.pub.pem"))
    assert public.returncode == 0 and public.stdout.strip() == key_id

    done = cli("sign", "--key", str(key), "--action", "Reset", "--name", "ops",
               stdin='{"type": "Immediate", "evseId": 1}')
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["type"] == "Immediate" and payload["signatures"][0]["keyId"] == key_id
    (result,) = verify_signatures(payload, "Reset", "to-station", time.time(), max_age_s=60)
    assert isinstance(result, VerifiedSignature) and result.name == "ops"

    (tmp_path / "policy.toml").write_text(
        'default = "reject"\n'
        '[[keys]]\nid = "ops"\npublic_key = "ops.pub.pem"\nroles = ["admin"]\n'
        '[[rules]]\nname = "admin commands"\nactions = ["Reset"]\ndirection = "to-station"\n'
        'require = { roles = ["admin"] }\nthen = "forward"\n')
    (tmp_path / "reset.json").write_text(done.stdout)
    explained = cli("policy", "explain", str(tmp_path / "policy.toml"), "--action", "Reset",
                    "--direction", "to-station", "--source", "main",
                    "--payload", str(tmp_path / "reset.json"))
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.splitlines()[:3] == [
        "decision: forward",
        "decided by: rule 'admin commands' (line 6)",
        "why: rule 'admin commands' forwards (signed by ops)",
    ]
    unsigned = cli("policy", "explain", str(tmp_path / "policy.toml"), "--action", "Reset",
                   "--direction", "to-station", "--source", "main")
    assert unsigned.stdout.startswith("decision: reject\ndecided by: rule 'admin commands'")
    assert "the message is not signed" in unsigned.stdout


def test_sign_refuses_bad_input_in_one_sentence(tmp_path: Path) -> None:
    for stdin, words in (("not json", "is not JSON"), ("[1]", "is not a JSON object"),
                         ('{"n": 1e999}', "cannot be signed")):
        done = cli("sign", "--key", str(ROOT / "tests" / "vectors" / "p256-test-key.pem"),
                   "--action", "Reset", stdin=stdin)
        assert done.returncode == 2 and words in done.stderr, done.stderr
        no_traceback(done)
    missing = cli("sign", "--key", str(tmp_path / "none.pem"), "--action", "Reset", stdin="{}")
    assert missing.returncode == 2 and "none.pem: cannot read the key" in missing.stderr
    (tmp_path / "junk.pem").write_text("junk")
    junk = cli("sign", "--key", str(tmp_path / "junk.pem"), "--action", "Reset", stdin="{}")
    assert junk.returncode == 2 and "junk.pem: not a PEM private key" in junk.stderr
    usage = cli("sign", "--action", "Reset")
    assert usage.returncode == 2 and "--key" in usage.stderr


def test_policy_check_examples_and_a_broken_file(tmp_path: Path) -> None:
    examples = sorted((ROOT / "examples" / "policies").glob("*.toml"))
    assert len(examples) == 4
    for example in examples:
        done = cli("policy", "check", str(example))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{example}: ok (")
    broken = tmp_path / "broken.toml"
    broken.write_text('default = "reject"\n\n[[rules]]\nname = "r"\nthen = "forwrd"\n')
    done = cli("policy", "check", str(broken))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"ocpp-router: {broken}:5: rules[0].then: must be one of "
                                   "forward, reject, drop (got 'forwrd')")
    explain = cli("policy", "explain", str(broken), "--action", "A", "--direction",
                  "to-station", "--source", "x")
    assert explain.returncode == 2 and "rules[0].then" in explain.stderr
    assert check_policy_file(broken) == [done.stderr.strip().removeprefix("ocpp-router: ")]
    assert check_policy_file(examples[0]) == []


def test_the_lead_can_wire_these_into_the_main_parser(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ocpp-router")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("check")
    add_commands(sub)
    assert set(COMMANDS) <= set(sub.choices)
    args = parser.parse_args(["policy", "check",
                              str(ROOT / "examples" / "policies" / "edge-gateway.toml")])
    assert run_command(args) == 0
    assert ": ok (2 keys, 5 rules, default reject)" in capsys.readouterr().out
    args = parser.parse_args(["keys", "new", "--out", str(tmp_path / "k.pem"), "--algorithm",
                              "ed25519"])
    assert run_command(args) == 0
    assert capsys.readouterr().out.strip().startswith("MCowBQYDK2VwAyEA")
    args = parser.parse_args(["policy", "explain", str(tmp_path / "none.toml"), "--action",
                              "A", "--direction", "to-station", "--source", "x", "--at",
                              "yesterday"])
    assert run_command(args) == 2
    assert "cannot read" in capsys.readouterr().err
