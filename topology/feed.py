"""Change feeds: which destinations' best routes changed, for each consumer to take."""

from __future__ import annotations

from collections.abc import Iterator


class ChangeFeed:
    """Destinations whose best route changed since the consumer last took them.

    Each exchange session owns one (see :meth:`topology.table.RouteTable.watch`), so a
    change made while handling one peer's message is seen by every other peer's session.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: set[str] = set()

    def take(self) -> set[str]:
        """Return the changed destinations and forget them."""
        taken, self._pending = self._pending, set()
        return taken

    def clear(self) -> None:
        """Forget pending changes (a full sync is about to cover them)."""
        self._pending.clear()

    def add(self, destination: str) -> None:
        """Record that the best route to ``destination`` changed."""
        self._pending.add(destination)

    def __len__(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __iter__(self) -> Iterator[str]:
        """The pending destinations, left pending."""
        return iter(self._pending)
