"""Bytes on the wire for a realistic OCPP 2.0.1 mix, with and without permessage-deflate.

One simulated charging session (boot, status changes, a transaction with periodic
meter values, its end), each CALL followed by its CALLRESULT, is framed the way
websockets frames it when sending: ``Frame.serialize`` with websockets' own
``PerMessageDeflate`` extension, whose ``encode()`` compresses the frame; station
frames masked, CSMS frames not. Every compressed frame is parsed back through
``Frame.parse`` with a matching decoder and compared with the original, so the
figures are of frames that really decode. Three framings are compared:

* raw: no extension;
* no context takeover: server_no_context_takeover and client_no_context_takeover,
  window 2^12, memLevel 5, which is what the node negotiates on both hops;
* context takeover: the same window and memLevel, but the compressor keeps its
  history between messages (websockets' default server settings).

Message ids are random UUIDs, as most stations send them; they do not compress.
Prints bytes per message type (frame headers included) and the total saving.

    .venv/bin/python bench/wire_bytes.py
    .venv/bin/python bench/wire_bytes.py --rounds 50 --json
"""

from __future__ import annotations

import argparse
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from router.net.compression import MEM_LEVEL, WINDOW_BITS, Deflate


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def sampled(value: float, measurand: str, unit: str, phase: str | None = None,
            location: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"value": value, "context": "Sample.Periodic", "measurand": measurand}
    if phase:
        item["phase"] = phase
    if location:
        item["location"] = location
    item["unitOfMeasure"] = {"unit": unit}
    return item


