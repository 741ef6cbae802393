"""router/channels/service.py against hostile frames, in one trio process: a channel over
an in-memory stream, frames handed in as a peer link's reader would (no sockets)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from router.channels.files import FileSink
from router.channels.service import ACK, CLOSE, DRAIN_S, OPEN, Channel, ChannelService
from router.config import ChannelsSection
from router.overlay.state import OverlayState
from router.relay.gate import Gate
from router.wire.frames import CALL, CALLRESULT, SEND
from router.wire.overlay_frames import CHANNEL_DATA, OverlayFrame
from topology import RouteTable

FAR = "core-1"


def _service(**settings: object) -> ChannelService:
    state = OverlayState("edge-7", RouteTable("edge-7", rng=random.Random(1)))
    section = ChannelsSection(**settings)  # type: ignore[arg-type]
    return ChannelService(state, lambda: Gate(None, None, None), (), lambda: section)


def _channel(service: ChannelService, window: int = 4096) -> tuple[Channel, trio.abc.Stream]:
    near, far = trio.testing.memory_stream_pair()
    return service._register(FAR, "c1", "meter", "10.0.0.5:502", near, 65536, window), far


def _data(offset: int, data: bytes, cid: str = "c1", origin: str = FAR) -> OverlayFrame:
    return OverlayFrame(CHANNEL_DATA, "edge-7", (origin,), cid, payload=data, offset=offset)


async def test_data_in_order_reaches_the_stream_and_a_gap_closes_the_channel() -> None:
    service = _service()
    channel, far = _channel(service)
    assert service.handle(_data(0, b"abc"))
    assert service.handle(_data(3, b"def"))
    assert channel.buffer == b"abcdef"  # one buffer, however the frames were cut
    assert service.handle(_data(10, b"x"))  # 6 was due: a frame was lost on the way
    assert "offset 10" in channel.reason and service.counters["faults"] == 1
    assert channel.scope.cancel_called
    await far.aclose()


async def test_data_beyond_the_window_closes_the_channel() -> None:
    service = _service()
    channel, _far = _channel(service, window=4096)
    service.handle(_data(0, b"x" * 4096))
    assert not channel.reason
    service.handle(_data(4096, b"y"))  # nothing written out yet: the window is full
    assert "overrun the window" in channel.reason


def test_frames_for_no_open_channel_are_dropped_and_counted() -> None:
    service = _service()
    assert service.handle(_data(0, b"abc"))
    assert service.handle(OverlayFrame(SEND, "edge-7", (FAR,), "m1", ACK,
                                       {"channel": "nope", "received": 3}))
    assert service.handle(OverlayFrame(SEND, "edge-7", (FAR,), "m2", CLOSE,
                                       {"channel": "nope", "reason": "x"}))
    assert service.counters["dropped"] == 3


async def test_another_node_cannot_feed_a_channel_by_reusing_its_id() -> None:
    service = _service()
    channel, _far = _channel(service)
    service.handle(_data(0, b"evil", origin="edge-9"))  # same id, another origin
    assert service.counters["dropped"] == 1 and not channel.reason
    assert not channel.buffer


@pytest.mark.parametrize("received", [-5, "3", 99999, None])
async def test_a_bad_acknowledgement_closes_the_channel(received: object) -> None:
    service = _service()
    channel, _far = _channel(service)
    service.handle(OverlayFrame(SEND, "edge-7", (FAR,), "m1", ACK,
                                {"channel": "c1", "received": received}))
    assert channel.reason and service.counters["faults"] == 1


async def test_a_close_from_the_far_end_writes_out_what_arrived_first() -> None:
    service = _service()
    channel, _far = _channel(service)
    service.handle(_data(0, b"last words"))
    service.handle(OverlayFrame(SEND, "edge-7", (FAR,), "m1", CLOSE,
                                {"channel": "c1", "reason": "done"}))
    assert channel.reason == f"closed by {FAR}: done"
    assert not channel.scope.cancel_called and channel.reader_scope.cancel_called
    assert channel.draining and channel.buffer == b"last words"
    # written out for at most DRAIN_S: a TCP side that never reads cannot hold it open
    assert channel.scope.deadline <= trio.current_time() + DRAIN_S


async def test_opens_beyond_the_limit_or_unlisted_are_refused_without_dialling() -> None:
    """The far node answers each refusal; with no route back, the answer is counted as
    dropped. Nothing is dialled: the opens' targets are not listening."""
    service = _service(allow_targets=("127.0.0.1:9",), max_channels=1)
    _channel(service)  # the one channel allowed
    async with trio.open_nursery() as nursery:
        service._nursery = nursery
        for cid, target in (("c2", "127.0.0.1:9"), ("c3", "127.0.0.1:10")):
            assert service.handle(OverlayFrame(CALL, "edge-7", (FAR,), f"o-{cid}", OPEN,
                                               {"channel": cid, "target": target,
                                                "window": 65536}))
    assert service.counters["refused"] == 2
    assert len(service.channels) == 1 and not service._opening


