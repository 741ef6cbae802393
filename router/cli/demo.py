"""``ocpp-router demo``: the whole product on loopback, narrated (the scene: router/demo/).

A core node in front of two demo CSMSs found by DNS SRV, two edge nodes chained under it,
simulated 1.6, 2.0.1 and 2.1 stations, a firewall, a secondary backend, a failover and a
failback. Keys, configs and state live in a temporary directory removed at the end.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import trio

from router.demo import run_scene


def run_demo(stations: int, duration: float | None, log_level: str) -> int:
    """Run the demo until Ctrl-C (or ``duration`` seconds); returns the exit code.

    ``stations`` is the number of simulated stations at each node."""
    if stations < 1:
        print("ocpp-router: demo: --stations must be at least 1", file=sys.stderr)
        return 2
    if duration is not None and duration <= 0:
        print("ocpp-router: demo: --duration must be more than 0", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ocpp-router-demo-") as directory:
        trio.run(run_scene, Path(directory), stations, duration, sys.stdout, log_level)
    return 0


__all__ = ["run_demo"]