def session(rounds: int, rng: random.Random) -> Iterator[tuple[str, Any, Any]]:
    """(message type, CALL payload, CALLRESULT payload) in the order a station sends them."""
    now = datetime(2025, 11, 22, 10, 15, 0, 123000, tzinfo=UTC)
    yield "BootNotification", {
        "reason": "PowerUp",
        "chargingStation": {
            "model": "AC22-Wallbox-2S", "vendorName": "ExampleCharge GmbH",
            "serialNumber": "EXC-22-004211", "firmwareVersion": "2.4.17",
            "modem": {"iccid": "8949020000123456789", "imsi": "262011234567890"},
        },
    }, {"currentTime": stamp(now), "interval": 300, "status": "Accepted"}
    for status in ("Available", "Occupied"):
        now += timedelta(seconds=rng.uniform(1, 60))
        yield "StatusNotification", {"timestamp": stamp(now), "connectorStatus": status,
                                     "evseId": 1, "connectorId": 1}, {}
    transaction = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    energy, soc = 18342.7, 31
    now += timedelta(seconds=2)
    yield "TransactionEvent", {
        "eventType": "Started", "timestamp": stamp(now), "triggerReason": "Authorized",
        "seqNo": 0, "transactionInfo": {"transactionId": transaction,
                                        "chargingState": "EVConnected"},
        "idToken": {"idToken": "04A2B3C4D5E680", "type": "ISO14443"},
        "evse": {"id": 1, "connectorId": 1},
        "meterValue": [{"timestamp": stamp(now), "sampledValue": [
            {"value": energy, "context": "Transaction.Begin",
             "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "Wh"}}]}],
    }, {"idTokenInfo": {"status": "Accepted"}}
    for seq in range(1, rounds + 1):
        now += timedelta(seconds=60 + rng.uniform(-0.5, 0.5))
        amps = [round(rng.uniform(30.5, 32.0), 1) for _ in range(3)]
        volts = round(rng.uniform(228.0, 233.0), 1)
        power = round(sum(amps) * volts)
        energy = round(energy + power / 60, 1)
        soc = min(100, soc + rng.choice((0, 1)))
        yield "MeterValues", {"evseId": 1, "meterValue": [{"timestamp": stamp(now),
                                                            "sampledValue": [
            sampled(energy, "Energy.Active.Import.Register", "Wh"),
            sampled(power, "Power.Active.Import", "W"),
            *(sampled(a, "Current.Import", "A", phase=p)
              for a, p in zip(amps, ("L1", "L2", "L3"), strict=True)),
            sampled(volts, "Voltage", "V", phase="L1-N"),
        ]}]}, {}
        yield "TransactionEvent", {
            "eventType": "Updated", "timestamp": stamp(now), "triggerReason": "MeterValuePeriodic",
            "seqNo": seq, "transactionInfo": {"transactionId": transaction,
                                              "chargingState": "Charging"},
            "evse": {"id": 1, "connectorId": 1},
            "meterValue": [{"timestamp": stamp(now), "sampledValue": [
                sampled(energy, "Energy.Active.Import.Register", "Wh"),
                sampled(power, "Power.Active.Import", "W"),
                sampled(soc, "SoC", "Percent", location="EV"),
                sampled(amps[0], "Current.Import", "A", phase="L1"),
            ]}],
        }, {}
    now += timedelta(seconds=30)
    yield "TransactionEvent", {
        "eventType": "Ended", "timestamp": stamp(now), "triggerReason": "EVCommunicationLost",
        "seqNo": rounds + 1, "transactionInfo": {"transactionId": transaction,
                                                 "chargingState": "Idle",
                                                 "stoppedReason": "EVDisconnected"},
        "meterValue": [{"timestamp": stamp(now), "sampledValue": [
            {"value": energy, "context": "Transaction.End",
             "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "Wh"}}]}],
    }, {}
    now += timedelta(seconds=5)
    yield "StatusNotification", {"timestamp": stamp(now), "connectorStatus": "Available",
                                 "evseId": 1, "connectorId": 1}, {}


def deflate(context_takeover: bool) -> PerMessageDeflate:
    # without context takeover: the node's own extension, which leaves small messages
    # uncompressed (router/net/compression.py)
    kind = PerMessageDeflate if context_takeover else Deflate
    return kind(
        remote_no_context_takeover=not context_takeover,
        local_no_context_takeover=not context_takeover,
        remote_max_window_bits=WINDOW_BITS,
        local_max_window_bits=WINDOW_BITS,
        compress_settings={"memLevel": MEM_LEVEL},
    )


@dataclass
class Hop:
    """One direction of one WebSocket link: the sender's encoder, the receiver's decoder."""

    masked: bool  # station -> CSMS frames are masked (client side)
    context_takeover: bool | None  # None: no extension
    encoder: PerMessageDeflate | None = field(init=False)
    decoder: PerMessageDeflate | None = field(init=False)

    def __post_init__(self) -> None:
        on = self.context_takeover is not None
        self.encoder = deflate(bool(self.context_takeover)) if on else None
        self.decoder = deflate(bool(self.context_takeover)) if on else None

    def wire(self, text: str) -> int:
        """Frame ``text`` as websockets sends it; returns its length on the wire."""
        frame = Frame(Opcode.TEXT, text.encode())
        if self.encoder is None:
            return len(frame.serialize(mask=self.masked))
        # serialize() runs the extension's encode() on the frame and writes the header
        # with RSV1 set, exactly as websockets' protocol does when it sends a frame
        wire = frame.serialize(mask=self.masked, extensions=[self.encoder])
        assert self.decoder is not None
        reader = StreamReader()
        reader.feed_data(wire)
        parser = Frame.parse(reader.read_exact, mask=self.masked, extensions=[self.decoder])
        try:
            next(parser)
        except StopIteration as done:
            decoded: Frame = done.value
        else:
            raise AssertionError("frame not complete")
        assert bytes(decoded.data) == frame.data, "permessage-deflate round trip failed"
        return len(wire)


@dataclass
class Tally:
    count: int = 0
    raw: int = 0
    no_ctx: int = 0
    ctx: int = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12,
                        help="periodic meter value rounds in the transaction (default 12)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    opts = parser.parse_args()

    rng = random.Random(opts.seed)
    framings: dict[str, dict[bool | None, Hop]] = {
        direction: {mode: Hop(masked=direction == "up", context_takeover=mode)
                    for mode in (None, False, True)}
        for direction in ("up", "down")
    }
    tallies: dict[str, Tally] = {}
    for action, request, answer in session(opts.rounds, rng):
        message_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        call = json.dumps([2, message_id, action, request], separators=(",", ":"))
        result = json.dumps([3, message_id, answer], separators=(",", ":"))
        for label, text, direction in ((action, call, "up"),
                                       (f"{action} result", result, "down")):
            tally = tallies.setdefault(label, Tally())
            hops = framings[direction]
            tally.count += 1
            tally.raw += hops[None].wire(text)
            tally.no_ctx += hops[False].wire(text)
            tally.ctx += hops[True].wire(text)

    def saved(small: int, big: int) -> str:
        return f"{(1 - small / big) * 100:.0f}%" if big else "-"

    print(f"OCPP 2.0.1 session, {opts.rounds} meter rounds: bytes per frame on the wire "
          f"(headers and masks included), permessage-deflate window 2^{WINDOW_BITS}, "
          f"memLevel {MEM_LEVEL}")
    head = (f"{'message':<28} {'n':>3} {'raw B':>7} {'no-ctx B':>9} {'saved':>6} "
            f"{'ctx B':>7} {'saved':>6}")
    print(head)
    print("-" * len(head))
    total = Tally()
    for label, t in tallies.items():
        print(f"{label:<28} {t.count:>3} {t.raw / t.count:>7.0f} {t.no_ctx / t.count:>9.0f} "
              f"{saved(t.no_ctx, t.raw):>6} {t.ctx / t.count:>7.0f} {saved(t.ctx, t.raw):>6}")
        total.count += t.count
        total.raw += t.raw
        total.no_ctx += t.no_ctx
        total.ctx += t.ctx
    print("-" * len(head))
    print(f"{'all frames (sum)':<28} {total.count:>3} {total.raw:>7} {total.no_ctx:>9} "
          f"{saved(total.no_ctx, total.raw):>6} {total.ctx:>7} {saved(total.ctx, total.raw):>6}")
    print()
    print("no-ctx: server_ and client_no_context_takeover (each message compressed on its "
          "own, as the node negotiates);")
    print("ctx: context takeover (the compressor remembers earlier messages on the link).")
    if opts.json:
        print(json.dumps({label: vars(t) for label, t in tallies.items()}
                         | {"total": vars(total)}, indent=2))


if __name__ == "__main__":
    main()
