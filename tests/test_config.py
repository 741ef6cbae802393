"""Unit tests of config validation: every mistake named with file, key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, env_name, load, parse
from router.passwords import hash_password
from tests.example_dirs import prepare_examples

GOOD = """\
[node]
id = "edge-1"

[listen]
port = 9000
security_profile = 0

[[stations]]
match = "CS-*"

[[backends]]
name = "main"
url = "ws://127.0.0.1:9100/ocpp"
"""


def problems(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        parse(text, "node.toml")
    return [(p.key, p.line, p.problem) for p in info.value.problems]


def test_minimal_config_has_sane_defaults() -> None:
    cfg = parse(GOOD)
    assert cfg.node.call_timeout_s == 30.0
    assert cfg.listen.path == "/ocpp"
    assert cfg.listen.subprotocols == ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")
    assert cfg.backends[0].role == "primary"
    assert cfg.backends[0].auth.mode == "passthrough"
    entry = cfg.station_entry("CS-7")
    assert entry is not None
    assert cfg.primary_for("CS-7", entry) is cfg.backends[0]
    assert cfg.station_entry("other") is None


def test_every_mistake_is_reported_with_key_and_line() -> None:
    text = """\
[node]
id = "edge-1"
call_timeout_s = "soon"

[listen]
port = 70000
security_profile = 1
subprotocols = ["ocpp1.6", "ocpp9"]
colour = "blue"

[[stations]]
match = "CS-*"

[[backends]]
name = "main"
url = "http://example"

[[backends]]
name = "main"
url = "ws://x/ocpp"
auth = 5
"""
    found = problems(text)
    keys = {key: (line, problem) for key, line, problem in found}
    assert keys["node.call_timeout_s"][0] == 3
    assert "number" in keys["node.call_timeout_s"][1]
    assert keys["listen.port"][0] == 6
    assert "between 0 and 65535" in keys["listen.port"][1]
    assert "ocpp9" in keys["listen.subprotocols"][1]
    assert keys["listen.colour"] == (9, keys["listen.colour"][1])
    assert "unknown key" in keys["listen.colour"][1]
    assert keys["stations[0].password_hash"][0] == 11  # missing: points at the entry
    assert keys["backends[0].url"][0] == 16
    assert keys["backends[1].name"][0] == 19
    assert "duplicate" in keys["backends[1].name"][1]
    assert keys["backends[1].auth"][0] == 21


def test_syntax_error_names_the_line() -> None:
    [(_key, line, problem)] = problems('[node]\nid = "x"\nport = = 3\n')
    assert line == 3
    assert "TOML" in problem


def test_policy_section_names_an_existing_file(tmp_path: Path) -> None:
    found = problems(GOOD + '\n[policy]\nfile = "absent.toml"\n')
    assert [(k, line) for k, line, _ in found] == [("policy.file", 16)]
    (tmp_path / "p.toml").write_text('default = "forward"\n')
    path = tmp_path / "node.toml"
    path.write_text(GOOD + '\n[policy]\nfile = "p.toml"\n')
    cfg = load(path)
    assert cfg.policy is not None
    assert cfg.policy.file == tmp_path / "p.toml"
    assert cfg.policy.audit_log == tmp_path / "state" / "audit.jsonl"


def test_sections_of_later_versions_are_refused_clearly() -> None:
    found = problems(GOOD + '\n[dns]\nnameservers = ["127.0.0.1"]\n')
    assert [k for k, _, _ in found] == ["dns.nameservers"]
    cfg = parse(GOOD.replace('url = "ws://127.0.0.1:9100/ocpp"',
                             'srv = "_ocpp._tcp.csms.test"\nscheme = "wss"')
                + '\n[dns]\nnameservers = ["127.0.0.1:5353"]\nttl_floor_s = 1\n')
    assert (cfg.backends[0].srv, cfg.backends[0].scheme, cfg.backends[0].url) == (
        "_ocpp._tcp.csms.test", "wss", "")
    assert cfg.dns.nameservers == (("127.0.0.1", 5353),) and cfg.dns.ttl_floor_s == 1


def test_peers_make_backends_optional_and_are_checked() -> None:
    chained = GOOD.split("[[backends]]")[0] + (
        '[[peers]]\nid = "core-1"\nurl = "ws://127.0.0.1:9300/ocpp"\nencoding = "msgpack"\n')
    cfg = parse(chained)
    assert cfg.backends == ()
    assert [(p.id, p.encoding) for p in cfg.peers] == [("core-1", "msgpack")]
    found = problems(chained.replace('"msgpack"', '"xml"').replace('"core-1"', '"edge-1"'))
    assert {k for k, _, _ in found} == {"peers[0].id", "peers[0].encoding"}


def test_tls_profiles_need_their_files(tmp_path: Path) -> None:
    found = problems(GOOD.replace("security_profile = 0", "security_profile = 3"))
    keys = {k for k, _, _ in found}
    assert {"listen.tls_cert", "listen.tls_key", "listen.tls_ca"} <= keys
    found = problems(GOOD.replace("security_profile = 0",
                                  'security_profile = 0\ntls_cert = "missing.pem"'))
    assert any("file not found" in p for _, _, p in found)


def test_password_hash_is_checked_and_env_overrides_backend_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = GOOD.replace('match = "CS-*"', 'match = "CS-*"\npassword_hash = "plain"')
    assert any(k == "stations[0].password_hash" for k, _, _ in problems(bad))
    good = GOOD.replace('match = "CS-*"', f'match = "CS-*"\npassword_hash = "{hash_password("x")}"')
    parse(good.replace("security_profile = 0", "security_profile = 1"))
    monkeypatch.setenv(env_name("main"), "s3cret")
    assert env_name("main") == "OCPP_ROUTER_BACKEND_MAIN_PASSWORD"
    cfg = parse(GOOD)
    assert (cfg.backends[0].auth.mode, cfg.backends[0].auth.password) == ("password", "s3cret")


def test_primary_must_exist_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    found = problems(GOOD.replace('match = "CS-*"', 'match = "CS-*"\nprimary = "nope"'))
    assert any(k == "stations[0].primary" for k, _, _ in found)
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "node.toml"
    path.write_text(GOOD.replace('id = "edge-1"', 'id = "edge-1"\nstate_dir = "st"'))
    assert load(path).node.state_dir == tmp_path / "sub" / "st"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "absent.toml")
    assert "cannot read" in str(info.value)


def test_shipped_example_passes_check(tmp_path: Path) -> None:
    """The edge-gateway example: TLS + Basic toward stations, wss:// toward the CSMS."""
    examples = prepare_examples(tmp_path, only=["edge-gateway"])
    cfg = load(examples / "edge-gateway" / "node.toml")
    assert cfg.listen.security_profile == 2
    assert cfg.listen.tls_cert is not None and cfg.listen.tls_cert.is_file()
    assert all(b.url.startswith("wss://") for b in cfg.backends)


