"""The forwarding loop (router/net/readloop.py) and a station session on it.

Each session here joins two real WebSockets over Unix socket pairs, so both of the node's
links are plain sockets and the session takes the loop's path: the loop reads them and
steps every frame in a plain call; the sides' tasks only do what must wait. The far ends
(the station, the CSMS) are links the test drives. Virtual time (MockClock, autojump):
nothing here waits on a wall clock.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from policies import Firewall, load_policy
from router.config import NodeSection
from router.net import readloop
from router.net.keepalive import Keepalive
from router.net.readloop import ReadLoop, read_loop
from router.net.wslink import LinkClosed, WsLink
from router.relay.forwarding import SessionDeps
from router.relay.gate import Gate
from router.relay.session import StationSession
from router.relay.timer import CallTimer
from router.stats import Stats
from router.wire.frames import SEND, Frame, Version, encode_frame
from tests.memory_ws import ws_pair
from tests.session_rig import running

Clock = trio.testing.MockClock
settle = trio.testing.wait_all_tasks_blocked


@pytest.fixture
def autojump_clock() -> Clock:
    return trio.testing.MockClock(autojump_threshold=0)


@dataclass
class Rig:
    session: StationSession
    station: WsLink  # the station's own end
    backend: WsLink  # the CSMS's own end
    node_station: WsLink  # the node's link to the station
    node_backend: WsLink  # the node's link to the CSMS
    stats: Stats
    ended: trio.Event


@asynccontextmanager
async def loop_rig(version: Version = Version.V201, *, loop: bool = True,
                   firewall: Path | None = None,
                   backend_keepalive: Keepalive | None = None) -> AsyncIterator[Rig]:
    station, node_station = ws_pair(version.value, sockets=True)
    node_backend, backend = ws_pair(version.value, sockets=True, keepalive=backend_keepalive)
    stats, timer = Stats(), CallTimer(30.0)
    gate = Gate(Firewall(load_policy(firewall)) if firewall else None, None, None)
    deps = SessionDeps(settings=NodeSection(id="n1", forwarding_loop=loop), gate=gate,
                       stats=stats, timer=timer)
    session = StationSession(deps, "CS-1", version, node_station, node_backend, "csms")
    async with running(session, timer) as ended:
        yield Rig(session, station, backend, node_station, node_backend, stats, ended)


async def read(link: WsLink, count: int = 1) -> list[Any]:
    """The next ``count`` messages the far end gets, decoded."""
    with trio.fail_after(60):
        return [json.loads(await link.get_message()) for _ in range(count)]


async def read_to_close(link: WsLink) -> tuple[list[Any], int | None]:
    """Every message the far end gets until the node closes the link, and the close code.
    (The far end's reply to the close may find the socket closed already: the messages
    parsed in that last read still count.)"""
    got: list[Any] = []
    with trio.fail_after(60):
        while True:
            try:
                got.append(json.loads(await link.get_message()))
            except LinkClosed:
                break
    got += [json.loads(m) for m in link._inbox[link._next:]]
    close = link.protocol.close_rcvd
    return got, close.code if close is not None else None


async def test_frames_cross_the_loop_both_ways(autojump_clock: Clock) -> None:
    async with loop_rig() as r:
        assert r.session.station.reading is not None and r.session.backend.reading is not None
        assert len(read_loop()) == 2  # both links are the loop's: no pump reads them
        await r.station.send_message('[2,"c1","Heartbeat",{}]')
        assert await read(r.backend) == [[2, "c1", "Heartbeat", {}]]
        await r.backend.send_message('[3,"c1",{"currentTime":"2026-01-01T00:00:00Z"}]')
        assert await read(r.station) == [[3, "c1", {"currentTime": "2026-01-01T00:00:00Z"}]]
        await r.backend.send_message('[2,"b1","Reset",{"type":"Immediate"}]')
        assert await read(r.station) == [[2, "b1", "Reset", {"type": "Immediate"}]]
        await r.station.send_message('[3,"b1",{"status":"Accepted"}]')
        assert await read(r.backend) == [[3, "b1", {"status": "Accepted"}]]
        await settle()
        assert (r.stats.frames_up, r.stats.frames_down, r.stats.answers_forwarded) == (2, 2, 2)
        assert r.session.station.jobs is None and r.session.backend.jobs is None


async def test_the_task_path_still_forwards_with_the_loop_turned_off(
    autojump_clock: Clock,
) -> None:
    async with loop_rig(loop=False) as r:
        assert r.session.station.reading is None
        await r.station.send_message('[2,"c1","Heartbeat",{}]')
        assert await read(r.backend) == [[2, "c1", "Heartbeat", {}]]
        await r.backend.send_message('[3,"c1",{"currentTime":"2026-01-01T00:00:00Z"}]')
        assert await read(r.station) == [[3, "c1", {"currentTime": "2026-01-01T00:00:00Z"}]]


async def test_frames_that_need_the_task_keep_their_place(autojump_clock: Clock,
                                                          tmp_path: Path) -> None:
    """A refused CALL and a malformed frame are answered by the side's task, between
    frames the loop steps itself: the station gets every answer in the order it earned
    it, and the CSMS every CALL in the station's order."""
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "forward"\n\n[[rules]]\nname = "no data transfer"\n'
                      'direction = "from-station"\nactions = ["DataTransfer"]\n'
                      'then = "reject"\n')
    async with loop_rig(firewall=policy) as r:
        await r.station.send_message('[2,"c1","Heartbeat",{}]')
        await r.station.send_message('[2,"c2","DataTransfer",{"vendorId":"x"}]')
        await r.station.send_message('[2,"c3","Heartbeat",')  # not JSON
        await r.station.send_message('[2,"c4","Heartbeat",{}]')  # queued behind c1
        assert await read(r.backend) == [[2, "c1", "Heartbeat", {}]]
        answers = await read(r.station, 2)
        assert [a[0] for a in answers] == [4, 4]
        assert answers[0][1:3] == ["c2", "SecurityError"]
        assert answers[1][2] in ("FormatViolation", "FormationViolation", "RpcFrameworkError")
        await r.backend.send_message('[3,"c1",{"currentTime":"2026-01-01T00:00:00Z"}]')
        assert await read(r.station) == [[3, "c1", {"currentTime": "2026-01-01T00:00:00Z"}]]
        assert await read(r.backend) == [[2, "c4", "Heartbeat", {}]]
        await settle()
        assert r.session.station.jobs is None  # the link is the loop's again


