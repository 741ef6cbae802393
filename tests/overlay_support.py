"""Helpers for the overlay end-to-end tests: configs, keys, log waits and stations that reconnect.

* :func:`overlay_config` writes the TOML of one overlay node (an edge with ``[[peers]]``
  and no backends, or a core with the CSMS as primary backend and accept-only
  ``[[peers]]`` for the nodes that dial it), security profile 0, ``[[stations]]
  match = "*"``.
* :func:`write_node_key` makes a signing key and writes its private and public PEMs.
* :func:`wait_log` / :func:`count_events` read a node's JSON log lines (conditions, no sleeps).
* :class:`ReconnectingStation` is an ``ocpp`` station that, like a real one, dials again
  with a short back-off (bounded attempts) whenever its link is closed, and records what
  every CALL it made came to (:class:`CallOutcome`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocpp.exceptions import OCPPError
from ocpp.routing import on
from ocpp.v16 import call_result as result16
from ocpp.v201 import call_result as result201
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from policies import SigningKey
from tests.nodeproc import NodeProcess
from tests.peers.ocpp_station import VERSION_SUBPROTOCOL, Station16, Station201

DEFAULT_SUBPROTOCOLS = ("ocpp2.1", "ocpp2.0.1", "ocpp1.6")


# --- configs ---------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


@dataclass(frozen=True)
class PeerLink:
    """One ``[[peers]]`` entry: the node dials ``<url>/<own id>`` and expects ``id`` there."""

    id: str
    url: str
    encoding: str = "json"
    password: str | None = None

    @classmethod
    def to(cls, node: NodeProcess, node_id: str, encoding: str = "json") -> PeerLink:
        """An uplink to a running node (its listener base URL, without an identity)."""
        return cls(node_id, f"{node.scheme}://127.0.0.1:{node.port}{node.path}", encoding)


def overlay_config(
    node_id: str,
    *,
    backend_url: str | None = None,
    peers: Sequence[PeerLink] = (),
    trust: Mapping[str, str | Path] | None = None,
    key: Path | None = None,
    call_timeout_s: float = 30,
    subprotocols: Sequence[str] = DEFAULT_SUBPROTOCOLS,
    stations: Sequence[Mapping[str, object]] = ({"match": "*"},),
    accept: Sequence[str] = (),
) -> str:
    """Config text of one overlay node, security profile 0, kernel-chosen port; ``accept``
    lists the node ids that may dial it (accept-only ``[[peers]]`` entries)."""
    lines = ["[node]", f"id = {_toml(node_id)}", f"call_timeout_s = {_toml(call_timeout_s)}"]
    if key is not None:
        lines.append(f"key = {_toml(str(key))}")
    lines += [
        "",
        "[listen]",
        'host = "127.0.0.1"',
        "port = 0",
        'path = "/ocpp"',
        f"subprotocols = {_toml(list(subprotocols))}",
        "security_profile = 0",
    ]
    for station in stations:
        lines += ["", "[[stations]]"]
        lines += [f"{k} = {_toml(v)}" for k, v in station.items()]
    if backend_url is not None:
        lines += ["", "[[backends]]", 'name = "csms"', 'role = "primary"',
                  f"url = {_toml(backend_url)}", 'auth = "passthrough"']
    for peer in peers:
        lines += ["", "[[peers]]", f"id = {_toml(peer.id)}", f"url = {_toml(peer.url)}",
                  f"encoding = {_toml(peer.encoding)}"]
        if peer.password is not None:
            lines.append(f"password = {_toml(peer.password)}")
    for node_id_ in accept:
        lines += ["", "[[peers]]", f"id = {_toml(node_id_)}"]
    if trust is not None:
        lines += ["", "[trust]", f"nodes = {_toml({k: str(v) for k, v in trust.items()})}"]
    return "\n".join(lines) + "\n"


def write_node_key(directory: Path, node_id: str, algorithm: str = "ed25519") -> tuple[
    SigningKey, Path, Path
]:
    """A fresh signing key for ``node_id``: (key, private PEM path, public PEM path)."""
    key = SigningKey.generate(algorithm)
    private = directory / f"{node_id}.key.pem"
    public = directory / f"{node_id}.pub.pem"
    private.write_bytes(key.private_pem())
    public.write_bytes(key.public_pem())
    return key, private, public


# --- node logs -------------------------------------------------------------------------


def _matches(line: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    return all(line.get(k) == v for k, v in fields.items())


def count_events(node: NodeProcess, name: str, **fields: Any) -> int:
    """How many log lines ``name`` (with these field values) the node wrote so far."""
    return sum(1 for line in node.events(name) if _matches(line, fields))


def wait_log(
    node: NodeProcess,
    name: str,
    predicate: Callable[[dict[str, Any]], bool] = lambda _line: True,
    *,
    timeout: float = 10.0,
    count: int = 1,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Block until ``count`` log lines ``name`` match ``fields`` and ``predicate``; return them.

    Waits on the node's log condition (no sleeping); on timeout the error shows the
    node's last stderr lines.
    """
    deadline = time.monotonic() + timeout
    cond = node._cond
    with cond:
        while True:
            found = [line for line in node.logs
                     if line.get("event") == name and _matches(line, fields) and predicate(line)]
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or node.proc.poll() is not None:
                raise TimeoutError(
                    f"{len(found)}/{count} {name!r} log lines {fields or ''}; stderr:\n"
                    + "".join(node.raw_stderr[-40:]))
            cond.wait(min(left, 0.2))


