"""``[[tunnels]]`` and ``[channels]`` in a node's config: checked in full, every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, parse
from tests.peers import edge_config

BASE = edge_config("ws://127.0.0.1:1/ocpp", node_id="core-1")


def test_tunnels_and_channels_are_read(tmp_path: Path) -> None:
    config = parse(BASE + """
[[tunnels]]
name = "site7-meter"
listen = "127.0.0.1:15020"
node = "edge-7"
target = "[fd00::7]:502"

[channels]
allow_targets = ["192.168.7.50:502", "meter.site7.example:502"]
window_bytes = 65536
files_dir = "files"
""", "node.toml", tmp_path)
    [tunnel] = config.tunnels
    assert (tunnel.host, tunnel.port, tunnel.node, tunnel.target) == (
        "127.0.0.1", 15020, "edge-7", "[fd00::7]:502")
    assert config.channels.allow_targets == ("192.168.7.50:502", "meter.site7.example:502")
    assert config.channels.window_bytes == 65536 and config.channels.files_dir == tmp_path / "files"
    assert config.channels.max_channels == 256 and config.channels.idle_timeout_s == 300


@pytest.mark.parametrize(("extra", "key"), [
    ('[[tunnels]]\nname = "t"\nlisten = "127.0.0.1"\nnode = "e"\ntarget = "h:1"\n',
     "tunnels[0].listen"),
    ('[[tunnels]]\nname = "t"\nlisten = "127.0.0.1:1"\nnode = "e"\ntarget = "h:0"\n',
     "tunnels[0].target"),
    ('[[tunnels]]\nname = "t"\nlisten = "127.0.0.1:1"\nnode = "e"\ntarget = "h:\u00b2"\n',
     "tunnels[0].target"),
    ('[[tunnels]]\nname = "t"\nlisten = "127.0.0.1:1"\nnode = "core-1"\ntarget = "h:1"\n',
     "tunnels[0].node"),
    ('[[tunnels]]\nname = "t"\nlisten = "127.0.0.1:1"\nnode = "e"\ntarget = "h:1"\n'
     '[[tunnels]]\nname = "t"\nlisten = "127.0.0.1:2"\nnode = "e"\ntarget = "h:1"\n',
     "tunnels[1].name"),
    ('[[tunnels]]\nname = "t"\nlisten = "127.0.0.1:1"\nnode = "e"\ntarget = "h:1"\nx = 1\n',
     "tunnels[0]"),
    ('tunnels = 3\n', "tunnels"),
    ('[channels]\nallow_targets = ["no port"]\n', "channels.allow_targets"),
    ('[channels]\nwindow_bytes = 1\n', "channels.window_bytes"),
    ('[channels]\nconnect_timeout_s = 60\n', "channels.connect_timeout_s"),
    ('[channels]\nfiles = "x"\n', "channels"),
])
def test_mistakes_are_named(tmp_path: Path, extra: str, key: str) -> None:
    # a top-level key goes before the first table, where TOML reads it as top-level
    text = extra + BASE if not extra.startswith("[") else BASE + extra
    with pytest.raises(ConfigError) as caught:
        parse(text, "node.toml", tmp_path)
    assert any(problem.key.startswith(key) for problem in caught.value.problems), \
        caught.value.problems
