"""Acceptance (issue 5, items 1-4): copies of station frames to secondary backends.

Each test runs its own node subprocess (``tests.nodeproc.start_node``) with one primary
backend and one or more secondaries, as described in docs/duplication.md:

1. an ``ocpp``-package primary and two ``ocpp``-package secondaries: subscribed station
   CALLs reach all three (the secondaries on their own socket per station, with ``dup-``
   message ids), only the primary's answers reach the station, Heartbeat only the primary;
2. a secondary that is down while a station sends 1,000 MeterValues gets all of them, in
   order, once it is back, also across a SIGKILL of the node (durable outbox, cached
   BootNotification replayed first);
3. a secondary that never answers, or answers after 10 s, does not delay the primary path;
4. a secondary's Reset is refused with SecurityError unless ``allow_commands = true``.

Synchronisation is by conditions and log events with timeouts, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.nodeproc import NodeProcess, start_node
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_raw, open_station
from tests.raw_backend import RawBackend

STEP = 10.0  # upper bound for any single network step
SUBSCRIBED = ("BootNotification", "StatusNotification", "MeterValues", "TransactionEvent")
PROMPT = 1.0  # a station CALL answered later than this waited on something it should not
METER_COUNT = 1000


# --- config -------------------------------------------------------------------------------


@dataclass
class Secondary:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dup_config(state_dir: Path, primary_url: str, secondaries: Sequence[Secondary]) -> str:
    """A security-profile-0 node with one primary and these secondaries."""
    lines = [
        "[node]",
        'id = "dup-test"',
        f"state_dir = {_toml(str(state_dir))}",
        "call_timeout_s = 10",
        "",
        "[listen]",
        'host = "127.0.0.1"',
        "port = 0",
        'path = "/ocpp"',
        'subprotocols = ["ocpp2.1", "ocpp2.0.1", "ocpp1.6"]',
        "security_profile = 0",
        "",
        "[[stations]]",
        'match = "*"',
        "",
        "[[backends]]",
        'name = "main"',
        'role = "primary"',
        f"url = {_toml(primary_url)}",
    ]
    for sec in secondaries:
        lines += [
            "",
            "[[backends]]",
            f"name = {_toml(sec.name)}",
            'role = "secondary"',
            f"url = {_toml(sec.url)}",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in sec.options.items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_node(config: str, directory: Path, name: str = "node.toml") -> Iterator[NodeProcess]:
    node = start_node(config, directory, env=node_env(), name=name)
    try:
        yield node
    finally:
        node.stop()
        save_log(node)


def save_log(node: NodeProcess) -> None:
    """Keep the node's log next to its config, for a look after a failure."""
    node.config_path.with_suffix(".log").write_text("".join(node.raw_stderr))


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, node: NodeProcess | None = None
) -> Any:
    """Poll ``predicate`` (cheap, in-memory) until truthy; fail with the node's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "".join(node.raw_stderr[-30:]) if node is not None else ""
            raise TimeoutError(f"timed out waiting for {what}\nnode log tail:\n{tail}")
        time.sleep(0.02)


def free_port_csms() -> Csms:
    """A Csms that has bound a port and closed it again: nothing listens there until
    ``start()`` is called (on the same port)."""
    csms = Csms().start()
    csms.stop()
    return csms


# --- a raw station: exact frames, round-trip times -----------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def boot_payload(version: str) -> dict[str, Any]:
    if version == "ocpp1.6":
        return {"chargePointVendor": "DupVendor", "chargePointModel": "DupModel"}
    return {"chargingStation": {"model": "DupModel", "vendorName": "DupVendor"},
            "reason": "PowerUp"}


def status_payload(version: str) -> dict[str, Any]:
    if version == "ocpp1.6":
        return {"connectorId": 1, "errorCode": "NoError", "status": "Available",
                "timestamp": _now()}
    return {"timestamp": _now(), "connectorStatus": "Available", "evseId": 1, "connectorId": 1}


def meter_payload(version: str, seq: int) -> dict[str, Any]:
    """MeterValues whose single sampled value is the sequence number ``seq``."""
    if version == "ocpp1.6":
        return {"connectorId": 1,
                "meterValue": [{"timestamp": _now(), "sampledValue": [{"value": str(seq)}]}]}
    return {"evseId": 1,
            "meterValue": [{"timestamp": _now(), "sampledValue": [{"value": float(seq)}]}]}


def meter_seq(payload: dict[str, Any]) -> int:
    return int(float(payload["meterValue"][0]["sampledValue"][0]["value"]))


class RawStation:
    """Sends CALLs one at a time and waits for each answer; keeps every frame it got."""

    def __init__(self, ws: Any, version: str) -> None:
        self.ws = ws
        self.version = version
        self.received: list[str] = []
        self.sent_ids: list[str] = []
        self.rtts: list[float] = []
        self.marker = 0  # a test's bookmark in sent_ids
        self._n = 0

    async def call(self, action: str, payload: dict[str, Any], timeout: float = STEP) -> str:
        """Send a CALL; return the text of its answer (other frames are kept, not matched)."""
        self._n += 1
        message_id = f"st-{self._n}"
        self.sent_ids.append(message_id)
        t0 = time.perf_counter()
        await self.ws.send(json.dumps([2, message_id, action, payload]))
        async with asyncio.timeout(timeout):
            while True:
                text = await self.ws.recv()
                assert isinstance(text, str)
                self.received.append(text)
                frame = json.loads(text)
                if frame[0] in (3, 4) and frame[1] == message_id:
                    self.rtts.append(time.perf_counter() - t0)
                    return text

    async def boot(self) -> str:
        return await self.call("BootNotification", boot_payload(self.version))

    async def meter(self, seq: int) -> str:
        text = await self.call("MeterValues", meter_payload(self.version, seq))
        assert json.loads(text)[0] == 3, text
        return text

    def unexpected(self) -> list[str]:
        """Frames that are not answers to this station's own CALLs."""
        own = set(self.sent_ids)
        out = []
        for text in self.received:
            frame = json.loads(text)
            if frame[0] not in (3, 4) or frame[1] not in own:
                out.append(text)
        return out