async def await_log(
    node: NodeProcess,
    name: str,
    predicate: Callable[[dict[str, Any]], bool] = lambda _line: True,
    *,
    timeout: float = 10.0,
    count: int = 1,
    **fields: Any,
) -> list[dict[str, Any]]:
    """:func:`wait_log` for asyncio code (runs the blocking wait in a thread)."""
    return await asyncio.to_thread(wait_log, node, name, predicate, timeout=timeout,
                                   count=count, **fields)


def routes_to(destination: str) -> Callable[[dict[str, Any]], bool]:
    """Predicate for ``routes_changed`` lines that name ``destination``."""
    return lambda line: destination in (line.get("destinations") or [])


def stderr_tail(node: NodeProcess, lines: int = 30) -> str:
    """The node's last stderr lines, for assertion messages."""
    return "".join(node.raw_stderr[-lines:])


# --- stations that reconnect -----------------------------------------------------------


@dataclass
class CallOutcome:
    """What one station CALL came to: ``kind`` is result, callerror, timeout or closed."""

    action: str
    kind: str
    generation: int
    detail: str = ""
    result: Any = None

    @property
    def answered(self) -> bool:
        """An answer or a CALLERROR reached the station (the call was not lost)."""
        return self.kind in ("result", "callerror")


class _Held:
    """Makes a station sit on a CSMS Reset until released (to keep a command in flight)."""

    hold_reset: asyncio.Event | None = None
    reset_arrived: asyncio.Event

    async def _maybe_hold(self) -> None:
        self.reset_arrived.set()
        if self.hold_reset is not None:
            await self.hold_reset.wait()


class _HeldStation16(_Held, Station16):
    @on("Reset")
    async def on_reset_16(self, **fields: Any) -> result16.Reset:  # type: ignore[override]
        self._record("Reset", fields)
        await self._maybe_hold()
        return result16.Reset(status=self.reset_status)


class _HeldStation201(_Held, Station201):
    @on("Reset")
    async def on_reset_201(self, **fields: Any) -> result201.Reset:  # type: ignore[override]
        self._record("Reset", fields)
        await self._maybe_hold()
        return result201.Reset(status=self.reset_status)


_STATION_CLASSES: dict[str, type[_HeldStation16] | type[_HeldStation201]] = {
    "1.6": _HeldStation16,
    "2.0.1": _HeldStation201,
}


class GaveUp(Exception):
    """The station could not connect within its bounded attempts."""


