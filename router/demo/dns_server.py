"""An authoritative DNS server on loopback, built on dnspython: the demo's SRV records
and the high-availability tests' (``tests/dns_server.py`` re-exports it).

It answers UDP queries on 127.0.0.1 (kernel-chosen port) from a background thread, from
records its owner sets and changes while it runs::

    with DnsServer() as dns_server:
        dns_server.set_srv("_ocpp._tcp.csms.test", [Srv(1, 10, csms1.port, "csms1.test"),
                                                   Srv(2, 10, csms2.port, "csms2.test")],
                           ttl=1)
        ...  # [dns] nameservers = [dns_server.nameserver]
        dns_server.fail("_ocpp._tcp.csms.test", "servfail")   # or nxdomain, timeout
        dns_server.fail("_ocpp._tcp.csms.test", None)         # answer again
        dns_server.down()                                     # socket closed
        dns_server.up()                                       # same port again

``set_srv`` also publishes an A record (127.0.0.1) for every target and puts those
records in the additional section of SRV answers, as a real authoritative server would.
Every query that reached the server is recorded (:meth:`DnsServer.queries`), with how it
was answered, so a test can wait for "the node asked again" instead of sleeping. The
server is a test double and a demo prop, never part of a running node.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["FAILURE_MODES", "DnsServer", "Query", "Srv"]

FAILURE_MODES = ("servfail", "nxdomain", "timeout")


@dataclass(frozen=True, slots=True)
class Srv:
    """One SRV target (RFC 2782): lower ``priority`` first, ``weight`` within a priority."""

    priority: int
    weight: int
    port: int
    target: str = "localhost."


@dataclass(frozen=True, slots=True)
class Query:
    """A query that reached the server and what it got: ``outcome`` is answer, nodata,
    nxdomain, servfail, timeout (no response sent) or formerr."""

    at: float  # time.monotonic()
    name: str  # absolute, lower case, e.g. "_ocpp._tcp.csms.test."
    rdtype: str  # "SRV", "A", ...
    outcome: str


@dataclass
class _Zone:
    records: dict[tuple[str, int], tuple[int, list[str]]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # name -> mode ("" = every name)


def _absolute(name: str) -> str:
    return dns.name.from_text(name).to_text().lower()


class DnsServer:
    """Authoritative UDP DNS server on ``host`` with settable records and failure modes.

    Thread-safe: records and failure modes may be changed by its owner while the server
    thread answers queries.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._cond = threading.Condition()
        self._zone = _Zone()
        self._queries: list[Query] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # lifecycle ------------------------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """``host:port``, as a node's ``[dns] nameservers`` entry."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> DnsServer:
        """Bind (the same port as before, after :meth:`down`) and answer in a thread."""
        if self._thread is not None:
            return self
        sock = self._bind()
        sock.settimeout(0.05)  # how quickly the thread notices a stop
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="dns-server",
                                        daemon=True)
        self._thread.start()
        return self

    def _bind(self) -> socket.socket:
        # Back on the old port after down(): a client's short-lived UDP socket may hold it as
        # its ephemeral source port for a moment, so retry briefly rather than fail.
        deadline = time.monotonic() + 5.0
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Close the socket and end the thread; queries then meet a closed port."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(5.0)
        self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    down = stop

    def up(self) -> None:
        """Listen again on the port used before :meth:`down`."""
        self.start()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # records --------------------------------------------------------------------------

    def set_srv(self, name: str, targets: Sequence[Srv], ttl: int = 1, *,
                address: str | None = "127.0.0.1") -> None:
        """Publish the SRV RRset of ``name`` (replacing any); with ``address``, also an A
        record for every target (same TTL). An empty ``targets`` leaves no SRV records
        (NODATA if the name has other records, else NXDOMAIN)."""
        texts = [f"{t.priority} {t.weight} {t.port} {_absolute(t.target)}" for t in targets]
        with self._cond:
            key = (_absolute(name), dns.rdatatype.SRV)
            if texts:
                self._zone.records[key] = (ttl, texts)
            else:
                self._zone.records.pop(key, None)
        if address is not None:
            for target in {t.target for t in targets if _absolute(t.target) != "."}:
                self.set_a(target, address, ttl)

    def set_a(self, name: str, address: str = "127.0.0.1", ttl: int = 1) -> None:
        """Publish one A record for ``name`` (replacing any)."""
        with self._cond:
            self._zone.records[(_absolute(name), dns.rdatatype.A)] = (ttl, [address])

    def remove(self, name: str) -> None:
        """Forget every record of ``name`` (queries then get NXDOMAIN)."""
        absolute = _absolute(name)
        with self._cond:
            for key in [k for k in self._zone.records if k[0] == absolute]:
                del self._zone.records[key]

    def fail(self, name: str | None, mode: str | None) -> None:
        """Make queries for ``name`` (``None``: every name) fail: ``"servfail"``,
        ``"nxdomain"`` or ``"timeout"`` (the query is read and never answered).
        ``mode=None`` answers normally again."""
        if mode is not None and mode not in FAILURE_MODES:
            raise ValueError(f"failure mode must be one of {FAILURE_MODES}, not {mode!r}")
        key = "" if name is None else _absolute(name)
        with self._cond:
            if mode is None:
                self._zone.failures.pop(key, None)
            else:
                self._zone.failures[key] = mode

    # what reached the server ----------------------------------------------------------

    def queries(self, name: str | None = None, rdtype: str | None = None,
                since: float = 0.0) -> list[Query]:
        """Queries received so far (optionally for ``name``/``rdtype``, at or after the
        monotonic time ``since``), oldest first."""
        absolute = None if name is None else _absolute(name)
        with self._cond:
            return [q for q in self._queries
                    if (absolute is None or q.name == absolute)
                    and (rdtype is None or q.rdtype == rdtype.upper())
                    and q.at >= since]

    def wait_for_query(
        self,
        name: str | None = None,
        rdtype: str | None = None,
        *,
        outcome: str | None = None,
        since: float = 0.0,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[Query]:
        """Block until ``count`` matching queries (with this ``outcome``) were received."""

        def found() -> list[Query]:
            hits = [q for q in self.queries(name, rdtype, since)
                    if outcome is None or q.outcome == outcome]
            return hits if len(hits) >= count else []

        return self._wait(found, timeout, f"{count} {rdtype or ''} queries for {name} "
                                          f"({outcome or 'any outcome'})")

    def _wait(self, predicate: Callable[[], list[Query]], timeout: float,
              what: str) -> list[Query]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"DNS server: timed out waiting for {what}; "
                                       f"last queries: {self._queries[-5:]}")
                self._cond.wait(min(left, 0.2))

    # serving --------------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(data)
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, peer)

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            self._record("", "?", "formerr")
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.RdataType.make(question.rdtype)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        found: tuple[int, list[str]] | None = None
        known = False
        extra: list[dns.rrset.RRset] = []
        with self._cond:
            mode = self._zone.failures.get(name) or self._zone.failures.get("")
            if mode is None:
                found = self._zone.records.get((name, rdtype))
                known = any(k[0] == name for k in self._zone.records)
                extra = self._additional(found) if rdtype == dns.rdatatype.SRV else []
        outcome: str
        if mode == "timeout":
            self._record(name, rdtype, "timeout")
            return None
        if mode == "servfail":
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL)
            outcome = "servfail"
        elif mode == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
            outcome = "nxdomain"
        elif found is not None:
            ttl, texts = found
            response.answer.append(dns.rrset.from_text_list(
                question.name, ttl, dns.rdataclass.IN, rdtype, texts))
            response.additional.extend(extra)
            outcome = "answer"
        elif known:
            outcome = "nodata"
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
            outcome = "nxdomain"
        self._record(name, rdtype, outcome)
        return response.to_wire()

    def _additional(self, found: tuple[int, list[str]] | None) -> list[dns.rrset.RRset]:
        """A records of the targets of an SRV answer (the caller holds the lock)."""
        if found is None:
            return []
        out = []
        for text in found[1]:
            target = text.split()[3]
            a = self._zone.records.get((target, dns.rdatatype.A))
            if a is not None and target != ".":
                out.append(dns.rrset.from_text_list(target, a[0], dns.rdataclass.IN,
                                                    dns.rdatatype.A, a[1]))
        return out

    def _record(self, name: str, rdtype: int | str, outcome: str) -> None:
        text = rdtype if isinstance(rdtype, str) else dns.rdatatype.to_text(
            dns.rdatatype.RdataType.make(rdtype))
        with self._cond:
            self._queries.append(Query(time.monotonic(), name, text, outcome))
            self._cond.notify_all()
