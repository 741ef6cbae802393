"""Real OCPP peers for end-to-end tests: a CSMS (``ocpp_csms``) and stations (``ocpp_station``).

Both are built on the ``ocpp`` package and the ``websockets`` asyncio API. The CSMS runs its
own event loop in a background thread, so plain (sync) pytest tests, asyncio code run through
``asyncio.run`` and trio tests can all use it.

This module also holds two small helpers shared by the end-to-end test modules:
``node_env`` (environment for ``tests.nodeproc.start_node``) and ``edge_config`` (the node's
TOML config as described in ``docs/edge-gateway.md``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_SUBPROTOCOLS = ("ocpp2.1", "ocpp2.0.1", "ocpp1.6")


def node_env() -> dict[str, str]:
    """Extra environment for ``start_node``: the node runs with its cwd in a temp dir, so make
    sure ``python -m router`` finds the package even when it is not pip-installed."""
    parts = [str(REPO_ROOT)]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        parts.append(existing)
    return {"PYTHONPATH": os.pathsep.join(parts)}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def edge_config(
    backend_url: str,
    *,
    node_id: str = "edge-test",
    security_profile: int = 0,
    subprotocols: Sequence[str] = DEFAULT_SUBPROTOCOLS,
    stations: Sequence[dict[str, object]] = ({"match": "*"},),
    backend_auth: str | dict[str, str] = "passthrough",
    call_timeout_s: float = 30,
    max_queued_calls: int = 16,
    max_message_bytes: int = 65536,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
    listen_extra: dict[str, object] | None = None,
    backend_extra: dict[str, object] | None = None,
) -> str:
    """Config text for one edge node in front of one primary backend at ``backend_url``;
    ``listen_extra`` and ``backend_extra`` add keys to ``[listen]`` and ``[[backends]]``."""
    node: dict[str, object] = {
        "id": node_id,
        "call_timeout_s": call_timeout_s,
        "max_queued_calls": max_queued_calls,
    }
    listen: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "path": "/ocpp",
        "subprotocols": list(subprotocols),
        "security_profile": security_profile,
        "max_message_bytes": max_message_bytes,
    }
    for key, path in (("tls_cert", tls_cert), ("tls_key", tls_key), ("tls_ca", tls_ca)):
        if path is not None:
            listen[key] = str(path)
    listen.update(listen_extra or {})
    lines = ["[node]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in node.items()]
    lines += ["", "[listen]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in listen.items()]
    for station in stations:
        lines += ["", "[[stations]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in station.items()]
    lines += [
        "",
        "[[backends]]",
        'name = "main"',
        'role = "primary"',
        f"url = {_toml_value(backend_url)}",
        f"auth = {_toml_value(backend_auth)}",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in (backend_extra or {}).items()]
    return "\n".join([*lines, ""])
