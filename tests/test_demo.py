"""``ocpp-router demo`` as a newcomer runs it: a subprocess, its terminal output read back.

Within its first 30 seconds (as the lines' own time stamps say) the demo must show the
overlay forming, a firewall refusal naming its rule, a signed Reset delivered, copies
reaching the secondary, a failover and a failback, and it must end cleanly: exit 0 after
``--duration`` and after Ctrl-C, its temporary directory gone. During the 40-second run
its live picture is opened in headless Chromium, which must show the three nodes, both
link encodings and frames moving (the screenshot is kept in the test's tmp_path).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from router.demo.ocpp_peers import DemoCsms
from tests.browser import chromium_binary, parse, png_size, rate_pair, run_chromium

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\[\s*(\d+\.\d)s\] (\S+)\s+(\S+)\s+(.*)$")
RULE = "resets need an admin signature"


@contextlib.contextmanager
def running_demo(stderr: Any, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``ocpp-router demo`` with its stdout piped; killed if the block leaves it running."""
    proc = subprocess.Popen([sys.executable, "-m", "router", "demo", *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stamped(stdout: str) -> list[tuple[float, str, str, str]]:
    """(seconds, source, tag, text) of every time-stamped line."""
    return [(float(m[1]), m[2], m[3], m[4])
            for m in map(LINE.match, stdout.splitlines()) if m is not None]


def first(lines: list[tuple[float, str, str, str]], source: str, tag: str,
          *words: str) -> float:
    """When the first line from ``source`` with ``tag`` and all ``words`` was stamped."""
    for at, who, what, text in lines:
        if who == source and what == tag and all(w in text for w in words):
            return at
    raise AssertionError(f"no {source} {tag} line with {words}")


def workdir(stdout: str) -> Path:
    found = re.search(r"keys, configs and state in (\S+) \(removed", stdout)
    assert found is not None, stdout[:500]
    return Path(found[1])


@pytest.mark.slow
def test_the_demo_shows_the_whole_mission_and_exits_0(tmp_path: Path) -> None:
    """One 40-second run: its live picture is opened in headless Chromium while it runs,
    and its terminal output is read back once it has ended by itself."""
    chromium = chromium_binary()  # installs Debian's chromium when missing, or skips
    # stderr into a file: a pipe nobody reads while stdout is read could fill and stall it
    errors = tmp_path / "demo.err"
    with errors.open("w") as stderr, running_demo(stderr, "--duration", "40") as proc:
        assert proc.stdout is not None
        seen: list[str] = []
        url = None
        for line in proc.stdout:  # until the core's summary shows traffic on both links
            seen.append(line)
            found = re.match(r"^demo: live picture: (\S+)$", line)
            url = found[1] if found else url
            if (url and " core " in line and " | stations " in line
                    and "edge-a json open" in line and "edge-b msgpack open" in line):
                break
        assert url is not None, "".join(seen)
        the_live_picture_shows_the_scene(chromium, url, tmp_path)
        rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    err = errors.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = stamped(out)

    assert re.search(r"^demo: live picture: http://127\.0\.0\.1:\d+/topology$", out, re.M)
    # the overlay forms: both encodings, routes both ways
    link_a = first(lines, "edge-a", "OVERLAY", "peer link to core up (json")
    link_b = first(lines, "edge-b", "OVERLAY", "peer link to core up (msgpack")
    first(lines, "edge-a", "ROUTES", "CSMS")
    first(lines, "edge-b", "ROUTES", "CSMS")
    first(lines, "core", "ROUTES", "DEMO-A1")
    first(lines, "core", "ROUTES", "DEMO-B1")
    attached = first(lines, "core", "ATTACH", "over the overlay", "csms-1")
    # the firewall: unsigned refused by name, signed delivered and answered by the station
    refused = first(lines, "core", "FIREWALL", "refused Reset", f'rule "{RULE}"')
    first(lines, "csms-1", "RESET", "unsigned Reset", "SecurityError", RULE)
    passed = first(lines, "core", "FIREWALL", "forwarded Reset", RULE)
    delivered = first(lines, "csms-1", "RESET", "signed Reset", "delivered",
                      "received it and answered Accepted")
    # copies at the secondary
    status = first(lines, "analytics", "COPIES", "StatusNotification")
    meter = first(lines, "analytics", "COPIES", "MeterValues")
    # the priority-1 CSMS stops: failover to priority 2; it returns: failback to priority 1
    stops = first(lines, "scene", "SCENE", "csms-1 stops")
    # every station's backend link moves, the edges' stations (attached over the overlay)
    # with the core's own, and none of them has to dial again
    failover = first(lines, "core", "FAILOVER",
                     "9 station links moved to SRV priority 2 (csms-2)")
    back = first(lines, "scene", "SCENE", "csms-1 is back")
    failback = first(lines, "core", "FAILBACK", "9 station links back on SRV priority 1 (csms-1)")
    assert not [line for line in out.splitlines() if "attached again" in line], out

    assert max(link_a, link_b) <= attached <= refused <= min(passed, delivered)
    assert stops <= failover <= back <= failback
    assert max(link_a, link_b, refused, delivered, status, meter, failover, failback) < 30

    # one line a second per node, with stations, a frame rate and its links
    summaries = {node: [text for _at, who, tag, text in lines if who == node and tag == "|"]
                 for node in ("core", "edge-a", "edge-b")}
    for node, rows in summaries.items():
        assert len(rows) >= 30, (node, len(rows))
        rates = [float(m[1]) for row in rows if (m := re.search(r"([\d.]+) frames/s", row))]
        assert max(rates) > 0, node
    assert "stations 3/3 + 6 over the overlay" in summaries["core"][-1]
    assert "edge-a json open" in summaries["core"][-1]
    assert "edge-b msgpack open" in summaries["core"][-1]
    assert re.search(r"analytics [1-9]\d* copies", summaries["core"][-1])
    assert "stations 3/3" in summaries["edge-a"][-1] and "core json open" in summaries["edge-a"][-1]
    assert "core msgpack open" in summaries["edge-b"][-1]

    closing = out.splitlines()[-1]
    assert closing.startswith("demo: done."), closing
    assert "firewall refusals 1" in closing
    assert not workdir(out).exists()


def the_live_picture_shows_the_scene(chromium: str, url: str, tmp_path: Path) -> None:
    """The core's live picture in Chromium, its script given virtual time to poll /live:
    all three nodes, both link encodings, frames moving on both links, the refusal."""
    budget = "--virtual-time-budget=5000"
    page = run_chromium(chromium, tmp_path, [budget, "--dump-dom", url])
    shot = tmp_path / "demo-live.png"
    run_chromium(chromium, tmp_path, [budget, f"--screenshot={shot}", url])
    (tmp_path / "demo-live.html").write_text(page)
    dom = parse(page)
    [(status, status_text)] = dom.find("p", id="live-status")
    assert int(status["data-updates"]) >= 1, status_text  # the script polled /live
    nodes = {a["data-node"]: a["data-kind"] for a, _ in dom.find("g")
             if "node" in a.get("class", "").split()}
    assert nodes == {"core": "self", "edge-a": "peer", "edge-b": "peer"}, nodes
    assert sorted(text for _, text in dom.find("text", **{"class": "encoding"})) == [
        "json", "msgpack"]
    rates = {a["data-peer"]: rate_pair(text) for a, text in dom.find("text", **{"class": "rate"})}
    assert set(rates) == {"edge-a", "edge-b"}, rates
    for peer, (frames_in, frames_out) in rates.items():
        assert frames_in > 0 and frames_out > 0, (peer, rates)
    decisions = dom.rows("decisions")
    assert [row[1:5] for row in decisions] == [["reject", RULE, "Reset", "csms"]], decisions
    assert png_size(shot.read_bytes()) == (1200, 800)
    assert shot.stat().st_size > 10_000  # a drawing, not a blank page


def test_ctrl_c_stops_the_demo_cleanly() -> None:
    with running_demo(subprocess.PIPE, "--stations", "1") as proc:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # until the first once-a-second line
            seen.append(line)
            if " | stations " in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    out = "".join(seen) + rest
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "demo: stopping" in out
    assert out.splitlines()[-1].startswith("demo: done."), out[-2000:]
    assert not workdir(out).exists()


async def test_a_demo_csms_whose_port_stays_taken_comes_back_on_another() -> None:
    """A restarted CSMS retries its old port, then takes a new one (the scene republishes
    its SRV record), rather than ending the demo."""
    seen: list[tuple[str, dict[str, object]]] = []
    holder = socket.socket()  # no SO_REUSEADDR: the port cannot be shared with it
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        csms = DemoCsms("csms-x", lambda name, fields: seen.append((name, fields)))
        taken = csms.port = holder.getsockname()[1]
        async with trio.open_nursery() as nursery:
            port = await nursery.start(csms.serve)
            assert port != taken and csms.port == port
            csms.stop()
        assert seen[0] == ("csms_listening", {"csms": "csms-x", "port": port})
        assert not csms.running
    finally:
        holder.close()