async def test_a_csms_that_does_not_read_stalls_only_what_goes_to_it(
    autojump_clock: Clock,
) -> None:
    """Frames the CSMS's socket cannot take wait in the node's link, in order, and the
    station's link is not read meanwhile; what the CSMS sends still reaches the station.
    Once the CSMS reads, every frame arrives, none lost, none reordered."""
    count = 24
    big = [Frame(SEND, f"ev-{i}", action="NotifyPeriodicEventStream",
                 payload={"id": 1, "pending": 0, "basetime": "2026-01-01T00:00:00Z",
                          "data": [str(i) * 200_000]}) for i in range(count)]
    async with loop_rig(Version.V21) as r, trio.open_nursery() as nursery:

        async def station_sends() -> None:
            for frame in big:
                await r.station.send_message(encode_frame(frame))

        nursery.start_soon(station_sends)
        await settle()
        assert r.node_backend.backlog > 0  # the CSMS's socket is full
        assert r.session.station.jobs is not None  # the station side waits for it
        await r.backend.send_message('[2,"b1","Reset",{"type":"Immediate"}]')
        assert await read(r.station) == [[2, "b1", "Reset", {"type": "Immediate"}]]
        got = await read(r.backend, count)
        assert [g[1] for g in got] == [f"ev-{i}" for i in range(count)]
        assert got[-1][3]["data"] == [str(count - 1) * 200_000]
        await settle()
        assert r.node_backend.backlog == 0 and r.session.station.jobs is None


async def test_the_station_leaving_ends_the_session(autojump_clock: Clock) -> None:
    """The CSMS's CALL the station did not answer gets the node's CALLERROR, then the
    CSMS's link closes with the station's code; the loop lets go of both links."""
    async with loop_rig() as r:
        await r.backend.send_message('[2,"b1","Reset",{"type":"Immediate"}]')
        assert (await read(r.station))[0][1] == "b1"
        await r.station.aclose(1000, "bye")
        with trio.fail_after(60):
            await r.ended.wait()
        [answer], close = await read_to_close(r.backend)
        assert answer[:3] == [4, "b1", "InternalError"]
        assert close == 1000
        assert len(read_loop()) == 0


async def test_a_station_answer_sent_with_its_close_is_forwarded(autojump_clock: Clock) -> None:
    """The station answers the CSMS's CALL and closes at once, the two in one read: the
    answer still reaches the CSMS (before, a read that ended in a close dropped the
    messages before it, and the CSMS got the node's InternalError instead)."""
    async with loop_rig() as r:
        await r.backend.send_message('[2,"b1","Reset",{"type":"Immediate"}]')
        assert (await read(r.station))[0][1] == "b1"
        await r.station.send_message('[3,"b1",{"status":"Accepted"}]')
        await r.station.aclose(1000, "bye")
        got, close = await read_to_close(r.backend)
        assert got == [[3, "b1", {"status": "Accepted"}]] and close == 1000


