"""SRV discovery: RFC 2782 ordering with a seeded RNG, the TTL cache and failure back-off on
trio's MockClock with an injected query, and the real dnspython path against a tiny UDP DNS
responder on loopback."""

from __future__ import annotations

import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
import trio
import trio.testing

from router.net.dns import (
    NOT_OFFERED,
    DnsCache,
    SrvTarget,
    SrvUnavailable,
    parse_nameserver,
    rfc2782_order,
)
from tests.log_events import Events, events_of

DRAWS = 10_000


def t(host: str, priority: int = 10, weight: int = 0, port: int = 9100) -> SrvTarget:
    return SrvTarget(priority=priority, weight=weight, host=host, port=port)


def first_shares(targets: list[SrvTarget], seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    counts = Counter(rfc2782_order(targets, rng)[0].host for _ in range(DRAWS))
    return {target.host: counts[target.host] / DRAWS for target in targets}


# --- ordering -------------------------------------------------------------------------------


def test_lower_priority_always_first_and_nothing_lost() -> None:
    targets = [t("c1", 30, 5), t("a1", 10, 50), t("b1", 20, 0), t("a2", 10, 50), t("b2", 20, 7)]
    rng = random.Random(7)
    for _ in range(1000):
        order = rfc2782_order(targets, rng)
        assert sorted(order, key=lambda x: x.host) == sorted(targets, key=lambda x: x.host)
        assert [x.priority for x in order] == [10, 10, 20, 20, 30]


def test_weights_give_their_shares_of_first_place() -> None:
    # RFC 2782 picks uniformly in [0, total], so each share is w/(total+1) plus a little for
    # whichever record is listed first; within 3 points of w/total over 10,000 draws.
    shares = first_shares([t("a", weight=60), t("b", weight=30), t("c", weight=10)])
    assert shares["a"] == pytest.approx(0.60, abs=0.03)
    assert shares["b"] == pytest.approx(0.30, abs=0.03)
    assert shares["c"] == pytest.approx(0.10, abs=0.03)


def test_second_place_is_weighted_among_the_rest() -> None:
    rng = random.Random(3)
    targets = [t("a", weight=60), t("b", weight=30), t("c", weight=10)]
    seconds = Counter(order[1].host for order in (rfc2782_order(targets, rng)
                                                  for _ in range(DRAWS)) if order[0].host == "a")
    assert seconds["b"] / seconds.total() == pytest.approx(30 / 40, abs=0.03)


def test_weights_only_matter_within_a_priority() -> None:
    shares = first_shares([t("light", priority=1, weight=1), t("heavy", priority=2, weight=1000)])
    assert shares == {"light": 1.0, "heavy": 0.0}


def test_weight_zero_is_chosen_rarely_beside_weighted_records() -> None:
    # Placed first in the list, a weight-0 record wins only when the draw is exactly 0:
    # probability 1/(total+1) = 1/101 here.
    shares = first_shares([t("zero", weight=0), t("heavy", weight=100)])
    assert 0.003 < shares["zero"] < 0.02


def test_weight_zero_alone_is_always_used() -> None:
    rng = random.Random(0)
    assert rfc2782_order([t("only", weight=0)], rng) == [t("only", weight=0)]
    # ...and alone in its priority it leads that priority whatever the other priorities weigh.
    order = rfc2782_order([t("later", priority=20, weight=100), t("zero", priority=5)], rng)
    assert [x.host for x in order] == ["zero", "later"]


def test_all_weight_zero_spreads_evenly() -> None:
    shares = first_shares([t("a"), t("b"), t("c")])
    for share in shares.values():
        assert share == pytest.approx(1 / 3, abs=0.03)


def test_order_is_repeatable_with_a_seed() -> None:
    targets = [t(f"h{i}", priority=i % 2, weight=i) for i in range(8)]
    first = [rfc2782_order(targets, r) for r in [random.Random(42)] for _ in range(20)]
    again = [rfc2782_order(targets, r) for r in [random.Random(42)] for _ in range(20)]
    assert first == again
    assert rfc2782_order([], random.Random(0)) == []


# --- resolver cache, on the mock clock --------------------------------------------------------


@pytest.fixture
def srv_log() -> Iterator[Events]:
    with events_of("router.srv") as collected:
        yield collected


Step = tuple[list[SrvTarget], float] | Exception | None  # None: never answers


@dataclass
class FakeDns:
    """Answers from a script, one step per query; the last step repeats."""

    steps: list[Step]
    calls: list[float] = field(default_factory=list)

    async def __call__(self, name: str) -> tuple[list[SrvTarget], float]:
        self.calls.append(trio.current_time())
        step = self.steps[min(len(self.calls) - 1, len(self.steps) - 1)]
        if step is None:
            await trio.sleep_forever()
        if isinstance(step, Exception):
            raise step
        assert step is not None
        return step


# dnspython's exception constructors are untyped; built once here.
SERVFAIL: Exception = dns.resolver.NoNameservers()  # type: ignore[no-untyped-call]
NXDOMAIN: Exception = dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]
GOOD = [t("a.example", 1, 10), t("b.example", 2, 10)]
OTHER = [t("c.example", 1, 10)]
NAME = "_ocpp._tcp.csms.example"