async def test_a_flood_of_opens_is_dropped_beyond_twice_the_channel_limit() -> None:
    service = _service(max_channels=2)
    async with trio.open_nursery() as nursery:
        service._nursery = nursery
        service._serving = 4  # opens already being served
        assert service.handle(OverlayFrame(CALL, "edge-7", (FAR,), "o1", OPEN,
                                           {"channel": "x", "target": "127.0.0.1:9",
                                            "window": 65536}))
        assert service.counters["dropped"] == 1 and service.counters["refused"] == 0


async def test_a_fetch_takes_no_more_than_the_announced_size(tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    sink = FileSink(part, limit=5)
    await sink.send_all(b"abc")
    with pytest.raises(trio.BrokenResourceError):
        await sink.send_all(b"def")  # 6 bytes where 5 were announced
    await sink.aclose()
    assert part.read_bytes() == b"abc"


class _Side(trio.abc.Stream):
    """A channel's TCP side that does nothing; tests override what they need."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_failing_tcp_side_ends_its_channel_not_the_node() -> None:
    """An OSError from the stream (a disk error under a served file, a reset socket)
    closes the channel with the reason; nothing escapes into the node's nursery."""

    class Failing(_Side):
        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            raise OSError(5, "Input/output error")

    service = _service()
    channel = service._register(FAR, "c9", "fw", "file fw.bin", Failing(), 65536, 4096)
    with trio.fail_after(5):
        await service.run_channel(channel)
    assert channel.reason.startswith("fw side failed: Input/output error")
    assert ("edge-7", "c9") not in service.channels and FAR not in str(service._opening)


async def test_a_tcp_side_that_stops_reading_after_a_close_is_cut_off(
        autojump_clock: trio.testing.MockClock) -> None:
    """The far end closed; our device never reads what is left: the channel ends
    DRAIN_S later instead of holding its slot forever."""

    class Stuck(_Side):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            await trio.sleep_forever()

    service = _service()
    channel = service._register(FAR, "c1", "meter", "10.0.0.5:502", Stuck(), 65536, 4096)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run_channel, channel)
        await trio.testing.wait_all_tasks_blocked()
        service.handle(_data(0, b"request"))
        service.handle(OverlayFrame(SEND, "edge-7", (FAR,), "m1", CLOSE,
                                    {"channel": "c1", "reason": "bye"}))
        started = trio.current_time()
    assert trio.current_time() - started == pytest.approx(DRAIN_S, abs=0.1)
    assert channel.reason.endswith(f"not all written out within {DRAIN_S:g} s")
    assert not service.channels


async def test_a_late_answer_to_a_given_up_open_is_closed_at_the_far_end() -> None:
    service = _service()
    async with trio.open_nursery() as nursery:
        service._nursery = nursery
        service._given_up["m1"] = (FAR, "c5")
        late = OverlayFrame(CALLRESULT, "edge-7", (FAR,), "m1", payload={"window": 65536})
        assert service.handle(late)
        assert "m1" not in service._given_up
        sent: list[OverlayFrame] = []

        async def send(dest: str, frame: OverlayFrame) -> None:
            sent.append(frame)

        service._send = send  # type: ignore[method-assign]
    assert [(f.action, f.payload["channel"]) for f in sent] == [(CLOSE, "c5")]


async def test_concurrent_opens_of_one_file_hash_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router.channels import files

    calls: list[Path] = []
    real = files.sha256_of

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(files, "sha256_of", counting)
    (tmp_path / "fw.bin").write_bytes(b"x" * 1000)
    digests, results = files.Digests(), []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(lambda: _append(results, digests.of(tmp_path / "fw.bin")))
    assert len(calls) == 1 and len(set(results)) == 1


async def _append(results: list[str], digest: object) -> None:
    results.append(await digest)  # type: ignore[misc]


async def test_a_busy_tunnel_port_is_reported_by_name() -> None:
    from router.channels.channel import TunnelBindError
    from router.config import TunnelEntry

    held = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = held[0].socket.getsockname()[1]
    state = OverlayState("edge-7", RouteTable("edge-7", rng=random.Random(1)))
    service = ChannelService(state, lambda: Gate(None, None, None),
                             (TunnelEntry("meter", "127.0.0.1", port, FAR, "10.0.0.5:502"),),
                             lambda: ChannelsSection())
    with pytest.raises(TunnelBindError) as refused:
        await service.run()
    assert str(refused.value).startswith(f"tunnel meter: cannot listen on 127.0.0.1:{port}: ")
    for listener in held:
        await listener.aclose()