@dataclass
class ReconnectingStation:
    """An ``ocpp`` station that reconnects like a real one whenever its link closes.

    Use as ``async with ReconnectingStation(url, "1.6") as st``: entering waits for the
    first connection. ``generation`` counts successful connections; ``closes`` holds the
    close code of every link that ended; ``outcomes`` every CALL made through
    :meth:`call`. Reconnect back-off: ``backoff_s`` doubling up to ``max_backoff_s``, at
    most ``attempts`` failed dials in a row, then the station gives up (``gave_up``).
    """

    url: str
    version: str = "1.6"
    identity: str = ""
    response_timeout: float = 10.0
    attempts: int = 25
    backoff_s: float = 0.05
    max_backoff_s: float = 0.5
    open_timeout: float = 10.0
    reset_status: str = "Accepted"
    start_status: str = "Accepted"
    generation: int = 0
    closes: list[int | None] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    outcomes: list[CallOutcome] = field(default_factory=list)
    gave_up: BaseException | None = None
    hold_reset: asyncio.Event | None = None
    station: Any = None
    _changed: asyncio.Condition | None = None
    _task: asyncio.Task[None] | None = None
    _ws: ClientConnection | None = None
    _links: int = 0  # links that were ever opened, including a closed current one

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = self.url.rstrip("/").rsplit("/", 1)[-1]

    async def __aenter__(self) -> ReconnectingStation:
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._run(), name=f"station-{self.identity}")
        await self.wait_generation(1, timeout=self.open_timeout + 5)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 3)

    @property
    def connected(self) -> bool:
        """Whether the current link is open."""
        return self._ws is not None and self._ws.close_code is None

    @property
    def subprotocol(self) -> str | None:
        return None if self._ws is None else self._ws.subprotocol

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        assert self._changed is not None
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: predicate() or self.gave_up is not None)
        except TimeoutError:
            raise TimeoutError(f"station {self.identity}: timed out waiting for {what}; "
                               f"closes={self.closes} failures={self.failures[-3:]}") from None
        if not predicate():
            raise GaveUp(f"station {self.identity} gave up: {self.gave_up!r}; "
                         f"failures={self.failures[-3:]}")

    async def wait_generation(self, generation: int, timeout: float = 15.0) -> None:
        """Wait until the station has connected ``generation`` times."""
        await self._wait(lambda: self.generation >= generation, timeout,
                         f"connection #{generation}")

    async def wait_closed(self, count: int = 1, timeout: float = 15.0) -> int | None:
        """Wait until ``count`` links have ended; return the close code of the last one."""
        await self._wait(lambda: len(self.closes) >= count, timeout, f"close #{count}")
        return self.closes[count - 1]

    async def _run(self) -> None:
        offered = [Subprotocol(VERSION_SUBPROTOCOL[self.version])]
        failed = 0
        while True:
            try:
                ws = await connect(self.url, subprotocols=offered, open_timeout=self.open_timeout,
                                   close_timeout=2.0, max_size=None, ping_interval=None)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                failed += 1
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if failed >= self.attempts:
                    self.gave_up = exc
                    await self._notify()
                    return
                await asyncio.sleep(min(self.backoff_s * 2 ** (failed - 1), self.max_backoff_s))
                continue
            failed = 0
            station = _STATION_CLASSES[self.version](
                self.identity, ws, self.response_timeout,
                reset_status=self.reset_status, start_status=self.start_status)
            station.hold_reset = self.hold_reset
            station.reset_arrived = asyncio.Event()
            self._ws, self.station = ws, station
            self.generation += 1
            await self._notify()
            serve = asyncio.create_task(self._serve(station))
            try:
                await ws.wait_closed()
            finally:
                # A handler may be waiting (hold_reset): the link is gone, so is it.
                await asyncio.sleep(0)
                serve.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serve
            self.closes.append(ws.close_code)
            await self._notify()

    @staticmethod
    async def _serve(station: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            await station.start()

    async def call(self, action: str, *args: Any, **kwargs: Any) -> CallOutcome:
        """Make one CALL through the current link with the station helper ``action``
        (``boot``, ``heartbeat``, ``status``, ``meter``, ``authorize``); record its outcome.

        A CALLERROR is an outcome, not an exception; so are a response timeout and a link
        that closed before anything was sent (``closed``).
        """
        generation = self.generation
        method = getattr(self.station, action)
        try:
            result = await method(*args, **kwargs)
        except OCPPError as exc:
            outcome = CallOutcome(action, "callerror", generation,
                                  f"{type(exc).__name__}: {exc.description}")
        except TimeoutError:
            outcome = CallOutcome(action, "timeout", generation,
                                  f"no answer within {self.response_timeout}s")
        except ConnectionClosed as exc:
            outcome = CallOutcome(action, "closed", generation, str(exc))
        else:
            outcome = CallOutcome(action, "result", generation, result=result)
        self.outcomes.append(outcome)
        return outcome

    async def must(self, action: str, *args: Any, **kwargs: Any) -> Any:
        """:meth:`call` that must be answered with a CALLRESULT; returns the result."""
        outcome = await self.call(action, *args, **kwargs)
        assert outcome.kind == "result", (
            f"{self.identity} {action}: {outcome.kind} {outcome.detail}")
        return outcome.result
