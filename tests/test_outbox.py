"""The durable outbox (router/backends/outbox.py): order, bounds, restarts, SIGKILL, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import router.backends.outbox as outbox_module
from router.backends.outbox import Outbox, OutboxError, OutboxItem

ROOT = Path(__file__).resolve().parent.parent


def item(seq: int, *, station: str = "CP1", created: float = 1_000.0) -> OutboxItem:
    """A MeterValues copy whose payload carries ``seq``, to check order on the way out."""
    return OutboxItem(station=station, subprotocol="ocpp1.6", action="MeterValues",
                      payload=json.dumps({"connectorId": 1, "seq": seq}), created=created)


def size(i: OutboxItem) -> int:
    """What a row counts against the byte bound: the UTF-8 bytes of its text."""
    return sum(len(t.encode()) for t in (i.station, i.subprotocol, i.action, i.payload))


def sized(seq: int, n: int, *, created: float = 1_000.0, fill: str = "x") -> OutboxItem:
    """An item that counts exactly ``n`` bytes (``fill`` may be a 2-byte character)."""
    base = item(seq, created=created)
    pad = n - size(base) - len(b',"pad":""')
    unit = len(fill.encode())
    assert pad >= 0, (n, pad)
    payload = base.payload[:-1] + ',"pad":"' + fill * (pad // unit) + "x" * (pad % unit) + '"}'
    out = OutboxItem(base.station, base.subprotocol, base.action, payload, created)
    assert size(out) == n
    return out


def seqs(rows: list[tuple[int, OutboxItem]]) -> list[int]:
    return [json.loads(i.payload)["seq"] for _, i in rows]


def drain_all(outbox: Outbox, subscriber: str) -> list[tuple[int, OutboxItem]]:
    return outbox.peek(subscriber, 1_000_000)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    # a directory that does not exist yet: the outbox creates it
    return tmp_path / "state" / "outbox.sqlite3"


# -- order -------------------------------------------------------------------------------


def test_order_preserved_across_append_peek_ack(db: Path) -> None:
    with Outbox(db) as outbox:
        assert outbox.append("a", [item(0), item(1), item(2)]) == 0
        assert outbox.append("b", [item(100)]) == 0
        assert outbox.append("a", [item(3)]) == 0
        outbox.append("a", [item(4), item(5)])
        outbox.append("b", [item(101), item(102)])

        rows = outbox.peek("a", 4)
        assert seqs(rows) == [0, 1, 2, 3]
        ids = [i for i, _ in rows]
        assert ids == sorted(ids) and len(set(ids)) == 4
        assert outbox.peek("a", 4) == rows  # peek removes nothing

        # the next batch while the first is in flight
        assert seqs(outbox.peek("a", 10, after_id=ids[-1])) == [4, 5]

        assert outbox.ack("a", ids[1]) == 2
        assert seqs(drain_all(outbox, "a")) == [2, 3, 4, 5]
        assert outbox.ack("a", ids[1]) == 0  # acking again is harmless
        assert outbox.count("a") == 4
        assert seqs(drain_all(outbox, "b")) == [100, 101, 102]  # untouched by a's acks

        # acking b's ids on a's queue deletes nothing of b's
        last_b = drain_all(outbox, "b")[-1][0]
        outbox.ack("a", last_b)
        assert outbox.count("a") == 0
        assert outbox.count("b") == 3
        assert outbox.subscribers() == ["b"]
        assert outbox.peek("a", 10) == []
        assert outbox.peek("b", 0) == []


def test_items_round_trip_exactly(db: Path) -> None:
    original = OutboxItem(station="Ümlaut/CP 7", subprotocol="ocpp2.0.1", action="TransactionEvent",
                          payload='{"a": [1, 2.50, "\\u00e9"], "b" : null}',
                          created=1_767_225_600.123456)
    with Outbox(db) as outbox:
        outbox.append("sec", [original])
        [(_, back)] = outbox.peek("sec", 1)
    assert back == original  # the payload text is the original, spacing and escapes included


def test_empty_append_is_a_no_op(db: Path) -> None:
    with Outbox(db) as outbox:
        assert outbox.append("a", []) == 0
        assert outbox.subscribers() == []
        assert outbox.count("a") == 0


# -- bounds ------------------------------------------------------------------------------


def test_count_bound_drops_oldest_and_reports(db: Path) -> None:
    with Outbox(db, max_rows_per_subscriber=5) as outbox:
        assert outbox.append("a", [item(i) for i in range(3)]) == 0
        outbox.append("b", [item(100)])
        assert outbox.append("a", [item(i) for i in range(3, 7)]) == 2
        assert seqs(drain_all(outbox, "a")) == [2, 3, 4, 5, 6]
        assert outbox.append("a", [item(7)]) == 1
        assert seqs(drain_all(outbox, "a")) == [3, 4, 5, 6, 7]
        # a batch larger than the bound keeps its own newest rows
        assert outbox.append("a", [item(i) for i in range(8, 20)]) == 12
        assert seqs(drain_all(outbox, "a")) == [15, 16, 17, 18, 19]
        assert outbox.count("a") == 5
        assert seqs(drain_all(outbox, "b")) == [100]  # bounds are per subscriber


def test_a_wrong_row_count_drops_nothing_new(db: Path) -> None:
    # safety net: the cached count is exact while this is the only writer; if it were
    # ever too high, the bound must not eat the rows being appended
    with Outbox(db, max_rows_per_subscriber=5) as outbox:
        outbox.append("a", [item(0), item(1)])
        outbox._counts["a"] = 50
        assert outbox.append("a", [item(2)]) == 0
        assert seqs(drain_all(outbox, "a")) == [0, 1, 2]
        assert outbox.count("a") == 3  # recounted


def test_byte_bound_drops_oldest_and_reports(db: Path) -> None:
    with Outbox(db, max_bytes_per_subscriber=3_000) as outbox:
        assert outbox.max_bytes_per_subscriber == 3_000
        assert outbox.append("a", [sized(0, 1_000), sized(1, 1_000)]) == 0
        outbox.append("b", [sized(100, 2_500)])
        assert outbox.append("a", [sized(2, 1_000)]) == 0  # exactly at the bound
        assert outbox.append("a", [sized(3, 1_000)]) == 1
        assert seqs(drain_all(outbox, "a")) == [1, 2, 3]
        # one large row pushes out as many old ones as it takes
        assert outbox.append("a", [sized(4, 2_500)]) == 3
        assert seqs(drain_all(outbox, "a")) == [4]
        # a batch larger than the bound keeps its own newest rows that fit
        assert outbox.append("a", [sized(i, 1_000) for i in range(5, 10)]) == 3
        assert seqs(drain_all(outbox, "a")) == [7, 8, 9]
        # UTF-8 bytes, not characters: "é" counts 2
        assert outbox.append("a", [sized(10, 1_000, fill="é")]) == 1
        assert seqs(drain_all(outbox, "a")) == [8, 9, 10]
        # a row larger than the bound on its own cannot be kept either
        assert outbox.append("a", [sized(11, 3_002)]) == 4
        assert outbox.count("a") == 0
        assert seqs(drain_all(outbox, "b")) == [100]  # bounds are per subscriber


def test_byte_bound_follows_acks_expiry_and_restarts(db: Path) -> None:
    with Outbox(db, max_bytes_per_subscriber=3_000, max_age_s=100.0) as outbox:
        outbox.append("a", [sized(0, 1_000, created=0.0), sized(1, 1_000, created=500.0),
                            sized(2, 1_000, created=500.0)])
        outbox.ack("a", outbox.peek("a", 1)[0][0])  # 1,000 bytes delivered
        assert outbox.append("a", [sized(3, 1_000, created=500.0)]) == 0
        assert outbox.expire(now=550.0) == {}
        outbox.append("a", [sized(4, 1_000, created=0.0)])  # drops 1
        assert seqs(drain_all(outbox, "a")) == [2, 3, 4]
    # the byte total is read back from the file
    with Outbox(db, max_bytes_per_subscriber=3_000, max_age_s=100.0) as outbox:
        assert outbox.append("a", [sized(5, 1_000, created=700.0)]) == 1
        assert seqs(drain_all(outbox, "a")) == [3, 4, 5]
        # expiry takes 3 and 4 (created 500 and 0): their 2,000 bytes are free again
        assert outbox.expire(now=650.0) == {"a": 2}
        assert outbox.append("a", [sized(6, 1_000, created=700.0),
                                   sized(7, 1_000, created=700.0)]) == 0
        assert seqs(drain_all(outbox, "a")) == [5, 6, 7]


def test_byte_bound_once_the_file_outgrows_it(db: Path) -> None:
    # bytes are counted only once the file is larger than the bound (before that no queue
    # can be over it); the count then starts from what the queue already holds
    bound = 64_000
    with Outbox(db, max_bytes_per_subscriber=bound) as outbox:
        dropped = 0
        for i in range(150):
            dropped += outbox.append("a", [sized(i, 1_000)])
            if i == 20:
                assert outbox._bytes == {}  # the file is still smaller than the bound
                outbox.ack("a", outbox.peek("a", 5)[-1][0])  # 0-4 delivered
        assert "a" in outbox._bytes
        assert dropped == 150 - 5 - 64
        assert seqs(drain_all(outbox, "a")) == list(range(86, 150))
        assert sum(size(i) for _, i in drain_all(outbox, "a")) == bound


def test_bounds_together_drop_what_either_needs(db: Path) -> None:
    with Outbox(db, max_rows_per_subscriber=4, max_bytes_per_subscriber=3_000) as outbox:
        outbox.append("a", [sized(i, 500) for i in range(4)])
        assert outbox.append("a", [sized(4, 500)]) == 1  # the row bound
        assert outbox.append("a", [sized(5, 2_000)]) == 2  # the byte bound, beyond it
        assert seqs(drain_all(outbox, "a")) == [3, 4, 5]


def test_dropped_rows_do_not_reuse_ids(db: Path) -> None:
    # The runtime may hold ids from a peek while a drop removes those rows; an ack of such
    # an id must never delete rows appended later.
    with Outbox(db, max_rows_per_subscriber=2) as outbox:
        outbox.append("a", [item(0), item(1)])
        held = outbox.peek("a", 2)
        outbox.append("a", [item(2), item(3)])  # drops 0 and 1
        assert outbox.ack("a", held[-1][0]) == 0
        assert seqs(drain_all(outbox, "a")) == [2, 3]


def test_age_bound_drops_oldest_and_reports(db: Path) -> None:
    with Outbox(db, max_age_s=100.0) as outbox:
        outbox.append("a", [item(0, created=10.0), item(1, created=20.0)])
        outbox.append("b", [item(100, created=15.0)])
        outbox.append("a", [item(2, created=30.0), item(3, created=40.0)])
        outbox.append("c", [item(200, created=50.0)])

        assert outbox.expire(now=105.0) == {}
        assert outbox.expire(now=125.0) == {"a": 2, "b": 1}  # 10, 15, 20 < 25; not 30
        assert seqs(drain_all(outbox, "a")) == [2, 3]
        assert outbox.count("a") == 2
        assert outbox.count("b") == 0
        assert outbox.subscribers() == ["a", "c"]
        assert outbox.expire(now=130.0) == {}  # created == cutoff is kept
        assert outbox.expire(now=1_000.0) == {"a": 2, "c": 1}
        assert outbox.subscribers() == []


def test_age_bound_expires_in_chunks(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "_EXPIRE_CHUNK", 3)
    with Outbox(db, max_age_s=100.0) as outbox:
        outbox.append("a", [item(i, created=float(i)) for i in range(10)])
        outbox.append("b", [item(100 + i, created=float(i)) for i in range(6)])
        outbox.append("c", [item(200 + i, created=float(i)) for i in range(3)])
        assert outbox.expire(now=107.5) == {"a": 8, "b": 6, "c": 3}  # created 0..7 go
        assert seqs(drain_all(outbox, "a")) == [8, 9]
        assert [outbox.count(s) for s in "abc"] == [2, 0, 0]


def test_expiry_spares_rows_appended_while_it_runs(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # expire releases the lock between chunks; a worker thread may append young rows then.
    # Appending after every chunk (same thread, so deterministic) stands for that.
    monkeypatch.setattr(outbox_module, "_EXPIRE_CHUNK", 2)
    with Outbox(db, max_age_s=100.0) as outbox:
        outbox.append("a", [item(i, created=0.0) for i in range(10)])
        chunk = outbox._expire_chunk
        young = iter(range(10, 1_000))

        def chunk_then_append(subscriber: str, before_id: int) -> int:
            n = chunk(subscriber, before_id)
            outbox.append("a", [item(next(young), created=1_000.0)])
            return n

        monkeypatch.setattr(outbox, "_expire_chunk", chunk_then_append)
        assert outbox.expire(now=1_000.0) == {"a": 10}
        assert seqs(drain_all(outbox, "a")) == list(range(10, 16))  # 6 chunks, 6 young rows


def test_age_bound_never_leaves_a_hole(db: Path) -> None:
    # a row stamped earlier than the one ahead of it (clock stepped back) waits for it
    with Outbox(db, max_age_s=100.0) as outbox:
        outbox.append("a", [item(0, created=10.0), item(1, created=60.0), item(2, created=5.0),
                            item(3, created=90.0)])
        assert outbox.expire(now=150.0) == {"a": 1}
        assert seqs(drain_all(outbox, "a")) == [1, 2, 3]
        assert outbox.expire(now=170.0) == {"a": 2}
        assert seqs(drain_all(outbox, "a")) == [3]


def test_unencodable_item_is_refused_and_leaves_the_outbox_usable(db: Path) -> None:
    # json.loads turns a station's "\ud800" escape into a lone surrogate, which UTF-8
    # cannot hold: the append fails as a whole, before any write, and the next one works
    bad = OutboxItem("CP1", "ocpp1.6", "MeterValues", '{"a":"\ud800"}', 1.0)
    with Outbox(db) as outbox:
        outbox.append("a", [item(0)])
        with pytest.raises(ValueError, match="UTF-8"):
            outbox.append("a", [item(1), bad])
        assert outbox.append("a", [item(2)]) == 0
        assert seqs(drain_all(outbox, "a")) == [0, 2]
        assert outbox.count("a") == 2


def test_full_disk_fails_the_append_as_a_whole(db: Path) -> None:
    with Outbox(db) as outbox:
        outbox.append("a", [item(0)])
        conn = outbox._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
        with pytest.raises(OutboxError, match="the disk is full") as caught:
            outbox.append("a", [sized(i, 5_000) for i in range(1, 4)])
        assert not caught.value.corrupt
        assert outbox.count("a") == 1
        conn.execute("PRAGMA max_page_count = 1000000")
        assert outbox.append("a", [sized(4, 5_000)]) == 0
        assert seqs(drain_all(outbox, "a")) == [0, 4]


# -- restarts ----------------------------------------------------------------------------


def test_reopen_after_close_keeps_everything(db: Path) -> None:
    outbox = Outbox(db)
    outbox.append("a", [item(i) for i in range(5)])
    outbox.append("b", [item(100)])
    outbox.ack("a", outbox.peek("a", 2)[-1][0])
    before = {s: outbox.peek(s, 100) for s in ("a", "b")}
    outbox.close()
    outbox.close()  # idempotent
    with pytest.raises(OutboxError, match="closed"):
        outbox.count("a")

    with Outbox(db) as again:
        assert again.subscribers() == ["a", "b"]
        assert {s: again.peek(s, 100) for s in ("a", "b")} == before
        assert again.count("a") == 3
        # ids keep growing after a restart even once everything was delivered
        last = max(i for rows in before.values() for i, _ in rows)
        again.ack("a", last)
        again.ack("b", last)
    with Outbox(db) as third:
        third.append("a", [item(9)])
        assert third.peek("a", 1)[0][0] > last


def test_sigkill_loses_no_returned_append(tmp_path: Path) -> None:
    # The child appends one item per call (like the runtime spilling frame by frame), says
    # "ready" after N, then keeps appending until the SIGKILL lands, possibly mid-commit.
    n = 2_000
    db = tmp_path / "state" / "outbox.sqlite3"
    child = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from router.backends.outbox import Outbox, OutboxItem\n"
        "outbox = Outbox(Path(sys.argv[1]))\n"
        "n, i = int(sys.argv[2]), 0\n"
        "while True:\n"
        "    payload = json.dumps({'seq': i})\n"
        "    outbox.append('sec', [OutboxItem('CP1', 'ocpp1.6', 'MeterValues', payload, 1.0)])\n"
        "    i += 1\n"
        "    if i == n:\n"
        "        sys.stdout.write('ready\\n')\n"
        "        sys.stdout.flush()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", child, str(db), str(n)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "ready\n", proc.stderr.read() if proc.stderr else line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # the commits are in the WAL, not yet checkpointed: reopening must recover them
    assert db.with_name(db.name + "-wal").exists()

    with Outbox(db) as outbox:
        rows = drain_all(outbox, "sec")
        got = seqs(rows)
        assert len(got) >= n
        assert got == list(range(len(got)))  # all of them, in order, none torn or repeated
        assert outbox.count("sec") == len(got)


# -- threads -----------------------------------------------------------------------------


def test_concurrent_appends_from_threads(db: Path) -> None:
    producers, per_producer = 4, 300
    received: list[tuple[int, OutboxItem]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(producers + 1)

    with Outbox(db) as outbox:

        def produce(p: int) -> None:
            try:
                start.wait()
                seq = 0
                while seq < per_producer:
                    size = 1 + seq % 3  # single items and small batches
                    batch = [item(seq + k, station=f"P{p}")
                             for k in range(min(size, per_producer - seq))]
                    outbox.append("sec", batch)
                    seq += len(batch)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        def consume() -> None:
            try:
                start.wait()
                while len(received) < producers * per_producer:
                    rows = outbox.peek("sec", 50)
                    if rows:
                        received.extend(rows)
                        assert outbox.ack("sec", rows[-1][0]) == len(rows)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
        threads.append(threading.Thread(target=consume))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert outbox.count("sec") == 0

    ids = [i for i, _ in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for p in range(producers):
        mine = [json.loads(i.payload)["seq"] for _, i in received if i.station == f"P{p}"]
        assert mine == list(range(per_producer))


# -- any interleaving --------------------------------------------------------------------

MAX_ROWS = 6
MAX_BYTES = 400  # binds before MAX_ROWS once the rows carry some padding
MAX_AGE = 50.0
SUBSCRIBERS = st.sampled_from(["a", "b", "c"])


class OutboxMachine(RuleBasedStateMachine):
    """Appends, acks, expiry and restarts against a list model of each queue."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="outbox-machine-"))
        self.path = self.directory / "outbox.sqlite3"
        self.outbox = self._open()
        self.model: dict[str, list[OutboxItem]] = {}
        self.clock = 0.0
        self.seq = 0
        self.last_id = 0

    def _open(self) -> Outbox:
        return Outbox(self.path, max_rows_per_subscriber=MAX_ROWS,
                      max_bytes_per_subscriber=MAX_BYTES, max_age_s=MAX_AGE)

    @rule(subscriber=SUBSCRIBERS, k=st.integers(1, 8), gap=st.integers(0, 20),
          pad=st.integers(0, 80))
    def append(self, subscriber: str, k: int, gap: int, pad: int) -> None:
        self.clock += gap
        items = [sized(self.seq + j, 60 + pad, created=self.clock) for j in range(k)]
        self.seq += k
        queue = self.model.setdefault(subscriber, [])
        queue.extend(items)
        expected = 0
        while len(queue) > MAX_ROWS or sum(size(i) for i in queue) > MAX_BYTES:
            del queue[0]
            expected += 1
        assert self.outbox.append(subscriber, items) == expected

    @rule(subscriber=SUBSCRIBERS, n=st.integers(0, 10))
    def ack(self, subscriber: str, n: int) -> None:
        rows = self.outbox.peek(subscriber, n)
        queue = self.model.get(subscriber, [])
        assert [i for _, i in rows] == queue[:n]
        if rows:
            assert self.outbox.ack(subscriber, rows[-1][0]) == len(rows)
            del queue[:len(rows)]

    @rule(subscriber=SUBSCRIBERS, n=st.integers(1, 4))
    def peek_in_two_steps(self, subscriber: str, n: int) -> None:
        first = self.outbox.peek(subscriber, n)
        after = first[-1][0] if first else 0
        rest = self.outbox.peek(subscriber, 100, after_id=after)
        assert [i for _, i in first + rest] == self.model.get(subscriber, [])

    @rule(advance=st.integers(0, 60))
    def expire(self, advance: int) -> None:
        now = self.clock + advance
        expected: dict[str, int] = {}
        for subscriber, queue in self.model.items():
            old = sum(1 for i in queue if i.created < now - MAX_AGE)
            if old:
                expected[subscriber] = old
                del queue[:old]
        assert self.outbox.expire(now) == expected

    @precondition(lambda self: self.seq > 0)
    @rule()
    def restart(self) -> None:
        self.outbox.close()
        self.outbox = self._open()

    @invariant()
    def counts_and_order(self) -> None:
        pending = sorted(s for s, q in self.model.items() if q)
        assert self.outbox.subscribers() == pending
        for subscriber in ("a", "b", "c"):
            queue = self.model.get(subscriber, [])
            assert self.outbox.count(subscriber) == len(queue)
            rows = drain_all(self.outbox, subscriber)
            assert [i for _, i in rows] == queue
            ids = [i for i, _ in rows]
            assert ids == sorted(set(ids))

    def teardown(self) -> None:
        self.outbox.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def test_any_interleaving_keeps_fifo_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "_EXPIRE_CHUNK", 4)  # expiry crosses chunk edges
    run_state_machine_as_test(
        OutboxMachine,
        settings=settings(max_examples=100, stateful_step_count=30, deadline=None,
                          derandomize=True),
    )


