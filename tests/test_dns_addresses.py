"""Target addresses in the one DNS cache (router/net/dns.py), on trio's MockClock.

Only the first lookup of a host waits for DNS; after that the cached address answers at
once and a stale one is refreshed by one background query; a failed refresh keeps the last
good address and backs off like an SRV answer does.
"""

from __future__ import annotations

import random

import dns.exception
import pytest
import trio
import trio.testing

from router.net.dns import DnsCache
from tests.log_events import events_of


class FakeAddresses:
    """Answers A queries from a script; records when each query was made."""

    def __init__(self, answers: list[tuple[list[str], float] | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, host: str) -> tuple[list[str], float]:
        self.calls.append((host, trio.current_time()))
        await trio.sleep(0.01)  # a query takes a little time: callers may overlap
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make(fake: FakeAddresses) -> DnsCache:
    return DnsCache(ttl_floor_s=5.0, ttl_ceiling_s=3600.0, timeout_s=2.0,
                    rng=random.Random(1), address_query=fake)


async def test_the_first_lookup_waits_then_the_cache_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAddresses([(["10.0.0.1"], 30.0)])
    cache = make(fake)
    assert not cache.knows_address("csms.example")
    assert await cache.address("csms.example") == "10.0.0.1"
    assert cache.knows_address("CSMS.example.")  # names are case-insensitive, dot or not
    await trio.sleep(10)
    assert await cache.address("csms.example") == "10.0.0.1"
    assert len(fake.calls) == 1


async def test_concurrent_first_lookups_share_one_query(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAddresses([(["10.0.0.1"], 30.0)])
    cache = make(fake)
    got: list[str | None] = []

    async def look() -> None:
        got.append(await cache.address("csms.example"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(look)
    assert got == ["10.0.0.1"] * 5
    assert len(fake.calls) == 1


async def test_a_stale_address_answers_at_once_and_is_refreshed_once_in_the_background(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAddresses([(["10.0.0.1"], 30.0), (["10.0.0.2"], 30.0)])
    cache = make(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        assert await cache.address("csms.example") == "10.0.0.1"
        await trio.sleep(31)
        before = trio.current_time()
        # stale: every caller gets the old address without waiting, one query goes out
        assert [await cache.address("csms.example") for _ in range(3)] == ["10.0.0.1"] * 3
        assert trio.current_time() == before
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.1)
        assert await cache.address("csms.example") == "10.0.0.2"
        nursery.cancel_scope.cancel()
    assert len(fake.calls) == 2


async def test_a_failed_refresh_keeps_the_last_good_address_and_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAddresses([(["10.0.0.1"], 5.0), dns.exception.Timeout()])
    cache = make(fake)  # no background runner: a due refresh happens in the lookup
    assert await cache.address("csms.example") == "10.0.0.1"
    await trio.sleep(6)
    assert await cache.address("csms.example") == "10.0.0.1"  # DNS down: last good address
    assert len(fake.calls) == 2
    await trio.sleep(0.5)
    assert await cache.address("csms.example") == "10.0.0.1"
    assert len(fake.calls) == 2  # backing off (1 s after the first failure)
    await trio.sleep(1)
    await cache.address("csms.example")
    assert len(fake.calls) == 3  # then tried again (2 s back-off next)
    await trio.sleep(1)
    await cache.address("csms.example")
    assert len(fake.calls) == 3


async def test_a_failed_address_lookup_is_logged_as_such_not_as_an_srv_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAddresses([dns.exception.Timeout()])
    with events_of("router.srv") as log:
        assert await make(fake).address("csms.example") is None
    assert log.named("srv_failed") == []
    [failed] = log.named("address_failed")
    assert (failed["name"], failed["using"]) == ("csms.example", "nothing")


async def test_a_host_never_resolved_falls_back_to_the_system_resolver(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeAddresses([dns.exception.Timeout()])
    cache = make(fake)
    assert await cache.address("csms.example") is None
    assert await cache.address("csms.example") is None  # backing off: no second query yet
    assert len(fake.calls) == 1


async def test_an_address_literal_needs_no_lookup() -> None:
    fake = FakeAddresses([(["10.0.0.1"], 30.0)])
    assert await make(fake).address("192.0.2.7") is None
    assert await make(fake).address("::1") is None
    assert fake.calls == []


async def test_without_own_nameservers_the_system_resolver_answers_once_per_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No [dns] nameservers: getaddrinfo (a thread each time) is asked once per host and
    TTL, not once per dial, so a reconnect storm does not queue dials behind threads."""
    asked: list[str] = []
    real = trio.socket.getaddrinfo

    async def counting(host: str, *args: object, **kwargs: object) -> object:
        asked.append(host)
        return await real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.socket, "getaddrinfo", counting)
    cache = DnsCache()
    first = [await cache.address("localhost") for _ in range(5)]
    assert first[0] in ("127.0.0.1", "::1") and first == [first[0]] * 5
    assert asked == ["localhost"]
    assert cache.knows_address("localhost")
