"""What the admin endpoint reads of a node: a read-only view, satisfied by the Node."""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from router.backends.duplication import Duplicator
from router.channels.service import ChannelService
from router.config import Config
from router.gcwatch import GcWatch
from router.net.dns import DnsCache
from router.overlay.mesh import Overlay
from router.relay.gate import Gate
from router.relay.registry import SessionRegistry
from router.stats import Stats


def shown_url(url: str | None) -> str | None:
    """A configured URL as the admin endpoint shows it: without a user name and password
    (``ws://user:secret@host`` is a working way to give a backend's credentials)."""
    if not url:
        return None
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


PEER_STATES = {"up": "open", "down": "syncing", "expired": "expired"}
"""A peer link's route-exchange state, as the operator is shown it."""


class NodeView(Protocol):
    """The parts of a node the admin endpoint reads (and, for ``POST /reload``, calls)."""

    @property
    def config(self) -> Config: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def sessions(self) -> SessionRegistry: ...

    @property
    def overlay(self) -> Overlay: ...

    @property
    def duplicator(self) -> Duplicator: ...

    @property
    def channels(self) -> ChannelService: ...

    @property
    def dns(self) -> DnsCache: ...

    @property
    def gc(self) -> GcWatch: ...

    def listener_problem(self) -> str | None:
        """Why stations cannot connect now, or None."""
        ...
