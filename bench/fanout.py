"""Duplication benchmark, in one run: the primary path with 0, 1 and 3 secondaries, and the
outbox's spill and replay rates.

The first part is ``bench/forwarding.py`` with the scenarios ``node`` (no secondary),
``node+1sec`` (one answering secondary) and ``node+3sec`` (two answering, one stalled:
it accepts the copies and never answers), N stations sending MeterValues (subscribed),
printed with the ratios to ``node``. The aim: p99 on the primary path with a stalled
secondary within 1.1x of no secondary. The second part is ``bench/outbox.py``'s
``measure`` (SQLite, WAL, synchronous=NORMAL, batches as the runtime spills them). Aim:
>= 20,000 frames/s spill and replay.

    .venv/bin/python bench/fanout.py [--stations 50] [--seconds 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from outbox import measure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", default="50")
    parser.add_argument("--seconds", default="10")
    parser.add_argument("--rate", default="1500",
                        help="calls/s of the paced run (below saturation: latency ratios)")
    args = parser.parse_args()
    common = [sys.executable, str(BENCH / "forwarding.py"), "--scenarios",
              "node,node+1sec,node+3sec", "--stations", args.stations, "--seconds",
              args.seconds, "--no-json"]
    print("closed loop (throughput; the node saturates a core, so copies cost primary calls):")
    done = subprocess.run(common, check=False)
    print(f"\npaced at {args.rate} calls/s (latency with the node below saturation):")
    paced = subprocess.run([*common, "--rate", args.rate], check=False)
    print()
    print("outbox (SQLite WAL, synchronous=NORMAL, 500-byte payloads, through worker threads "
          "as the runtime calls it):")
    for batch in (1, 10, 100):
        spill, replay = measure(20_000, batch, "NORMAL", via_trio_thread=True)
        ok = "met" if min(spill, replay) >= 20_000 else "below"
        print(f"  spill in batches of {batch:>3}: {spill:>9,.0f} frames/s   replay "
              f"{replay:>9,.0f} frames/s   aim >= 20,000: {ok}")
    return done.returncode or paced.returncode


if __name__ == "__main__":
    raise SystemExit(main())
