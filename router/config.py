"""The node's TOML config: parsed, validated in full, and turned into frozen objects.

Validation collects every mistake rather than stopping at the first, and each one names
the file, the key (``backends[2].url``), the line and the problem, so an operator fixes
a config in one pass. Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router.frames import SUBPROTOCOLS
from router.passwords import HashFormatError, parse_hash

MAX_ID = 48
DEFAULT_SUBSCRIBE = ("BootNotification", "StatusNotification", "MeterValues", "TransactionEvent")


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake in a config file."""

    file: str
    key: str
    line: int | None
    problem: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` lists every mistake found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class NodeSection:
    """``[node]``: identity, state and the timers every link uses."""

    id: str
    key: Path | None = None
    state_dir: Path = Path("state")
    call_timeout_s: float = 30.0
    max_queued_calls: int = 16
    connect_timeout_s: float = 10.0
    shutdown_timeout_s: float = 5.0
    failover_grace_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ListenSection:
    """``[listen]``: the WebSocket server stations connect to."""

    host: str = "127.0.0.1"
    port: int = 9000
    path: str = "/ocpp"
    subprotocols: tuple[str, ...] = SUBPROTOCOLS
    security_profile: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    max_message_bytes: int = 65536
    handshake_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class StationEntry:
    """One ``[[stations]]`` entry: which identities may connect, and how they prove it."""

    match: str
    password_hash: str | None = None
    primary: str | None = None
    keep_signatures: bool = False

    def matches(self, identity: str) -> bool:
        return fnmatch.fnmatchcase(identity, self.match)


@dataclass(frozen=True, slots=True)
class BackendAuth:
    """How the node authenticates a station's backend link."""

    mode: str = "passthrough"  # passthrough | none | password
    password: str | None = None


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """One ``[[backends]]`` entry."""

    name: str
    role: str
    url: str  # "" when srv is used
    stations: tuple[str, ...] = ("*",)
    auth: BackendAuth = field(default_factory=BackendAuth)
    keep_signatures: bool = False
    # secondaries only
    subscribe: tuple[str, ...] = ()
    allow_commands: bool = False
    answer_timeout_s: float = 30.0
    queue: int = 10_000
    outbox_max_rows: int = 1_000_000
    outbox_max_age_s: float = 7 * 86400.0
    srv: str | None = None  # an SRV name instead of url, with scheme and path
    scheme: str = "ws"
    path: str = "/ocpp"

    def subscribes(self, action: str) -> bool:
        return any(fnmatch.fnmatchcase(action, pattern) for pattern in self.subscribe)

    def serves(self, identity: str) -> bool:
        return any(fnmatch.fnmatchcase(identity, pattern) for pattern in self.stations)

    def station_url(self, identity_quoted: str) -> str:
        return f"{self.url.rstrip('/')}/{identity_quoted}"


@dataclass(frozen=True, slots=True)
class AdminSection:
    """``[admin]``: the operator's HTTP endpoint."""

    host: str = "127.0.0.1"
    port: int = 9090


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One ``[[peers]]`` entry: an overlay uplink this node dials."""

    id: str
    url: str  # "" when srv is used
    encoding: str = "json"  # json | msgpack
    password: str | None = None
    srv: str | None = None
    scheme: str = "ws"
    path: str = "/ocpp"


@dataclass(frozen=True, slots=True)
class DnsSection:
    """``[dns]``: where SRV names are resolved, and how long answers are kept."""

    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system's resolver config
    ttl_floor_s: float = 5.0
    ttl_ceiling_s: float = 3600.0
    timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class TrustSection:
    """``[trust]``: node ids and the public keys (PEM file or base64 key id) they sign with."""

    nodes: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class PolicySection:
    """``[policy]``: the firewall's policy file and where its decisions are audited."""

    file: Path
    audit_log: Path


@dataclass(frozen=True, slots=True)
class Config:
    """A validated node configuration."""

    node: NodeSection
    listen: ListenSection
    stations: tuple[StationEntry, ...]
    backends: tuple[BackendEntry, ...]
    admin: AdminSection | None = None
    source: Path | None = None
    policy: PolicySection | None = None
    peers: tuple[PeerEntry, ...] = ()
    trust: TrustSection | None = None
    dns: DnsSection = field(default_factory=DnsSection)

    def station_entry(self, identity: str) -> StationEntry | None:
        """The first ``[[stations]]`` entry whose glob matches, or None."""
        for entry in self.stations:
            if entry.matches(identity):
                return entry
        return None

    def primary_for(self, identity: str, entry: StationEntry) -> BackendEntry | None:
        """The station's primary backend: named by its entry, else the first that serves it."""
        for backend in self.backends:
            if backend.role != "primary":
                continue
            if entry.primary is not None:
                if backend.name == entry.primary:
                    return backend
            elif backend.serves(identity):
                return backend
        return None


def env_name(backend_name: str) -> str:
    """The environment variable that overrides a backend's password."""
    return "OCPP_ROUTER_BACKEND_" + re.sub(r"[^A-Za-z0-9]", "_", backend_name).upper() + "_PASSWORD"


# --- locating keys in the source text, so errors can name a line ------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEYLINE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _find_line(text: str, key: str) -> int | None:
    """Best-effort line of ``table.key`` or ``array[i].key`` in the TOML source."""
    m = re.fullmatch(r"([A-Za-z0-9_-]+)(?:\[(\d+)\])?(?:\.([A-Za-z0-9_-]+))?.*", key)
    if not m:
        return None
    table, index, leaf = m.group(1), m.group(2), m.group(3)
    want = int(index) if index is not None else 0
    seen: dict[str, int] = {}
    inside = False
    header_line = None
    for number, raw in enumerate(text.splitlines(), start=1):
        h = _HEADER.match(raw)
        if h:
            name = h.group(2)
            count = seen.get(name, -1) + 1
            seen[name] = count
            inside = name == table and (h.group(1) == "[" or count == want)
            if inside:
                header_line = number
            continue
        if inside and leaf:
            k = _KEYLINE.match(raw)
            if k and k.group(1) == leaf:
                return number
    if header_line is None and leaf is None:
        # a top-level key such as ``default``
        for number, raw in enumerate(text.splitlines(), start=1):
            if _HEADER.match(raw):
                break
            k = _KEYLINE.match(raw)
            if k and k.group(1) == table:
                return number
    return header_line


class _Checker:
    """Collects problems while reading values out of the parsed TOML."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text
        self.problems: list[ConfigProblem] = []

    def fail(self, key: str, problem: str) -> None:
        self.problems.append(ConfigProblem(self.file, key, _find_line(self.text, key), problem))

    def table(self, raw: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(key, "must be a table")
            return {}
        for name in raw:
            if name not in allowed:
                self.fail(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(allowed))})")
        return raw

    def string(
        self, t: dict[str, Any], base: str, name: str, default: str | None = None,
        required: bool = False,
    ) -> str | None:
        value = t.get(name, default)
        if value is None:
            if required:
                self.fail(f"{base}.{name}", "is required")
            return None
        if not isinstance(value, str):
            self.fail(f"{base}.{name}", f"must be a string, not {type(value).__name__}")
            return default
        return value

    def integer(
        self, t: dict[str, Any], base: str, name: str, default: int, lo: int, hi: int
    ) -> int:
        value = t.get(name, default)
        if type(value) is not int:
            self.fail(f"{base}.{name}", f"must be an integer, not {type(value).__name__}")
            return default
        if not lo <= value <= hi:
            self.fail(f"{base}.{name}", f"must be between {lo} and {hi}, not {value}")
            return default
        return value

    def number(
        self, t: dict[str, Any], base: str, name: str, default: float, lo: float, hi: float
    ) -> float:
        value = t.get(name, default)
        if type(value) not in (int, float):
            self.fail(f"{base}.{name}", f"must be a number, not {type(value).__name__}")
            return default
        if not lo <= value <= hi:
            self.fail(f"{base}.{name}", f"must be between {lo} and {hi}, not {value}")
            return default
        return float(value)

    def boolean(self, t: dict[str, Any], base: str, name: str, default: bool) -> bool:
        value = t.get(name, default)
        if type(value) is not bool:
            self.fail(f"{base}.{name}", f"must be true or false, not {type(value).__name__}")
            return default
        return value

    def strings(
        self, t: dict[str, Any], base: str, name: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        value = t.get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(f"{base}.{name}", "must be a list of non-empty strings")
            return default
        return tuple(value)

    def path(
        self, t: dict[str, Any], base: str, name: str, root: Path, must_exist: bool
    ) -> Path | None:
        value = self.string(t, base, name)
        if value is None:
            return None
        resolved = (root / value) if not os.path.isabs(value) else Path(value)
        if must_exist and not resolved.is_file():
            self.fail(f"{base}.{name}", f"file not found: {resolved}")
        return resolved


_NOT_YET: dict[str, str] = {}


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
             "dns"}
    for name in raw:
        if name in _NOT_YET:
            c.fail(name, _NOT_YET[name])
        elif name not in known:
            c.fail(name, f"unknown section (known: {', '.join(sorted(known))})")

    node = _node(c, raw, root)
    listen = _listen(c, raw, root)
    peers = _peers(c, raw, node.id)
    backends = _backends(c, raw, required=not peers)
    stations = _stations(c, raw, listen, backends)
    admin = None
    if "admin" in raw:
        t = c.table(raw["admin"], "admin", {"host", "port"})
        admin = AdminSection(
            host=c.string(t, "admin", "host", "127.0.0.1") or "127.0.0.1",
            port=c.integer(t, "admin", "port", 9090, 0, 65535),
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
    if c.problems:
        raise ConfigError(c.problems)
    return Config(node, listen, stations, backends, admin, Path(file), policy, peers, trust,
                  dns)


def _dns(c: _Checker, raw: dict[str, Any]) -> DnsSection:
    if "dns" not in raw:
        return DnsSection()
    t = c.table(raw["dns"], "dns", {"nameservers", "ttl_floor_s", "ttl_ceiling_s", "timeout_s"})
    servers = []
    for item in c.strings(t, "dns", "nameservers", ()):
        host, sep, port = item.rpartition(":")
        address = host.strip("[]")
        if not sep or not address or not port.isdigit() or not 0 < int(port) < 65536:
            c.fail("dns.nameservers", f"{item!r} is not address:port")
            continue
        try:
            ipaddress.ip_address(address)
        except ValueError:
            c.fail("dns.nameservers", f"{item!r}: a nameserver is given by IP address")
            continue
        servers.append((address, int(port)))
    floor = c.number(t, "dns", "ttl_floor_s", 5.0, 0.0, 86400.0)
    ceiling = c.number(t, "dns", "ttl_ceiling_s", 3600.0, 0.0, 7 * 86400.0)
    if ceiling < floor:
        c.fail("dns.ttl_ceiling_s", "must not be below ttl_floor_s")
    return DnsSection(tuple(servers), floor, ceiling,
                      c.number(t, "dns", "timeout_s", 2.0, 0.1, 60.0))


def _target(c: _Checker, t: dict[str, Any], base: str) -> tuple[str, str | None, str, str]:
    """(url, srv, scheme, path) of a backend or peer: a url, or an SRV name with scheme/path."""
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
    url = c.string(t, base, "url", required=True) or ""
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            c.fail(f"{base}.url", f"must be a ws:// or wss:// URL with a host, not {url!r}")
        elif parts.query or parts.fragment:
            c.fail(f"{base}.url", "must not carry a query or fragment")
    return url, None, scheme, path


def _node(c: _Checker, raw: dict[str, Any], root: Path) -> NodeSection:
    if "node" not in raw:
        c.fail("node", "the [node] section is required (it holds at least id)")
        return NodeSection(id="node")
    allowed = {"id", "key", "state_dir", "call_timeout_s", "max_queued_calls",
               "connect_timeout_s", "shutdown_timeout_s", "failover_grace_s"}
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
    )


def _listen(c: _Checker, raw: dict[str, Any], root: Path) -> ListenSection:
    allowed = {"host", "port", "path", "subprotocols", "security_profile", "tls_cert",
               "tls_key", "tls_ca", "max_message_bytes", "handshake_timeout_s"}
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
    )


def peer_env_name(peer_id: str) -> str:
    """The environment variable that overrides a peer's password."""
    return "OCPP_ROUTER_PEER_" + re.sub(r"[^A-Za-z0-9]", "_", peer_id).upper() + "_PASSWORD"


def _peers(c: _Checker, raw: dict[str, Any], node_id: str) -> tuple[PeerEntry, ...]:
    items = raw.get("peers", [])
    if not isinstance(items, list):
        c.fail("peers", "must be an array of tables ([[peers]])")
        return ()
    out: list[PeerEntry] = []
    for i, item in enumerate(items):
        base = f"peers[{i}]"
        t = c.table(item, base, {"id", "url", "srv", "scheme", "path", "encoding", "password"})
        peer_id = c.string(t, base, "id", required=True) or f"peer-{i}"
        if not 1 <= len(peer_id) <= MAX_ID or peer_id == node_id:
            c.fail(f"{base}.id", f"must be 1-{MAX_ID} characters and not this node's own id")
        url, srv, scheme, path = _target(c, t, base)
        encoding = c.string(t, base, "encoding", "json") or "json"
        if encoding not in ("json", "msgpack"):
            c.fail(f"{base}.encoding", f"must be \"json\" or \"msgpack\", not {encoding!r}")
        password = os.environ.get(peer_env_name(peer_id)) or c.string(t, base, "password")
        out.append(PeerEntry(peer_id, url, encoding, password, srv, scheme, path))
    return tuple(out)


def _backends(
    c: _Checker, raw: dict[str, Any], required: bool = True
) -> tuple[BackendEntry, ...]:
    items = raw.get("backends", [])
    if not isinstance(items, list) or (required and not items):
        c.fail("backends", "at least one [[backends]] entry with role = \"primary\" is required"
               " (or [[peers]] for a chained node)")
        return ()
    allowed = {"name", "role", "url", "srv", "scheme", "path", "stations", "auth",
               "subscribe", "keep_signatures", "allow_commands", "answer_timeout_s", "queue",
               "outbox_max_rows", "outbox_max_age_s"}
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
            subscribe=c.strings(t, base, "subscribe", DEFAULT_SUBSCRIBE if role == "secondary"
                                else ()),
            allow_commands=c.boolean(t, base, "allow_commands", False),
            answer_timeout_s=c.number(t, base, "answer_timeout_s", 30.0, 0.1, 3600.0),
            queue=c.integer(t, base, "queue", 10_000, 1, 10_000_000),
            outbox_max_rows=c.integer(t, base, "outbox_max_rows", 1_000_000, 1, 10**9),
            outbox_max_age_s=c.number(t, base, "outbox_max_age_s", 7 * 86400.0, 1.0, 1e9),
            srv=srv,
            scheme=scheme,
            path=path,
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
    allowed = {"match", "password_hash", "primary", "keep_signatures"}
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
        ))
    return tuple(out)
