"""The three packages stay ruff-clean and mypy --strict clean (run as part of the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "router", "policies",
                           "topology", "tests", "bench"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_sans_io_cores_import_no_io() -> None:
    """policies/ and topology/ must not import trio or sockets."""
    for package in ("policies", "topology"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for banned in ("import trio", "from trio", "import socket", "import asyncio"):
                assert banned not in text, f"{path} imports I/O ({banned})"