async def test_a_csms_that_stops_answering_pings_ends_the_session(
    autojump_clock: Clock,
) -> None:
    """The keepalive watcher gives up the CSMS's link while the loop reads it: the
    session hears it as a reader would, and the station is told why."""
    async with loop_rig(backend_keepalive=Keepalive(10.0, 5.0)) as r:
        with trio.fail_after(60):
            await r.ended.wait()  # the CSMS's end never reads, so never answers a ping
        with pytest.raises(LinkClosed):
            await r.station.get_message()
        close = r.station.protocol.close_rcvd
        assert close is not None and close.code == 1001
        assert close.reason == "backend link closed: no answer to a ping within 5 s"


class Recorder:
    """A consumer of the loop that keeps what it gets; ``raises`` makes ``take`` fail."""

    def __init__(self, raises: bool = False) -> None:
        self.messages: list[str | bytes] = []
        self.failures: list[Exception] = []
        self.closes: list[int] = []
        self.raises = raises
        self.got = trio.Event()

    def take(self, message: str | bytes) -> bool:
        self.got.set()
        if self.raises:
            raise RuntimeError("a bug in the consumer")
        self.messages.append(message)
        return True

    def lost(self, code: int, reason: str) -> None:
        self.closes.append(code)

    def failed(self, error: Exception) -> None:
        self.failures.append(error)


async def test_a_consumer_that_raises_costs_its_link_only() -> None:
    loop = ReadLoop()
    bad_far, bad = ws_pair(sockets=True)
    good_far, good = ws_pair(sockets=True)
    broken, fine = Recorder(raises=True), Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        for link, consumer in ((bad, broken), (good, fine)):
            loop.resume(loop.add(link, consumer))
        await bad_far.send_message("one")
        await bad_far.send_message("two")
        with trio.fail_after(5):
            await broken.got.wait()
        await good_far.send_message("three")
        with trio.fail_after(5):
            await fine.got.wait()
        assert fine.messages == ["three"]
        # the failure paused the link: its task raises it, and nothing more is handed
        # over (the second message waits in the loop for a resume that never comes)
        assert [str(e) for e in broken.failures] == ["a bug in the consumer"]
        nursery.cancel_scope.cancel()


async def test_a_link_closed_under_the_loop_leaves_its_fd_number_to_the_next() -> None:
    """A socket closed before its link left the loop frees its fd number; the next link
    given that number replaces the entry, and the old link's removal leaves it alone."""
    loop = ReadLoop()
    old, old_far = ws_pair(sockets=True)
    old_reading = loop.add(old, Recorder())
    old.stream.socket.close()  # type: ignore[attr-defined]
    new, new_far = ws_pair(sockets=True)
    new_consumer = Recorder()
    assert new.sock is not None and new.sock.fileno() == old_reading.fd
    new_reading = loop.add(new, new_consumer)
    loop.remove(old_reading)
    assert len(loop) == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        loop.resume(new_reading)
        await new_far.send_message("still read")
        with trio.fail_after(5):
            await new_consumer.got.wait()
        assert new_consumer.messages == ["still read"]
        nursery.cancel_scope.cancel()
    del old_far


async def test_writes_that_do_not_wait_keep_their_order_with_writes_that_do() -> None:
    """``put`` leaves what the kernel does not take in the link; a later send, waiting or
    not, goes after it, and a flush returns once all of it is out."""
    node, far = ws_pair(sockets=True)
    first = Frame(SEND, "big", action="NotifyPeriodicEventStream",
                  payload={"id": 1, "pending": 0, "basetime": "2026-01-01T00:00:00Z",
                           "data": ["x" * 900_000]})
    node.put_frame(first, None)
    assert node.backlog > 0
    node.put_frame(Frame(SEND, "second", action="Heartbeat", payload={}), None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.send_frame, Frame(SEND, "third", action="Heartbeat",
                                                  payload={}), None)
        got = [json.loads(await far.get_message())[1] for _ in range(3)]
    assert got == ["big", "second", "third"]
    assert node.backlog == 0


