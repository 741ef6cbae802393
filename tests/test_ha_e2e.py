"""High availability end to end (issue 6, acceptance 2-4): DNS SRV discovery, failover, failback.

Real processes and servers on loopback: an authoritative DNS server (``tests.dns_server``)
publishes SRV records with a 1 s TTL, ``ocpp``-package CSMS (``tests.peers.ocpp_csms``)
are the targets, the node runs as a subprocess (``tests.nodeproc``) configured with
``srv = ...`` instead of ``url``, and stations that redial like real ones
(``ReconnectingStation``) keep calling through it while targets die and return.

* acceptance 2: three CSMS at priorities 1, 2, 3. Stopping the priority-1 CSMS moves every
  station to the priority-2 one within the grace period (station links stay up), the
  CALL in flight there gets a CALLERROR, and their calls keep being answered; restarting
  it brings new links back, and idle existing ones; every CALL is answered or gets a
  CALLERROR, none is lost (counted per station). With no target left, CALLs sent during
  the grace period are answered and the station link is closed after it; the node
  completes a stopping CSMS's close at once.
* acceptance 3: SERVFAIL, NXDOMAIN (the SRV name), no answer and DNS server down (every
  name): each gives an ``srv_failed`` line naming the failure, is retried, and the node
  keeps serving from the last good answer (connected stations and stations connecting
  meanwhile, without waiting for DNS during the back-off); a failover while DNS is down
  still reaches the next target. An SRV target on a closed port gives ``backend_failed``
  and the next target is used; a service whose only target is closed, or whose name never
  resolved, refuses its stations (5xx) until the target listens / DNS answers.
* acceptance 4: an edge node whose ``[[peers]]`` entry is an SRV name with two core nodes
  moves to core 2 when core 1 is killed; its stations carry on.

Every wait is on a condition (a log line, a CSMS record, a DNS query, a station outcome)
with a deadline; no sleeps stand in for synchronisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.dns_server import DnsServer, Srv
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import (
    GaveUp,
    PeerLink,
    ReconnectingStation,
    await_log,
    overlay_config,
    routes_to,
    stderr_tail,
)
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms, group_id_token, identity_time, parent_id_tag
from tests.peers.ocpp_station import open_station

STEP = 10.0  # upper bound for any one step (network, failover, DNS retry)
PAUSE = 0.03  # pacing between one station's CALLs (load shape, not synchronisation)
SRV_CSMS = "_ocpp._tcp.csms.test"
SRV_CLOSED = "_ocpp._tcp.closed.test"
SRV_DEAD = "_ocpp._tcp.dead.test"
SRV_LATE = "_ocpp._tcp.late.test"
SRV_CORES = "_ocpp-overlay._tcp.cores.test"
# SRV target host names exist only on the test DNS server (A records -> 127.0.0.1): the node
# must resolve them there, as it would in a private zone.


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


# --- configs -----------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def srv_backend(name: str, srv: str, stations: Sequence[str] = ("*",)) -> dict[str, object]:
    """A primary ``[[backends]]`` entry given by an SRV name."""
    return {"name": name, "role": "primary", "srv": srv, "scheme": "ws", "path": "/ocpp",
            "auth": "passthrough", "stations": list(stations)}


def ha_config(
    node_id: str,
    nameserver: str,
    *,
    backends: Sequence[Mapping[str, object]] = (),
    peers: Sequence[Mapping[str, object]] = (),
    grace_s: float = 5.0,
    call_timeout_s: float = 10.0,
    dns_timeout_s: float = 1.0,
) -> str:
    """Config text of a node with SRV backends and/or peers, resolved at ``nameserver``."""
    lines = ["[node]", f"id = {_toml(node_id)}", f"call_timeout_s = {_toml(call_timeout_s)}",
             f"failover_grace_s = {_toml(grace_s)}", "",
             "[listen]", 'host = "127.0.0.1"', "port = 0", 'path = "/ocpp"',
             'subprotocols = ["ocpp2.1", "ocpp2.0.1", "ocpp1.6"]', "security_profile = 0", "",
             "[[stations]]", 'match = "*"']
    for table, entries in (("backends", backends), ("peers", peers)):
        for entry in entries:
            lines += ["", f"[[{table}]]"] + [f"{k} = {_toml(v)}" for k, v in entry.items()]
    lines += ["", "[dns]", f"nameservers = [{_toml(nameserver)}]", "ttl_floor_s = 1",
              "ttl_ceiling_s = 60", f"timeout_s = {_toml(dns_timeout_s)}"]
    return "\n".join(lines) + "\n"


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- stations calling continuously -------------------------------------------------------


@dataclass
class Load:
    """Stations that each make CALLs back to back (alternating Heartbeat and Authorize with
    a fresh idTag, whose answer must carry the values derived from that tag)."""

    stations: dict[str, ReconnectingStation]
    mismatches: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(s)) for s in self.stations.values()]

    async def stop(self) -> None:
        """Let each station finish its CALL in flight, then stop."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _run(self, station: ReconnectingStation) -> None:
        n = 0
        while not self._stop.is_set():
            if not station.connected:
                try:
                    await station.wait_generation(station.generation + 1, timeout=STEP)
                except (TimeoutError, GaveUp):
                    return
                continue
            n += 1
            if n % 2:
                await station.call("heartbeat")
            else:
                token = f"T{n}-{station.identity}"[:20]
                outcome = await station.call("authorize", token)
                if outcome.kind == "result":
                    self._check_authorize(station, token, outcome.result)
            await asyncio.sleep(PAUSE)

    def _check_authorize(self, station: ReconnectingStation, token: str, result: Any) -> None:
        if station.version == "1.6":
            got, want = result.id_tag_info.get("parent_id_tag"), parent_id_tag(token)
        else:
            got = result.id_token_info["group_id_token"]["id_token"]
            want = group_id_token(token)
        if got != want:
            self.mismatches.append(f"{station.identity}: Authorize {token} answered {got!r}")

    def results(self, identity: str) -> int:
        return sum(1 for o in self.stations[identity].outcomes if o.kind == "result")

    def tally(self) -> dict[str, dict[str, int]]:
        """Per station: how many CALLs ended as result, callerror, timeout, closed."""
        return {identity: dict(Counter(o.kind for o in s.outcomes))
                for identity, s in self.stations.items()}

    def lost(self) -> list[str]:
        """CALLs sent that got neither an answer nor a CALLERROR."""
        return [f"{identity}: {o.action} #{i} {o.kind} ({o.detail})"
                for identity, s in self.stations.items()
                for i, o in enumerate(s.outcomes) if o.kind == "timeout"]


