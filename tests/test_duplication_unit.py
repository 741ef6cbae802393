"""Duplication without sockets (router/backends/duplication.py): the boot cache, the drain
task when the outbox cannot be written, the outbox bounds as the runtime counts them.

A secondary that is down is a patched ``dial`` that fails; the drain runs on trio's
MockClock. Where the order of events matters, the outbox is called inline instead of
through ``trio.to_thread`` so ``wait_all_tasks_blocked`` sees every step.
"""

from __future__ import annotations

import builtins
import json
import os
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import router.backends.duplication as duplication
from router.backends.boots import BootCache
from router.backends.duplication import DuplicationContext, Duplicator, Secondary
from router.backends.outbox import OutboxError, OutboxItem
from router.config import BackendEntry, ConfigError, NodeSection, parse
from router.net.wslink import WsLink
from router.relay.registry import SessionRegistry
from tests.log_events import Events, events_of
from tests.memory_ws import ws_pair


@pytest.fixture
def events() -> Iterator[Events]:
    with events_of("router.fanout") as handler:
        yield handler


def context(state_dir: Path) -> DuplicationContext:
    return DuplicationContext(state_dir, lambda: NodeSection(id="unit"), 65536,
                              SessionRegistry(), lambda _dialing: ssl.create_default_context())


def entry(**options: Any) -> BackendEntry:
    options.setdefault("subscribe", ("MeterValues",))
    options.setdefault("name", "sec")
    return BackendEntry(role="secondary", url="ws://127.0.0.1:9/ocpp", **options)


def meter(seq: int, pad: int = 0) -> OutboxItem:
    payload = json.dumps({"connectorId": 1, "seq": seq, "pad": "x" * pad})
    return OutboxItem("CP1", "ocpp1.6", "MeterValues", payload, time.time())


def boot(model: str) -> dict[str, Any]:
    return {"chargePointVendor": "V", "chargePointModel": model}


@pytest.fixture
def secondary_down(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every dial to a secondary fails, as if it were down; returns the stations dialled."""
    dialled: list[str] = []

    async def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
        dialled.append(url)
        await trio.lowlevel.checkpoint()
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(duplication, "dial", refuse)
    return dialled


@pytest.fixture
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outbox calls run on the loop, so wait_all_tasks_blocked follows every step."""

    async def run_sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Secondary], None]]:
    """Starts a secondary's drain task; cancelled and its outbox closed at the end."""
    started: list[Secondary] = []
    async with trio.open_nursery() as nursery:

        def start(sub: Secondary) -> None:
            started.append(sub)
            nursery.start_soon(sub.run)

        yield start
        nursery.cancel_scope.cancel()
    for sub in started:
        sub.outbox.close()


async def until(condition: Callable[[], bool], within_s: float = 120.0) -> None:
    """Wait, in virtual time, for a condition the drain task brings about."""
    with trio.fail_after(within_s):
        while not condition():
            await trio.sleep(0.01)


def fill_disk(sub: Secondary) -> None:
    """SQLite's page limit at the file's current size: the next new page is a full disk."""
    conn = sub.outbox._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(sub: Secondary) -> None:
    conn = sub.outbox._conn
    assert conn is not None
    conn.execute("PRAGMA max_page_count = 1000000")


# --- the boot cache ------------------------------------------------------------------------


