"""Self-test of the loopback DNS server (router/demo/dns_server.py) with dnspython's resolvers."""

from __future__ import annotations

from collections.abc import Iterator

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver
import pytest
import trio

from tests.dns_server import DnsServer, Srv

NAME = "_ocpp._tcp.csms.test"


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as running:
        yield running


def _resolver(server: DnsServer, timeout: float = 0.5) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    return resolver


def test_srv_answer_with_targets_ttl_and_additional_a_records(server: DnsServer) -> None:
    server.set_srv(NAME, [Srv(1, 10, 9001, "csms1.test"), Srv(2, 5, 9002, "csms2.test.")],
                   ttl=3)
    answer = _resolver(server).resolve(NAME, "SRV")
    assert answer.rrset is not None and answer.rrset.ttl == 3
    got = sorted((r.priority, r.weight, r.port, r.target.to_text()) for r in answer)
    assert got == [(1, 10, 9001, "csms1.test."), (2, 5, 9002, "csms2.test.")]
    assert answer.response.flags & dns.flags.AA
    glue = {rrset.name.to_text(): [r.address for r in rrset]
            for rrset in answer.response.additional}
    assert glue == {"csms1.test.": ["127.0.0.1"], "csms2.test.": ["127.0.0.1"]}
    a = _resolver(server).resolve("csms2.test", "A")
    assert [r.address for r in a] == ["127.0.0.1"]
    assert [(q.name, q.rdtype, q.outcome) for q in server.queries()] == [
        (NAME + ".", "SRV", "answer"), ("csms2.test.", "A", "answer")]


def test_records_change_while_running(server: DnsServer) -> None:
    server.set_srv(NAME, [Srv(1, 0, 9001)])
    assert [r.port for r in _resolver(server).resolve(NAME, "SRV")] == [9001]
    server.set_srv(NAME, [Srv(1, 0, 9003)])
    assert [r.port for r in _resolver(server).resolve(NAME, "SRV")] == [9003]
    server.set_srv(NAME, [Srv(0, 0, 0, ".")])  # "service not offered"
    assert [r.target.to_text() for r in _resolver(server).resolve(NAME, "SRV")] == ["."]
    server.remove(NAME)
    with pytest.raises(dns.resolver.NXDOMAIN):
        _resolver(server).resolve(NAME, "SRV")


def test_unknown_name_is_nxdomain_and_missing_type_is_nodata(server: DnsServer) -> None:
    server.set_a("host.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        _resolver(server).resolve("other.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        _resolver(server).resolve("host.test", "SRV")
    assert [q.outcome for q in server.queries()] == ["nxdomain", "nodata"]


@pytest.mark.parametrize(("mode", "error"), [
    ("servfail", dns.resolver.NoNameservers),
    ("nxdomain", dns.resolver.NXDOMAIN),
    ("timeout", dns.exception.Timeout),
])
def test_failure_modes_per_name(server: DnsServer, mode: str,
                                error: type[Exception]) -> None:
    server.set_srv(NAME, [Srv(1, 0, 9001)])
    server.set_srv("_other._tcp.csms.test", [Srv(1, 0, 9009)])
    server.fail(NAME, mode)
    with pytest.raises(error):
        _resolver(server, timeout=0.3).resolve(NAME, "SRV")
    # other names are unaffected
    assert [r.port for r in _resolver(server).resolve("_other._tcp.csms.test", "SRV")] == [9009]
    assert server.queries(NAME)[-1].outcome == mode
    server.fail(NAME, None)
    assert [r.port for r in _resolver(server).resolve(NAME, "SRV")] == [9001]


def test_failure_for_every_name(server: DnsServer) -> None:
    server.set_srv(NAME, [Srv(1, 0, 9001)])
    server.fail(None, "servfail")
    with pytest.raises(dns.resolver.NoNameservers):
        _resolver(server).resolve(NAME, "SRV")
    server.fail(None, None)
    assert [r.port for r in _resolver(server).resolve(NAME, "SRV")] == [9001]


def test_down_closes_the_socket_and_up_reopens_the_same_port(server: DnsServer) -> None:
    server.set_srv(NAME, [Srv(1, 0, 9001)])
    port = server.port
    server.down()
    assert not server.running
    with pytest.raises((dns.resolver.NoNameservers, dns.exception.Timeout)):
        _resolver(server, timeout=0.3).resolve(NAME, "SRV")
    server.up()
    assert server.port == port
    assert [r.port for r in _resolver(server).resolve(NAME, "SRV")] == [9001]


def test_wait_for_query(server: DnsServer) -> None:
    server.set_srv(NAME, [Srv(1, 0, 9001)])
    with pytest.raises(TimeoutError):
        server.wait_for_query(NAME, "SRV", timeout=0.1)
    _resolver(server).resolve(NAME, "SRV")
    assert server.wait_for_query(NAME, "SRV", outcome="answer", timeout=1)[0].rdtype == "SRV"


async def test_async_resolver_on_trio(server: DnsServer) -> None:
    """The node's way of asking: dnspython's async resolver on the trio backend."""
    server.set_srv(NAME, [Srv(1, 10, 9001, "csms1.test"), Srv(2, 10, 9002, "csms2.test")])
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = 2.0
    with trio.fail_after(5):
        answer = await resolver.resolve(NAME, "SRV")
    assert sorted(r.port for r in answer) == [9001, 9002]
    server.fail(NAME, "servfail")
    with pytest.raises(dns.resolver.NoNameservers), trio.fail_after(5):
        await resolver.resolve(NAME, "SRV")
    assert answer.rdtype == dns.rdatatype.SRV