async def test_a_link_that_never_pauses_does_not_keep_the_loop_from_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A far end with more queued than the loop reads in one turn: the loop goes on to
    the other links and comes back to it (re-armed, not forgotten)."""
    monkeypatch.setattr(readloop, "RECEIVE_BYTES", 1024)  # a turn: 4 reads of 1 KiB
    loop = ReadLoop()
    busy_far, busy = ws_pair(sockets=True)
    quiet_far, quiet = ws_pair(sockets=True)
    flood, calm = Recorder(), Recorder()
    count = 16
    for number in range(count):
        await busy_far.send_message(f"{number:04}" + "y" * 1000)
    await quiet_far.send_message("hello")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        for link, consumer in ((busy, flood), (quiet, calm)):
            loop.add(link, consumer)
            # as resume would, without reading: what is queued is epoll's to report
            loop._readings[link.sock.fileno()].paused = False  # type: ignore[union-attr]
        with trio.fail_after(5):
            await calm.got.wait()
        assert len(flood.messages) < count  # the quiet link was served in between
        with trio.fail_after(5):
            while len(flood.messages) < count:
                await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert flood.messages == [f"{number:04}" + "y" * 1000 for number in range(count)]


async def test_messages_parsed_with_the_handshake_come_first() -> None:
    """Frames that came in the read that completed the opening handshake are the link's
    first messages on the loop too, before anything read later."""
    loop = ReadLoop()
    link, far = ws_pair(sockets=True)
    link.take_frames([WsFrame(Opcode.TEXT, b"early")])
    consumer = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        loop.resume(loop.add(link, consumer))
        assert consumer.messages == ["early"]
        await far.send_message("later")
        with trio.fail_after(5):
            while len(consumer.messages) < 2:
                await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert consumer.messages == ["early", "later"]


# --- found by a red-team review of the loop (each failed before its fix) ----------------


async def test_a_station_that_pings_and_never_reads_cannot_pile_up_pongs(
    autojump_clock: Clock,
) -> None:
    """Pongs the station's socket does not take stop the loop reading that station until
    they are out: the station's own sends back up instead of the node's memory."""
    async with loop_rig() as r:
        with trio.move_on_after(10):
            for _ in range(200):
                for _ in range(1000):
                    r.station.protocol.send_ping(b"p" * 125)
                await r.station.flush()  # blocks once the node stops reading
        await settle()
        assert r.node_station.backlog < 1_000_000  # 25 MB and growing before the fix
        assert r.session.station.jobs is not None  # the side waits for its pongs to go


async def test_an_answer_that_meets_two_full_sockets_still_goes_out(
    autojump_clock: Clock,
) -> None:
    """The station's answer only partly fits the CSMS's socket, and the CALL it releases
    meets a full station socket: both are flushed as soon as the far ends read (the
    answer waited for the CSMS's next CALL to time out before the fix)."""
    big = [Frame(SEND, f"ev-{i}", action="NotifyPeriodicEventStream",
                 payload={"id": 1, "pending": 0, "basetime": "2026-01-01T00:00:00Z",
                          "data": [str(i) * 200_000]}) for i in range(4)]
    async with loop_rig(Version.V21) as r, trio.open_nursery() as nursery:
        await r.backend.send_message('[2,"b1","Reset",{"type":"Immediate"}]')
        assert (await read(r.station))[0][1] == "b1"
        await r.backend.send_message('[2,"b2","Reset",{"type":"Immediate"}]')  # queued
        await settle()

        async def csms_sends() -> None:
            for frame in big:
                await r.backend.send_message(encode_frame(frame))

        nursery.start_soon(csms_sends)
        await settle()
        assert r.node_station.backlog > 0
        nursery.start_soon(r.station.send_message,
                           json.dumps([3, "b1", {"status": "Accepted", "x": "y" * 900_000}]))
        await settle()

        async def station_reads() -> None:
            while True:
                await r.station.get_message()

        nursery.start_soon(station_reads)
        with trio.fail_after(5):  # virtual: the CALL timeout is 30 s
            answer = json.loads(await r.backend.get_message())
        assert answer[:2] == [3, "b1"]
        nursery.cancel_scope.cancel()


async def test_a_station_that_sends_and_drops_its_connection_ends_the_session(
    autojump_clock: Clock,
) -> None:
    """A frame and the TCP end of stream in one read (no close frame): the frame is
    forwarded and the session ends (an end that came with data raised no edge of its
    own, and the session hung before the fix)."""
    async with loop_rig() as r:
        r.station.protocol.send_text(b'[2,"c1","Heartbeat",{}]')
        sock = r.station.sock
        assert sock is not None
        sock.sendall(b"".join(r.station.protocol.data_to_send()))
        sock.shutdown(socket.SHUT_WR)
        assert await read(r.backend) == [[2, "c1", "Heartbeat", {}]]
        with trio.fail_after(60):
            await r.ended.wait()


async def test_a_csms_whose_process_dies_after_a_frame_ends_the_session(
    autojump_clock: Clock,
) -> None:
    """The CSMS's last frame, then its socket closed: the node's next write to it (a
    keepalive ping) fails, and the loop hears of it from the write."""
    async with loop_rig(backend_keepalive=Keepalive(20.0, 10.0)) as r:
        r.backend.protocol.send_text(b'[2,"b1","Reset",{"type":"Immediate"}]')
        sock = r.backend.sock
        assert sock is not None
        sock.sendall(b"".join(r.backend.protocol.data_to_send()))
        sock.close()
        assert (await read(r.station))[0][1] == "b1"
        with trio.fail_after(120):
            await r.ended.wait()
