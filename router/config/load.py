"""Reading a config file: TOML in, a validated :class:`~router.config.model.Config` out,
or a ConfigError listing every mistake with its file, key and line (see the package)."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router.config.checker import Checker as _Checker
from router.config.model import (
    COMPRESSIONS,
    DEFAULT_SUBSCRIBE,
    MAX_ID,
    RESERVED_IDS,
    AdminSection,
    BackendAuth,
    BackendEntry,
    ChannelsSection,
    Config,
    ConfigError,
    ConfigProblem,
    DialSettings,
    DnsSection,
    ListenSection,
    NodeSection,
    PeerEntry,
    PolicySection,
    StationEntry,
    TrustSection,
    TunnelEntry,
    env_name,
    peer_env_name,
)
from router.passwords import HashFormatError, parse_hash
from router.wire.frames import SUBPROTOCOLS


def load(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming every mistake."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(str(source), "", None, f"cannot read: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(str(source), "", None, "not UTF-8 text")]) from None
    return parse(text, str(source), source.resolve().parent)


def parse(text: str, file: str = "<config>", root: Path | None = None) -> Config:
    """Validate config text; ``root`` anchors relative paths (default: the working dir)."""
    root = root or Path.cwd()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            [ConfigProblem(file, "", int(m.group(1)) if m else None, f"not valid TOML: {exc}")]
        ) from None
    c = _Checker(file, text)
    known = {"node", "listen", "stations", "backends", "admin", "policy", "peers", "trust",
             "dns", "tunnels", "channels"}
    for name in raw:
        if name not in known:
            c.fail(name, f"unknown section (known: {', '.join(sorted(known))})")

    node = _node(c, raw, root)
    listen = _listen(c, raw, root)
    peers = _peers(c, raw, node.id, listen, root)
    backends = _backends(c, raw, root, required=not peers)
    stations = _stations(c, raw, listen, backends)
    admin = None
    if "admin" in raw:
        t = c.table(raw["admin"], "admin", {"host", "port", "allowed_hosts"})
        allowed_hosts = c.strings(t, "admin", "allowed_hosts", ())
        for name in allowed_hosts:
            # exact DNS names: a scheme, port, path, "*" or brackets would never match a Host
            if len(name) > 253 or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", name):
                c.fail("admin.allowed_hosts", f"{name!r} is not a host name: list exact names "
                       "without scheme, port or path, like \"ops.example.net\"")
        admin = AdminSection(
            host=c.string(t, "admin", "host", "127.0.0.1") or "127.0.0.1",
            port=c.integer(t, "admin", "port", 9090, 0, 65535),
            allowed_hosts=tuple(name.lower() for name in allowed_hosts),
        )
    policy = None
    if "policy" in raw:
        t = c.table(raw["policy"], "policy", {"file", "audit_log"})
        policy_file = c.path(t, "policy", "file", root, must_exist=True)
        if policy_file is None and "file" not in t:
            c.fail("policy.file", "is required: the policy file to enforce")
        audit = c.string(t, "policy", "audit_log")
        policy = PolicySection(
            file=policy_file or root / "policy.toml",
            audit_log=(root / audit) if audit else node.state_dir / "audit.jsonl",
        )
    trust = None
    if "trust" in raw:
        t = c.table(raw["trust"], "trust", {"nodes"})
        nodes = t.get("nodes", {})
        if not isinstance(nodes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in nodes.items()
        ):
            c.fail("trust.nodes", "must be a table of node id = \"key file or key id\"")
            nodes = {}
        resolved = []
        for node_id, key in nodes.items():
            if key.endswith(".pem"):
                path = root / key if not os.path.isabs(key) else Path(key)
                if not path.is_file():
                    c.fail("trust.nodes", f"{node_id}: file not found: {path}")
                key = str(path)
            resolved.append((node_id, key))
        trust = TrustSection(tuple(resolved))
    dns = _dns(c, raw)
    tunnels = _tunnels(c, raw, node.id)
    channels = _channels(c, raw, root)
    if c.problems:
        raise ConfigError(c.problems)
    return Config(node, listen, stations, backends, admin, Path(file), policy, peers, trust,
                  dns, tunnels, channels)


def _host_port(value: str) -> tuple[str, int] | None:
    """``host:port`` (an IPv6 address in brackets) split, or None if it is not one."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        return None
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif not re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", host):
        return None
    return host, int(port)


