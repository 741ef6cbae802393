"""The loopback DNS server of the high-availability tests: the demo's, re-exported.

One copy lives in the product (``router/demo/dns_server.py``), because ``ocpp-router
demo`` publishes its CSMSs by SRV through it; tests and benchmarks import it from here.
"""

from router.demo.dns_server import FAILURE_MODES, DnsServer, Query, Srv

__all__ = ["FAILURE_MODES", "DnsServer", "Query", "Srv"]