@contextlib.asynccontextmanager
async def raw_station(node: NodeProcess, identity: str, version: str = "ocpp1.6") -> Any:
    async with open_raw(node.url(identity), [version]) as ws:
        assert ws.subprotocol == version
        yield RawStation(ws, version)


def first_arrivals(values: Sequence[int]) -> list[int]:
    """Values in order of their first arrival (at-least-once may repeat some)."""
    seen: set[int] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def secondary_meter_seqs(csms: Csms, identity: str) -> list[int]:
    return [meter_seq(c.payload) for c in csms.calls(identity, "MeterValues")]


# --- 1. one primary, two secondaries -------------------------------------------------------


@pytest.mark.parametrize("version", ["ocpp1.6", "ocpp2.0.1"])
def test_subscribed_calls_reach_all_backends_and_only_primary_answers(
    tmp_path: Path, version: str
) -> None:
    identity = f"DUP-ALL-{version}"
    with Csms() as primary, Csms() as sec_a, Csms() as sec_b:
        config = dup_config(tmp_path / "state", primary.url, [
            Secondary("analytics", sec_a.url), Secondary("grid", sec_b.url)])
        with running_node(config, tmp_path) as node:
            sent: dict[str, dict[str, Any]] = {}

            async def scenario() -> RawStation:
                async with raw_station(node, identity, version) as st:
                    for action, payload in (
                        ("BootNotification", boot_payload(version)),
                        ("Heartbeat", {}),
                        ("StatusNotification", status_payload(version)),
                        ("MeterValues", meter_payload(version, 42)),
                    ):
                        sent[action] = payload
                        answer = await st.call(action, payload)
                        assert json.loads(answer)[0] == 3, answer
                    # both secondaries have answered every copy: a secondary answer that
                    # leaked to the station would have been sent by now
                    for sec in (sec_a, sec_b):
                        await asyncio.to_thread(
                            sec.wait_for,
                            lambda s=sec: sum(
                                1 for f in s.sent_frames(identity)
                                if isinstance(f, str) and json.loads(f)[0] == 3) >= 3,
                            STEP, "3 answers from a secondary")
                    await st.call("Heartbeat", {})  # one more round trip after those answers
                    return st

            st = asyncio.run(scenario())

        # the primary got every CALL, Heartbeat included, with the station's own ids
        prim_calls = primary.calls(identity)
        assert [c.action for c in prim_calls] == [
            "BootNotification", "Heartbeat", "StatusNotification", "MeterValues", "Heartbeat"]
        assert [c.message_id for c in prim_calls] == st.sent_ids

        # only the primary's answers reached the station, exactly as the primary sent them
        assert st.unexpected() == []
        assert st.received == [f for f in primary.sent_frames(identity) if isinstance(f, str)]

        for sec in (sec_a, sec_b):
            conns = sec.connections(identity)
            assert len(conns) == 1, conns
            assert conns[0].path == f"/ocpp/{identity}"
            assert conns[0].subprotocol == version
            calls = sec.calls(identity)
            # subscribed actions only (no Heartbeat), in order, with the original payloads
            assert [c.action for c in calls] == [
                "BootNotification", "StatusNotification", "MeterValues"]
            for c in calls:
                assert c.message_id.startswith("dup-"), c
                assert c.payload == sent[c.action]
            # the secondary's answers went back on its own socket with the dup- ids...
            sec_answers = [json.loads(f) for f in sec.sent_frames(identity)
                           if isinstance(f, str)]
            assert {a[1] for a in sec_answers} == {c.message_id for c in calls}
            # ...and none of them reached the station (no dup- id ever arrived there)
            assert not any(json.loads(f)[1].startswith("dup-") for f in st.received)


