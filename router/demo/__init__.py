"""The demo scene of ``ocpp-router demo``: three nodes, DNS SRV, CSMSs and stations on loopback.

Its parts are plain product code so the demo runs from an installed package: the scene
(``scene.py``), its configs (``configs.py``), what it prints (``narrator.py``, sans-IO), the
demo CSMS and stations (``ocpp_peers.py``) and an authoritative DNS server
(``dns_server.py``, which the high-availability tests use too).
"""

from router.demo.dns_server import FAILURE_MODES, DnsServer, Query, Srv
from router.demo.scene import run_scene

__all__ = ["FAILURE_MODES", "DnsServer", "Query", "Srv", "run_scene"]
