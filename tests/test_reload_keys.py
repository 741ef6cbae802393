"""A reload that changes [trust] or [node] key takes effect on the overlay (it used to be
ignored without a word): peer links start over under the new keys; a key that cannot be
loaded keeps the old configuration and says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from policies import SigningKey
from router.config import load
from router.node import Node
from router.overlay.peer_link import PeerLink

CONFIG = """
[node]
id = "rk-core"
state_dir = "{state}"
{key}
[listen]
port = 0
security_profile = 0

[[stations]]
match = "*"

[[backends]]
name = "csms"
role = "primary"
url = "ws://127.0.0.1:1/ocpp"

[[peers]]
id = "rk-edge"
{trust}
"""


def _key(directory: Path, name: str) -> tuple[Path, Path]:
    key = SigningKey.generate("ed25519")
    private, public = directory / f"{name}.key.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_pem())
    public.write_bytes(key.public_pem())
    return private, public


def _write(source: Path, tmp_path: Path, *, key: Path | None, trusted: Path | None) -> None:
    source.write_text(CONFIG.format(
        state=tmp_path / "state",
        key=f'key = "{key}"' if key else "",
        trust=f'[trust]\nnodes = {{ "rk-edge" = "{trusted}" }}' if trusted else ""))


def test_new_trusted_keys_restart_the_peer_links(tmp_path: Path) -> None:
    _, edge_public = _key(tmp_path, "edge")
    _, other_public = _key(tmp_path, "other")
    source = tmp_path / "node.toml"
    _write(source, tmp_path, key=None, trusted=edge_public)
    node = Node(load(source))
    overlay = node.overlay
    link = PeerLink(overlay, "rk-edge", cast(Any, None), "json", overlay.new_exchange("rk-edge"))
    overlay.links["rk-edge"] = link
    verify_before = overlay._verify

    _write(source, tmp_path, key=None, trusted=other_public)
    ok, message = node.reload()
    assert ok, message
    assert overlay._verify is not None and overlay._verify is not verify_before
    assert link._scope.cancel_called  # the old link starts over under the new keys


def test_a_new_node_key_signs_the_routes_of_new_links(tmp_path: Path) -> None:
    private, _ = _key(tmp_path, "core")
    source = tmp_path / "node.toml"
    _write(source, tmp_path, key=None, trusted=None)
    node = Node(load(source))
    assert node.overlay._sign is None
    _write(source, tmp_path, key=private, trusted=None)
    ok, message = node.reload()
    assert ok, message
    assert node.overlay._sign is not None  # what new exchange sessions sign with


def test_a_trusted_key_that_cannot_be_loaded_keeps_the_old_config(tmp_path: Path) -> None:
    _, edge_public = _key(tmp_path, "edge")
    source = tmp_path / "node.toml"
    _write(source, tmp_path, key=None, trusted=edge_public)
    node = Node(load(source))
    before = node.config
    broken = tmp_path / "broken.pub.pem"
    broken.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    _write(source, tmp_path, key=None, trusted=broken)
    ok, message = node.reload()
    assert not ok
    assert "broken.pub.pem" in message and "rk-edge" in message
    assert node.config is before