# --- 2. a secondary that is down: durable outbox, replay in order ---------------------------


async def send_meters(node: NodeProcess, identity: str, count: int) -> RawStation:
    async with raw_station(node, identity) as st:
        boot = json.loads(await st.boot())
        assert boot[0] == 3 and boot[2]["status"] == "Accepted", boot
        for i in range(count):
            await st.meter(i)
        return st


def wait_spilled(node: NodeProcess, subscriber: str, expected: int) -> int:
    """Wait until the outbox backlog reported by ``fanout_spill`` reaches ``expected``;
    return how many copies the node reports spilled (a shortfall is checked later, by
    which sequence numbers never reach the secondary)."""
    with contextlib.suppress(TimeoutError):
        node.wait_for_event("fanout_spill", timeout=STEP, subscriber=subscriber,
                            backlog=expected)
    return sum(e["count"] for e in node.events("fanout_spill")
               if e.get("subscriber") == subscriber)


def assert_all_in_order(sec: Csms, identity: str, spilled: int, expected: int) -> None:
    seqs = secondary_meter_seqs(sec, identity)
    missing = sorted(set(range(METER_COUNT)) - set(seqs))
    assert not missing, (
        f"MeterValues never delivered to the secondary: seq {missing}; fanout_spill "
        f"reported {spilled} of {expected} copies spilled to the outbox")
    assert first_arrivals(seqs) == list(range(METER_COUNT))


def test_down_secondary_gets_every_meter_value_in_order_when_back(tmp_path: Path) -> None:
    identity = "DUP-DOWN"
    expected = METER_COUNT + 1  # the BootNotification is subscribed too
    sec = free_port_csms()
    try:
        with Csms() as primary:
            config = dup_config(tmp_path / "state", primary.url, [
                Secondary("sec", sec.url, {"answer_timeout_s": 2})])
            with running_node(config, tmp_path) as node:
                st = asyncio.run(send_meters(node, identity, METER_COUNT))
                assert len(st.rtts) == expected
                assert len(primary.calls(identity, "MeterValues")) == METER_COUNT

                # every copy (the Boot and 1,000 MeterValues) goes to the outbox
                spilled = wait_spilled(node, "sec", expected)
                assert node.events("secondary_unreachable")
                assert (tmp_path / "state" / "outbox-sec.sqlite").is_file()
                assert sec.calls(identity) == []

                sec.start()  # the secondary comes back on the same port
                # logged once the outbox is empty: every replayed copy was answered (and
                # so recorded by the secondary)
                replayed = node.wait_for_event("fanout_replayed", timeout=60.0,
                                               subscriber="sec")
                calls = sec.calls(identity)
                assert calls[0].action == "BootNotification"
                assert calls[0].payload == boot_payload("ocpp1.6")
                assert_all_in_order(sec, identity, spilled, expected)
                assert replayed["replayed"] >= expected
                assert node.events("fanout_overflow") == []
                assert all(e["dropped"] == 0 for e in node.events("fanout_spill"))
    finally:
        sec.close()


def test_down_secondary_backlog_survives_sigkill_of_the_node(tmp_path: Path) -> None:
    identity = "DUP-KILL"
    sec = free_port_csms()
    try:
        with Csms() as primary:
            # only MeterValues are subscribed: the backlog is exactly the 1,000 copies and
            # the BootNotification the secondary sees first comes from the node's cache
            config = dup_config(tmp_path / "state", primary.url, [
                Secondary("sec", sec.url, {"answer_timeout_s": 2,
                                           "subscribe": ["MeterValues"]})])
            first = start_node(config, tmp_path, env=node_env())
            try:
                asyncio.run(send_meters(first, identity, METER_COUNT))
                spilled = wait_spilled(first, "sec", METER_COUNT)
            finally:
                first.stop(signal.SIGKILL)
                save_log(first)
            assert first.proc.returncode == -signal.SIGKILL
            assert sec.calls(identity) == []

            with running_node(config, tmp_path, name="node-restarted.toml") as second:
                sec.start()
                replayed = second.wait_for_event("fanout_replayed", timeout=60.0,
                                                 subscriber="sec")
                calls = sec.calls(identity)
                assert calls[0].action == "BootNotification", [c.action for c in calls[:3]]
                assert calls[0].payload == boot_payload("ocpp1.6")
                assert {c.action for c in calls} == {"BootNotification", "MeterValues"}
                assert_all_in_order(sec, identity, spilled, METER_COUNT)
                assert spilled == METER_COUNT
                assert replayed["replayed"] >= METER_COUNT
                assert second.events("fanout_overflow") == []
    finally:
        sec.close()


