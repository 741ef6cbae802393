"""The command line as a user runs it: real subprocesses, exit codes, messages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.example_dirs import prepare_examples

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_shipped_example_passes_check(tmp_path: Path) -> None:
    """The README's edge gateway, once its script has made the TLS certificate (in a copy)."""
    examples = prepare_examples(tmp_path, only=["edge-gateway"])
    done = cli("check", "--config", str(examples / "edge-gateway" / "node.toml"))
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


def test_check_names_file_line_and_key_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nid = "x"\n[listen]\nport = "nine"\n')
    done = cli("check", "--config", str(bad))
    assert done.returncode == 2
    assert f"{bad}:4: listen.port: must be an integer" in done.stderr
    assert "Traceback" not in done.stderr
    missing = cli("check", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_hash_password_prints_a_usable_hash() -> None:
    done = cli("hash-password", stdin="pw\n")
    assert done.returncode == 0
    from router.passwords import verify_password

    assert verify_password("pw", done.stdout.strip())
    assert cli("hash-password", stdin="\n").returncode == 2


def test_usage_errors_exit_2() -> None:
    assert cli().returncode == 2
    assert cli("run").returncode == 2


def test_demo_runs_a_small_scene_and_stops_cleanly() -> None:
    """``--stations 1``: one station at each node; the whole demo is tests/test_demo.py."""
    done = cli("demo", "--stations", "1", "--duration", "6")
    assert done.returncode == 0, done.stderr
    summaries = [line for line in done.stdout.splitlines() if " | stations " in line]
    for node in ("core", "edge-a", "edge-b"):
        rows = [line for line in summaries if re.match(rf"\[\s*[\d.]+s\] {node} ", line)]
        assert len(rows) >= 3, (node, done.stdout)
        assert "stations 1/1" in rows[-1], rows[-1]
    assert "+ 2 over the overlay" in summaries[-3]  # the core holds the edges' stations
    forwarded = int(re.search(r"core (\d+),", done.stdout.splitlines()[-1]).group(1))  # type: ignore[union-attr]
    assert forwarded >= 3 * 2 * 2  # boot and status of each station: request and answer
    assert done.stdout.splitlines()[-1].startswith("demo: done.")


def test_demo_usage_mistakes_exit_2() -> None:
    assert cli("demo", "--stations", "0").returncode == 2
    assert cli("demo", "--duration", "0").returncode == 2
    assert cli("demo", "--log-level", "loud").returncode == 2


def test_frames_are_logged_at_debug_and_secrets_never(tmp_path: Path) -> None:
    """At debug level each frame is a log line; Authorization never appears."""
    import base64

    from websockets.sync.client import connect

    from router.passwords import hash_password
    from tests.nodeproc import start_node
    from tests.raw_backend import RawBackend

    with RawBackend() as backend:
        config = f"""
[node]
id = "debug-log"
[listen]
port = 0
security_profile = 1
[[stations]]
match = "*"
password_hash = "{hash_password("topsecret-pw")}"
[[backends]]
name = "main"
url = "{backend.url}"
"""
        node = start_node(config, tmp_path, log_level="debug")
        try:
            token = base64.b64encode(b"LOG-1:topsecret-pw").decode()
            with connect(node.url("LOG-1"), subprotocols=["ocpp1.6"],
                         additional_headers={"Authorization": f"Basic {token}"}) as ws:
                ws.send('[2,"m1","Heartbeat",{}]')
                ws.recv(timeout=10)
            node.wait_for_event("station_disconnected", station="LOG-1")
        finally:
            node.stop()
    frames = node.events("frame")
    assert [(f["side"], f["text"].replace(" ", "")[:9]) for f in frames][:2] == [
        ("station", '[2,"m1","'), ("backend", '[3,"m1",{')]
    everything = "".join(node.raw_stderr)
    assert "topsecret-pw" not in everything
    assert token not in everything


def test_unloadable_tls_files_are_a_clear_config_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = tmp_path / "tls.toml"
    config.write_text("""
[node]
id = "tls"
[listen]
security_profile = 2
tls_cert = "cert.pem"
tls_key = "key.pem"
[[stations]]
match = "*"
password_hash = "scrypt$16$8$1$AAAA$AAAA"
[[backends]]
name = "main"
url = "ws://127.0.0.1:9/ocpp"
""")
    for command in ("check", "run"):
        done = cli(command, "--config", str(config))
        assert done.returncode == 2, (command, done.stderr)
        assert "listen.tls_cert" in done.stderr and "cannot load" in done.stderr
        assert "Traceback" not in done.stderr
