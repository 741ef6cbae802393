"""``ocpp-router demo``: the whole mission on loopback, in one process.

A core node holds the CSMS connection for two edge nodes chained under it (one peer link
in JSON, one in msgpack). The CSMS is found by DNS SRV: two demo CSMSs at priority 1 and
2 behind a real DNS server on loopback. Stations of OCPP 1.6, 2.0.1 and 2.1 at every
node boot, report status and send meter values; the core copies status and meter values
to a secondary backend and runs a firewall. Early on the CSMS sends an unsigned Reset
(the core refuses it) and a signed one (delivered); then the priority-1 CSMS stops and
comes back, so the core's SRV links fail over and back, for the core's own stations and
for the edges' stations attached over the overlay alike, without any station dialling
again.

The terminal lines come from what really happened: the nodes' own log events, caught by
a logging handler that knows which node's task logged (a context variable set at the
root of each node's task tree), their counters and links, and what the demo's CSMSs and
stations saw. Only the scene's own doings (a CSMS stopping) are told as such.
"""

from __future__ import annotations

import contextvars
import logging
import math
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from policies import SigningKey, sign_payload
from router import config as config_mod
from router import logs
from router.admin import links_view, serve_admin
from router.demo.configs import (
    ADMIN_RULE,
    CORE,
    CSMS_HOSTS,
    EDGES,
    SECONDARY,
    SRV_NAME,
    SRV_TTL_S,
    PlannedStation,
    core_config,
    edge_config,
    policy_text,
    reset_payload,
    reset_target,
    station_plan,
)
from router.demo.dns_server import DnsServer, Srv
from router.demo.narrator import (
    Event,
    Narrator,
    NodeSnapshot,
    PeerState,
    SecondaryState,
    summary_line,
)
from router.demo.ocpp_peers import SHORT, DemoCsms, Station
from router.node import Node
from router.passwords import hash_password

STATION_PASSWORD = "demo-station-password"
PEER_PASSWORD = "demo-peer-password"
STOP_AT_S = 9.0  # when the priority-1 CSMS stops...
RESTART_AT_S = 15.0  # ...and when it comes back
TICK_S = 0.1  # how often events are drained and printed

_NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("demo_node", default=None)
TOLD = frozenset({
    "peer_connected", "peer_disconnected", "peer_expired", "announcement_rejected",
    "routes_changed", "srv_resolved", "policy_reject", "policy_drop", "backend_failover",
    "backend_failback", "backend_failover_failed", "overlay_station",
})
"""The node log events the demo narrates."""


class EventTap(logging.Handler):
    """Keeps the told log events, stamped with the node whose task logged them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(logging.DEBUG)
        self.clock = clock
        self.events: deque[Event] = deque(maxlen=100_000)  # appends are thread-safe

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        node = _NODE.get()
        if isinstance(fields, dict) and node is not None and record.msg in TOLD:
            self.events.append(Event(self.clock(), node, str(record.msg), dict(fields)))


class _NodeField(logging.Filter):
    """Adds ``node`` to a JSON log line: three nodes share one stderr here."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        node = _NODE.get()
        if isinstance(fields, dict) and node is not None and "node" not in fields:
            record.fields = {"node": node, **fields}
        return True


def setup_logging(level: str, tap: EventTap) -> None:
    """JSON lines on stderr at ``level``; the tap sees info events whatever the level."""
    logs.setup(level)
    root = logging.getLogger("router")
    for handler in root.handlers:
        handler.setLevel(level.upper())
        handler.addFilter(_NodeField())
    root.addHandler(tap)
    root.setLevel(min(logging.INFO, logging.getLevelNamesMapping()[level.upper()]))


