"""A site's energy meter for tunnel tests: a pymodbus Modbus/TCP server on loopback.

It runs its own asyncio loop in a background thread (as the ``ocpp`` CSMS peer does), so
plain pytest tests and trio tests can use it. 100 holding registers from address 0, each
starting at 7, on device id 1.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

REGISTERS = 100
INITIAL = 7


@dataclass
class ModbusMeter:
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def modbus_meter() -> Iterator[ModbusMeter]:
    """Run the meter until the block ends."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    port: list[int] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        device = SimDevice(1, [SimData(0, count=REGISTERS, values=INITIAL,
                                       datatype=DataType.REGISTERS)])
        server = ModbusTcpServer(device, address=("127.0.0.1", 0))
        task = asyncio.create_task(server.serve_forever())
        while server.transport is None:
            await asyncio.sleep(0.01)
        port.append(server.transport.sockets[0].getsockname()[1])
        ready.set()
        await stop.wait()
        await server.shutdown()
        task.cancel()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10) or failure:
        raise RuntimeError(f"the Modbus meter did not start: {failure}")
    try:
        yield ModbusMeter(port[0])
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