# --- 3. a stalled secondary never slows the primary path ------------------------------------


def _stalled_scenario(
    node: NodeProcess,
    identity: str,
    min_calls: int = 20,
    linger: Callable[[RawStation], Awaitable[None]] | None = None,
) -> RawStation:
    """Keep calling until the node logged both a secondary timeout and a spill, then
    ``min_calls`` more: every call must be answered promptly all along. ``linger`` runs
    last, with the station still connected."""

    async def scenario() -> RawStation:
        async with raw_station(node, identity) as st:
            await st.boot()
            await st.call("StatusNotification", status_payload("ocpp1.6"))
            seq = 0
            deadline = time.monotonic() + 20.0
            while not (node.events("secondary_timeout") and node.events("fanout_spill")):
                assert time.monotonic() < deadline, "no secondary_timeout / fanout_spill"
                await st.meter(seq)
                seq += 1
            st.marker = len(st.sent_ids)  # the node has given up waiting on the secondary
            for _ in range(min_calls):
                await st.meter(seq)
                seq += 1
            await st.call("Heartbeat", {})
            if linger is not None:
                await linger(st)
            return st

    return asyncio.run(scenario())


def _assert_prompt(st: RawStation) -> None:
    assert len(st.rtts) == len(st.sent_ids), "a station CALL was not answered"
    slow = [(i, round(t, 3)) for i, t in enumerate(st.rtts) if t >= PROMPT]
    assert slow == [], f"station CALLs waited (index, seconds): {slow[:10]}"
    for text in st.received:
        assert json.loads(text)[0] == 3, text  # every answer is the primary's CALLRESULT


def test_secondary_that_never_answers_does_not_delay_the_primary(tmp_path: Path) -> None:
    identity = "DUP-NEVER"
    with Csms() as primary, RawBackend() as stalled:
        for action in SUBSCRIBED:
            stalled.set_answer(action, never=True)
        config = dup_config(tmp_path / "state", primary.url, [
            Secondary("stalled", stalled.url, {"answer_timeout_s": 2})])
        with running_node(config, tmp_path) as node:
            st = _stalled_scenario(node, identity)

            _assert_prompt(st)
            assert st.unexpected() == []
            assert len(primary.calls(identity)) == len(st.sent_ids)
            # the secondary did get copies on its socket (and never answered them)
            stalled.wait_connected(identity, STEP)
            copies = [json.loads(f) for f in stalled.received(identity)]
            assert copies and all(f[0] == 2 and f[1].startswith("dup-") for f in copies)
            assert node.events("secondary_timeout")[0]["subscriber"] == "stalled"
            # the primary kept answering while the secondary was known to be stalled
            assert len(st.sent_ids) - st.marker >= 21


def test_secondary_that_answers_after_10s_does_not_delay_the_primary(tmp_path: Path) -> None:
    identity = "DUP-SLOW"
    late_answers: list[str] = []

    def late(ident: str, action: str, payload: Any) -> Any:
        late_answers.append(action)
        return {}

    with Csms() as primary, RawBackend() as slow:
        for action in SUBSCRIBED:
            slow.set_answer(action, delay=10.0, payload=late)
        config = dup_config(tmp_path / "state", primary.url, [
            Secondary("slow", slow.url, {"answer_timeout_s": 2})])
        async def past_late_answer(st: RawStation) -> None:
            # the secondary's first answer comes 10 s after its copy; the node consumes it
            await asyncio.to_thread(slow.wait_until, lambda: bool(late_answers), 20.0)
            for _ in range(5):
                await st.call("Heartbeat", {})

        with running_node(config, tmp_path) as node:
            st = _stalled_scenario(node, identity, linger=past_late_answer)
            _assert_prompt(st)
            assert st.unexpected() == []  # the late answers never reached the station
            assert len(primary.calls(identity)) == len(st.sent_ids)
            assert len(st.sent_ids) - st.marker >= 21
            assert node.events("secondary_timeout")[0]["subscriber"] == "slow"
            copies = [json.loads(f) for f in slow.received(identity)]
            assert copies and all(f[0] == 2 and f[1].startswith("dup-") for f in copies)