class Scene:
    """Everything the demo runs, built in ``directory`` (keys, configs, state)."""

    def __init__(self, directory: Path, per_site: int, out: TextIO) -> None:
        self.directory = directory
        self.out = out
        self.t0 = time.monotonic()
        self.tap = EventTap(self.elapsed)
        self.plan = station_plan(per_site)
        self.per_site = per_site
        self.dns = DnsServer()
        self.csms = {p: DemoCsms(f"csms-{p}", self._observe) for p in CSMS_HOSTS}
        self.secondary = DemoCsms(SECONDARY, self._observe)
        self.csms_names = {c.name for c in self.csms.values()}
        self.narrator = Narrator({p: c.name for p, c in self.csms.items()})
        self.nodes: dict[str, Node] = {}
        self.stations: dict[str, Station] = {}
        self.ops_key = SigningKey.generate()  # the operator's key, role admin at the core
        self.happened: Counter[str] = Counter()  # event names, for the closing line
        self._copied: set[str] = set()  # actions the secondary has had a copy of
        self._forwarded = 0  # signed Resets the core's firewall let through, seen so far
        self._scope = trio.CancelScope()  # stations and the scenario

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _push(self, source: str, name: str, fields: dict[str, Any]) -> None:
        self.tap.events.append(Event(self.elapsed(), source, name, fields))

    def _observe(self, name: str, fields: dict[str, Any]) -> None:
        """What a demo CSMS saw; the secondary's first copy of each action is told."""
        if name == "csms_call":
            if fields["csms"] == SECONDARY and fields["action"] not in self._copied:
                self._copied.add(fields["action"])
                self._push(SECONDARY, "secondary_copy", {**fields, "via": CORE})
            return
        if name == "csms_listening":
            self._publish()  # the same port again, unless another socket had taken it
        if "csms" in fields:  # a CSMS stopping or listening again
            self._push(str(fields["csms"]), name, fields)

    def _publish(self) -> None:
        """The SRV records of the demo CSMSs, once each has a port."""
        if all(c.port for c in self.csms.values()):
            self.dns.set_srv(SRV_NAME, [Srv(p, 10, c.port, f"{CSMS_HOSTS[p]}.")
                                        for p, c in self.csms.items()], ttl=SRV_TTL_S)

    # --- building ------------------------------------------------------------------------

    def _keys(self) -> dict[str, str]:
        """Node keys as ``ocpp-router keys new`` writes them; node id -> public PEM path."""
        keys = self.directory / "keys"
        keys.mkdir()
        public = {}
        for node_id in (CORE, *(edge for edge, _ in EDGES)):
            key = SigningKey.generate()
            (keys / f"{node_id}.pem").write_bytes(key.private_pem())
            (keys / f"{node_id}.pub.pem").write_bytes(key.public_pem())
            public[node_id] = f"keys/{node_id}.pub.pem"
        (keys / "ops.pem").write_bytes(self.ops_key.private_pem())
        return public

    def _load(self, name: str, text: str) -> config_mod.Config:
        path = self.directory / f"{name}.toml"
        path.write_text(text)
        return config_mod.load(path)

    async def _run_as(self, name: str, run: Callable[..., Awaitable[Any]], *args: Any,
                      task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        _NODE.set(name)  # every task this one starts inherits it: its logs are ``name``'s
        await run(*args, task_status=task_status)

    async def _start_node(self, nursery: trio.Nursery, name: str, text: str) -> Node:
        node = Node(self._load(name, text))
        self.nodes[name] = node
        await nursery.start(self._run_as, name, node.run)
        return node

    async def build(self, nursery: trio.Nursery) -> int | None:
        """Start DNS, the CSMSs, the secondary and the three nodes; the admin port."""
        self.dns.start()
        for server in (*self.csms.values(), self.secondary):
            await nursery.start(server.serve)  # the CSMSs publish their SRV records
        trust = self._keys()
        station_hash, peer_hash = hash_password(STATION_PASSWORD), hash_password(PEER_PASSWORD)
        (self.directory / "core-policy.toml").write_text(policy_text(self.ops_key.key_id))
        core = await self._start_node(nursery, CORE, core_config(
            nameserver=self.dns.nameserver,
            secondary_url=f"ws://127.0.0.1:{self.secondary.port}/ocpp",
            station_hash=station_hash, peer_hash=peer_hash,
            trust={k: v for k, v in trust.items() if k != CORE}))
        admin_port: int | None = await nursery.start(self._run_as, CORE, serve_admin, core)
        for edge, encoding in EDGES:  # chained under the core
            await self._start_node(nursery, edge, edge_config(
                edge, encoding=encoding, core_url=f"ws://127.0.0.1:{core.port}/ocpp",
                station_hash=station_hash, peer_password=PEER_PASSWORD,
                trust={k: v for k, v in trust.items() if k != edge}))
        return admin_port

    def intro(self, admin_port: int | None) -> None:
        c1, c2 = self.csms[1], self.csms[2]
        pad = " " * 10

        def stations(node: str) -> str:
            return "stations " + ", ".join(f"{s.identity} ({SHORT[s.version]})"
                                           for s in self.plan if s.node == node)

        self.say(f"demo: three nodes on 127.0.0.1; keys, configs and state in "
                 f"{self.directory} (removed at the end)")
        self.say(f"  {CORE:<7} ws://127.0.0.1:{self.nodes[CORE].port}/ocpp  the CSMS by DNS "
                 f"SRV {SRV_NAME} (DNS server {self.dns.nameserver}):")
        self.say(f"{pad}{c1.name} at priority 1 (port {c1.port}), {c2.name} at priority 2 "
                 f"(port {c2.port}); secondary {SECONDARY} (port {self.secondary.port}) "
                 "copies StatusNotification and MeterValues")
        self.say(f"{pad}firewall rule \"{ADMIN_RULE}\"; {stations(CORE)}")
        for edge, encoding in EDGES:
            self.say(f"  {edge:<7} ws://127.0.0.1:{self.nodes[edge].port}/ocpp  no backend, "
                     f"a {encoding} peer link to {CORE}; {stations(edge)}")
        if admin_port is not None:
            self.say(f"demo: live picture: http://127.0.0.1:{admin_port}/topology")
        self.say(f"demo: at {STOP_AT_S:.0f} s {c1.name} stops, at {RESTART_AT_S:.0f} s it comes "
                 "back. Ctrl-C stops the demo.")

    # --- running -------------------------------------------------------------------------

    async def _wait_for_csms_routes(self, timeout_s: float = 10) -> None:
        with trio.move_on_after(timeout_s):
            while not all(self.nodes[edge].overlay.table.candidates("CSMS")
                          for edge, _ in EDGES):
                await trio.sleep(0.05)

    async def play(self, nursery: trio.Nursery) -> None:
        """Stations on both edges, then the Resets and the CSMS's outage; runs until the
        scene's scope is cancelled."""
        with self._scope:
            await self._wait_for_csms_routes()
            async with trio.open_nursery() as group:
                for planned in self.plan:
                    url = f"ws://127.0.0.1:{self.nodes[planned.node].port}/ocpp"
                    station = Station(planned.identity, planned.version, url,
                                      STATION_PASSWORD, self._observe)
                    self.stations[planned.identity] = station
                    group.start_soon(station.run)
                await self._resets(reset_target(self.plan))
                await self._sleep_until(STOP_AT_S)
                self.csms[1].stop()
                await self._sleep_until(RESTART_AT_S)
                await nursery.start(self.csms[1].serve)

    async def _sleep_until(self, at_s: float) -> None:
        await trio.sleep(max(0.0, at_s - self.elapsed()))

    async def _resets(self, target: PlannedStation) -> None:
        with trio.move_on_after(STOP_AT_S - 1):
            while target.identity not in self.csms[1].booted:
                await trio.sleep(0.1)
            await trio.sleep(0.5)
            await self._reset(target, signed=False)
            await trio.sleep(0.5)
            await self._reset(target, signed=True)

    async def _reset(self, target: PlannedStation, *, signed: bool) -> None:
        """The CSMS holding the station sends it a Reset; what came back is told."""
        holder = next((c for c in self.csms.values() if target.identity in c.stations), None)
        if holder is None:
            return
        payload: dict[str, Any] = reset_payload(target.version)
        if signed:
            payload = sign_payload(payload, "Reset", "to-station", self.ops_key, time.time())
        station = self.stations[target.identity]
        before = station.commands["Reset"]
        fields: dict[str, Any] = {"csms": holder.name, "station": target.identity,
                                  "node": target.node, "version": SHORT[target.version],
                                  "signed": signed}
        reply = await holder.command(target.identity, "Reset", payload)
        fields.update(error=reply.error, description=reply.description,
                      status=(reply.result or {}).get("status"),
                      station_saw=station.commands["Reset"] > before)
        self._push(holder.name, "reset_answer", fields)

    async def narrate(self) -> None:
        """Every TICK_S: tell new events; every second: one summary line per node."""
        before = {name: self._snapshot(name, self.elapsed()) for name in self.nodes}
        next_summary = 1.0
        while True:
            await trio.sleep(TICK_S)
            self._tell()
            now = self.elapsed()
            if now >= next_summary:
                next_summary = math.floor(now) + 1.0
                for name in self.nodes:
                    snapshot = self._snapshot(name, now)
                    self.say(summary_line(snapshot, before[name]))
                    before[name] = snapshot

    def _tell(self) -> None:
        core = self.nodes[CORE]
        forwarded = core.gate.decisions.get((ADMIN_RULE, "forward"), 0)
        if forwarded > self._forwarded:
            self._forwarded = forwarded
            self._push(CORE, "firewall_forward", {"rule": ADMIN_RULE, "action": "Reset"})
        while self.tap.events:
            event = self.tap.events.popleft()
            self.happened[event.name] += 1
            if event.source in self.nodes:
                event = self._enrich(event, self.nodes[event.source])
            for line in self.narrator.feed(event):
                self.say(line)
        for line in self.narrator.flush(self.elapsed()):
            self.say(line)

    def _enrich(self, event: Event, node: Node) -> Event:
        """Add what the node's state says now: the destinations a route change made
        reachable; the CSMS a station attached over the overlay was dialled on."""
        extra: dict[str, Any] = {}
        if event.name == "routes_changed":
            table = node.overlay.table
            extra["reachable"] = [d for d in event.fields.get("destinations", ())
                                  if table.candidates(d)]
        elif event.name == "overlay_station":
            session = node.sessions.held.get(str(event.fields.get("station")))
            if session is not None:
                extra["target"] = self._target_of(session.backend.ws.info().remote)
        return Event(event.at, event.source, event.name, {**event.fields, **extra}) \
            if extra else event

    def _target_of(self, remote: str | None) -> str:
        """The demo CSMS at ``host:port``, by its port."""
        port = (remote or "").rsplit(":", 1)[-1]
        return next((c.name for c in self.csms.values() if str(c.port) == port), "?")

    def _snapshot(self, name: str, at: float) -> NodeSnapshot:
        node = self.nodes[name]
        view = links_view(node)
        backends: tuple[tuple[str, int], ...] = ()
        if node.config.backends:
            on: Counter[str] = Counter()
            for session in node.sessions.all():
                info = session.backend.ws.info()
                on["moving" if info.state == "failing_over"
                   else self._target_of(info.remote)] += 1
            backends = tuple((c.name, on[c.name]) for c in self.csms.values())
            backends += tuple((label, n) for label, n in on.items()
                              if n and label not in self.csms_names)
        return NodeSnapshot(
            node=name, at=at, stations=len(node.sessions.local), planned=self.per_site,
            held=len(node.sessions.held),
            frames=node.stats.frames_up + node.stats.frames_down,
            peers=tuple(PeerState(p["id"], p["encoding"], p["state"], p["routes_learned"])
                        for p in view["peers"]),
            backends=backends,
            secondaries=tuple(SecondaryState(s["name"], s["delivered"], s["backlog"])
                              for s in view["secondaries"]),
            refused=sum(n for (_rule, outcome), n in node.gate.decisions.items()
                        if outcome != "forward"))

    async def stop(self) -> None:
        """Stations first, then the edges and the core, each closing its links cleanly."""
        self._scope.cancel()
        self._tell()
        for line in self.narrator.flush(self.elapsed(), everything=True):
            self.say(line)
        self.say("demo: stopping: stations leave, then each node answers what is pending "
                 "and closes its links")
        for name in reversed(list(self.nodes)):
            token = _NODE.set(name)  # its shutdown's log lines are its own
            try:
                await self.nodes[name].shutdown()
            finally:
                _NODE.reset(token)

    def closing_line(self) -> str:
        frames = ", ".join(f"{name} {n.stats.frames_up + n.stats.frames_down}"
                           for name, n in self.nodes.items())
        errors = sum(n.stats.node_errors for n in self.nodes.values())
        copies = sum(s.stats.delivered for n in self.nodes.values()
                     for s in n.duplicator.secondaries)
        h = self.happened
        return (f"demo: done. frames forwarded: {frames}; firewall refusals "
                f"{h['policy_reject'] + h['policy_drop']}; copies to {SECONDARY} {copies}; "
                f"station links failed over {h['backend_failover']}, failed back "
                f"{h['backend_failback']}; node CALLERRORs {errors}.")

    def close(self) -> None:
        self.dns.stop()


async def _stop_when(duration: float | None, signals: Any, stop: trio.Event) -> None:
    with trio.move_on_after(math.inf if duration is None else duration):
        async for _ in signals:
            break
    stop.set()


async def run_scene(directory: Path, per_site: int, duration: float | None,
                    out: TextIO, log_level: str) -> None:
    """Build the scene in ``directory``, play it until ``duration`` or a signal, stop."""
    scene = Scene(directory, per_site, out)
    setup_logging(log_level, scene.tap)
    stop = trio.Event()
    narrating = trio.CancelScope()

    async def narrate() -> None:
        with narrating:
            await scene.narrate()

    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_when, duration, signals, stop)
                scene.intro(await scene.build(nursery))
                nursery.start_soon(narrate)
                nursery.start_soon(scene.play, nursery)
                await stop.wait()
                narrating.cancel()
                await scene.stop()
                nursery.cancel_scope.cancel()
        scene.say(scene.closing_line())
    finally:
        scene.close()
        logging.getLogger("router").removeHandler(scene.tap)


__all__ = ["TOLD", "EventTap", "Scene", "run_scene", "setup_logging"]
