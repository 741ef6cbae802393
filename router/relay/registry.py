"""The one registry of the station sessions a node holds.

A session is *local* when its station is connected to this node, and *held* when its
station is connected to another node of the overlay and this node holds the station's
backend link. The listener, the overlay, duplication (a secondary's command for a
station) and the admin endpoint all look sessions up here.
"""

from __future__ import annotations

import trio

from router.relay.session import StationSession


class SessionRegistry:
    """Station sessions by identity, local and held, registered while they run."""

    def __init__(self) -> None:
        self.local: dict[str, StationSession] = {}
        self.held: dict[str, StationSession] = {}
        self.started = 0  # sessions ever added: how much the population has churned

    def __len__(self) -> int:
        return len(self.local) + len(self.held)

    def get(self, station: str) -> StationSession | None:
        """The station's session, wherever the station is connected."""
        session = self.local.get(station)
        return session if session is not None else self.held.get(station)

    def all(self) -> list[StationSession]:
        """Every session, local ones first (a copy: safe to iterate across awaits)."""
        return [*self.local.values(), *self.held.values()]

    def add(self, session: StationSession, *, held: bool = False) -> None:
        """Register a session that is about to run (it replaces any older one's entry)."""
        (self.held if held else self.local)[session.identity] = session
        self.started += 1

    def ended(self, session: StationSession, *, held: bool = False) -> None:
        """A session has finished running: forget it (if still its entry), set ``done``.

        ``add`` and ``ended`` around ``session.run()`` rather than a ``run`` here: a
        coroutine frame fewer held for every connected station."""
        table = self.held if held else self.local
        if table.get(session.identity) is session:
            del table[session.identity]
        session.done.set()

    async def stop(self, station: str, why: str, timeout_s: float, *,
                   held: bool = False) -> bool:
        """End the station's session (a newer one replaces it) and wait for it to finish;
        False if there was none."""
        session = (self.held if held else self.local).get(station)
        if session is None:
            return False
        session.stop(why)
        with trio.move_on_after(timeout_s):
            await session.done.wait()
        return True

    async def stop_all(self, why: str, timeout_s: float, *, held: bool) -> None:
        """End every local (or every held) session and wait, up to ``timeout_s``, for all."""
        sessions = list((self.held if held else self.local).values())
        for session in sessions:
            session.stop(why)
        with trio.move_on_after(timeout_s):
            for session in sessions:
                await session.done.wait()
