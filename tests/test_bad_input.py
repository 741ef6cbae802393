"""Robustness of the edge gateway (the node) against bad input on a station link.

The node runs as a subprocess (security profile 0, see ``docs/edge-gateway.md``)
in front of :class:`tests.raw_backend.RawBackend`; stations are raw WebSocket clients
(``websockets`` sync API, or a hand-made socket client where the frame itself is the
point). Expectations come from the contract:

* every CALL-like or unparseable frame gets exactly one node-made CALLERROR
  ``[4, id, code, description, {}]`` with the code of the link's subprotocol;
* CALLRESULT/CALLERROR frames nobody waits for (malformed or unmatched) are dropped:
  never answered, never forwarded, logged as ``frame_dropped``;
* valid CALLs reach the backend as the same text;
* invalid UTF-8 -> close 1007, too large -> close 1009, binary -> close 1003;
* at most ``max_queued_calls`` CALLs wait behind the one in flight, the rest get
  GenericError; every CALL gets exactly one answer;
* ``call_timeout_s`` -> InternalError; bad handshakes -> HTTP status, no backend socket.

"No answer" is proven without sleeping: after the frame under test the station sends a
probe CALL; the node handles a link's frames in order, so anything it would send for
the first frame arrives before the probe's answer, and anything it would forward reaches
the backend before the probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import string
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tests.nodeproc import NodeProcess, start_node
from tests.raw_backend import RawBackend

MAX_QUEUED_CALLS = 16
MAX_MESSAGE_BYTES = 65536

CODES = {
    "ocpp1.6": {
        "rpc": "FormationViolation",
        "type": "FormationViolation",
        "format": "FormationViolation",
    },
    "ocpp2.0.1": {
        "rpc": "RpcFrameworkError",
        "type": "MessageTypeNotSupported",
        "format": "FormatViolation",
    },
}


def node_config(
    backend_url: str,
    *,
    call_timeout_s: float = 30,
    max_queued_calls: int = MAX_QUEUED_CALLS,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> str:
    return f"""\
[node]
id = "edge-bad-input"
call_timeout_s = {call_timeout_s}
max_queued_calls = {max_queued_calls}

[listen]
host = "127.0.0.1"
port = 0
path = "/ocpp"
subprotocols = ["ocpp2.1", "ocpp2.0.1", "ocpp1.6"]
security_profile = 0
max_message_bytes = {max_message_bytes}

[[stations]]
match = "*"