def _tunnels(c: _Checker, raw: dict[str, Any], node_id: str) -> tuple[TunnelEntry, ...]:
    items = c.tables(raw, "tunnels")
    out: list[TunnelEntry] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        base = f"tunnels[{i}]"
        t = c.table(item, base, {"name", "listen", "node", "target"})
        name = c.string(t, base, "name", required=True) or f"tunnel-{i}"
        if name in names:
            c.fail(f"{base}.name", f"duplicate tunnel name {name!r}")
        names.add(name)
        listen = _host_port(c.string(t, base, "listen", required=True) or "")
        if listen is None:
            c.fail(f"{base}.listen", "must be host:port, e.g. \"127.0.0.1:15020\"")
        node = c.string(t, base, "node", required=True) or ""
        if node and (node == node_id or node in RESERVED_IDS or len(node) > MAX_ID):
            c.fail(f"{base}.node", "must be another node's id")
        target = c.string(t, base, "target", required=True) or ""
        if target and (_host_port(target) or ("", 0))[1] == 0:
            c.fail(f"{base}.target", "must be host:port, e.g. \"192.168.7.50:502\"")
        host, port = listen or ("127.0.0.1", 0)
        out.append(TunnelEntry(name, host, port, node, target))
    return tuple(out)


def _channels(c: _Checker, raw: dict[str, Any], root: Path) -> ChannelsSection:
    if "channels" not in raw:
        return ChannelsSection()
    t = c.table(raw["channels"], "channels", {"allow_targets", "window_bytes",
                                              "idle_timeout_s", "connect_timeout_s",
                                              "max_channels", "files_dir"})
    targets = c.strings(t, "channels", "allow_targets", ())
    for target in targets:
        if (_host_port(target) or ("", 0))[1] == 0:
            c.fail("channels.allow_targets", f"{target!r} is not host:port")
    return ChannelsSection(
        allow_targets=tuple(targets),
        window_bytes=c.integer(t, "channels", "window_bytes", 256 * 1024, 4096, 16 * 2**20),
        idle_timeout_s=c.number(t, "channels", "idle_timeout_s", 300.0, 1.0, 86400.0),
        # below the opener's 15 s wait for the answer (docs/protocol.md section 10.1)
        connect_timeout_s=c.number(t, "channels", "connect_timeout_s", 10.0, 0.1, 10.0),
        max_channels=c.integer(t, "channels", "max_channels", 256, 1, 10_000),
        files_dir=c.path(t, "channels", "files_dir", root, must_exist=False),
    )


def _dns(c: _Checker, raw: dict[str, Any]) -> DnsSection:
    if "dns" not in raw:
        return DnsSection()
    t = c.table(raw["dns"], "dns", {"nameservers", "ttl_floor_s", "ttl_ceiling_s", "timeout_s"})
    servers = []
    for item in c.strings(t, "dns", "nameservers", ()):
        split = _host_port(item)
        if split is None or split[1] == 0:
            c.fail("dns.nameservers", f"{item!r} is not address:port")
            continue
        address, port = split
        try:
            ipaddress.ip_address(address)
        except ValueError:
            c.fail("dns.nameservers", f"{item!r}: a nameserver is given by IP address")
            continue
        servers.append((address, port))
    floor = c.number(t, "dns", "ttl_floor_s", 5.0, 0.0, 86400.0)
    ceiling = c.number(t, "dns", "ttl_ceiling_s", 3600.0, 0.0, 7 * 86400.0)
    if ceiling < floor:
        c.fail("dns.ttl_ceiling_s", "must not be below ttl_floor_s")
    return DnsSection(tuple(servers), floor, ceiling,
                      c.number(t, "dns", "timeout_s", 2.0, 0.1, 60.0))


