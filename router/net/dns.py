"""DNS for the node: SRV discovery (RFC 2782) and the addresses of SRV targets, one cache.

``rfc2782_order`` is the pure ordering rule (randomness injected). :class:`DnsCache` keeps
every answer the node uses, SRV records and target addresses alike, on the trio clock:
answers live for their TTL clamped to a floor and a ceiling, a failed re-resolution keeps
the last good answer and backs off (1 s doubling to 60 s) so a dead DNS server is not
asked on every connection attempt, and concurrent callers share one query. SRV lookups
wait for a due refresh; address lookups answer from the cache at once and refresh in the
background, so a slow DNS server never delays a station. Queries are injectable, so all
of this is testable without a network; the default ones use dnspython's async resolver on
trio, one resolver for both kinds.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.resolver
import trio

from router.logs import log_event

logger = logging.getLogger("router.srv")

NOT_OFFERED = "."
"""The host of the RFC 2782 target ``"."``: the service is decidedly not offered."""

#: How long a system resolver's answer (getaddrinfo: no TTL of its own) is kept.
SYSTEM_ADDRESS_TTL_S = 30.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0

SrvQuery = Callable[[str], Awaitable[tuple[list["SrvTarget"], float]]]
"""Resolves one SRV name to ``(targets, ttl_s)``; raises ``dns.exception.DNSException`` or
``OSError`` when DNS fails. A ``"."`` target is returned with host ``NOT_OFFERED``."""

AddressQuery = Callable[[str], Awaitable[tuple[list[str], float]]]
"""Resolves one host name to ``(IPv4 addresses, ttl_s)``; raises as :data:`SrvQuery`."""


@dataclass(frozen=True, slots=True)
class SrvTarget:
    """One SRV record: where to connect and how much to prefer it."""

    priority: int
    weight: int
    host: str  # without the trailing dot
    port: int


class SrvUnavailable(Exception):
    """No usable answer: never resolved, or the service is explicitly not offered ("." target)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"SRV {name}: {reason}")
        self.name = name
        self.reason = reason


def rfc2782_order(targets: Sequence[SrvTarget], rng: random.Random) -> list[SrvTarget]:
    """Lowest priority first; within a priority a weighted random order (RFC 2782's running-sum
    selection, weight 0 entries placed first in the list before selection so they are chosen only
    rarely, exactly as the RFC describes); a single "." target is handled by the resolver."""
    by_priority: dict[int, list[SrvTarget]] = {}
    for target in targets:
        by_priority.setdefault(target.priority, []).append(target)
    ordered: list[SrvTarget] = []
    for priority in sorted(by_priority):
        remaining = list(by_priority[priority])
        # The RFC allows "any order" before selection; a shuffle keeps the first-listed record
        # from being favoured, and spreads load evenly when every weight is 0.
        rng.shuffle(remaining)
        remaining.sort(key=lambda t: t.weight != 0)  # stable: weight 0 first, as the RFC says
        while remaining:
            total = sum(t.weight for t in remaining)
            pick = rng.randint(0, total)  # inclusive of 0, so weight-0 entries can win rarely
            running = 0
            for index, target in enumerate(remaining):
                running += target.weight
                if running >= pick:
                    ordered.append(remaining.pop(index))
                    break
    return ordered


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"``, ``"[::1]:5353"`` or a bare address (port 53) -> ``(address, port)``."""
    address, port = text, 53
    if text.startswith("["):
        address, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"nameserver {text!r}: expected [address]:port")
        if rest:
            port = _port(text, rest[1:])
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
        port = _port(text, port_text)
    if not dns.inet.is_address(address):
        raise ValueError(f"nameserver {text!r}: {address!r} is not an IP address")
    return address, port


def _port(text: str, port_text: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"nameserver {text!r}: port must be 1-65535")
    return int(port_text)