def test_admin_allowed_hosts_are_exact_host_names() -> None:
    cfg = parse(GOOD + '\n[admin]\nallowed_hosts = ["Ops.Example.net", "node-7"]\n')
    assert cfg.admin is not None and cfg.admin.allowed_hosts == ("ops.example.net", "node-7")
    plain = parse(GOOD + "\n[admin]\n").admin
    assert plain is not None and plain.allowed_hosts == ()
    for bad in ['"ops.example.net"', "[7]", '[""]', '["http://ops.example.net"]',
                '["ops.example.net:9090"]', '["ops.example.net/admin"]', '["*.example.net"]',
                '["[::1]"]', '["ops..example.net"]']:
        found = problems(GOOD + f"\n[admin]\nport = 9090\nallowed_hosts = {bad}\n")
        assert [(key, line) for key, line, _ in found] == [("admin.allowed_hosts", 17)], bad
    [(_key, _line, problem)] = problems(GOOD + '\n[admin]\nallowed_hosts = ["x.net:1"]\n')
    assert "'x.net:1' is not a host name" in problem and "without scheme, port or path" in problem


def test_accept_only_peers_and_their_credentials() -> None:
    """A [[peers]] entry without url or srv only accepts; under profiles 1-2 it needs the
    peer's password_hash. Ids are unique and never CSMS or *; nodes goes with srv."""
    base = GOOD.split("[[backends]]")[0].replace("security_profile = 0", "security_profile = 1")
    base = base.replace('match = "CS-*"', f'match = "CS-*"\npassword_hash = "{hash_password("x")}"')
    backend = '[[backends]]\nname = "main"\nurl = "ws://127.0.0.1:9100/ocpp"\n'
    ok = base + backend + f'\n[[peers]]\nid = "edge-7"\npassword_hash = "{hash_password("p")}"\n'
    cfg = parse(ok)
    [peer] = cfg.peers
    assert (peer.id, peer.dialled, peer.url, peer.srv) == ("edge-7", False, "", None)
    assert cfg.peer_entry("edge-7") is peer and cfg.peer_entry("edge-8") is None
    found = problems(base + backend + '\n[[peers]]\nid = "edge-7"\n')
    assert [k for k, _, _ in found] == ["peers[0].password_hash"]
    found = problems(base + backend + '\n[[peers]]\nid = "CSMS"\npassword_hash = "nope"\n'
                     '\n[[peers]]\nid = "a"\nurl = "ws://127.0.0.1:1/ocpp"\nnodes = ["b"]\n'
                     '\n[[peers]]\nid = "a"\nurl = "ws://127.0.0.1:1/ocpp"\n')
    assert {k for k, _, _ in found} == {"peers[0].id", "peers[0].password_hash",
                                        "peers[1].nodes", "peers[2].id"}
    srv = parse(GOOD + '\n[[peers]]\nid = "core"\nsrv = "_ocpp._tcp.cores.test"\n'
                       'nodes = ["core-1", "core-2"]\n')
    assert srv.peers[0].answers_as("core-2") and not srv.peers[0].answers_as("core-3")
