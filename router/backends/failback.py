"""Failback: idle station links move back to a better SRV target once one accepts again."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from router.backends.dialer import BackendDialer
from router.net.handshake import DialFailed
from router.relay.failover import FailoverLink
from router.relay.registry import SessionRegistry

log = logging.getLogger("router.failback")


async def fail_back(sessions: SessionRegistry, dialer: BackendDialer, period_s: float) -> None:
    """Every ``period_s``, offer each idle SRV-backed link of a station (connected here,
    or attached over the overlay from another node) the best priority its backend's SRV
    name has now; runs until cancelled."""
    while True:
        await trio.sleep(period_s)
        best: dict[str, int] = {}
        gave_up: set[str] = set()
        for session in sessions.all():
            link = session.backend.ws
            if (not isinstance(link, FailoverLink) or link.moving or session.done.is_set()
                    or not session.idle()):
                continue
            name = link.backend.name
            if name in gave_up:
                continue
            if name not in best:
                try:
                    targets = await dialer.targets(link.backend, "-")
                except DialFailed:
                    gave_up.add(name)
                    continue
                best[name] = min(priority for priority, _ in targets)
            if link.priority > best[name] and not await _move(link, session.idle):
                gave_up.add(name)  # the better target does not answer yet


async def _move(link: FailoverLink, idle: Callable[[], bool]) -> bool:
    """One link's failback. This task runs in the node's own nursery, where an exception
    would end the node and every station's session with it: a failure here is logged and
    counts as a target that did not answer."""
    try:
        return await link.move_to_better(idle)
    except Exception:
        log.exception("failback of %s failed", link.identity)
        return False
