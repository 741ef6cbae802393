"""The ready-made examples under ``examples/``, prepared for tests in a temporary copy.

:func:`prepare_examples` copies the whole tree (``firewall/`` names ``../policies/``) and
runs every example's key and certificate scripts (``examples/*/*.sh``) there, with
``OCPP_ROUTER`` naming this checkout's command; so the committed files stay as they are
and no key made for a test lands in the repository. :func:`node_configs` finds the node
configs by globbing, so a new example is covered without touching the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from tests.peers import node_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def node_configs(base: Path = EXAMPLES) -> list[Path]:
    """Every TOML file under ``base`` with a ``[node]`` table (policy files have none)."""
    found = []
    for path in sorted(base.rglob("*.toml")):
        if "state" in path.relative_to(base).parts:
            continue
        with path.open("rb") as f:
            if "node" in tomllib.load(f):
                found.append(path)
    return found


def key_scripts(base: Path = EXAMPLES) -> list[Path]:
    """The shell scripts of the example directories (they make keys and certificates)."""
    return sorted(base.glob("*/*.sh"))


def _router_command(directory: Path) -> Path:
    """A one-word command for ``ocpp-router`` from this checkout, for the scripts' OCPP_ROUTER."""
    command = directory / "ocpp-router"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m router "$@"\n')
    command.chmod(0o755)
    return command


def run_script(script: Path, router: Path) -> subprocess.CompletedProcess[str]:
    """Run one example script as a user would (``sh script``) from the repository root."""
    env = {**os.environ, **node_env(), "OCPP_ROUTER": str(router)}
    return subprocess.run(["sh", str(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def prepare_examples(directory: Path, only: Sequence[str] = ()) -> Path:
    """Copy ``examples/`` into ``directory``, run the scripts in the copy (every example's,
    or those of the example directories named in ``only``); the copy's root.

    A script that fails raises AssertionError with its output.
    """
    copy = directory / "examples"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("state", "__pycache__"))
    router = _router_command(directory)
    for script in key_scripts(copy):
        if only and script.parent.name not in only:
            continue
        done = run_script(script, router)
        assert done.returncode == 0, (
            f"{script.relative_to(copy)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return copy


def set_key(text: str, table: str, key: str, value: str) -> str:
    """``text`` with ``key = ...`` of the first ``[table]`` (or ``[[table]]``) set to the
    TOML ``value``; the key must be there, so a changed example fails loudly."""
    header = re.search(rf"^\[\[?{re.escape(table)}\]\]?[ \t]*(#.*)?$", text, re.MULTILINE)
    assert header is not None, f"no [{table}] table"
    end = re.search(r"^\[", text[header.end():], re.MULTILINE)
    stop = header.end() + (end.start() if end else len(text) - header.end())
    body, count = re.subn(rf"^{re.escape(key)}[ \t]*=.*$", f"{key} = {value}",
                          text[header.end():stop], count=1, flags=re.MULTILINE)
    assert count == 1, f"no {key} in [{table}]"
    return text[:header.end()] + body + text[stop:]
