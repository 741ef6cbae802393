"""Start ``ocpp-router run`` as a real subprocess for end-to-end tests and benchmarks.

The node logs JSON lines on stderr; the ``listening`` event carries the port the
listener bound (configs in tests use ``port = 0``), which is how callers find it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class NodeProcess:
    """A running node: its process, listening port and the log lines seen so far."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    port: int = 0
    scheme: str = "ws"
    path: str = "/ocpp"
    logs: list[dict[str, Any]] = field(default_factory=list)
    raw_stderr: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def url(self, identity: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.path}/{identity}"

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.logs if line.get("event") == name]

    def wait_for_event(self, name: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Block until a log line with this event (and these field values) appears."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.logs:
                    if line.get("event") == name and all(
                        line.get(k) == v for k, v in fields.items()
                    ):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(
                        f"no {name!r} log line {fields or ''}; stderr:\n"
                        + "".join(self.raw_stderr[-40:])
                    )
                self._cond.wait(min(left, 0.2))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the node and wait for it to exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _pump(node: NodeProcess) -> None:
    assert node.proc.stderr is not None
    for raw in node.proc.stderr:
        text = raw.decode("utf-8", "replace")
        with node._cond:
            node.raw_stderr.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            if isinstance(line, dict):
                node.logs.append(line)
            node._cond.notify_all()


def start_node(
    config_text: str,
    directory: Path,
    *,
    log_level: str = "info",
    env: dict[str, str] | None = None,
    name: str = "node.toml",
) -> NodeProcess:
    """Write the config, start ``python -m router run`` and wait until it listens."""
    config_path = directory / name
    config_path.write_text(config_text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "run", "--config", str(config_path),
         "--log-level", log_level],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # log lines at once, so that a test sees them as they happen (a benchmark passes
        # OCPP_ROUTER_LOG_BUFFER=1 to measure the node as it runs in production)
        env={"OCPP_ROUTER_LOG_BUFFER": "0", **os.environ, **(env or {})},
    )
    node = NodeProcess(proc=proc, config_path=config_path)
    threading.Thread(target=_pump, args=(node,), daemon=True).start()
    try:
        listening = node.wait_for_event("listening", timeout=20.0)
    except TimeoutError:
        node.stop(signal.SIGKILL)
        raise
    node.port = int(listening["port"])
    node.scheme = "wss" if listening.get("tls") else "ws"
    node.path = str(listening.get("path", "/ocpp"))
    return node
