"""The validated config objects: frozen sections and entries, and the errors that name mistakes.

Nothing here reads files; :mod:`router.config.load` builds these from TOML.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from router.wire.frames import SUBPROTOCOLS

MAX_ID = 48
RESERVED_IDS = ("CSMS", "*")
"""Overlay destinations that are not node or station ids: the anycast backend, broadcast."""
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
    # plain-TCP station sessions are read by one forwarding loop (router/net/readloop.py);
    # False gives every session a task per link, as TLS and overlay sessions have
    forwarding_loop: bool = True


COMPRESSIONS = ("deflate", "none")
"""Values of ``compression``: RFC 7692 permessage-deflate when the other end agrees, or never."""


@dataclass(frozen=True, slots=True)
class DialSettings:
    """How the node dials a backend or a peer: compression, TLS toward it, keepalive.

    ``tls_ca`` is the PEM bundle that signs the server's certificate (None: the system's
    store); ``tls_cert`` and ``tls_key`` are the node's own client certificate chain and key
    (OCPP 2.1 Part 4 §6.5: a Local Controller has its own Charging Station certificate).
    A ping goes out after ``ping_interval_s`` without a byte from the far end (0: never);
    without a byte back within ``ping_timeout_s`` the link is dead.
    """

    compression: str = "deflate"
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ping_interval_s: float = 60.0
    ping_timeout_s: float = 30.0


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
    # connections between accept and a running session (TLS, upgrade, auth, backend dial);
    # past it a new connection gets 503 with Retry-After
    max_handshakes: int = 1024
    # failed authentications per remote address per minute before it gets 429 (no more
    # password checks); a station whose password was verified before still connects
    max_auth_failures: int = 30
    compression: str = "deflate"  # accept permessage-deflate when a station offers it
    # the node's own pings to stations (0: none; stations ping per WebSocketPingInterval)
    ping_interval_s: float = 0.0
    ping_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class StationEntry:
    """One ``[[stations]]`` entry: which identities may connect, and how they prove it."""

    match: str
    password_hash: str | None = None
    primary: str | None = None
    keep_signatures: bool = False
    signed_messages: str | None = None  # keep | unwrap; None: by subprotocol

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
    signed_messages: str | None = None  # keep | unwrap; None: by subprotocol
    # secondaries only
    subscribe: tuple[str, ...] = ()
    allow_commands: bool = False
    answer_timeout_s: float = 30.0
    queue: int = 10_000
    outbox_max_rows: int = 1_000_000
    outbox_max_bytes: int = 1 << 30
    outbox_max_age_s: float = 7 * 86400.0
    srv: str | None = None  # an SRV name instead of url, with scheme and path
    scheme: str = "ws"
    path: str = "/ocpp"
    dialing: DialSettings = field(default_factory=DialSettings)

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
    # host names (lowercase, no port) a request's Host may carry besides IP literals and
    # localhost: anything else is a DNS-rebinding page or a misdirected request
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One ``[[peers]]`` entry: a node that may hold an overlay link with this one.

    With ``url`` or ``srv`` this node dials it; with neither the entry is *accept-only*
    (the peer dials us). Either way a peer that dials us authenticates on its entry
    (``password_hash`` under security profiles 1-2, its certificate's CN under 3).
    """

    id: str
    url: str  # "" when srv is used, or for an accept-only entry
    encoding: str = "json"  # json | msgpack
    password: str | None = None  # ours, sent when we dial this peer
    srv: str | None = None
    scheme: str = "ws"
    path: str = "/ocpp"
    password_hash: str | None = None  # the peer's, checked when it dials us
    # node ids that may answer at this entry's targets (several nodes behind one SRV
    # name name themselves with X-OCPP-NodeId); by default only ``id``
    nodes: tuple[str, ...] = ()
    dialing: DialSettings = field(default_factory=DialSettings)

    @property
    def dialled(self) -> bool:
        """Whether this node dials the peer (an entry without url or srv only accepts)."""
        return bool(self.url or self.srv)

    def answers_as(self, node_id: str) -> bool:
        """Whether a node reached through this entry may call itself ``node_id``."""
        return node_id == self.id or node_id in self.nodes


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
class TunnelEntry:
    """One ``[[tunnels]]`` entry: a local TCP listener whose connections become channels
    to ``target`` behind the node ``node`` (router/channels/)."""

    name: str
    host: str
    port: int
    node: str
    target: str  # host:port, as the far node's allow_targets lists it


@dataclass(frozen=True, slots=True)
class ChannelsSection:
    """``[channels]``: what this node dials for other nodes' channels, and their limits."""

    allow_targets: tuple[str, ...] = ()  # nothing is dialled unless listed
    window_bytes: int = 256 * 1024
    idle_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    max_channels: int = 256
    # files other nodes may fetch from here, and where files this node fetches land
    files_dir: Path | None = None


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
    tunnels: tuple[TunnelEntry, ...] = ()
    channels: ChannelsSection = field(default_factory=ChannelsSection)

    def station_entry(self, identity: str) -> StationEntry | None:
        """The first ``[[stations]]`` entry whose glob matches, or None."""
        for entry in self.stations:
            if entry.matches(identity):
                return entry
        return None

    def backend_entry(self, name: str) -> BackendEntry | None:
        """The ``[[backends]]`` entry of this name, or None."""
        return next((b for b in self.backends if b.name == name), None)

    def peer_entry(self, node_id: str) -> PeerEntry | None:
        """The ``[[peers]]`` entry of a node id (its ``id``), or None: not a peer."""
        for entry in self.peers:
            if entry.id == node_id:
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


SIGNED_MESSAGES = ("keep", "unwrap")


def unwraps_signed(setting: str | None, subprotocol: str) -> bool:
    """Whether a peer gets OCPP 2.1 Signed Messages (``<Action>-Signed``, a JWS payload) as
    the plain action and payload. By default only OCPP 1.6 peers do: Signed Messages are
    chapter 7 of Part 4 in 2.0.1 and 2.1; 1.6 has no such chapter."""
    if setting is not None:
        return setting == "unwrap"
    return subprotocol == "ocpp1.6"


def env_name(backend_name: str) -> str:
    """The environment variable that overrides a backend's password."""
    return "OCPP_ROUTER_BACKEND_" + re.sub(r"[^A-Za-z0-9]", "_", backend_name).upper() + "_PASSWORD"




def peer_env_name(peer_id: str) -> str:
    """The environment variable that overrides a peer's password."""
    return "OCPP_ROUTER_PEER_" + re.sub(r"[^A-Za-z0-9]", "_", peer_id).upper() + "_PASSWORD"