[[backends]]
name = "main"
role = "primary"
url = "{backend_url}"
auth = "passthrough"
"""


# ---------------------------------------------------------------------------- helpers


def open_ws(url: str, subprotocols: list[str] | None) -> ClientConnection:
    return connect(
        url,
        subprotocols=[Subprotocol(s) for s in subprotocols] if subprotocols is not None else None,
        compression=None,
        open_timeout=10,
        close_timeout=5,
        ping_interval=None,
        max_size=None,
        max_queue=None,
        proxy=None,
        legacy=True,
    )


def open_station(node: NodeProcess, identity: str, subprotocol: str) -> ClientConnection:
    ws = open_ws(node.url(identity), [subprotocol])
    assert ws.subprotocol == subprotocol
    return ws


def recv_json(ws: ClientConnection, timeout: float = 10.0) -> Any:
    message = ws.recv(timeout=timeout)
    assert isinstance(message, str), f"node sent a binary message: {message!r}"
    return json.loads(message)


def call(
    ws: ClientConnection, message_id: str, action: str, payload: Any = None, timeout: float = 10.0
) -> Any:
    ws.send(json.dumps([2, message_id, action, payload if payload is not None else {}]))
    return recv_json(ws, timeout)


def assert_echo(answer: Any, message_id: str, action: str) -> None:
    assert answer == [3, message_id, {"echo": action}], answer


def assert_node_error(
    answer: Any, message_id: str | frozenset[str], codes: set[str] | frozenset[str]
) -> None:
    ids = {message_id} if isinstance(message_id, str) else message_id
    assert isinstance(answer, list), answer
    assert len(answer) == 5, answer
    assert answer[0] == 4, answer
    assert answer[1] in ids, f"message id {answer[1]!r} not in {sorted(ids)}: {answer}"
    assert answer[2] in codes, f"code {answer[2]!r} not in {sorted(codes)}: {answer}"
    assert isinstance(answer[3], str), answer
    assert answer[4] == {}, answer


def wait_for_count(
    node: NodeProcess, event: str, count: int, timeout: float = 10.0, **fields: Any
) -> list[dict[str, Any]]:
    """Block until ``count`` log lines with this event (and field values) appeared.

    Like ``NodeProcess.wait_for_event`` (whose condition variable it shares), but counting.
    """
    deadline = time.monotonic() + timeout

    def matching() -> list[dict[str, Any]]:
        return [
            line
            for line in node.logs
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    with node._cond:
        while True:
            found = matching()
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or not node.alive():
                raise TimeoutError(
                    f"{len(found)} of {count} {event!r} log lines {fields}; stderr tail:\n"
                    + "".join(node.raw_stderr[-30:])
                )
            node._cond.wait(min(left, 0.2))


NO_RESPONSE = -1


def handshake_status(url: str, subprotocols: list[str] | None) -> int:
    """HTTP status the node answers a handshake with (101: upgraded, -1: no response)."""
    try:
        ws = open_ws(url, subprotocols)
    except InvalidStatus as exc:
        return exc.response.status_code
    except (InvalidMessage, OSError):
        return NO_RESPONSE
    ws.close()
    return 101


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RawSocketStation:
    """A hand-made WebSocket client: exact frames, reading and writing concurrently."""

    KEY = "dGhlIHNhbXBsZSBub25jZQ=="

    def __init__(self, port: int, path: str, subprotocol: str, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        request = (
            f"GET {path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
            "\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("node closed during the handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode()
        if status_line.split()[1] != "101":
            raise ConnectionError(f"handshake refused: {status_line}")

    def send_frame(self, opcode: int, payload: bytes, chunk: int = 256 * 1024) -> bool:
        """Send one masked frame (all-zero mask key); False if the node went away mid-way."""
        size = len(payload)
        if size < 126:
            header = bytes([0x80 | opcode, 0x80 | size])
        elif size < 1 << 16:
            header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
        data = memoryview(header + b"\0\0\0\0" + payload)
        try:
            for start in range(0, len(data), chunk):
                self.sock.sendall(data[start : start + chunk])
        except OSError:
            return False
        return True

    def _read_exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by the node")
            self.buf += chunk
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def read_frame(self) -> tuple[int, bytes]:
        first, second = self._read_exact(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(self._read_exact(2), "big")
        elif size == 127:
            size = int.from_bytes(self._read_exact(8), "big")
        mask = self._read_exact(4) if second & 0x80 else b""
        payload = self._read_exact(size)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return first & 0x0F, payload

    def read_close_code(self, *, reply: bool = True) -> int | None:
        """Skip frames up to the node's close frame; its code (None: no close frame)."""
        try:
            while True:
                opcode, payload = self.read_frame()
                if opcode == 0x8:
                    if reply:
                        self.send_frame(0x8, payload[:2])
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in sendall
        self.sock.close()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def backend() -> Iterator[RawBackend]:
    with RawBackend() as b:
        yield b