def forbid_file_io(m: pytest.MonkeyPatch) -> None:
    """From now on every file write or open raises (and fails the test)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"file I/O on the primary path: {args[:2]!r}")

    for owner, name in ((Path, "write_text"), (Path, "write_bytes"), (Path, "open"),
                        (Path, "replace"), (Path, "rename"), (Path, "touch"),
                        (os, "replace"), (os, "rename"), (os, "fsync"), (os, "open"),
                        (builtins, "open")):
        m.setattr(owner, name, refuse)


async def test_offer_does_no_file_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dup = Duplicator([entry(subscribe=("BootNotification", "MeterValues"))],
                     context(tmp_path))
    try:
        with monkeypatch.context() as m:
            forbid_file_io(m)
            for i in range(200):
                dup.offer(f"CS-{i % 50}", "ocpp1.6", "BootNotification", boot(f"M{i}"))
                dup.offer(f"CS-{i % 50}", "ocpp1.6", "MeterValues", {"connectorId": 1})
        assert dup.boots is not None
        assert dup.boots.get("CS-49") == ("ocpp1.6", json.dumps(boot("M199"),
                                                                separators=(",", ":")))
        assert dup.secondaries[0].queued == 400
    finally:
        dup.secondaries[0].outbox.close()
    assert not (tmp_path / "boots.json").exists()


def test_boot_cache_is_bounded_and_its_file_pruned(tmp_path: Path) -> None:
    path = tmp_path / "boots.json"
    boots = BootCache(path, max_stations=3)
    for i in range(5):
        boots.remember(f"CS-{i}", "ocpp1.6", f'{{"n":{i}}}')
    boots.remember("CS-2", "ocpp1.6", '{"n":2}')  # the same boot again: kept longest
    boots.remember("CS-5", "ocpp2.0.1", '{"n":5}')
    assert len(boots) == 3
    assert [boots.get(f"CS-{i}") is not None for i in range(6)] == [
        False, False, True, False, True, True]
    boots.close()
    assert list(json.loads(path.read_text())) == ["CS-4", "CS-2", "CS-5"]
    assert BootCache(path).get("CS-5") == ("ocpp2.0.1", '{"n":5}')

    # by size too: the least recently booted go first
    by_size = BootCache(tmp_path / "sized.json", max_chars=100)
    for i in range(4):
        by_size.remember(f"S{i}", "ocpp1.6", "x" * 40)  # 2 + 7 + 40 characters each
    assert [by_size.get(f"S{i}") is not None for i in range(4)] == [False, False, True, True]


def test_an_unbounded_file_is_pruned_when_read(tmp_path: Path) -> None:
    path = tmp_path / "boots.json"
    # as the unbounded cache wrote it: one entry per station ever seen
    path.write_text(json.dumps({f"CS-{i}": ["ocpp1.6", f'{{"n":{i}}}'] for i in range(10)}))
    boots = BootCache(path, max_stations=4)
    assert len(boots) == 4 and boots.get("CS-9") is not None and boots.get("CS-5") is None
    assert boots.dirty  # the file still has all ten
    boots.close()
    assert list(json.loads(path.read_text())) == ["CS-6", "CS-7", "CS-8", "CS-9"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_a_damaged_or_huge_file_starts_an_empty_cache(tmp_path: Path, events: Events) -> None:
    path = tmp_path / "boots.json"
    path.write_text('{"CS-1": ["ocpp1.6", ')
    assert len(BootCache(path)) == 0
    path.write_text(json.dumps({"CS-1": ["ocpp1.6", "x" * 1000]}))
    assert len(BootCache(path, max_chars=100)) == 0  # > 8 x what a bounded cache writes
    path.write_text(json.dumps({"CS-1": "not a pair", "CS-2": ["ocpp1.6", "{}"]}))
    assert BootCache(path).get("CS-2") == ("ocpp1.6", "{}")
    assert len(events.named("boot_cache_unreadable")) == 2


async def test_boot_cache_is_written_by_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "boots.json"
    boots = BootCache(path)
    write = boots._write
    threads: list[threading.Thread] = []

    def record(entries: list[tuple[str, tuple[str, str]]]) -> None:
        threads.append(threading.current_thread())
        write(entries)

    monkeypatch.setattr(boots, "_write", record)
    boots.remember("CS-1", "ocpp1.6", "{}")
    assert boots.dirty
    await boots.flush()
    assert len(threads) == 1 and threads[0] is not threading.current_thread()
    assert not boots.dirty
    assert json.loads(path.read_text()) == {"CS-1": ["ocpp1.6", "{}"]}
    await boots.flush()
    assert len(threads) == 1  # nothing changed, nothing written


async def test_boot_cache_is_written_soon_then_at_most_every_few_s(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, events: Events,
    inline_threads: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "boots.json"
    boots = BootCache(path, flush_every_s=5.0)
    write = boots._write
    attempts: list[tuple[float, list[str] | None]] = []  # (when, stations written)
    fail = [True]

    def record(entries: list[tuple[str, tuple[str, str]]]) -> None:
        if fail[0]:
            fail[0] = False
            attempts.append((trio.current_time(), None))
            raise OSError(28, "No space left on device")
        write(entries)
        attempts.append((trio.current_time(), [station for station, _ in entries]))

    monkeypatch.setattr(boots, "_write", record)
    # a deadline, so a write that never comes fails the test instead of hanging it
    with trio.fail_after(1_000.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(boots.run)
            await trio.sleep(60.0)
            assert attempts == []  # nothing to write yet

            start = trio.current_time()
            boots.remember("CS-1", "ocpp1.6", "{}")
            await trio.testing.wait_all_tasks_blocked()
            # written at once; the write fails (logged, kept) and is retried
            # flush_every_s later
            assert attempts == [(start, None)]
            [failed] = events.named("boot_cache_write_failed")
            assert "No space left" in failed["reason"]
            await trio.sleep(5.0)
            await trio.testing.wait_all_tasks_blocked()
            assert attempts[1] == (start + 5.0, ["CS-1"])

            # a quiet spell, then a burst of boots: the first is written at once...
            await trio.sleep(60.0)
            burst = trio.current_time()
            boots.remember("CS-2", "ocpp1.6", "{}")
            await trio.testing.wait_all_tasks_blocked()
            assert attempts[2] == (burst, ["CS-1", "CS-2"])
            # ...the rest of the burst together, flush_every_s later
            for i in range(3, 50):
                boots.remember(f"CS-{i}", "ocpp1.6", "{}")
            await trio.testing.wait_all_tasks_blocked()
            assert len(attempts) == 3
            await trio.sleep(5.0)
            await trio.testing.wait_all_tasks_blocked()
            assert attempts[3] == (burst + 5.0, [f"CS-{i}" for i in range(1, 50)])
            await trio.sleep(60.0)
            assert len(attempts) == 4  # nothing changed since
            nursery.cancel_scope.cancel()
    assert not boots.dirty
    assert list(json.loads(path.read_text())) == [f"CS-{i}" for i in range(1, 50)]


def test_close_writes_what_is_left(tmp_path: Path) -> None:
    dup = Duplicator([entry()], context(tmp_path))
    dup.offer("CS-1", "ocpp2.0.1", "BootNotification", boot("A"))
    assert not (tmp_path / "boots.json").exists()
    dup.close()
    assert json.loads((tmp_path / "boots.json").read_text()) == {
        "CS-1": ["ocpp2.0.1", json.dumps(boot("A"), separators=(",", ":"))]}


def test_a_lone_surrogate_is_copied_as_an_escape(tmp_path: Path) -> None:
    # json.loads turned the station's "\ud800" escape into a lone surrogate: written back
    # unescaped the copy could be neither sent nor spilled
    payload = {"connectorId": 1, "note": "\ud800", "name": "Zoë"}
    text = duplication.payload_text(payload)
    text.encode("utf-8")
    assert json.loads(text) == payload
    assert duplication.payload_text({"name": "Zoë"}) == '{"name":"Zoë"}'  # as before

    dup = Duplicator([entry()], context(tmp_path))
    try:
        dup.offer("CS-1", "ocpp1.6", "MeterValues", payload)
        copy = dup.secondaries[0]._recv.receive_nowait()
        copy.payload.encode("utf-8")
        assert json.loads(copy.payload) == payload
    finally:
        dup.close()


# --- the outbox cannot be written ---------------------------------------------------------


async def test_full_disk_counts_and_logs_lost_copies_and_the_drain_goes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, events: Events,
    secondary_down: list[str], inline_threads: None,
    running: Callable[[Secondary], None],
) -> None:
    sub = Secondary(entry(queue=10), BootCache(tmp_path / "boots.json"), context(tmp_path))
    fill_disk(sub)
    running(sub)

    sub.offer(meter(0, pad=5_000))
    await trio.testing.wait_all_tasks_blocked()
    assert secondary_down  # the secondary was tried first
    assert sub.stats.dropped == 1 and sub.stats.spilled == 0
    [failed] = events.named("outbox_write_failed")
    assert failed["subscriber"] == "sec" and failed["count"] == 1
    assert failed["retry_in_s"] == duplication.WRITE_RETRY_S
    assert "disk is full" in failed["reason"]

    # the drain pauses: new copies wait in the inbox, then the write is tried again
    for i in range(1, 4):
        sub.offer(meter(i, pad=5_000))
    await trio.testing.wait_all_tasks_blocked()
    assert sub.queued == 3 and sub.stats.dropped == 1
    await trio.sleep(duplication.WRITE_RETRY_S)
    await trio.testing.wait_all_tasks_blocked()
    assert sub.stats.dropped == 4 and sub.queued == 0
    assert [e["count"] for e in events.named("outbox_write_failed")] == [1, 3]
    assert events.named("outbox_write_failed")[1]["retry_in_s"] == 2 * duplication.WRITE_RETRY_S

    # space again: the next copies reach the outbox as before
    free_disk(sub)
    sub.offer(meter(4))
    sub.offer(meter(5))
    await trio.sleep(2 * duplication.WRITE_RETRY_S)
    await trio.testing.wait_all_tasks_blocked()
    assert sub.stats.spilled == 2 and sub.stats.dropped == 4
    assert sub.backlog == sub.outbox.count("sec") == 2
    assert [json.loads(i.payload)["seq"] for _, i in sub.outbox.peek("sec", 10)] == [4, 5]
    assert sub.stats.offered == sub.stats.dropped + sub.stats.spilled
    assert sub._write_retry_s == duplication.WRITE_RETRY_S


async def test_full_disk_while_backing_off_from_a_down_secondary(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, events: Events,
    secondary_down: list[str], inline_threads: None,
    running: Callable[[Secondary], None],
) -> None:
    # the outbox already holds a backlog: the drain backs off, spilling what arrives
    sub = Secondary(entry(queue=100), BootCache(tmp_path / "boots.json"), context(tmp_path))
    running(sub)
    sub.offer(meter(0))
    await until(lambda: sub.backlog == 1)
    fill_disk(sub)
    for i in range(1, 31):
        sub.offer(meter(i, pad=2_000))
        await trio.sleep(0.1)
    free_disk(sub)
    await until(lambda: sub.stats.offered == sub.stats.spilled + sub.stats.dropped)
    assert sub.stats.dropped == sum(e["count"] for e in events.named("outbox_write_failed"))
    assert sub.stats.dropped > 0
    sub.offer(meter(99))
    await until(lambda: sub.stats.offered == sub.stats.spilled + sub.stats.dropped)
    assert sub.backlog == sub.outbox.count("sec") == sub.stats.spilled
    spilled = [json.loads(i.payload)["seq"] for _, i in sub.outbox.peek("sec", 100)]
    assert spilled[0] == 0 and spilled[-1] == 99 and spilled == sorted(spilled)
    # the pauses, doubling, kept the failures few: not one per copy
    pauses = [e["retry_in_s"] for e in events.named("outbox_write_failed")]
    assert 1 <= len(pauses) <= 4
    assert pauses == [duplication.WRITE_RETRY_S * 2**n for n in range(len(pauses))]


async def test_outbox_read_and_expiry_failures_are_logged_and_retried(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, events: Events,
    secondary_down: list[str], inline_threads: None,
    running: Callable[[Secondary], None], monkeypatch: pytest.MonkeyPatch,
) -> None:
    sub = Secondary(entry(), BootCache(tmp_path / "boots.json"), context(tmp_path))
    broken = [True]

    def failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if broken[0]:
                raise OutboxError("outbox x: cannot read: disk I/O error", sub.outbox.path)
            return real(*args)
        return call

    monkeypatch.setattr(sub.outbox, "peek", failing(sub.outbox.peek))
    monkeypatch.setattr(sub.outbox, "expire", failing(sub.outbox.expire))
    running(sub)
    sub.offer(meter(0))
    await trio.sleep(duplication.EXPIRE_EVERY_S + 1)
    operations = {e["operation"] for e in events.named("outbox_error")}
    assert operations == {"read", "expire"}
    broken[0] = False
    sub.offer(meter(1))
    await trio.sleep(60.0)
    await trio.testing.wait_all_tasks_blocked()
    assert sub.backlog == 2 and sub.stats.dropped == 0
    assert [json.loads(i.payload)["seq"] for _, i in sub.outbox.peek("sec", 10)] == [0, 1]


# --- the byte bound as the runtime counts it ----------------------------------------------


async def test_byte_bound_drops_are_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, events: Events,
    secondary_down: list[str], inline_threads: None,
    running: Callable[[Secondary], None],
) -> None:
    sub = Secondary(entry(outbox_max_bytes=10_000), BootCache(tmp_path / "boots.json"),
                    context(tmp_path))
    assert sub.outbox.max_bytes_per_subscriber == 10_000
    running(sub)
    for i in range(8):
        sub.offer(meter(i, pad=3_000))
        await trio.sleep(1.0)
    await trio.testing.wait_all_tasks_blocked()
    assert sub.stats.spilled == 8
    assert sub.stats.dropped == 5 == sum(e["dropped"] for e in events.named("fanout_spill"))
    assert sub.backlog == sub.outbox.count("sec") == 3
    assert [json.loads(i.payload)["seq"] for _, i in sub.outbox.peek("sec", 10)] == [5, 6, 7]


CONFIG = """\
[node]
id = "edge-1"

