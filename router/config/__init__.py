"""The node's TOML config: validated in full and turned into frozen objects.

Validation collects every mistake rather than stopping at the first, and each one names
the file, the key (``backends[2].url``), the line and the problem, so an operator fixes
a config in one pass. Relative paths are resolved against the config file's directory.
"""

from router.config.load import load, parse
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
    unwraps_signed,
)

__all__ = [
    "COMPRESSIONS", "DEFAULT_SUBSCRIBE", "MAX_ID", "RESERVED_IDS", "AdminSection",
    "BackendAuth", "BackendEntry", "ChannelsSection", "Config", "ConfigError",
    "ConfigProblem", "DialSettings", "DnsSection", "ListenSection", "NodeSection", "PeerEntry",
    "PolicySection", "StationEntry",
    "TrustSection", "TunnelEntry", "env_name", "load", "parse", "peer_env_name", "unwraps_signed",
]
