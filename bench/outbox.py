"""Outbox spill and replay rates (router/backends/outbox.py), synchronous=NORMAL and FULL.

Spill: ``n`` MeterValues copies (~500-byte payloads) appended to one subscriber in
batches of 1, 10 and 100 items per `append` (one commit each). Replay: the same rows read
back with ``peek(500)`` + ``ack`` until empty. Both are frames per second over the whole
run, on a fresh database in a temporary directory (``--dir`` to put it on the disk that
will hold the node's state_dir: the FULL figures are that disk's fsync latency).

    .venv/bin/python bench/outbox.py                 # ~1 minute
    .venv/bin/python bench/outbox.py --quick         # smoke run, a few seconds
    .venv/bin/python bench/outbox.py -n 50000 --batches 1,100 --sync NORMAL --no-trio
    .venv/bin/python bench/outbox.py --dir /var/lib/ocpp-router   # on the state disk

The "to_thread" rows make each call through trio.to_thread.run_sync from a trio task,
as the fan-out runtime does: the thread hop is part of what a spilled frame costs.

`measure(n, batch, synchronous)` is the function a combined benchmark calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: make `router` importable
    sys.path.insert(0, str(ROOT))

from router.backends.outbox import Outbox, OutboxItem, Synchronous  # noqa: E402

AIM_FRAMES_PER_S = 20_000
PAYLOAD_BYTES = 500
REPLAY_BATCH = 500


def _payload(i: int, size: int) -> str:
    """A MeterValues payload of about ``size`` bytes of JSON text, varying with ``i``."""
    samples = []
    k = 0
    text = ""
    while True:
        samples.append({
            "value": f"{(i * 7 + k * 13) % 100000 / 10:.1f}",
            "measurand": "Energy.Active.Import.Register",
            "unit": "Wh",
        })
        k += 1
        candidate = json.dumps({
            "connectorId": 1,
            "transactionId": i,
            "meterValue": [{"timestamp": "2026-01-01T00:00:00Z", "sampledValue": samples}],
        }, separators=(",", ":"))
        if len(candidate) > size:
            return text or candidate
        text = candidate


def _items(n: int, size: int) -> list[OutboxItem]:
    now = time.time()
    return [
        OutboxItem(station=f"CP{i % 50:04d}", subprotocol="ocpp1.6", action="MeterValues",
                   payload=_payload(i, size), created=now)
        for i in range(n)
    ]


def _spill_and_replay(outbox: Outbox, batches: list[list[OutboxItem]]) -> tuple[float, int, float]:
    """Append the batches, then drain with peek + ack: (spill seconds, rows read, replay s)."""
    start = time.perf_counter()
    for chunk in batches:
        outbox.append("secondary", chunk)
    spill_s = time.perf_counter() - start
    start = time.perf_counter()
    replayed = 0
    while rows := outbox.peek("secondary", REPLAY_BATCH):
        replayed += len(rows)
        outbox.ack("secondary", rows[-1][0])
    return spill_s, replayed, time.perf_counter() - start


async def _spill_and_replay_trio(
    outbox: Outbox, batches: list[list[OutboxItem]]
) -> tuple[float, int, float]:
    """The same, each call hopping to a worker thread as the trio runtime does."""
    run = trio.to_thread.run_sync
    start = time.perf_counter()
    for chunk in batches:
        await run(outbox.append, "secondary", chunk)
    spill_s = time.perf_counter() - start
    start = time.perf_counter()
    replayed = 0
    while rows := await run(outbox.peek, "secondary", REPLAY_BATCH):
        replayed += len(rows)
        await run(outbox.ack, "secondary", rows[-1][0])
    return spill_s, replayed, time.perf_counter() - start


def measure(
    n: int,
    batch: int,
    synchronous: str,
    *,
    directory: Path | None = None,
    payload_bytes: int = PAYLOAD_BYTES,
    via_trio_thread: bool = False,
) -> tuple[float, float]:
    """Spill and replay rates in frames/s for ``n`` frames appended ``batch`` per commit.

    A fresh outbox in a temporary directory (under ``directory`` when given) is filled with
    ``n`` items in appends of ``batch`` items, then drained with peek(500) + ack; each rate
    is ``n`` over the wall time of its phase. ``synchronous`` is "NORMAL" or "FULL".
    ``via_trio_thread`` makes every call through ``trio.to_thread.run_sync`` from a trio
    task, the way the fan-out runtime calls the outbox, so the thread hop is included.
    """
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
    sync: Synchronous = "FULL" if synchronous == "FULL" else "NORMAL"
    items = _items(n, payload_bytes)
    batches = [items[i:i + batch] for i in range(0, n, batch)]
    with tempfile.TemporaryDirectory(prefix="outbox-bench-", dir=directory) as tmp:
        outbox = Outbox(Path(tmp) / "outbox.sqlite3", synchronous=sync)
        try:
            if via_trio_thread:
                spill_s, replayed, replay_s = trio.run(_spill_and_replay_trio, outbox, batches)
            else:
                spill_s, replayed, replay_s = _spill_and_replay(outbox, batches)
        finally:
            outbox.close()
    if replayed != n:
        raise RuntimeError(f"replayed {replayed} of {n} frames")
    return n / spill_s, n / replay_s


def _filesystem(path: Path) -> str:
    """The filesystem type holding ``path`` (tmpfs would make FULL look free)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and str(path).startswith(fields[1]) and \
                        len(fields[1]) > len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return kind