[listen]
security_profile = 0

[[stations]]
match = "*"

[[backends]]
name = "main"
url = "ws://127.0.0.1:9100/ocpp"

[[backends]]
name = "analytics"
role = "secondary"
url = "ws://127.0.0.1:9200/ocpp"
"""


def test_outbox_max_bytes_config() -> None:
    assert parse(CONFIG).backends[1].outbox_max_bytes == 1 << 30
    config = parse(CONFIG + "outbox_max_bytes = 2097152\n")
    assert config.backends[1].outbox_max_bytes == 2 * 1024 * 1024
    for bad in ("1000", "1048575", '"1GiB"', "2e9"):
        with pytest.raises(ConfigError) as info:
            parse(CONFIG + f"outbox_max_bytes = {bad}\n", "node.toml")
        [problem] = info.value.problems
        assert problem.key == "backends[1].outbox_max_bytes", problem
        assert problem.line == 18


def test_signed_messages_are_copied_by_their_plain_action_signed_or_plain(
        tmp_path: Path) -> None:
    """An OCPP 2.1 Signed Message matches a subscription by its plain action; each secondary
    gets it as its signed_messages says (default: kept for 2.x, unwrapped for 1.6)."""
    from tests.test_policies_jws import Signer

    notice = {"chargingLimit": {"chargingLimitSource": "SO", "isGridCritical": True}}
    signed = Signer().sign(json.dumps(notice).encode(), OCPPAction="NotifyChargingLimit",
                           OCPPMessageTypedId=2)
    dup = Duplicator([entry(name="keeps", subscribe=("NotifyChargingLimit",)),
                      entry(name="plain", subscribe=("NotifyChargingLimit",),
                            signed_messages="unwrap"),
                      entry(name="other", subscribe=("MeterValues",))], context(tmp_path))
    try:
        # kept signed for the primary: the copy starts from the Signed Message
        dup.offer("CS-1", "ocpp2.1", "NotifyChargingLimit-Signed", signed)
        # unwrapped for the primary by the gate: the Signed Message comes along
        dup.offer("CS-1", "ocpp2.1", "NotifyChargingLimit", notice,
                  ("NotifyChargingLimit-Signed", signed))
        keeps, plain, other = (sub._recv for sub in dup.secondaries)
        for _ in range(2):
            copy = keeps.receive_nowait()
            assert (copy.action, json.loads(copy.payload)) == ("NotifyChargingLimit-Signed",
                                                               signed)
            copy = plain.receive_nowait()
            assert (copy.action, json.loads(copy.payload)) == ("NotifyChargingLimit", notice)
        with pytest.raises(trio.WouldBlock):
            other.receive_nowait()
        # a JWS with nothing inside: the secondary that wants it plain gets no copy, counted
        dup.offer("CS-1", "ocpp2.1", "NotifyChargingLimit-Signed", {"payload": "!"})
        assert keeps.receive_nowait().action == "NotifyChargingLimit-Signed"
        with pytest.raises(trio.WouldBlock):
            plain.receive_nowait()
        assert dup.secondaries[1].stats.dropped == 1
    finally:
        dup.close()


async def test_a_clean_stop_spills_what_is_in_memory_to_the_outbox(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
    inline_threads: None,
) -> None:
    """The node's shutdown cancels the drain while a copy waits for the secondary's answer
    and more wait in the inbox: all of them reach the outbox (a crash is the only way to
    lose copies), none is left uncounted."""
    far_ends: list[WsLink] = []

    async def silent_secondary(url: str, *args: Any, **kwargs: Any) -> WsLink:
        node, far = ws_pair("ocpp1.6")
        far_ends.append(far)  # takes the copy, never answers
        return node

    monkeypatch.setattr(duplication, "dial", silent_secondary)
    sub = Secondary(entry(queue=10), BootCache(tmp_path / "boots.json"), context(tmp_path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sub.run)
        for seq in range(3):
            sub.offer(meter(seq))
        await trio.testing.wait_all_tasks_blocked()
        assert far_ends and sub.queued == 2  # one being delivered, two in the inbox
        nursery.cancel_scope.cancel()
    stats = sub.stats
    assert (stats.offered, stats.delivered, stats.spilled, stats.dropped) == (3, 0, 3, 0)
    assert [json.loads(item.payload)["seq"] for _, item in sub.outbox.peek("sec", 10)] == [
        0, 1, 2]
    sub.outbox.close()