def make(fake: FakeDns, *, ttl_floor_s: float = 5.0, ttl_ceiling_s: float = 3600.0,
         timeout_s: float = 2.0) -> DnsCache:
    return DnsCache(ttl_floor_s=ttl_floor_s, ttl_ceiling_s=ttl_ceiling_s,
                    timeout_s=timeout_s, rng=random.Random(1), query=fake)


async def hosts(resolver: DnsCache, name: str = NAME) -> list[str]:
    return [x.host for x in await resolver.targets(name)]


async def test_ttl_is_used_between_floor_and_ceiling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeDns([(GOOD, 30.0), (OTHER, 30.0)])
    resolver = make(fake)
    start = trio.current_time()
    assert await hosts(resolver) == ["a.example", "b.example"]
    assert resolver.cached_until(NAME) == start + 30
    await trio.sleep(29.5)
    assert await hosts(resolver) == ["a.example", "b.example"]
    assert len(fake.calls) == 1
    await trio.sleep(0.5)
    assert await hosts(resolver) == ["c.example"]
    assert fake.calls == [start, start + 30]


async def test_ttl_floor(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeDns([(GOOD, 0.0)])
    resolver = make(fake, ttl_floor_s=5.0)
    start = trio.current_time()
    await resolver.targets(NAME)
    assert resolver.cached_until(NAME) == start + 5
    for _ in range(9):
        await trio.sleep(0.5)
        await resolver.targets(NAME)
    assert len(fake.calls) == 1
    await trio.sleep(0.5)
    await resolver.targets(NAME)
    assert fake.calls == [start, start + 5]


async def test_ttl_ceiling(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeDns([(GOOD, 86400.0)])
    resolver = make(fake, ttl_ceiling_s=3600.0)
    start = trio.current_time()
    await resolver.targets(NAME)
    assert resolver.cached_until(NAME) == start + 3600
    await trio.sleep(3599)
    await resolver.targets(NAME)
    await trio.sleep(1)
    await resolver.targets(NAME)
    assert fake.calls == [start, start + 3600]


async def test_each_call_gives_a_fresh_weighted_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeDns([([t("a", weight=50), t("b", weight=50)], 60.0)])
    resolver = make(fake)
    firsts = Counter([(await resolver.targets(NAME))[0].host for _ in range(400)])
    assert len(fake.calls) == 1
    assert 150 < firsts["a"] < 250


async def test_dot_target_means_not_offered(
    autojump_clock: trio.testing.MockClock, srv_log: Events
) -> None:
    fake = FakeDns([([t(NOT_OFFERED, 0, 0, 0)], 60.0), (GOOD, 60.0)])
    resolver = make(fake)
    for _ in range(3):
        with pytest.raises(SrvUnavailable) as caught:
            await resolver.targets(NAME)
        assert "not offered" in caught.value.reason
    assert len(fake.calls) == 1  # an explicit "no" is an answer, cached for its TTL
    assert srv_log.named("srv_not_offered") == [{"name": NAME, "ttl_s": 60.0}]
    assert not srv_log.named("srv_failed")
    await trio.sleep(60)
    assert await hosts(resolver) == ["a.example", "b.example"]


async def test_dot_beside_real_targets_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    resolver = make(FakeDns([([t(NOT_OFFERED, 0, 0, 0), *GOOD], 60.0)]))
    assert await hosts(resolver) == ["a.example", "b.example"]


async def test_dot_replaces_a_previous_good_answer(autojump_clock: trio.testing.MockClock) -> None:
    resolver = make(FakeDns([(GOOD, 10.0), ([t(NOT_OFFERED, 0, 0, 0)], 10.0)]))
    await resolver.targets(NAME)
    await trio.sleep(10)
    with pytest.raises(SrvUnavailable):
        await resolver.targets(NAME)


async def test_failures_keep_the_last_good_answer_and_back_off(
    autojump_clock: trio.testing.MockClock, srv_log: Events
) -> None:
    steps: list[Step] = [(GOOD, 10.0), *[SERVFAIL] * 9, (OTHER, 10.0), SERVFAIL]
    fake = FakeDns(steps)
    resolver = make(fake)
    start = trio.current_time()
    await resolver.targets(NAME)
    # Poll every 0.5 s, as a reconnecting station would: DNS must be asked only on the
    # back-off schedule, and the old answer served all along.
    while len(fake.calls) < 11:
        await trio.sleep(0.5)
        got = await hosts(resolver)
        assert got == (["a.example", "b.example"] if len(fake.calls) < 11 else ["c.example"])
    offsets = [call - start for call in fake.calls]
    assert offsets == [0, 10, 11, 13, 17, 25, 41, 73, 133, 193, 253]  # 1,2,4,...,60,60
    failed = srv_log.named("srv_failed")
    assert len(failed) == 9
    assert failed[0]["name"] == NAME
    assert failed[0]["using"] == "last good answer"
    assert [f["retry_in_s"] for f in failed] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    # Success resets the back-off: the next failure waits 1 s again.
    assert resolver.cached_until(NAME) == start + 263
    await trio.sleep_until(start + 263)
    assert await hosts(resolver) == ["c.example"]
    assert resolver.cached_until(NAME) == start + 264


async def test_cached_until_covers_the_back_off(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeDns([(GOOD, 10.0), NXDOMAIN])
    resolver = make(fake)
    start = trio.current_time()
    await resolver.targets(NAME)
    await trio.sleep(10)
    await resolver.targets(NAME)
    # Someone sleeping until cached_until() must not wake into a busy loop.
    assert resolver.cached_until(NAME) == start + 11


async def test_nothing_ever_resolved_raises_and_backs_off(
    autojump_clock: trio.testing.MockClock, srv_log: Events
) -> None:
    fake = FakeDns([NXDOMAIN, NXDOMAIN, (GOOD, 60.0)])
    resolver = make(fake)
    start = trio.current_time()
    for _ in range(5):
        with pytest.raises(SrvUnavailable) as caught:
            await resolver.targets(NAME)
        assert caught.value.reason == "NXDOMAIN"
        assert caught.value.name == NAME
    assert len(fake.calls) == 1
    assert resolver.cached_until(NAME) is None
    assert srv_log.named("srv_failed")[0]["using"] == "nothing"
    await trio.sleep(1)
    with pytest.raises(SrvUnavailable):
        await resolver.targets(NAME)
    await trio.sleep(2)
    assert await hosts(resolver) == ["a.example", "b.example"]
    assert [c - start for c in fake.calls] == [0, 1, 3]
    resolved = srv_log.named("srv_resolved")
    assert resolved[-1]["after_failures"] == 2


async def test_a_hung_query_times_out(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeDns([None])
    resolver = make(fake, timeout_s=2.0)
    start = trio.current_time()
    with pytest.raises(SrvUnavailable) as caught:
        await resolver.targets(NAME)
    assert caught.value.reason == "timeout"
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_concurrent_callers_share_one_query(autojump_clock: trio.testing.MockClock) -> None:
    class Slow(FakeDns):
        async def __call__(self, name: str) -> tuple[list[SrvTarget], float]:
            await trio.sleep(1)
            return await super().__call__(name)

    fake = Slow([(GOOD, 10.0), (OTHER, 10.0)])
    resolver = make(fake)
    got: list[list[str]] = []

    async def one() -> None:
        got.append(await hosts(resolver))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert len(fake.calls) == 1
    assert got == [["a.example", "b.example"]] * 20
    # Expired and being refreshed: others get the stale answer at once instead of waiting.
    await trio.sleep(10)
    got.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        before = trio.current_time()
        assert await hosts(resolver) == ["a.example", "b.example"]
        assert trio.current_time() == before
    assert got == [["c.example"]]
    assert len(fake.calls) == 2


async def test_a_cancelled_refresh_does_not_wedge_the_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeDns([None, (GOOD, 10.0)])
    resolver = make(fake, timeout_s=5.0)
    with trio.move_on_after(1):
        await resolver.targets(NAME)
    assert await hosts(resolver) == ["a.example", "b.example"]
    assert len(fake.calls) == 2


async def test_names_are_case_and_dot_insensitive(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeDns([(GOOD, 60.0)])
    resolver = make(fake)
    await resolver.targets("_OCPP._tcp.CSMS.example.")
    await resolver.targets(NAME)
    assert len(fake.calls) == 1
    assert resolver.cached_until(NAME) == resolver.cached_until(NAME.upper() + ".")


def test_constructor_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="floor"):
        DnsCache(ttl_floor_s=10, ttl_ceiling_s=5)
    with pytest.raises(ValueError, match="timeout"):
        DnsCache(timeout_s=0)
    with pytest.raises(ValueError, match="not an IP address"):
        DnsCache([("dns.example", 53)])


def test_parse_nameserver() -> None:
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("10.0.0.1") == ("10.0.0.1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x"):
        with pytest.raises(ValueError, match="nameserver"):
            parse_nameserver(bad)


# --- the real dnspython path, against a loopback responder -------------------------------------


ZONE: dict[str, str | list[str]] = {
    "_ocpp._tcp.csms.test.": ["10 60 9101 csms-a.test.", "10 40 9102 csms-b.test.",
                              "20 0 9103 csms-c.test."],
    "_ocpp._tcp.gone.test.": ["0 0 0 ."],
    "_ocpp._tcp.servfail.test.": "SERVFAIL",
    "_ocpp._tcp.empty.test.": "EMPTY",
}
ZONE_TTL = 30


async def serve_dns(sock: trio.socket.SocketType) -> None:
    """An authoritative responder for ``ZONE``: SRV answers, SERVFAIL, NOERROR/empty, else
    NXDOMAIN."""
    while True:
        wire, peer = await sock.recvfrom(4096)
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        entry = ZONE.get(question.name.to_text())
        if entry == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif isinstance(entry, list) and question.rdtype == dns.rdatatype.SRV:
            response.answer.append(
                dns.rrset.from_text_list(question.name, ZONE_TTL, "IN", "SRV", entry))
        await sock.sendto(response.to_wire(), peer)


@pytest.fixture
async def dns_port() -> AsyncIterator[int]:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_dns, sock)
        yield sock.getsockname()[1]
        nursery.cancel_scope.cancel()
    sock.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    # Bound but never read: queries to it time out rather than get ICMP port-unreachable.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_real_query_through_a_nameserver_on_a_custom_port(dns_port: int) -> None:
    resolver = DnsCache([("127.0.0.1", dns_port)], rng=random.Random(5))
    before = trio.current_time()
    order = await resolver.targets("_ocpp._tcp.csms.test")
    assert sorted(order[:2], key=lambda x: x.port) == [
        SrvTarget(10, 60, "csms-a.test", 9101), SrvTarget(10, 40, "csms-b.test", 9102)]
    assert order[2] == SrvTarget(20, 0, "csms-c.test", 9103)
    until = resolver.cached_until("_ocpp._tcp.csms.test")
    assert until is not None
    assert before + ZONE_TTL <= until <= trio.current_time() + ZONE_TTL


async def test_real_dot_servfail_nxdomain_and_empty(dns_port: int) -> None:
    resolver = DnsCache([("127.0.0.1", dns_port)])
    cases = {
        "_ocpp._tcp.gone.test": "not offered",
        "_ocpp._tcp.servfail.test": f"SERVFAIL from Do53:127.0.0.1@{dns_port}",
        "_ocpp._tcp.missing.test": "NXDOMAIN",
        "_ocpp._tcp.empty.test": "no SRV records",
    }
    for name, reason in cases.items():
        with pytest.raises(SrvUnavailable) as caught:
            await resolver.targets(name)
        assert reason in caught.value.reason, (name, caught.value.reason)


async def test_real_timeout_then_second_nameserver(dns_port: int, silent_port: int) -> None:
    alone = DnsCache([("127.0.0.1", silent_port)], timeout_s=0.3)
    with pytest.raises(SrvUnavailable) as caught:
        await alone.targets("_ocpp._tcp.csms.test")
    assert caught.value.reason == "timeout"
    # The budget is split between nameservers, so a dead first one leaves time for the next.
    both = DnsCache([("127.0.0.1", silent_port), ("127.0.0.1", dns_port)], timeout_s=1.0)
    assert len(await both.targets("_ocpp._tcp.csms.test")) == 3