def _target(c: _Checker, t: dict[str, Any], base: str,
            required: bool = True) -> tuple[str, str | None, str, str]:
    """(url, srv, scheme, path) of a backend or peer: a url, or an SRV name with scheme/path
    (or, when not ``required``, neither: url "")."""
    if "srv" in t and "url" in t:
        c.fail(f"{base}.srv", "give url or srv, not both")
    srv = c.string(t, base, "srv")
    scheme = c.string(t, base, "scheme", "ws") or "ws"
    path = c.string(t, base, "path", "/ocpp") or "/ocpp"
    if srv is not None:
        if not srv.startswith("_") or "." not in srv:
            c.fail(f"{base}.srv",
                   f"must be an SRV name such as _ocpp._tcp.example.com, not {srv!r}")
        if scheme not in ("ws", "wss"):
            c.fail(f"{base}.scheme", f"must be \"ws\" or \"wss\", not {scheme!r}")
        if not path.startswith("/"):
            c.fail(f"{base}.path", "must start with /")
        return "", srv.rstrip("."), scheme, path.rstrip("/") or "/"
    url = c.string(t, base, "url", required=required) or ""
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            c.fail(f"{base}.url", f"must be a ws:// or wss:// URL with a host, not {url!r}")
        elif parts.query or parts.fragment:
            c.fail(f"{base}.url", "must not carry a query or fragment")
    return url, None, scheme, path


_DIALING_KEYS = ("compression", "tls_ca", "tls_cert", "tls_key", "ping_interval_s",
                 "ping_timeout_s")


def _compression(c: _Checker, t: dict[str, Any], base: str) -> str:
    value = c.string(t, base, "compression", "deflate") or "deflate"
    if value not in COMPRESSIONS:
        c.fail(f"{base}.compression", f"must be \"deflate\" or \"none\", not {value!r}")
    return value


def _dialing(c: _Checker, t: dict[str, Any], base: str, root: Path, url: str,
             scheme: str) -> DialSettings:
    """A backend's or peer's ``compression``, ``tls_*`` and ``ping_*`` keys."""
    tls_ca = c.path(t, base, "tls_ca", root, must_exist=True)
    tls_cert = c.path(t, base, "tls_cert", root, must_exist=True)
    tls_key = c.path(t, base, "tls_key", root, must_exist=True)
    if ("tls_cert" in t) != ("tls_key" in t):
        c.fail(f"{base}.tls_cert", "tls_cert and tls_key go together: the node's client "
               "certificate chain and its private key")
    secure = urlsplit(url).scheme == "wss" if url else scheme == "wss"
    if not secure and any(k in t for k in ("tls_ca", "tls_cert", "tls_key")):
        c.fail(f"{base}.tls_ca", "TLS settings need a wss:// url (or scheme = \"wss\")")
    if (tls_cert is not None and tls_key is not None) or tls_ca is not None:
        _check_tls_files(c, base, tls_cert, tls_key, tls_ca)
    return DialSettings(
        compression=_compression(c, t, base),
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        ping_interval_s=_ping_interval(c, t, base, 60.0),
        ping_timeout_s=c.number(t, base, "ping_timeout_s", 30.0, 0.1, 3600.0),
    )


def _signed_messages(c: _Checker, t: dict[str, Any], base: str) -> str | None:
    value = c.string(t, base, "signed_messages")
    if value is not None and value not in ("keep", "unwrap"):
        c.fail(f"{base}.signed_messages", f"must be \"keep\" or \"unwrap\", not {value!r}")
    return value


def _ping_interval(c: _Checker, t: dict[str, Any], base: str, default: float) -> float:
    value = c.number(t, base, "ping_interval_s", default, 0.0, 86400.0)
    if 0 < value < 0.1:
        c.fail(f"{base}.ping_interval_s", "must be 0 (no pings) or at least 0.1 s")
    return value


def no_key_password() -> str:
    """The ``password`` callback of every ``load_cert_chain``: OpenSSL would prompt on the
    terminal for an encrypted key, stalling the node; refuse instead."""
    raise ValueError("the private key is encrypted: give the node an unencrypted key "
                     "file and protect it with file permissions")


