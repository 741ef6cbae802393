"""The operator's admin HTTP endpoint: health, Prometheus metrics, routes, links, topology.

A plain ASGI application served by hypercorn on the node's own trio loop (``[admin]`` in
the config). Every view reads the node's live structures when it is asked for; nothing
is added to the forwarding path. The endpoint has no authentication of its own: bind it
to loopback or a management network (see docs/operations.md).

=================  ==========================================================
``GET /healthz``   200 ``ok``, or 503 with the reason (listener down, no backend)
``GET /metrics``   Prometheus text (or OpenMetrics when asked), ``ocpp_router_*``
``GET /routes``    the route table as JSON
``GET /links``     stations, backends, peers and secondaries as JSON
``GET /live``      the moving parts as JSON: topology, frame rates per peer link and
                   for stations and secondaries, backlogs, recent firewall refusals
``GET /topology``  an HTML page with the overlay drawn as inline SVG; its one script,
                   ``GET /topology.js``, polls ``/live`` and updates it in place;
                   ``GET /topology.svg`` the drawing alone
``POST /reload``   ``node.reload()`` where the node has it (policy, credentials, ...)
=================  ==========================================================
"""

from router.admin.app import AdminApp, AdminBindError, serve_admin
from router.admin.drawing import render_page, render_svg
from router.admin.health import Health, HealthCheck, listener_problem
from router.admin.live import RateMeter, live_view
from router.admin.metrics import NodeCollector, render_metrics
from router.admin.topology import Topology, topology_model
from router.admin.view import NodeView
from router.admin.views import links_view, routes_view

__all__ = [
    "AdminApp", "AdminBindError", "Health", "HealthCheck", "NodeCollector", "NodeView",
    "RateMeter", "Topology", "links_view", "listener_problem", "live_view", "render_metrics",
    "render_page", "render_svg", "routes_view", "serve_admin", "topology_model",
]