def _frames(sync: str, batch: int, n: int, quick: bool) -> int:
    if n:
        return n
    # FULL pays one fsync per commit: bound the number of commits rather than frames
    full = 100_000 if sync == "NORMAL" else min(100_000, batch * 3_000)
    return full // 10 if quick else full


def main() -> int:
    """Print spill and replay rates per setting against the aim."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-n", type=int, default=0,
                        help="frames per run (default 100,000; FULL: 3,000 commits at most)")
    parser.add_argument("--batches", default="1,10,100", help="items per append")
    parser.add_argument("--sync", default="NORMAL,FULL", help="synchronous settings")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--no-trio", action="store_true",
                        help="skip the rows measured through trio.to_thread.run_sync")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the temporary database goes (default: system temp)")
    parser.add_argument("--quick", action="store_true", help="small runs, a smoke test")
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    rows = [(sync.strip().upper(), batch, False)
            for sync in args.sync.split(",") for batch in batches]
    if not args.no_trio:
        rows += [("NORMAL", batch, True) for batch in batches]
    where = Path(args.dir or tempfile.gettempdir()).resolve()
    print(f"outbox bench: ~{PAYLOAD_BYTES}-byte payloads, replay = peek({REPLAY_BATCH}) + ack, "
          f"database under {where} ({_filesystem(where)}), {os.cpu_count()} CPUs, "
          f"median of {args.repeat}")
    print(f"aim: >= {AIM_FRAMES_PER_S:,} frames/s spill and replay")
    print(f"{'synchronous':<12}{'calls':<15}{'batch':>6}{'frames':>9}{'spill/s':>11}"
          f"{'replay/s':>11}  aim")
    for sync, batch, via_trio in rows:
        n = _frames(sync, batch, args.n, args.quick)
        runs = [measure(n, batch, sync, directory=args.dir, via_trio_thread=via_trio)
                for _ in range(max(1, args.repeat))]
        spill = statistics.median(r[0] for r in runs)
        replay = statistics.median(r[1] for r in runs)
        ok = spill >= AIM_FRAMES_PER_S and replay >= AIM_FRAMES_PER_S
        calls = "to_thread" if via_trio else "direct"
        print(f"{sync:<12}{calls:<15}{batch:>6}{n:>9,}{spill:>11,.0f}{replay:>11,.0f}  "
              f"{'meets' if ok else 'misses'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