def _check_tls_files(c: _Checker, base: str, cert: Path | None, key: Path | None,
                     ca: Path | None) -> None:
    """Load the PEM files as the node will, so a bad file is a config error naming its key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(str(cert), str(key), password=no_key_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            c.fail(f"{base}.tls_cert", f"cannot load {cert} and {key} as a certificate chain "
                   f"and its private key: {_ssl_reason(exc)}")
    if ca is not None:
        try:
            context.load_verify_locations(str(ca))
        except (ssl.SSLError, OSError, ValueError) as exc:
            c.fail(f"{base}.tls_ca", f"cannot load {ca} as PEM CA certificates: "
                   f"{_ssl_reason(exc)}")


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return str(reason or exc)


def _node(c: _Checker, raw: dict[str, Any], root: Path) -> NodeSection:
    if "node" not in raw:
        c.fail("node", "the [node] section is required (it holds at least id)")
        return NodeSection(id="node")
    allowed = {"id", "key", "state_dir", "call_timeout_s", "max_queued_calls",
               "connect_timeout_s", "shutdown_timeout_s", "failover_grace_s",
               "forwarding_loop"}
    t = c.table(raw["node"], "node", allowed)
    node_id = c.string(t, "node", "id", required=True) or "node"
    if not 1 <= len(node_id) <= MAX_ID:
        c.fail("node.id", f"must be 1-{MAX_ID} characters")
    return NodeSection(
        id=node_id,
        key=c.path(t, "node", "key", root, must_exist=True),
        state_dir=root / (c.string(t, "node", "state_dir", "state") or "state"),
        call_timeout_s=c.number(t, "node", "call_timeout_s", 30.0, 0.1, 3600.0),
        max_queued_calls=c.integer(t, "node", "max_queued_calls", 16, 0, 10_000),
        connect_timeout_s=c.number(t, "node", "connect_timeout_s", 10.0, 0.1, 600.0),
        shutdown_timeout_s=c.number(t, "node", "shutdown_timeout_s", 5.0, 0.0, 600.0),
        failover_grace_s=c.number(t, "node", "failover_grace_s", 5.0, 0.0, 600.0),
        forwarding_loop=c.boolean(t, "node", "forwarding_loop", True),
    )


def _listen(c: _Checker, raw: dict[str, Any], root: Path) -> ListenSection:
    allowed = {"host", "port", "path", "subprotocols", "security_profile", "tls_cert",
               "tls_key", "tls_ca", "max_message_bytes", "handshake_timeout_s",
               "max_handshakes", "max_auth_failures", "compression", "ping_interval_s",
               "ping_timeout_s"}
    t = c.table(raw.get("listen", {}), "listen", allowed)
    path = c.string(t, "listen", "path", "/ocpp") or "/ocpp"
    if not path.startswith("/"):
        c.fail("listen.path", "must start with /")
    subprotocols = c.strings(t, "listen", "subprotocols", SUBPROTOCOLS)
    for sp in subprotocols:
        if sp not in SUBPROTOCOLS:
            c.fail("listen.subprotocols", f"unknown subprotocol {sp!r} (known: "
                   + ", ".join(SUBPROTOCOLS) + ")")
    if not subprotocols:
        c.fail("listen.subprotocols", "must name at least one subprotocol")
    profile = c.integer(t, "listen", "security_profile", 1, 0, 3)
    tls_cert = c.path(t, "listen", "tls_cert", root, must_exist=True)
    tls_key = c.path(t, "listen", "tls_key", root, must_exist=True)
    tls_ca = c.path(t, "listen", "tls_ca", root, must_exist=True)
    if profile >= 2:
        for key, value in (("tls_cert", tls_cert), ("tls_key", tls_key)):
            if value is None:
                c.fail(f"listen.{key}", f"is required for security_profile {profile} (TLS)")
    if profile == 3 and tls_ca is None:
        c.fail("listen.tls_ca", "is required for security_profile 3 (client certificates)")
    if profile >= 2 and tls_cert is not None and tls_key is not None:
        _check_tls_files(c, "listen", tls_cert, tls_key, tls_ca if profile == 3 else None)
    return ListenSection(
        host=c.string(t, "listen", "host", "127.0.0.1") or "127.0.0.1",
        port=c.integer(t, "listen", "port", 9000, 0, 65535),
        path=path.rstrip("/") or "/",
        subprotocols=subprotocols,
        security_profile=profile,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        max_message_bytes=c.integer(t, "listen", "max_message_bytes", 65536, 1024, 64 * 2**20),
        handshake_timeout_s=c.number(t, "listen", "handshake_timeout_s", 10.0, 0.1, 600.0),
        max_handshakes=c.integer(t, "listen", "max_handshakes", 1024, 1, 1_000_000),
        max_auth_failures=c.integer(t, "listen", "max_auth_failures", 30, 1, 1_000_000),
        compression=_compression(c, t, "listen"),
        ping_interval_s=_ping_interval(c, t, "listen", 0.0),
        ping_timeout_s=c.number(t, "listen", "ping_timeout_s", 30.0, 0.1, 3600.0),
    )


def _peers(c: _Checker, raw: dict[str, Any], node_id: str,
           listen: ListenSection, root: Path) -> tuple[PeerEntry, ...]:
    items = c.tables(raw, "peers")
    out: list[PeerEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        base = f"peers[{i}]"
        t = c.table(item, base, {"id", "url", "srv", "scheme", "path", "encoding", "password",
                                 "password_hash", "nodes", *_DIALING_KEYS})
        peer_id = c.string(t, base, "id", required=True) or f"peer-{i}"
        if (not 1 <= len(peer_id) <= MAX_ID or peer_id == node_id
                or peer_id in RESERVED_IDS):
            c.fail(f"{base}.id", f"must be 1-{MAX_ID} characters, not this node's own id "
                   f"and not {' or '.join(RESERVED_IDS)}")
        if peer_id in seen:
            c.fail(f"{base}.id", f"duplicate peer id {peer_id!r}")
        seen.add(peer_id)
        url, srv, scheme, path = _target(c, t, base, required=False)
        encoding = c.string(t, base, "encoding", "json") or "json"
        if encoding not in ("json", "msgpack"):
            c.fail(f"{base}.encoding", f"must be \"json\" or \"msgpack\", not {encoding!r}")
        password = os.environ.get(peer_env_name(peer_id)) or c.string(t, base, "password")
        password_hash = c.string(t, base, "password_hash")
        if password_hash is not None:
            try:
                parse_hash(password_hash)
            except HashFormatError as exc:
                c.fail(f"{base}.password_hash",
                       f"{exc} (make one with ocpp-router hash-password)")
        elif not (url or srv) and listen.security_profile in (1, 2):
            c.fail(f"{base}.password_hash",
                   f"is required for an accept-only peer with security_profile "
                   f"{listen.security_profile} (the peer authenticates with Basic auth)")
        nodes = c.strings(t, base, "nodes", ())
        if nodes and srv is None:
            c.fail(f"{base}.nodes", "is for an srv entry: the nodes that may answer there")
        for other in nodes:
            if not 1 <= len(other) <= MAX_ID or other == node_id or other in RESERVED_IDS:
                c.fail(f"{base}.nodes", f"{other!r} cannot be a peer's node id")
        out.append(PeerEntry(peer_id, url, encoding, password, srv, scheme, path,
                             password_hash, nodes, _dialing(c, t, base, root, url, scheme)))
    return tuple(out)


def _backends(
    c: _Checker, raw: dict[str, Any], root: Path, required: bool = True
) -> tuple[BackendEntry, ...]:
    items = raw.get("backends", [])
    if not isinstance(items, list) or (required and not items):
        c.fail("backends", "at least one [[backends]] entry with role = \"primary\" is required"
               " (or [[peers]] for a chained node)")
        return ()
    allowed = {"name", "role", "url", "srv", "scheme", "path", "stations", "auth",
               "subscribe", "keep_signatures", "signed_messages", "allow_commands",
               "answer_timeout_s", "queue",
               "outbox_max_rows", "outbox_max_bytes", "outbox_max_age_s", *_DIALING_KEYS}
    out: list[BackendEntry] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        base = f"backends[{i}]"
        t = c.table(item, base, allowed)
        name = c.string(t, base, "name", required=True) or f"backend-{i}"
        if name in names:
            c.fail(f"{base}.name", f"duplicate backend name {name!r}")
        names.add(name)
        role = c.string(t, base, "role", "primary") or "primary"
        if role not in ("primary", "secondary"):
            c.fail(f"{base}.role", f"must be \"primary\" or \"secondary\", not {role!r}")
        url, srv, scheme, path = _target(c, t, base)
        out.append(BackendEntry(
            name=name,
            role=role,
            url=url,
            stations=c.strings(t, base, "stations", ("*",)),
            auth=_backend_auth(c, t, base, name),
            keep_signatures=c.boolean(t, base, "keep_signatures", False),
            signed_messages=_signed_messages(c, t, base),
            subscribe=c.strings(t, base, "subscribe", DEFAULT_SUBSCRIBE if role == "secondary"
                                else ()),
            allow_commands=c.boolean(t, base, "allow_commands", False),
            answer_timeout_s=c.number(t, base, "answer_timeout_s", 30.0, 0.1, 3600.0),
            queue=c.integer(t, base, "queue", 10_000, 1, 10_000_000),
            outbox_max_rows=c.integer(t, base, "outbox_max_rows", 1_000_000, 1, 10**9),
            outbox_max_bytes=c.integer(t, base, "outbox_max_bytes", 1 << 30, 1 << 20, 1 << 40),
            outbox_max_age_s=c.number(t, base, "outbox_max_age_s", 7 * 86400.0, 1.0, 1e9),
            srv=srv,
            scheme=scheme,
            path=path,
            dialing=_dialing(c, t, base, root, url, scheme),
        ))
        if role == "primary" and any(k in t for k in ("subscribe", "allow_commands")):
            c.fail(f"{base}.subscribe", "subscribe and allow_commands are for secondaries")
    outboxes: dict[str, str] = {}
    for i, b in enumerate(out):
        if b.role == "secondary":
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", b.name)
            if safe in outboxes:
                c.fail(f"backends[{i}].name", f"{b.name!r} and {outboxes[safe]!r} would share "
                       f"the outbox file outbox-{safe}.sqlite; rename one")
            outboxes[safe] = b.name
    if out and not any(b.role == "primary" for b in out):
        c.fail("backends", "no backend has role = \"primary\"")
    return tuple(out)


def _backend_auth(c: _Checker, t: dict[str, Any], base: str, name: str) -> BackendAuth:
    override = os.environ.get(env_name(name))
    if override is not None:
        return BackendAuth("password", override)
    value = t.get("auth", "passthrough")
    if value in ("passthrough", "none"):
        return BackendAuth(value)
    if isinstance(value, dict):
        sub = c.table(value, f"{base}.auth", {"password"})
        password = sub.get("password")
        if isinstance(password, str) and password:
            return BackendAuth("password", password)
        c.fail(f"{base}.auth", "a table auth needs password = \"...\"")
        return BackendAuth()
    c.fail(f"{base}.auth", "must be \"passthrough\", \"none\" or { password = \"...\" }")
    return BackendAuth()


def _stations(
    c: _Checker, raw: dict[str, Any], listen: ListenSection, backends: tuple[BackendEntry, ...]
) -> tuple[StationEntry, ...]:
    items = raw.get("stations", [])
    if not isinstance(items, list) or not items:
        c.fail("stations", "at least one [[stations]] entry is required, or no station can connect")
        return ()
    allowed = {"match", "password_hash", "primary", "keep_signatures", "signed_messages"}
    primaries = {b.name for b in backends if b.role == "primary"}
    out: list[StationEntry] = []
    for i, item in enumerate(items):
        base = f"stations[{i}]"
        t = c.table(item, base, allowed)
        match = c.string(t, base, "match", required=True) or ""
        password_hash = c.string(t, base, "password_hash")
        if password_hash is not None:
            try:
                parse_hash(password_hash)
            except HashFormatError as exc:
                c.fail(f"{base}.password_hash", f"{exc} (make one with ocpp-router hash-password)")
        elif listen.security_profile in (1, 2):
            c.fail(f"{base}.password_hash",
                   f"is required with security_profile {listen.security_profile} (Basic auth)")
        primary = c.string(t, base, "primary")
        if primary is not None and backends and primary not in primaries:
            c.fail(f"{base}.primary", f"no primary backend is named {primary!r}")
        out.append(StationEntry(
            match=match,
            password_hash=password_hash,
            primary=primary,
            keep_signatures=c.boolean(t, base, "keep_signatures", False),
            signed_messages=_signed_messages(c, t, base),
        ))
    return tuple(out)