class DnspythonQuery:
    """The real ``SrvQuery``: dnspython's async resolver on the trio backend."""

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None, timeout_s: float) -> None:
        for address, port in nameservers or ():
            if not dns.inet.is_address(address):
                raise ValueError(f"DNS nameserver {address!r} is not an IP address")
            if not 0 < port < 65536:
                raise ValueError(f"DNS nameserver {address!r}: port {port} out of range")
        self._nameservers = list(nameservers) if nameservers else None
        self._timeout_s = timeout_s
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        # Built on first use, not at start-up: a missing /etc/resolv.conf then fails (and is
        # logged and retried) like any other DNS failure instead of stopping the node.
        if self._resolver is None:
            if self._nameservers is not None:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(address, port)
                    for address, port in self._nameservers
                ]
            else:
                resolver = dns.asyncresolver.Resolver()
            # Share the budget so a dead first server still leaves time to ask the others.
            resolver.timeout = self._timeout_s / max(1, len(resolver.nameservers))
            resolver.lifetime = self._timeout_s
            self._resolver = resolver
        return self._resolver

    async def __call__(self, name: str) -> tuple[list[SrvTarget], float]:
        """Resolve ``name`` to its SRV targets and the answer's TTL in seconds."""
        resolver = self._get_resolver()
        answer = await resolver.resolve(
            dns.name.from_text(name),  # absolute: an SRV name is never a search-list suffix
            dns.rdatatype.SRV,
            search=False,
            lifetime=self._timeout_s,
            # Named explicitly: dnspython's default backend is sniffed once per process and
            # would stay asyncio if anything asyncio ran first.
            backend=dns.asyncbackend.get_backend("trio"),
        )
        targets = [
            SrvTarget(
                priority=rdata.priority,
                weight=rdata.weight,
                host=NOT_OFFERED if rdata.target == dns.name.root
                else rdata.target.to_text(omit_final_dot=True),
                port=rdata.port,
            )
            for rdata in answer.rrset or ()
            if isinstance(rdata, dns.rdtypes.IN.SRV.SRV)
        ]
        # The minimum over a CNAME chain, not just the SRV rrset's own TTL.
        return targets, float(answer.chaining_result.minimum_ttl)

    async def address(self, host: str) -> tuple[list[str], float]:
        """Resolve a target host to its IPv4 addresses and the answer's TTL in seconds."""
        resolver = self._get_resolver()
        answer = await resolver.resolve(
            dns.name.from_text(host), dns.rdatatype.A, search=False,
            lifetime=self._timeout_s, backend=dns.asyncbackend.get_backend("trio"))
        return [str(rdata) for rdata in answer.rrset or ()], float(
            answer.chaining_result.minimum_ttl)


async def _system_address(host: str) -> tuple[list[str], float]:
    """The system resolver's addresses of ``host``, in its order of preference."""
    infos = await trio.socket.getaddrinfo(host, None, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos], SYSTEM_ADDRESS_TTL_S