async def until(predicate: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    """Wait until ``predicate()`` holds, checking as the event loop runs; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def csms_calls(csms: Csms, identity: str, count: int, what: str = "") -> None:
    """Wait until ``csms`` has received ``count`` CALLs from ``identity`` in all."""
    await asyncio.to_thread(csms.wait_for, lambda: len(csms.calls(identity)) >= count, STEP,
                            what or f"{count} CALLs from {identity}")


def reconnecting(node: NodeProcess, ids: Mapping[str, str]) -> dict[str, ReconnectingStation]:
    """Stations that redial like real ones, at ``node``: identity -> OCPP version."""
    return {identity: ReconnectingStation(node.url(identity), version, response_timeout=STEP,
                                          open_timeout=STEP)
            for identity, version in ids.items()}


async def entered(stations: Mapping[str, ReconnectingStation]) -> None:
    for station in stations.values():
        await station.__aenter__()


async def left(stations: Mapping[str, ReconnectingStation]) -> None:
    for station in stations.values():
        await station.__aexit__(None, None, None)


def on(csms: Csms, identity: str) -> bool:
    """Whether ``identity``'s latest link to ``csms`` is open."""
    return csms.is_connected(identity)


# --- acceptance 2: failover to the next priority and failback ----------------------------

HOLD = "HA-F-HOLD"


def test_stopping_the_priority_1_csms_moves_stations_and_no_call_is_lost(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    with Csms() as csms1, Csms() as csms2, Csms() as csms3:
        dns_server.set_srv(SRV_CSMS, [Srv(1, 10, csms1.port, "csms1.test."),
                                      Srv(2, 10, csms2.port, "csms2.test."),
                                      Srv(3, 10, csms3.port, "csms3.test.")], ttl=1)
        node = start_node(ha_config("ha-failover", dns_server.nameserver,
                                    backends=[srv_backend("main", SRV_CSMS)]),
                          tmp_path, env=node_env())
        try:
            asyncio.run(_failover_and_failback(node, csms1, csms2, csms3))
        finally:
            node.stop()


async def _failover_and_failback(node: NodeProcess, csms1: Csms, csms2: Csms,
                                 csms3: Csms) -> None:
    ids = {"HA-F-CP16A": "1.6", "HA-F-CS201": "2.0.1", "HA-F-CP16B": "1.6"}
    stations = reconnecting(node, ids)
    # HOLD's CALL is in flight at the priority-1 CSMS (received, never answered) when it stops
    csms1.set_raw(HOLD)
    hold = ReconnectingStation(node.url(HOLD), "2.0.1", response_timeout=STEP,
                               open_timeout=STEP)
    await entered({**stations, HOLD: hold})
    load = Load(stations)
    try:
        # 1. Every station's backend link goes to the priority-1 target.
        for identity, station in stations.items():
            boot = await station.must("boot")
            assert boot.current_time == identity_time(identity)
            assert on(csms1, identity), f"{identity} is not on the priority-1 CSMS"
            assert not csms2.connections(identity) and not csms3.connections(identity)
            await await_log(node, "station_connected", station=identity, backend="main")

        load.start()
        for identity in stations:
            await csms_calls(csms1, identity, 5)
        in_flight = asyncio.create_task(hold.call("boot"))
        await csms_calls(csms1, HOLD, 1, "the BootNotification held in flight")
        csms1.set_raw(HOLD, False)

        # 2. The priority-1 CSMS stops (its links closed, listener gone).
        await asyncio.to_thread(csms1.stop)
        held = await in_flight
        assert held.kind == "callerror" and "InternalError" in held.detail, (
            f"the CALL in flight at the stopped CSMS ended as {held.kind} ({held.detail}), "
            f"expected a CALLERROR InternalError; node log:\n{stderr_tail(node)}")
        await asyncio.to_thread(csms2.wait_for_connection, HOLD, STEP)
        await hold.must("boot")
        for identity in stations:
            try:
                await await_log(node, "backend_failover", station=identity, backend="main",
                                timeout=STEP)
            except TimeoutError:
                pytest.fail(f"{identity}: no backend_failover after the priority-1 CSMS "
                            f"stopped; node log:\n{stderr_tail(node)}")
            await asyncio.to_thread(csms2.wait_for_connection, identity, STEP)
            # its calls keep being answered, now by the priority-2 CSMS
            before = load.results(identity)
            await csms_calls(csms2, identity, 4, f"CALLs of {identity} at the priority-2 CSMS")

            def answered_again(identity: str = identity, before: int = before) -> bool:
                return load.results(identity) >= before + 3

            await until(answered_again, f"answers to {identity} after the failover")
        assert not csms3.connections(), "priority 3 used while priority 2 was up"
        for identity, station in stations.items():
            assert station.generation == 1 and not station.closes, (
                f"{identity}: the node closed the station link (closes {station.closes}) "
                f"instead of moving its backend link within failover_grace_s; node log:\n"
                f"{stderr_tail(node)}")

        # 3. The priority-1 CSMS returns: new station links go there...
        await asyncio.to_thread(csms1.start)
        newcomer = await _new_link_lands_on(node, csms1, csms2, "HA-F-NEW")
        # ...and the existing links move back when idle, still losing nothing.
        for identity in stations:
            try:
                await await_log(node, "backend_failback", station=identity, timeout=STEP)
                await asyncio.to_thread(csms1.wait_for_connection, identity, STEP, 2)
            except TimeoutError:
                pytest.fail(f"{identity}: its backend link did not move back to the restored "
                            f"priority-1 CSMS; node log:\n{stderr_tail(node)}")
            count = len(csms1.calls(identity))
            await csms_calls(csms1, identity, count + 3,
                             f"CALLs of {identity} at the priority-1 CSMS after failback")
    finally:
        await load.stop()
        await left({**stations, HOLD: hold})

    tally = load.tally()
    print(f"\nper-station CALL outcomes (failover and failback): {tally}; new links tried "
          f"until one reached priority 1: {newcomer}")
    assert not load.lost(), (f"CALLs without an answer: {load.lost()}; tally {tally}; node log:\n"
                             f"{stderr_tail(node)}")
    assert not load.mismatches, load.mismatches
    for identity, station in stations.items():
        kinds = tally[identity]
        assert set(kinds) <= {"result", "callerror"}, (identity, kinds)
        for outcome in station.outcomes:
            if outcome.kind == "callerror":
                assert "InternalError" in outcome.detail, (identity, outcome)
        # every answered CALL was answered by a CSMS, not made up by the node
        received = sum(len(c.calls(identity)) for c in (csms1, csms2, csms3))
        assert kinds.get("result", 0) <= received, (identity, kinds, received)


async def _new_link_lands_on(node: NodeProcess, preferred: Csms, other: Csms,
                             prefix: str) -> int:
    """Connect fresh stations until one's backend link reaches ``preferred`` (it must within
    a TTL or so); returns how many tries it took. Every try must be served somewhere."""
    deadline = time.monotonic() + STEP
    tries = 0
    while True:
        tries += 1
        identity = f"{prefix}-{tries}"
        async with open_station(node.url(identity), "2.0.1", open_timeout=STEP,
                                response_timeout=STEP) as station:
            boot = await station.boot()
            assert boot.current_time == identity_time(identity)
            if on(preferred, identity):
                return tries
            assert on(other, identity), f"{identity} reached neither CSMS"
        if time.monotonic() > deadline:
            pytest.fail(f"{tries} new station links in {STEP}s, none went to the restored "
                        f"priority-1 target; node log:\n{stderr_tail(node)}")
        await asyncio.sleep(0.2)  # pacing between tries


GRACE_S = 1.5


def test_past_the_grace_period_the_station_link_is_closed_and_reconnects(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    """The only target dies: CALLs sent while the node looks for another one are answered
    (CALLERROR at the latest) and the station link is closed after failover_grace_s; the
    station then reconnects as OCPP expects and is served once the target is back."""
    with Csms() as csms:
        dns_server.set_srv(SRV_CSMS, [Srv(1, 10, csms.port, "csms1.test.")], ttl=1)
        node = start_node(ha_config("ha-grace", dns_server.nameserver, grace_s=GRACE_S,
                                    backends=[srv_backend("main", SRV_CSMS)]),
                          tmp_path, env=node_env())
        try:
            asyncio.run(_grace_expires(node, csms))
        finally:
            node.stop()


async def _grace_expires(node: NodeProcess, csms: Csms) -> None:
    identity = "HA-G-CP16"
    async with ReconnectingStation(node.url(identity), "1.6", response_timeout=STEP,
                                   open_timeout=STEP, attempts=200,
                                   max_backoff_s=0.2) as station:
        await station.must("boot")
        began = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(csms.stop))
        # the node notices and tries to dial a target (there is none that answers)
        await await_log(node, "backend_failed", station=identity, timeout=STEP)
        during = await station.call("heartbeat")  # sent while the node holds the frames
        await station.wait_closed(1, timeout=GRACE_S + STEP)
        closed_s = time.monotonic() - began
        await stopping
        await asyncio.to_thread(csms.start)  # same port
        await station.wait_generation(2, timeout=STEP)
        await station.must("boot")
        assert on(csms, identity)

    print(f"\nCALL sent during the grace period: {during.kind} ({during.detail}); station "
          f"link closed {closed_s:.2f}s after the CSMS stopped (grace {GRACE_S}s)")
    assert during.answered, (
        f"a CALL sent during the grace period ended as {during.kind} ({during.detail}): the "
        f"node closed the station link without answering it; node log:\n{stderr_tail(node)}")
    assert GRACE_S - 0.5 <= closed_s <= GRACE_S + 3, closed_s


def test_a_stopping_csms_is_not_kept_waiting_for_the_grace_period(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    """When a CSMS closes a backend link (graceful shutdown) and no other target answers,
    the node still completes that close at once: the CSMS's shutdown must not wait for
    failover_grace_s while the node looks for a new target."""
    with Csms() as csms:
        dns_server.set_srv(SRV_CSMS, [Srv(1, 10, csms.port, "csms1.test.")], ttl=1)
        node = start_node(ha_config("ha-stop", dns_server.nameserver, grace_s=GRACE_S,
                                    backends=[srv_backend("main", SRV_CSMS)]),
                          tmp_path, env=node_env())

        async def scenario() -> float:
            async with ReconnectingStation(node.url("HA-S-CP16"), "1.6",
                                           open_timeout=STEP) as station:
                await station.must("boot")
                began = time.monotonic()
                await asyncio.to_thread(csms.stop)
                return time.monotonic() - began

        try:
            stop_s = asyncio.run(scenario())
        finally:
            node.stop()
    lines = [line for line in node.logs if line.get("event") in (
        "backend_failover_failed", "station_disconnected")]
    assert stop_s < GRACE_S - 0.5, (
        f"the CSMS's graceful stop took {stop_s:.2f}s: the node kept the backend link the "
        f"CSMS closed open through failover_grace_s ({GRACE_S}s) instead of completing the "
        f"close; node log: {lines}")


# --- acceptance 3: DNS failures and a dead target ----------------------------------------

FAILURE_WORDS = {
    "servfail": ("servfail",),
    "nxdomain": ("nxdomain", "does not exist"),
    "timeout": ("timeout", "timed out", "lifetime"),
    "down": ("refused", "unreachable", "timeout", "timed out"),
}
# (mode, the names it hits): a zone problem hits the SRV name; an unresponsive or stopped
# DNS server hits every name, the targets' A records too.
DNS_FAILURES = (("servfail", "srv"), ("nxdomain", "srv"), ("timeout", "all"), ("down", "all"))


def test_dns_failures_are_logged_retried_and_the_last_good_answer_serves(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    with Csms() as csms:
        dns_server.set_srv(SRV_CSMS, [Srv(1, 10, csms.port, "csms1.test.")], ttl=1)
        node = start_node(ha_config("ha-dns", dns_server.nameserver,
                                    backends=[srv_backend("main", SRV_CSMS)]),
                          tmp_path, env=node_env())
        try:
            asyncio.run(_dns_failures(node, dns_server, csms))
        finally:
            node.stop()


async def _dns_failures(node: NodeProcess, dns_server: DnsServer, csms: Csms) -> None:
    keep = ReconnectingStation(node.url("HA-D-KEEP"), "1.6", response_timeout=STEP,
                               open_timeout=STEP)
    problems: list[str] = []
    slowest: dict[str, float] = {}  # per mode: the longest a station took to connect and boot
    async with keep:
        await keep.must("boot")
        reasons: dict[str, list[str]] = {}
        for mode, scope in DNS_FAILURES:
            reasons[mode] = await _one_dns_failure(node, dns_server, csms, keep, mode, scope,
                                                   problems, slowest)
        assert keep.generation == 1, f"the connected station lost its link: {keep.closes}"
        await keep.must("heartbeat")
    print(f"\nsrv_failed reasons: {json.dumps(reasons, indent=1)}\nslowest station "
          f"connect+boot per mode: { {m: round(t, 2) for m, t in slowest.items()} }")
    assert not problems, "\n".join(problems)


async def _one_dns_failure(node: NodeProcess, dns_server: DnsServer, csms: Csms,
                           keep: ReconnectingStation, mode: str, scope: str,
                           problems: list[str], slowest: dict[str, float]) -> list[str]:
    """One failure mode: stations connecting meanwhile must be served from the last good
    answer; the failure must be logged, retried, and recovered from once DNS answers."""
    before = len(srv_failed(node, SRV_CSMS))
    began = time.monotonic()
    if mode == "down":
        dns_server.down()
    else:
        dns_server.fail(SRV_CSMS if scope == "srv" else None, mode)
    tries, refused = 0, 0

    async def probe() -> None:
        # A station connecting now; its dial is also what makes the node ask DNS again.
        nonlocal tries, refused
        tries += 1
        identity = f"HA-D-{mode.upper()}-{tries}"
        began_probe = time.monotonic()
        try:
            async with open_station(node.url(identity), "2.0.1", open_timeout=STEP,
                                    response_timeout=STEP) as station:
                boot = await station.boot()
        except (InvalidStatus, OSError) as exc:
            refused += 1
            if refused == 1:
                why = [line.get("reason") for line in node.events("backend_failed")
                       if line.get("station") == identity]
                problems.append(f"DNS {mode} ({'every name' if scope == 'all' else SRV_CSMS}):"
                                f" station {identity} not served from the last good answer: "
                                f"{exc!r}; backend_failed reasons {why}")
            return
        slowest[mode] = max(slowest.get(mode, 0.0), time.monotonic() - began_probe)
        assert boot.current_time == identity_time(identity)
        assert csms.connections(identity), identity
        await keep.must("heartbeat")  # the connected station is served all along

    # servfail and timeout also show the retries while failing (two lines, the back-off
    # between them)
    wanted = 2 if mode in ("servfail", "timeout") else 1
    await _until_failed(node, probe, before + wanted, mode)
    # The failure is known now and the next SRV query is backed off (retry_in_s): a station
    # connecting meanwhile is served from the last good answers without waiting for DNS.
    # The targets' A records are DNS too; they must not be asked (and waited for) again by
    # every station that connects during the outage.
    quick_began = time.monotonic()
    await probe()
    quick_s = time.monotonic() - quick_began
    if scope == "all" and mode == "timeout" and quick_s > 0.5:
        asked = [f"{q.rdtype} {q.name} at +{q.at - quick_began:.2f}s"
                 for q in dns_server.queries(since=quick_began)]
        problems.append(
            f"DNS {mode} (every name): a station connecting during the SRV back-off (after "
            f"srv_failed retry_in_s={srv_failed(node, SRV_CSMS)[-1].get('retry_in_s')}) "
            f"waited {quick_s:.2f}s to be served (dns timeout_s 1); DNS was asked meanwhile: "
            f"{asked}")
    new_lines = srv_failed(node, SRV_CSMS)[before:]
    words = FAILURE_WORDS[mode]
    for line in new_lines:
        assert any(w in str(line.get("reason", "")).lower() for w in words), (
            f"DNS {mode}: srv_failed reason {line.get('reason')!r} does not say so ({words})")
    if mode != "down":
        seen = dns_server.queries(SRV_CSMS, "SRV", since=began)
        assert sum(1 for q in seen if q.outcome == mode) >= wanted, seen

    # DNS answers again: the node asks again by itself (back-off) and gets the answer.
    restored = time.monotonic()
    if mode == "down":
        dns_server.up()
    else:
        dns_server.fail(SRV_CSMS if scope == "srv" else None, None)

    def answered() -> bool:
        return any(q.outcome == "answer" for q in dns_server.queries(SRV_CSMS, "SRV",
                                                                     since=restored))

    deadline = time.monotonic() + 2 * STEP
    while not answered():
        if time.monotonic() > deadline:
            pytest.fail(f"DNS {mode}: the node did not ask again after DNS recovered; "
                        f"node log:\n{stderr_tail(node)}")
        await probe()
        await asyncio.sleep(0.2)  # pacing between probes
    if refused:
        problems[-1] += f" ({refused} of {tries} stations refused during and after it)"
    return [str(line.get("reason")) for line in new_lines]


def srv_failed(node: NodeProcess, srv: str) -> list[dict[str, Any]]:
    """The node's ``srv_failed`` lines about ``srv`` so far."""
    return [line for line in node.events("srv_failed") if line.get("name") == srv]


async def _until_failed(node: NodeProcess, probe: Callable[[], Awaitable[None]], count: int,
                        mode: str) -> None:
    """Run ``probe`` (paced) until the node has logged ``count`` srv_failed lines."""
    deadline = time.monotonic() + 2 * STEP
    while len(srv_failed(node, SRV_CSMS)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"DNS {mode}: {len(srv_failed(node, SRV_CSMS))}/{count} srv_failed "
                        f"lines; node log:\n{stderr_tail(node)}")
        await probe()
        await asyncio.sleep(0.2)  # pacing between probes


def test_failover_while_dns_is_down_uses_the_last_good_answers(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    """DNS has gone down (the node keeps its last good answer); then the priority-1 CSMS
    dies. The node must still move its stations to the priority-2 target it was told about:
    everything it needs (SRV answer, the targets' addresses, sent along in the answer's
    additional section) came in the last good answer."""
    with Csms() as csms1, Csms() as csms2:
        dns_server.set_srv(SRV_CSMS, [Srv(1, 10, csms1.port, "csms1.test."),
                                      Srv(2, 10, csms2.port, "csms2.test.")], ttl=1)
        node = start_node(ha_config("ha-dns-down", dns_server.nameserver, grace_s=3.0,
                                    backends=[srv_backend("main", SRV_CSMS)]),
                          tmp_path, env=node_env())

        async def scenario() -> None:
            identity = "HA-DD-CP16"
            async with ReconnectingStation(node.url(identity), "1.6", response_timeout=STEP,
                                           open_timeout=STEP) as station:
                await station.must("boot")
                assert on(csms1, identity)
                dns_server.down()
                # wait until the node has noticed: its SRV answer expired and was kept
                await until(lambda: bool(srv_failed(node, SRV_CSMS)), "srv_failed", STEP)
                await asyncio.to_thread(csms1.stop)
                outcome = await station.call("heartbeat")

                def moved_now() -> list[dict[str, object]]:
                    return [line for line in node.events("backend_failover")
                            if line.get("station") == identity]

                # the CALL in flight is answered at once; the move itself may finish a
                # little later (on a loaded machine, after the answer reached the station)
                with contextlib.suppress(TimeoutError):
                    await until(lambda: bool(moved_now()) and on(csms2, identity),
                                "backend_failover", STEP)
                moved = moved_now()
                why = [(line.get("target"), line.get("reason"))
                       for line in node.events("backend_failed")
                       if line.get("station") == identity]
                assert moved and on(csms2, identity), (
                    f"no failover to the priority-2 target while DNS is down: heartbeat "
                    f"{outcome.kind} ({outcome.detail}), station link closes "
                    f"{station.closes}; backend_failed {why}")
                await station.must("heartbeat")
                assert csms2.calls(identity, "Heartbeat")

        try:
            asyncio.run(scenario())
        finally:
            node.stop()


def test_closed_targets_and_unresolvable_names_refuse_only_their_stations(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    """A target on a closed port is logged and skipped; a service with no target that
    answers, or whose name never resolved, refuses its stations (5xx, logged) and serves them
    once the target listens / DNS answers, while the node serves everyone else."""
    dead_port = closed_port()
    with Csms() as csms, Csms() as late:
        dns_server.set_srv(SRV_CLOSED, [Srv(1, 10, dead_port, "closed.test."),
                                        Srv(2, 10, csms.port, "csms2.test.")], ttl=1)
        dns_server.set_srv(SRV_DEAD, [Srv(1, 10, dead_port, "closed.test.")], ttl=1)
        dns_server.set_srv(SRV_LATE, [Srv(1, 10, late.port, "late.test.")], ttl=1)
        dns_server.fail(SRV_LATE, "servfail")  # from the start: no good answer to fall back on
        node = start_node(ha_config("ha-closed", dns_server.nameserver, grace_s=GRACE_S,
                                    backends=[
            srv_backend("dead", SRV_DEAD, ["HA-DEAD-*"]),
            srv_backend("late", SRV_LATE, ["HA-LATE-*"]),
            srv_backend("main", SRV_CLOSED),
        ]), tmp_path, env=node_env())
        try:
            asyncio.run(_closed_port(node, csms, dead_port))
            asyncio.run(_never_resolved(node, dns_server, late))
        finally:
            node.stop()


async def _closed_port(node: NodeProcess, csms: Csms, dead_port: int) -> None:
    # A priority-1 target on a closed port: logged, and the station is served by priority 2.
    async with ReconnectingStation(node.url("HA-C-CP16"), "1.6", open_timeout=STEP) as station:
        line = (await await_log(node, "backend_failed", station="HA-C-CP16"))[0]
        assert f":{dead_port}" in json.dumps(line), line
        assert station.generation == 1 and on(csms, "HA-C-CP16")
        await station.must("boot")
        await station.must("heartbeat")

    # The only target is closed: the station is refused (5xx, logged) on every try, the
    # node dials again each time, and serves it as soon as the target listens.
    waiting = ReconnectingStation(node.url("HA-DEAD-CP16"), "1.6", open_timeout=STEP,
                                  attempts=200, max_backoff_s=0.2)
    entering = asyncio.create_task(waiting.__aenter__())
    try:
        await await_log(node, "backend_failed", station="HA-DEAD-CP16", backend="dead", count=2)
        assert not entering.done(), "connected although the only target is closed"
        refusals = list(waiting.failures)
        assert refusals and all(("502" in f or "503" in f or "504" in f) for f in refusals), (
            refusals)
        with Csms(port=dead_port) as revived:
            try:
                await asyncio.wait_for(entering, STEP)
            except TimeoutError:
                pytest.fail(f"station not served after its target came up; failures "
                            f"{waiting.failures[-3:]}; node log:\n{stderr_tail(node)}")
            await waiting.must("boot")
            assert on(revived, "HA-DEAD-CP16")
            await waiting.__aexit__(None, None, None)  # before the CSMS goes away
    finally:
        if not entering.done():
            entering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entering
        await waiting.__aexit__(None, None, None)


async def _never_resolved(node: NodeProcess, dns_server: DnsServer, late: Csms) -> None:
    identity = "HA-LATE-CP16"
    waiting = ReconnectingStation(node.url(identity), "1.6", open_timeout=STEP, attempts=200,
                                  max_backoff_s=0.2)
    entering = asyncio.create_task(waiting.__aenter__())
    try:
        await until(lambda: len(srv_failed(node, SRV_LATE)) >= 2, "two srv_failed lines")
        lines = srv_failed(node, SRV_LATE)
        assert all("servfail" in str(line.get("reason")).lower() for line in lines), lines
        assert not entering.done(), "connected although the name never resolved"
        assert waiting.failures and all("502" in f for f in waiting.failures), waiting.failures
        async with ReconnectingStation(node.url("HA-L-OTHER"), "2.0.1",
                                       open_timeout=STEP) as other:
            await other.must("boot")  # the other backends are served meanwhile
        dns_server.fail(SRV_LATE, None)
        try:
            await asyncio.wait_for(entering, STEP)
        except TimeoutError:
            pytest.fail(f"station not served after DNS recovered; node log:\n"
                        f"{stderr_tail(node)}")
        await waiting.must("boot")
        assert on(late, identity)
    finally:
        if not entering.done():
            entering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entering
        await waiting.__aexit__(None, None, None)


# --- acceptance 4: an upstream peer given by SRV -----------------------------------------

UPLINK, CORE_1, CORE_2, EDGE_ID = "ha-core", "ha-core-1", "ha-core-2", "ha-edge"


def test_edge_fails_over_between_core_nodes_given_by_srv(
    dns_server: DnsServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two core nodes, each with its own CSMS as primary backend, stand behind one SRV name;
    the edge's [[peers]] entry names the uplink, the core it reaches says who it is."""
    started: list[NodeProcess] = []
    with Csms() as csms1, Csms() as csms2:
        try:
            cores = []
            for core_id, csms in ((CORE_1, csms1), (CORE_2, csms2)):
                cores.append(start_node(overlay_config(core_id, backend_url=csms.url,
                                                       accept=[EDGE_ID]),
                                        tmp_path_factory.mktemp(core_id), env=node_env()))
                started.append(cores[-1])
            dns_server.set_srv(SRV_CORES, [Srv(1, 10, cores[0].port, "core1.test."),
                                           Srv(2, 10, cores[1].port, "core2.test.")], ttl=1)
            edge = start_node(ha_config(EDGE_ID, dns_server.nameserver, peers=[{
                "id": UPLINK, "srv": SRV_CORES, "scheme": "ws", "path": "/ocpp",
                "encoding": "json", "nodes": [CORE_1, CORE_2]}]),
                tmp_path_factory.mktemp("edge"), env=node_env())
            started.append(edge)
            asyncio.run(_peer_failover(edge, cores[0], cores[1], csms1, csms2))
        finally:
            for node in reversed(started):
                node.stop()


async def _peer_failover(edge: NodeProcess, core1: NodeProcess, core2: NodeProcess,
                         csms1: Csms, csms2: Csms) -> None:
    await await_log(edge, "peer_connected", peer=CORE_1, direction="out", timeout=STEP)
    await await_log(core1, "peer_connected", peer=EDGE_ID, direction="in", timeout=STEP)
    await await_log(edge, "routes_changed", routes_to("CSMS"), timeout=STEP)
    assert not core2.events("peer_connected"), "the edge dialled priority 2 first"

    ids = {"HA-P-CP16": "1.6", "HA-P-CS201": "2.0.1"}
    stations = reconnecting(edge, ids)
    await entered(stations)
    load = Load(stations)
    try:
        for identity, station in stations.items():
            await station.must("boot")
            assert on(csms1, identity), f"{identity} did not reach core 1's CSMS"
        load.start()
        for identity in stations:
            await csms_calls(csms1, identity, 4)

        killed = time.monotonic()
        await asyncio.to_thread(core1.stop, signal.SIGKILL)
        try:
            await await_log(core2, "peer_connected", peer=EDGE_ID, direction="in",
                            timeout=STEP)
        except TimeoutError:
            pytest.fail(f"the edge did not move to the priority-2 core; edge log:\n"
                        f"{stderr_tail(edge)}")
        moved_s = time.monotonic() - killed
        await await_log(edge, "peer_connected", peer=CORE_2, direction="out", timeout=STEP)
        # the stations carry on through core 2, whose CSMS now answers them
        for identity in stations:
            await csms_calls(csms2, identity, 4, f"CALLs of {identity} through core 2")
        answered_s = time.monotonic() - killed
    finally:
        await load.stop()
        await left(stations)

    tally = load.tally()
    print(f"\nedge linked to core 2 {moved_s:.2f}s and every station answered through it "
          f"{answered_s:.2f}s after core 1 was killed; per-station CALL outcomes: {tally}")
    assert not load.lost(), (f"CALLs without an answer: {load.lost()}; edge log:\n"
                             f"{stderr_tail(edge)}")
    assert not load.mismatches, load.mismatches
    assert [line["peer"] for line in edge.events("peer_connected")] == [CORE_1, CORE_2]


# --- stations attached over the overlay fail over and back like local ones ----------------

CHAIN_CORE, CHAIN_EDGE = "ha-chain-core", "ha-chain-edge"


def test_stations_behind_an_edge_follow_the_cores_srv_failover_and_failback(
    dns_server: DnsServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The core holds the CSMS connection by SRV; the stations are connected to an edge
    chained under it. Their backend links (the core's, for stations it does not see
    directly) move to priority 2 and back without their station links closing."""
    with Csms() as csms1, Csms() as csms2:
        dns_server.set_srv(SRV_CSMS, [Srv(1, 10, csms1.port, "csms1.test."),
                                      Srv(2, 10, csms2.port, "csms2.test.")], ttl=1)
        core = start_node(ha_config(CHAIN_CORE, dns_server.nameserver,
                                    backends=[srv_backend("main", SRV_CSMS)],
                                    peers=[{"id": CHAIN_EDGE}]),
                          tmp_path_factory.mktemp("core"), env=node_env())
        try:
            edge = start_node(overlay_config(CHAIN_EDGE,
                                             peers=[PeerLink.to(core, CHAIN_CORE, "msgpack")]),
                              tmp_path_factory.mktemp("edge"), env=node_env())
            try:
                asyncio.run(_chained_failover(core, edge, csms1, csms2))
            finally:
                edge.stop()
        finally:
            core.stop()


async def _chained_failover(core: NodeProcess, edge: NodeProcess, csms1: Csms,
                            csms2: Csms) -> None:
    await await_log(edge, "routes_changed", routes_to("CSMS"), timeout=STEP)
    ids = {"HA-C-CP16": "1.6", "HA-C-CS201": "2.0.1"}
    stations = reconnecting(edge, ids)
    await entered(stations)
    load = Load(stations)
    try:
        for identity, station in stations.items():
            await station.must("boot")
            assert on(csms1, identity), f"{identity} is not on the priority-1 CSMS"
            await await_log(core, "overlay_station", station=identity, via=CHAIN_EDGE)
        load.start()
        for identity in stations:
            await csms_calls(csms1, identity, 4)

        await asyncio.to_thread(csms1.stop)
        for identity in stations:
            try:
                await await_log(core, "backend_failover", station=identity, backend="main",
                                timeout=STEP)
            except TimeoutError:
                pytest.fail(f"{identity}: no backend_failover at the core; core log:\n"
                            f"{stderr_tail(core)}")
            count = len(csms2.calls(identity))
            try:
                await csms_calls(csms2, identity, count + 3,
                                 f"CALLs of {identity} at the priority-2 CSMS")
            except TimeoutError:
                pytest.fail(f"{identity}: {len(csms2.calls(identity)) - count} CALLs at the "
                            f"priority-2 CSMS after the failover; outcomes "
                            f"{stations[identity].outcomes[-6:]}; core log:\n"
                            f"{stderr_tail(core, 60)}\nedge log:\n{stderr_tail(edge, 30)}")

        await asyncio.to_thread(csms1.start)
        for identity in stations:
            try:
                await await_log(core, "backend_failback", station=identity, timeout=STEP)
            except TimeoutError:
                pytest.fail(f"{identity}: no backend_failback at the core; core log:\n"
                            f"{stderr_tail(core)}")
            count = len(csms1.calls(identity))
            await csms_calls(csms1, identity, count + 3,
                             f"CALLs of {identity} at the priority-1 CSMS after failback")
    finally:
        await load.stop()
        await left(stations)

    assert not load.lost(), (f"CALLs without an answer: {load.lost()}; core log:\n"
                             f"{stderr_tail(core)}")
    assert not load.mismatches, load.mismatches
    for identity, station in stations.items():
        assert station.generation == 1 and not station.closes, (
            f"{identity}: its station link was closed (closes {station.closes}) instead of "
            f"its backend link moving at the core")
        for outcome in station.outcomes:
            if outcome.kind == "callerror":
                assert "InternalError" in outcome.detail, (identity, outcome)
    assert not edge.events("overlay_attach_failed")