# --- 3b. a full inbox spills to the outbox instead of dropping copies -----------------------


def test_slow_secondary_with_full_inbox_spills_instead_of_dropping(tmp_path: Path) -> None:
    """Contract: copies spill to the outbox when "the inbox is half full"; the issue: "when
    it is full or the subscriber is down, frames go to a durable outbox". A subscriber
    waiting on a slow answer must therefore not make the node drop copies."""
    identity = "DUP-FULL"
    with Csms() as primary, RawBackend() as slow:
        for action in SUBSCRIBED:
            slow.set_answer(action, delay=10.0)
        config = dup_config(tmp_path / "state", primary.url, [
            Secondary("slow", slow.url, {"queue": 10})])  # default answer_timeout_s = 30

        async def scenario(node: NodeProcess) -> RawStation:
            async with raw_station(node, identity) as st:
                await st.boot()
                for i in range(50):
                    await st.meter(i)
                return st

        with running_node(config, tmp_path) as node:
            st = asyncio.run(scenario(node))
            _assert_prompt(st)  # the primary path itself is fine...
            # ...but no copy may be dropped while the subscriber waits on one answer
            assert node.events("fanout_overflow") == [], (
                "copies dropped instead of spilled:\n" + "".join(node.raw_stderr[-20:]))
            wait_until(
                lambda: sum(e["count"] for e in node.events("fanout_spill")) >= 40, 5.0,
                "fanout_spill of the copies beyond the half-full inbox", node)


# --- 4. secondary-initiated commands -------------------------------------------------------


def test_secondary_reset_refused_by_default_and_passes_when_allowed(tmp_path: Path) -> None:
    identity = "DUP-CMD"
    refused_id, allowed_id = "ro-reset-1", "rw-reset-7"
    with Csms() as primary, Csms() as read_only, Csms() as commander:
        config = dup_config(tmp_path / "state", primary.url, [
            Secondary("readonly", read_only.url),
            Secondary("commander", commander.url, {"allow_commands": True}),
        ])

        def answer_to(sec: Csms, message_id: str) -> list[Any]:
            def found() -> list[Any] | None:
                for f in sec.frames(identity):
                    if isinstance(f, str):
                        frame = json.loads(f)
                        if frame[0] in (3, 4) and frame[1] == message_id:
                            return list(frame)
                return None
            return sec.wait_for(found, STEP, f"answer to {message_id}")

        with running_node(config, tmp_path) as node:

            async def scenario() -> None:
                async with open_station(node.url(identity), "1.6",
                                        reset_status="Accepted") as st:
                    await st.boot()
                    for sec in (read_only, commander):
                        await asyncio.to_thread(
                            sec.wait_for_call, identity, "BootNotification", STEP)

                    # default: read-only, the node answers SecurityError itself
                    await asyncio.to_thread(
                        read_only.send_raw, identity,
                        json.dumps([2, refused_id, "Reset", {"type": "Hard"}]))
                    refused = await asyncio.to_thread(answer_to, read_only, refused_id)
                    assert refused[0] == 4 and refused[2] == "SecurityError", refused
                    await asyncio.to_thread(
                        node.wait_for_event, "secondary_command_refused", STEP,
                        subscriber="readonly", station=identity, action="Reset")

                    # allow_commands = true: delivered, and the station's answer returns
                    await asyncio.to_thread(
                        commander.send_raw, identity,
                        json.dumps([2, allowed_id, "Reset", {"type": "Soft"}]))
                    command = await st.wait_for_command("Reset", STEP)
                    assert command.fields == {"type": "Soft"}
                    allowed = await asyncio.to_thread(answer_to, commander, allowed_id)
                    assert allowed == [3, allowed_id, {"status": "Accepted"}]

                    # the station got exactly one Reset: the refused one never reached it
                    assert [c.action for c in st.commands] == ["Reset"]
                    assert (await st.heartbeat()).current_time

            asyncio.run(scenario())

        # the station's Reset answer went to the commander only: the primary made no CALL,
        # so it never gets an answer frame, and the read-only one only got our refusal
        assert [f for f in primary.frames(identity) if json.loads(f)[0] != 2] == []
        ro_answers = [json.loads(f) for f in read_only.frames(identity)
                      if json.loads(f)[0] != 2]
        assert [(a[0], a[1]) for a in ro_answers] == [(4, refused_id)]
        refusals = node.events("secondary_command_refused")
        assert [(e["subscriber"], e["action"]) for e in refusals] == [("readonly", "Reset")]