@functools.lru_cache(maxsize=1024)
def address_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP address literal, None for a name to resolve. A node
    dials the same few backend hosts for every station: each is parsed once."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def failure_reason(exc: BaseException) -> str:
    """A short, operator-readable reason for a failed SRV query."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "NXDOMAIN"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no SRV records (NOERROR, empty answer)"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        # Each error names its server as dnspython prints it, e.g. "Do53:127.0.0.1@5353".
        answers = sorted({f"{err[3]} from {err[0]}" for err in errors})
        return "no nameserver answered: " + ("; ".join(answers) or "none configured")
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return "no resolver configuration (/etc/resolv.conf)"
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class _Entry:
    """What is known about one name (its SRV records, or one host's address)."""

    answer: tuple[Any, ...] | None = None  # last good answer; () for SRV means "." (not offered)
    expires_at: float = -math.inf
    failures: int = 0  # consecutive failed queries since the last good answer
    retry_at: float = -math.inf
    reason: str = ""
    inflight: trio.Event | None = None  # set when the running query finishes

    def due(self, now: float) -> bool:
        """Whether a query should be made now: expired and not backing off."""
        return now >= self.expires_at and now >= self.retry_at


class DnsCache:
    """SRV targets in RFC 2782 order and target addresses, cached on the trio clock."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        *,
        ttl_floor_s: float = 5.0,
        ttl_ceiling_s: float = 3600.0,
        timeout_s: float = 2.0,
        rng: random.Random | None = None,
        query: SrvQuery | None = None,
        address_query: AddressQuery | None = None,
    ) -> None:
        if not 0 <= ttl_floor_s <= ttl_ceiling_s:
            raise ValueError(f"DNS TTL floor {ttl_floor_s} and ceiling {ttl_ceiling_s}: "
                             "need 0 <= floor <= ceiling")
        if timeout_s <= 0:
            raise ValueError(f"DNS timeout_s {timeout_s} must be positive")
        self.ttl_floor_s = ttl_floor_s
        self.ttl_ceiling_s = ttl_ceiling_s
        self.timeout_s = timeout_s
        self._rng = rng or random.Random()
        dnspython = DnspythonQuery(nameservers, timeout_s)
        self._query: SrvQuery = query or dnspython
        # addresses come from the [dns] nameservers, or else from the system's resolver
        # (getaddrinfo, which trio runs in a thread); either way each host is looked up
        # once per TTL, not once per dial: in a reconnect storm thousands of dials would
        # otherwise each take a thread, forty at a time
        self._address_query: AddressQuery = address_query or (
            dnspython.address if nameservers else _system_address)
        self._entries: dict[str, _Entry] = {}
        self._addresses: dict[str, _Entry] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Refresh stale addresses in the background for as long as this runs; without
        it, a stale address is refreshed by the lookup that finds it."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def targets(self, name: str) -> list[SrvTarget]:
        """The targets in the order to try them now (a fresh weighted order on each call), from a
        cache kept for the record TTL clamped to [floor, ceiling]. On a DNS failure (timeout,
        SERVFAIL, NXDOMAIN, no answer) the last good answer is kept and used, the failure is
        logged (log_event from router.logs, logger "router.srv", event "srv_failed" with name,
        reason) and the next attempt is made after a back-off (doubling from 1 s to 60 s) rather
        than on every call. Raises SrvUnavailable when there is no good answer to fall back on,
        or when the answer is a single "." target (no fallback to A/AAAA)."""
        entry = self._entries.setdefault(_key(name), _Entry())
        while True:
            now = trio.current_time()
            if not entry.due(now):
                return self._serve(name, entry)  # fresh, or backing off after a failure
            if entry.inflight is not None:
                if entry.answer is not None:
                    # Someone is already refreshing; a stale answer beats waiting up to
                    # timeout_s when a station is trying to fail over.
                    return self._serve(name, entry)
                await entry.inflight.wait()
                continue  # re-read: that query may have succeeded, failed or been cancelled
            await self._refresh(name, entry, self._srv_answer)
            # Served directly rather than by looping: with a zero floor and TTL the fresh answer
            # is already expired, and looping would query again forever.
            return self._serve(name, entry)

    def cached_until(self, name: str) -> float | None:
        """Trio clock time until which ``targets(name)`` answers from cache without asking DNS.

        That is when the answer expires, or, after a failed re-resolution that kept the last
        good answer, when the next attempt is due. None when nothing good was ever resolved.
        """
        entry = self._entries.get(_key(name))
        if entry is None or entry.answer is None:
            return None
        return max(entry.expires_at, entry.retry_at)

    async def address(self, host: str) -> str | None:
        """The address to dial for ``host``: from the ``[dns]`` nameservers, or else the
        system resolver's first answer (kept :data:`SYSTEM_ADDRESS_TTL_S`). None for an
        address literal, or while no lookup of the host has succeeded (the dial then
        resolves the name itself).

        Only the first lookup of a host waits for DNS. After that the known address is
        used at once and, once its TTL has passed, refreshed by one background query, so
        a DNS outage neither delays stations nor floods the resolver; a failed refresh
        keeps the last good address and is retried with back-off.
        """
        if not host or address_family(host) is not None:
            return None
        key = _key(host)
        entry = self._addresses.setdefault(key, _Entry())
        if entry.answer is None:
            if entry.inflight is not None:
                await entry.inflight.wait()
            elif entry.due(trio.current_time()):
                await self._refresh(host, entry, self._address_answer)
            return entry.answer[0] if entry.answer else None
        if entry.inflight is None and entry.due(trio.current_time()):
            if self._nursery is not None:
                # marked in flight now, not when the task starts: one refresh per host
                entry.inflight = trio.Event()
                self._nursery.start_soon(self._refresh, host, entry, self._address_answer)
            else:
                await self._refresh(host, entry, self._address_answer)
        return str(entry.answer[0])

    def knows_address(self, host: str) -> bool:
        """Whether an address of ``host`` is cached (fresh or not)."""
        entry = self._addresses.get(_key(host))
        return entry is not None and entry.answer is not None

    async def _srv_answer(self, name: str) -> tuple[tuple[Any, ...], float]:
        targets, ttl = await self._query(name)
        usable = tuple(t for t in targets if t.host not in (NOT_OFFERED, ""))
        if not usable and not targets:
            raise _Empty("no SRV records (NOERROR, empty answer)")
        return usable, ttl

    async def _address_answer(self, host: str) -> tuple[tuple[Any, ...], float]:
        addresses, ttl = await self._address_query(host)
        if not addresses:
            raise _Empty("no A records (NOERROR, empty answer)")
        return (addresses[0],), ttl

    async def _refresh(
        self, name: str, entry: _Entry,
        ask: Callable[[str], Awaitable[tuple[tuple[Any, ...], float]]],
    ) -> None:
        done = entry.inflight if entry.inflight is not None else trio.Event()
        entry.inflight = done
        try:
            reason = ""
            answer: tuple[Any, ...] = ()
            ttl = 0.0
            # A trio scope as well as dnspython's lifetime: it also bounds an injected query.
            with trio.move_on_after(self.timeout_s) as scope:
                try:
                    answer, ttl = await ask(name)
                except (dns.exception.DNSException, OSError) as exc:
                    reason = failure_reason(exc)
                except _Empty as exc:
                    reason = str(exc)
            if scope.cancelled_caught:
                reason = "timeout"
            now = trio.current_time()
            srv = ask == self._srv_answer
            if reason:
                self._failed(name, entry, reason, now, srv=srv)
            else:
                self._resolved(name, entry, answer, ttl, now, srv=srv)
        finally:
            entry.inflight = None
            done.set()

    def _resolved(self, name: str, entry: _Entry, answer: tuple[Any, ...], ttl: float,
                  now: float, *, srv: bool) -> None:
        ttl_s = min(max(ttl, self.ttl_floor_s), self.ttl_ceiling_s)
        changed = entry.answer is None or set(entry.answer) != set(answer)
        recovered_after = entry.failures
        entry.answer, entry.expires_at = answer, now + ttl_s
        entry.failures, entry.retry_at, entry.reason = 0, -math.inf, ""
        if not srv:
            return
        if not answer:
            log_event(logger, logging.WARNING, "srv_not_offered", name=name, ttl_s=ttl_s)
        elif changed or recovered_after:
            log_event(logger, logging.INFO, "srv_resolved", name=name, ttl_s=ttl_s,
                      targets=[f"{t.host}:{t.port} priority={t.priority} weight={t.weight}"
                               for t in sorted(answer, key=lambda t: (t.priority, -t.weight))],
                      after_failures=recovered_after)

    def _failed(self, name: str, entry: _Entry, reason: str, now: float, *, srv: bool) -> None:
        entry.failures += 1
        # The exponent is capped so a DNS server down for days cannot overflow the float.
        backoff = min(BACKOFF_INITIAL_S * 2 ** min(entry.failures - 1, 32), BACKOFF_MAX_S)
        entry.retry_at = now + backoff
        entry.reason = reason
        # a host name's addresses (a backend's url, an SRV target) are not an SRV lookup
        event = "srv_failed" if srv else "address_failed"
        log_event(logger, logging.WARNING, event, name=name, reason=reason,
                  failures=entry.failures, retry_in_s=backoff,
                  using="last good answer" if entry.answer is not None else "nothing")

    def _serve(self, name: str, entry: _Entry) -> list[SrvTarget]:
        if entry.answer is None:
            raise SrvUnavailable(name, entry.reason or "not resolved yet")
        if not entry.answer:
            raise SrvUnavailable(name, "service not offered (SRV target \".\")")
        return rfc2782_order(entry.answer, self._rng)


class _Empty(Exception):
    """A DNS answer without any record of the type asked for."""


def _key(name: str) -> str:
    # DNS names are case-insensitive and "x." is "x": one cache entry for all spellings.
    return name.rstrip(".").lower()