@contextlib.contextmanager
def running_node(config: str, directory: Path) -> Iterator[NodeProcess]:
    node = start_node(config, directory, log_level="debug")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def node(backend: RawBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with running_node(node_config(backend.url), tmp_path_factory.mktemp("node")) as n:
        yield n


@pytest.fixture(scope="module")
def quick_timeout_node(
    backend: RawBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    config = node_config(backend.url, call_timeout_s=1)
    with running_node(config, tmp_path_factory.mktemp("quick")) as n:
        yield n


# ---------------------------------------------------------------------------- raw backend


def test_raw_backend_selfcheck(backend: RawBackend) -> None:
    """The raw backend and the raw clients work against each other, without the node."""
    for subprotocol in ("ocpp1.6", "ocpp2.0.1", "ocpp2.1"):
        identity = f"SELF-{subprotocol}"
        with open_ws(f"{backend.url}/{identity}", [subprotocol]) as ws:
            assert ws.subprotocol == subprotocol
            assert backend.wait_connected(identity) == subprotocol
            text = '[2, "a1", "Heartbeat", {}]'
            ws.send(text)
            assert_echo(recv_json(ws), "a1", "Heartbeat")
            assert backend.received(identity) == [text]
            # The backend can put any frame on the station's socket.
            backend.send(identity, '[2,"c1","Reset",{"type":"Immediate"}]')
            assert recv_json(ws) == [2, "c1", "Reset", {"type": "Immediate"}]
            ws.send('[3,"c1",{}]')
            backend.wait_frames(identity, 2)
    # Configurable answers: other payload, held until released, never.
    identity = "SELF-answers"
    backend.set_answer(
        "Custom", identity=identity, payload=lambda ident, action, p: {"got": p, "who": ident}
    )
    backend.set_answer("Gate", identity=identity, held=True)
    backend.set_answer("Void", identity=identity, never=True)
    with open_ws(f"{backend.url}/{identity}", ["ocpp2.0.1", "ocpp1.6"]) as ws:
        assert ws.subprotocol == "ocpp2.0.1"
        assert call(ws, "c", "Custom", {"x": 1}) == [3, "c", {"got": {"x": 1}, "who": identity}]
        ws.send('[2,"g","Gate",{}]')
        ws.send('[2,"v","Void",{}]')
        backend.wait_until(lambda: backend.held_count("Gate") == 1)
        backend.wait_until(lambda: any(c.message_id == "v" for c in backend.unanswered))
        backend.release("Gate")
        assert_echo(recv_json(ws), "g", "Gate")
        assert backend.max_outstanding[identity] == 2
    # Handshake control.
    backend.refuse("SELF-refused", 403)
    assert handshake_status(f"{backend.url}/SELF-refused", ["ocpp1.6"]) == 403
    assert handshake_status(f"{backend.url}/SELF-x", ["ocpp1.5"]) == 400
    backend.accept_without_subprotocol("SELF-noproto")
    with open_ws(f"{backend.url}/SELF-noproto", ["ocpp1.6"]) as ws:
        assert ws.subprotocol is None
    # The hand-made client: a text frame, then a close frame with a code.
    raw = RawSocketStation(backend.port, "/ocpp/SELF-raw", "ocpp1.6")
    try:
        assert raw.send_frame(0x1, b'[2,"r1","Heartbeat",{}]')
        assert raw.read_frame() == (0x1, b'[3, "r1", {"echo": "Heartbeat"}]')
        assert raw.send_frame(0x2, b"\x00\x01")
        backend.wait_until(lambda: backend.binary["SELF-raw"] == [b"\x00\x01"])
        backend.close("SELF-raw", 4001, "bye")
        assert raw.read_close_code() == 4001
    finally:
        raw.close()


# ---------------------------------------------------------------------------- fuzzed frames


@dataclass(frozen=True)
class Expect:
    kind: str  # "error" (one node-made CALLERROR) | "drop" | "forward"
    codes: frozenset[str] = frozenset()
    message_ids: frozenset[str] = frozenset({"-1"})
    action: str = ""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def readable_id(value: Any) -> bool:
    """An OCPP-J message id: a string of at most 36 characters (OCPP-J spec), not empty."""
    return isinstance(value, str) and 1 <= len(value) <= 36


def expected(text: str, subprotocol: str) -> Expect | None:
    """What the contract says the node does with this station frame (None: unclear).

    A frame breaking several rules may get the code of any of them. A message type
    that is not an integer may be reported as a framing error (id "-1") or as an
    unknown message type (with the id).
    """
    codes = CODES[subprotocol]
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return Expect("error", frozenset({codes["rpc"]}))
    if not isinstance(value, list):
        return Expect("error", frozenset({codes["rpc"]}))
    if not value:
        return Expect("error", frozenset({codes["rpc"], codes["type"]}))
    kind = value[0]
    if isinstance(kind, float) and kind in (2, 3, 4):
        return None  # 3.0 as a message type: dropped as an answer or refused? Unclear.
    known = type(kind) is int and kind in (2, 3, 4)
    if known and kind in (3, 4):
        return Expect("drop")  # nobody in this test waits for an answer
    has_id = len(value) >= 2 and readable_id(value[1])
    problems = set()
    ids = {value[1]} if has_id else {"-1"}
    if not has_id:
        problems.add("rpc")
    if type(kind) is not int:
        problems |= {"rpc", "type"}
        ids.add("-1")
    elif not known:
        problems.add("type")
    elif len(value) != 4 or not isinstance(value[2], str) or not isinstance(value[3], dict):
        problems.add("format")
    if problems:
        return Expect("error", frozenset(codes[p] for p in problems), frozenset(ids))
    return Expect("forward", message_ids=frozenset({value[1]}), action=value[2])


ID_ALPHABET = string.ascii_letters + string.digits + "-_."
message_ids = st.text(ID_ALPHABET, min_size=1, max_size=36)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what both JSON and msgpack links carry
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)  # hypothesis makes no lone surrogates
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
non_objects = json_values.filter(lambda v: not isinstance(v, dict))
non_strings = json_values.filter(lambda v: not isinstance(v, str))
actions = st.text(min_size=1, max_size=24)
unknown_types = st.sampled_from([0, 1, 5, 6, 7, 8, 99, -1, -2, 2**31]) | st.integers().filter(
    lambda t: t not in (2, 3, 4)
)
rests = st.lists(json_values, max_size=3)


def render(value: Any, style: int) -> str:
    """JSON text in one of a few layouts, so verbatim forwarding is really checked."""
    if style == 0:
        return json.dumps(value, separators=(",", ":"))
    if style == 1:
        return json.dumps(value)
    if style == 2:
        return json.dumps(value, indent=1, ensure_ascii=False)
    return " " + json.dumps(value, ensure_ascii=False) + "\n"


def as_text(values: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    return st.builds(render, values, st.integers(0, 3))


valid_calls = st.builds(lambda i, a, p: [2, i, a, p], message_ids, actions, json_objects)
calls_with_bad_id = st.builds(lambda i, a, p: [2, i, a, p], non_strings, actions, json_objects)
calls_with_bad_shape = st.one_of(
    st.builds(lambda i, r: [2, i, *r], message_ids, st.lists(json_values, max_size=1)),
    st.builds(
        lambda i, a, p, r: [2, i, a, p, *r],
        message_ids,
        actions,
        json_objects,
        st.lists(json_values, min_size=1, max_size=3),
    ),
    st.builds(lambda i, a, p: [2, i, a, p], message_ids, non_strings, json_objects),
    st.builds(lambda i, a, p: [2, i, a, p], message_ids, actions, non_objects),
)
unknown_type_frames = st.builds(lambda t, i, r: [t, i, *r], unknown_types, message_ids, rests)
answer_frames = st.one_of(
    st.builds(lambda i, p: [3, i, p], message_ids, json_values),
    st.builds(lambda r: [3, *r], st.lists(json_values, max_size=4)),
    st.builds(
        lambda i, c, d, x: [4, i, c, d, x],
        message_ids,
        json_values,
        json_values,
        json_values,
    ),
    st.builds(lambda r: [4, *r], st.lists(json_values, max_size=6)),
)
arrays = st.lists(json_values, max_size=6) | st.builds(
    lambda t, r: [t, *r], st.sampled_from([2, 3, 4, "2", None, True]), rests
)
not_json = st.one_of(
    st.text(max_size=40),
    st.builds(lambda s, k: s[: k % max(len(s), 1)], as_text(valid_calls), st.integers(0, 200)),
    st.sampled_from(["[2,'a','Heartbeat',{}]", '[2,"a","Heartbeat",{},]', "[NaN]", "nul"]),
)
frames = st.one_of(
    as_text(valid_calls),
    as_text(calls_with_bad_id),
    as_text(calls_with_bad_shape),
    as_text(unknown_type_frames),
    as_text(answer_frames),
    as_text(json_values),
    as_text(arrays),
    not_json,
)


class FuzzLink:
    """One station link used for a whole fuzz run (reopened only if the node closes it)."""

    def __init__(self, node: NodeProcess, backend: RawBackend, subprotocol: str) -> None:
        self.node = node
        self.backend = backend
        self.subprotocol = subprotocol
        self.identity = "FUZZ-" + subprotocol.replace(".", "")
        self.ws: ClientConnection | None = None
        self.probes = 0
        self.dropped = 0

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()

    def check(self, text: str, expect: Expect) -> None:
        if self.ws is None:
            self.ws = open_station(self.node, self.identity, self.subprotocol)
        ws = self.ws
        mark = len(self.backend.received(self.identity))
        self.probes += 1
        probe_id = f"probe:{self.probes}"
        probe = f'[2,"{probe_id}","Probe",{{}}]'
        got: list[Any] = []
        try:
            ws.send(text)
            ws.send(probe)
            while True:
                frame = recv_json(ws)
                if frame == [3, probe_id, {"echo": "Probe"}]:
                    break
                got.append(frame)
        except ConnectionClosed as exc:
            self.ws = None
            raise AssertionError(
                f"node closed the link ({exc}) after {text!r}; frames before: {got}"
            ) from exc
        if expect.kind == "error":
            assert len(got) == 1, f"{text!r}: expected one CALLERROR, got {got}"
            assert_node_error(got[0], expect.message_ids, expect.codes)
        elif expect.kind == "forward":
            (message_id,) = expect.message_ids
            assert got == [[3, message_id, {"echo": expect.action}]], (text, got)
        else:
            assert got == [], f"{text!r} must not be answered, got {got}"
        reached = self.backend.received(self.identity)[mark:]
        if expect.kind == "forward":
            assert reached == [text, probe], "a valid CALL reaches the backend verbatim"
        else:
            assert reached == [probe], f"{text!r} must not reach the backend: {reached}"
        if expect.kind == "drop":
            self.dropped += 1
            wait_for_count(self.node, "frame_dropped", self.dropped, station=self.identity)


@pytest.fixture(scope="module")
def fuzz_links(node: NodeProcess, backend: RawBackend) -> Iterator[dict[str, FuzzLink]]:
    links = {p: FuzzLink(node, backend, p) for p in CODES}
    yield links
    for link in links.values():
        link.close()


@pytest.mark.parametrize("subprotocol", sorted(CODES))
@settings(
    max_examples=int(os.environ.get("BAD_INPUT_EXAMPLES", "150")),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(text=frames)
@example(text="")
@example(text="not json")
@example(text='{"a": 1}')
@example(text="[]")
@example(text='[null, ""]')
@example(text='["2", "m1", "Heartbeat", {}]')
@example(text='[2, "", "Heartbeat", {}]')
@example(text='[2, "0123456789012345678901234567890123456", "Heartbeat", {}]')
@example(text='[2, "012345678901234567890123456789012345", "Heartbeat", {}]')
@example(text='[2, 17, "Heartbeat", {}]')
@example(text='[2, "m1", "Heartbeat"]')
@example(text='[2, "m1", 7, {}]')
@example(text='[2, "m1", "Heartbeat", []]')
@example(text='[2, "m1", "Heartbeat", {}, {}]')
@example(text='[0, "m1", "Heartbeat", {}]')
@example(text='[1, "m1", "Heartbeat", {}]')
@example(text='[5, "m1", "CALLRESULTERROR", "", {}]')
@example(text='[6, "m1", "NotifyPeriodicEventStream", {}]')
@example(text='[7, "m1"]')
@example(text='[99, "m1", {}]')
@example(text='[-1, "m1", {}]')
@example(text='[3, "nobody-asked", {}]')
@example(text='[3, "m1"]')
@example(text='[4, "nobody-asked", "GenericError", "", {}]')
@example(text='[4, "m1", 1, 2]')
@example(text='[2, "m1", "Heartbeat", {}]')
@example(text='[2,"m2","DataTransfer",{"vendorId":"é\\u00e9","data":"\\ud83d\\ude00"}]')
def test_fuzzed_frames_on_one_link(
    fuzz_links: dict[str, FuzzLink], subprotocol: str, text: str
) -> None:
    expect = expected(text, subprotocol)
    assume(expect is not None)
    assert expect is not None
    link = fuzz_links[subprotocol]
    link.check(text, expect)
    assert link.node.alive()


# ---------------------------------------------------------------------------- close codes


INVALID_UTF8 = b'[2,"u1","DataTransfer",{"vendorId":"x","data":"\xc3\x28\xff"}]'


@pytest.mark.parametrize(
    ("case", "close_code"),
    [("invalid-utf8", 1007), ("binary", 1003), ("ten-megabytes", 1009)],
)
def test_bad_message_closes_only_that_link(
    node: NodeProcess, backend: RawBackend, case: str, close_code: int
) -> None:
    bystander_id = f"BYSTANDER-{case}"
    identity = f"BAD-{case}"
    with open_station(node, bystander_id, "ocpp2.0.1") as bystander:
        assert_echo(call(bystander, "b1", "Heartbeat"), "b1", "Heartbeat")
        if case == "ten-megabytes":
            got = send_huge_message(node, identity, 10 * 1024 * 1024)
        else:
            ws = open_station(node, identity, "ocpp1.6")
            assert_echo(call(ws, "s1", "Heartbeat"), "s1", "Heartbeat")
            if case == "invalid-utf8":
                ws.send(INVALID_UTF8, text=True)
            else:
                ws.send(b'[2,"s2","Heartbeat",{}]')  # bytes: a binary message
            with pytest.raises(ConnectionClosed):
                extra = ws.recv(timeout=10)
                pytest.fail(f"expected the link to close, got {extra!r}")
            got = ws.close_code
            ws.close()
        assert got == close_code, (
            f"{case}: the station saw close code {got}, expected {close_code}; node log: "
            f"{node.events('station_disconnected')[-1:]}"
        )
        # The bad message never reached the backend and the backend link went away too.
        before = [] if case == "ten-megabytes" else ['[2, "s1", "Heartbeat", {}]']
        assert backend.received(identity) == before
        assert backend.binary.get(identity, []) == []
        backend.wait_closed(identity)
        # The other station was not disturbed.
        assert_echo(call(bystander, "b2", "Heartbeat"), "b2", "Heartbeat")
    assert node.alive()
    with open_station(node, identity, "ocpp2.0.1") as again:
        assert_echo(call(again, "a1", "Heartbeat"), "a1", "Heartbeat")


@pytest.mark.parametrize(
    ("case", "close_code"),
    [("invalid-utf8", 1007), ("binary", 1003), ("too-big", 1009)],
)
def test_bad_message_from_backend_closes_both_links(
    node: NodeProcess, backend: RawBackend, case: str, close_code: int
) -> None:
    """The same faults on the backend link: that link closes with the code, the station's
    link with 1001, and the station's pending CALL still gets its one answer."""
    identity = f"BAD-BACKEND-{case}"
    backend.set_answer("Pending", identity=identity, never=True)
    with open_station(node, identity, "ocpp2.0.1") as ws:
        assert_echo(call(ws, "s1", "Heartbeat"), "s1", "Heartbeat")
        ws.send('[2,"s2","Pending",{}]')
        backend.wait_until(lambda: any(c.identity == identity for c in backend.unanswered))
        if case == "invalid-utf8":
            backend.send(identity, INVALID_UTF8, text=True)
        elif case == "binary":
            backend.send(identity, b'[2,"c1","Reset",{}]')
        else:
            backend.send(identity, '[2,"c1","DataTransfer",{"data":"' + "z" * 70000 + '"}]')
        frames: list[Any] = []
        with pytest.raises(ConnectionClosed):
            while True:
                frames.append(recv_json(ws))
        assert ws.close_code == 1001
        assert len(frames) == 1, f"only the pending CALL's answer, got {frames}"
        assert_node_error(frames[0], "s2", {"InternalError"})
        try:
            code, _ = backend.wait_close_frame(identity, timeout=5)
        except TimeoutError:
            pytest.fail(f"{case}: the node sent no close frame on the backend link")
        assert code == close_code, f"{case}: the backend got close code {code}"
        try:
            backend.wait_closed(identity, timeout=5)
        except TimeoutError:
            pytest.fail(f"{case}: the node never closed the backend link's TCP connection")
    assert node.alive()


def send_huge_message(node: NodeProcess, identity: str, size: int) -> int | None:
    """Send one text message of ``size`` bytes; return the close code the node sends."""
    head = b'[2,"big","DataTransfer",{"vendorId":"x","data":"'
    tail = b'"}]'
    payload = head + b"x" * (size - len(head) - len(tail)) + tail
    raw = RawSocketStation(node.port, f"{node.path}/{identity}", "ocpp2.0.1")
    sender = threading.Thread(target=raw.send_frame, args=(0x1, payload), daemon=True)
    try:
        sender.start()
        # no close reply: it would land in the middle of the frame still being sent
        return raw.read_close_code(reply=False)
    finally:
        raw.close()
        sender.join(15)


def test_message_size_limit_boundary(node: NodeProcess, backend: RawBackend) -> None:
    """A message of exactly max_message_bytes passes; one byte more closes with 1009."""
    identity = "SIZE-LIMIT"

    def message(message_id: str, size: int) -> str:
        head = f'[2,"{message_id}","DataTransfer",{{"vendorId":"x","data":"'
        tail = '"}]'
        return head + "y" * (size - len(head) - len(tail)) + tail

    with open_station(node, identity, "ocpp2.0.1") as ws:
        exact = message("exact", MAX_MESSAGE_BYTES)
        assert len(exact.encode()) == MAX_MESSAGE_BYTES
        ws.send(exact)
        assert_echo(recv_json(ws), "exact", "DataTransfer")
        assert backend.received(identity)[-1] == exact
        ws.send(message("over", MAX_MESSAGE_BYTES + 1))
        with pytest.raises(ConnectionClosed):
            extra = ws.recv(timeout=10)
            pytest.fail(f"expected the link to close, got {extra!r}")
        assert ws.close_code == 1009
    assert '"over"' not in "".join(backend.received(identity)[-1:])
    assert node.alive()


# ---------------------------------------------------------------------------- flood

FLOOD_CALLS = 2000


@contextlib.contextmanager
def busy_neighbour(node: NodeProcess, identity: str, minimum: int = 20) -> Iterator[None]:
    """Another station making sequential CALLs for as long as the block runs.

    On exit it checks that every one of them got the backend's answer.
    """
    stop = threading.Event()
    answers: list[Any] = []
    errors: list[BaseException] = []

    def run(ws: ClientConnection) -> None:
        try:
            n = 0
            while not stop.is_set() or n < minimum:
                n += 1
                answers.append(call(ws, f"n{n}", "Sequential", {"n": n}, timeout=20))
        except BaseException as exc:
            errors.append(exc)

    with open_station(node, identity, "ocpp1.6") as ws:
        assert_echo(call(ws, "n0", "Sequential"), "n0", "Sequential")
        thread = threading.Thread(target=run, args=(ws,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(30)
    assert not thread.is_alive(), "the neighbour's calls stalled"
    assert errors == [], f"the neighbour's calls failed: {errors!r}"
    assert len(answers) >= minimum
    for n, answer in enumerate(answers, start=1):
        assert_echo(answer, f"n{n}", "Sequential")


def test_flood_every_call_answered_once(node: NodeProcess, backend: RawBackend) -> None:
    """2,000 CALLs back to back: one answer each; what got through was forwarded in order."""
    identity = "FLOOD"
    with busy_neighbour(node, "FLOOD-NEIGHBOUR"), open_station(node, identity, "ocpp2.0.1") as ws:
        sent = [f"f{i}" for i in range(FLOOD_CALLS)]
        for message_id in sent:
            ws.send(f'[2,"{message_id}","FloodFree",{{}}]')
        answers = [recv_json(ws, timeout=20) for _ in range(FLOOD_CALLS)]
        by_id: dict[str, Any] = {}
        for answer in answers:
            assert answer[1] not in by_id, f"two answers for {answer[1]}"
            by_id[answer[1]] = answer
            if answer[0] == 3:
                assert_echo(answer, answer[1], "FloodFree")
            else:
                assert_node_error(answer, answer[1], {"GenericError"})
        assert set(by_id) == set(sent), "every CALL is answered"
        results = [a[1] for a in answers if a[0] == 3]
        forwarded = [json.loads(f)[1] for f in backend.received(identity)]
        assert forwarded == results, "exactly the CALLs the backend answered reached it"
        assert backend.max_outstanding[identity] == 1, "CALLs are serialized"
        position = {message_id: i for i, message_id in enumerate(sent)}
        overtaken, latest = [], -1
        for message_id in forwarded:
            if position[message_id] < latest:
                overtaken.append(message_id)
            latest = max(latest, position[message_id])
        assert overtaken == [], (
            f"queued CALLs {overtaken[:20]} were overtaken by later ones; "
            f"order at the backend: {forwarded[:8]} ... {forwarded[-20:]}"
        )
        # The flooding station's link still works.
        assert_echo(call(ws, "after", "Heartbeat"), "after", "Heartbeat")
    assert node.alive()


def test_flood_queue_limit_is_exact(node: NodeProcess, backend: RawBackend) -> None:
    """With the first CALL held by the backend, exactly max_queued_calls wait behind it."""
    identity = "FLOOD-HELD"
    backend.set_answer("FloodHeld", identity=identity, held=True)
    with (
        busy_neighbour(node, "FLOOD-HELD-NEIGHBOUR"),
        open_station(node, identity, "ocpp2.0.1") as ws,
    ):
        sent = [f"h{i}" for i in range(FLOOD_CALLS)]
        for message_id in sent:
            ws.send(f'[2,"{message_id}","FloodHeld",{{}}]')
        queued = 1 + MAX_QUEUED_CALLS
        early = [recv_json(ws, timeout=20) for _ in range(FLOOD_CALLS - queued)]
        for answer, message_id in zip(early, sent[queued:], strict=True):
            assert_node_error(answer, message_id, {"GenericError"})
        backend.wait_until(lambda: backend.held_count("FloodHeld") >= 1)
        assert backend.held_count("FloodHeld") == 1
        backend.release("FloodHeld")
        late = [recv_json(ws, timeout=20) for _ in range(queued)]
        for answer, message_id in zip(late, sent[:queued], strict=True):
            assert_echo(answer, message_id, "FloodHeld")
        assert [json.loads(f)[1] for f in backend.received(identity)] == sent[:queued]
        assert backend.max_outstanding[identity] == 1, "CALLs are serialized"
        assert_echo(call(ws, "after", "Heartbeat"), "after", "Heartbeat")
    assert node.alive()


# ---------------------------------------------------------------------------- unmatched


def test_unmatched_answers_are_dropped(node: NodeProcess, backend: RawBackend) -> None:
    identity = "UNMATCHED"
    with open_station(node, identity, "ocpp2.0.1") as ws:
        assert_echo(call(ws, "u0", "Heartbeat"), "u0", "Heartbeat")
        mark = len(backend.received(identity))
        ws.send('[3,"nobody-asked",{"status":"Accepted"}]')
        ws.send('[4,"nobody-asked-either","GenericError","",{}]')
        assert_echo(call(ws, "u1", "Heartbeat"), "u1", "Heartbeat")
        assert [json.loads(f)[1] for f in backend.received(identity)[mark:]] == ["u1"]
        wait_for_count(node, "frame_dropped", 2, station=identity)
        # The same from the backend side: the station never sees the stray answer.
        backend.send(identity, '[3,"stray",{"currentTime":"2024-01-01T00:00:00Z"}]')
        assert_echo(call(ws, "u2", "Heartbeat"), "u2", "Heartbeat")
        wait_for_count(node, "frame_dropped", 3, station=identity)
    assert node.alive()


# ---------------------------------------------------------------------------- timeouts


def test_call_timeout(quick_timeout_node: NodeProcess, backend: RawBackend) -> None:
    node = quick_timeout_node
    identity = "TIMEOUT"
    backend.set_answer("NeverAnswered", identity=identity, never=True)
    with open_station(node, identity, "ocpp1.6") as ws:
        started = time.monotonic()
        ws.send('[2,"t1","NeverAnswered",{}]')
        answer = recv_json(ws, timeout=10)
        elapsed = time.monotonic() - started
        assert_node_error(answer, "t1", {"InternalError"})
        assert elapsed >= 0.9, f"InternalError after {elapsed:.2f}s, call_timeout_s = 1"
        assert '[2,"t1","NeverAnswered",{}]' in backend.received(identity)
        node.wait_for_event("call_timeout", station=identity, message_id="t1")
        # A late answer from the backend is dropped; the next call works.
        backend.send(identity, '[3,"t1",{"late":true}]')
        assert_echo(call(ws, "t2", "Heartbeat"), "t2", "Heartbeat")
        wait_for_count(node, "frame_dropped", 1, station=identity)
        # The other direction: the station never answers a backend CALL.
        mark = len(backend.received(identity))
        backend.send(identity, '[2,"c1","TriggerMessage",{"requestedMessage":"Heartbeat"}]')
        assert recv_json(ws) == [2, "c1", "TriggerMessage", {"requestedMessage": "Heartbeat"}]
        backend.wait_frames(identity, mark + 1)
        assert_node_error(json.loads(backend.received(identity)[mark]), "c1", {"InternalError"})
        ws.send('[3,"c1",{"status":"Accepted"}]')  # too late: dropped
        assert_echo(call(ws, "t3", "Heartbeat"), "t3", "Heartbeat")
        assert [json.loads(f)[1] for f in backend.received(identity)[mark:]] == ["c1", "t3"]
    assert node.alive()


# ---------------------------------------------------------------------------- handshakes


def test_bad_handshakes(node: NodeProcess, backend: RawBackend) -> None:
    base = f"ws://127.0.0.1:{node.port}"
    good = ["ocpp2.0.1"]
    before = len(backend.handshakes)
    cases = [
        (f"{base}/wrong/CP-PATH", good, 404),
        (f"{base}/ocppx/CP-PATH", good, 404),
        (f"{base}/ocpp/", good, 400),
        (f"{base}/ocpp/{'L' * 49}", good, 400),
        (f"{base}/ocpp/CP%2FSLASH", good, 400),
        (f"{base}/ocpp/CP/SLASH", good, 400),
        (f"{base}/ocpp/CP-NOPROTO", None, 400),
        (f"{base}/ocpp/CP-BADPROTO", ["ocpp1.5"], 400),
    ]
    for url, subprotocols, status in cases:
        got = handshake_status(url, subprotocols)
        assert got == status, f"{url} {subprotocols}: HTTP {got}, expected {status}"
        assert node.alive()
    assert backend.handshakes[before:] == [], "rejected handshakes opened no backend socket"
    # Boundary: 48 characters is a valid identity.
    assert handshake_status(f"{base}/ocpp/{'L' * 48}", good) == 101
    with open_station(node, "CP-AFTER", "ocpp2.0.1") as ws:
        assert_echo(call(ws, "h1", "Heartbeat"), "h1", "Heartbeat")


@pytest.mark.parametrize(("verdict", "status"), [("refuse-403", 403), ("no-subprotocol", 502)])
def test_backend_verdict_is_passed_on(
    node: NodeProcess, backend: RawBackend, verdict: str, status: int
) -> None:
    """Backend refused with status S: S. Backend chose no subprotocol: 502."""
    identity = f"CP-VERDICT-{verdict}"
    if verdict == "no-subprotocol":
        backend.accept_without_subprotocol(identity)
    else:
        backend.refuse(identity, status)
    got = handshake_status(node.url(identity), ["ocpp2.0.1"])
    assert got == status, f"{verdict}: HTTP {got} ({NO_RESPONSE}: no HTTP response)"
    assert identity in backend.handshakes
    assert node.alive()
    with open_station(node, f"{identity}-AFTER", "ocpp2.0.1") as ws:
        assert_echo(call(ws, "v1", "Heartbeat"), "v1", "Heartbeat")


def test_backend_down_is_502(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ocpp"
    with running_node(node_config(url), tmp_path) as node:
        for identity in ("CP-DOWN-1", "CP-DOWN-2"):
            assert handshake_status(node.url(identity), ["ocpp1.6"]) == 502
            assert node.alive()
        node.wait_for_event("backend_failed", station="CP-DOWN-1")
