"""Serve a zone file over DNS/UDP on loopback, for trying SRV failover without a DNS server.

    .venv/bin/python examples/high-availability/serve-zone.py [--zone FILE] [--port 5353]

Answers authoritatively from the zone as loaded at start (restart it after editing the
file), with the targets' A records added to SRV answers. It is a test aid built on
dnspython, which the node already depends on; in production publish the records in your
own DNS (BIND's named, CoreDNS's file plugin and Knot all read this file format).
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.zone


def answer(zone: dns.zone.Zone, wire: bytes) -> bytes:
    """The response to one query in wire format, from ``zone`` alone."""
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    for question in query.question:
        node = zone.get_node(question.name)
        if node is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            continue
        rdataset = node.get_rdataset(question.rdclass, question.rdtype)
        if rdataset is None:
            continue  # the name exists without this type: NOERROR with no answer
        response.answer.append(dns.rrset.from_rdata_list(question.name, rdataset.ttl,
                                                         list(rdataset)))
        if question.rdtype == dns.rdatatype.SRV:
            for srv in rdataset:
                found = zone.get_rdataset(srv.target, dns.rdatatype.A)
                if found is not None:
                    response.additional.append(
                        dns.rrset.from_rdata_list(srv.target, found.ttl, list(found)))
    return response.to_wire()


def main() -> None:
    """Load the zone and answer queries on 127.0.0.1 until interrupted."""
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zone", default=str(here / "csms.example.zone"))
    parser.add_argument("--port", type=int, default=5353)
    args = parser.parse_args()
    zone = dns.zone.from_file(args.zone, relativize=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", args.port))
        print(f"serving {zone.origin} from {args.zone} on 127.0.0.1:{sock.getsockname()[1]}",
              flush=True)
        try:
            while True:
                wire, client = sock.recvfrom(4096)
                try:
                    sock.sendto(answer(zone, wire), client)
                except Exception as exc:  # a malformed query must not stop the server
                    print(f"dropped a query from {client[0]}: {exc}", flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