# -- bad files ---------------------------------------------------------------------------


def test_garbage_file_is_a_clear_error(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database, just text " * 200)
    with pytest.raises(OutboxError) as caught:
        Outbox(db)
    assert str(db) in str(caught.value)
    assert caught.value.path == db
    assert caught.value.corrupt


def test_damaged_pages_are_a_clear_error(db: Path) -> None:
    with Outbox(db) as outbox:
        for start in range(0, 2_000, 100):
            outbox.append("a", [item(i) for i in range(start, start + 100)])
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    data[page:len(data) - page] = b"\xff" * (len(data) - 2 * page)  # all but the schema page
    db.write_bytes(bytes(data))

    with pytest.raises(OutboxError) as caught, Outbox(db) as outbox:
        outbox.count("a")
        drain_all(outbox, "a")
        outbox.append("a", [item(0)])
    assert str(db) in str(caught.value)
    assert caught.value.corrupt


def test_path_that_cannot_hold_a_database(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(OutboxError, match="a-directory"):
        Outbox(tmp_path / "a-directory")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutboxError, match="a-file"):
        Outbox(tmp_path / "a-file" / "outbox.sqlite3")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of mode bits")
def test_unreadable_file_is_a_clear_error(db: Path) -> None:
    Outbox(db).close()
    db.chmod(0)
    try:
        with pytest.raises(OutboxError, match=str(db)):
            Outbox(db)
    finally:
        db.chmod(0o600)


def test_second_owner_is_refused(db: Path) -> None:
    with Outbox(db) as outbox:
        outbox.append("a", [item(0)])
        with pytest.raises(OutboxError, match="another process or Outbox") as caught:
            Outbox(db, busy_timeout_s=0.05)
        assert str(db) in str(caught.value)
        assert not caught.value.corrupt
        assert outbox.count("a") == 1  # the owner is unaffected


def test_foreign_or_newer_schema_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, body BLOB)")
    conn.close()
    with pytest.raises(OutboxError, match="columns"):
        Outbox(foreign)

    newer = tmp_path / "newer.sqlite3"
    Outbox(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(OutboxError, match="schema version 99"):
        Outbox(newer)


def test_bad_arguments(db: Path) -> None:
    with pytest.raises(ValueError):
        Outbox(db, max_rows_per_subscriber=0)
    with pytest.raises(ValueError):
        Outbox(db, max_bytes_per_subscriber=0)
    with pytest.raises(ValueError):
        Outbox(db, max_age_s=0)
    with pytest.raises(ValueError):
        Outbox(db, synchronous="OFF")  # type: ignore[arg-type]
