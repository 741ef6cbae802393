"""The admin endpoint as an ASGI application, and serving it with hypercorn on trio."""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from prometheus_client.registry import CollectorRegistry

from router.admin.drawing import render_page, render_svg
from router.admin.health import HealthCheck
from router.admin.metrics import NodeCollector, render_metrics
from router.admin.topology import topology_model
from router.admin.view import NodeView
from router.admin.views import links_view, routes_view
from router.logs import log_event

log = logging.getLogger("router.admin")


_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_HTML = b"text/html; charset=utf-8"
_SVG = b"image/svg+xml"
_GET_PATHS = ("/healthz", "/metrics", "/routes", "/links", "/topology", "/topology.svg")


class AdminApp:
    """The admin endpoint as an ASGI 3 application (no framework: six routes)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.health = HealthCheck(node)
        self.collector = NodeCollector(node)
        self.registry = CollectorRegistry()  # for prometheus_client's own tools
        self.registry.register(self.collector)

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # hypercorn answers a WebSocket upgrade the app ignores with 403/500
        await _drain(receive)
        try:
            status, content_type, body, extra = await self._route(scope)
        except Exception as exc:
            log.exception("admin request failed",
                          extra={"fields": {"path": scope["path"], "error": repr(exc)}})
            status, content_type, body, extra = (500, _TEXT, b"internal error: see the node "
                                                 b"log (admin request failed)\n", [])
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body, "more_body": False})

    async def _route(self, scope: HTTPScope) -> tuple[int, bytes, bytes, list[tuple[bytes,
                                                                                     bytes]]]:
        path, method = scope["path"], scope["method"]
        if path == "/reload":
            if method != "POST":
                return 405, _TEXT, b"use POST\n", [(b"allow", b"POST")]
            return await self._reload(scope)
        if path not in _GET_PATHS:
            return 404, _TEXT, b"not found; try /healthz /metrics /routes /links /topology\n", []
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"use GET\n", [(b"allow", b"GET, HEAD")]
        if path == "/healthz":
            health = await self.health.check()
            if health.ok:
                return 200, _TEXT, b"ok\n", []
            return 503, _TEXT, f"unhealthy: {health.reason}\n".encode(), []
        if path == "/metrics":
            body, content_type = await render_metrics(self.collector,
                                                      _header(scope, b"accept"))
            return 200, content_type.encode(), body, []
        if path == "/routes":
            return 200, _JSON, _json(routes_view(self.node)), []
        if path == "/links":
            return 200, _JSON, _json(links_view(self.node)), []
        if path == "/topology.svg":
            return 200, _SVG, render_svg(topology_model(self.node)).encode(), []
        query = parse_qs(scope["query_string"].decode("latin-1"))
        refresh = query.get("refresh", [""])[0]
        refresh_s = int(refresh) if refresh.isdigit() and 0 < int(refresh) <= 3600 else None
        page = render_page(topology_model(self.node), links_view(self.node), refresh_s)
        return 200, _HTML, page.encode(), []

    async def _reload(self, scope: HTTPScope) -> tuple[int, bytes, bytes,
                                                       list[tuple[bytes, bytes]]]:
        origin = _header(scope, b"origin")
        if origin and urlsplit(origin).netloc != _header(scope, b"host"):
            # a web page elsewhere must not make an operator's browser reload the node
            return 403, _TEXT, b"cross-origin reload refused\n", []
        reload = getattr(self.node, "reload", None)
        if reload is None or not callable(reload):
            return 501, _TEXT, b"this node cannot reload its configuration\n", []
        log_event(log, logging.INFO, "admin_reload", client=_client(scope))
        result = reload()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
            result = {"ok": result[0], "message": str(result[1])}  # Node.reload's (ok, why)
        elif result is None or isinstance(result, bool):
            result = {"ok": result is not False}
        elif isinstance(result, str):
            result = {"ok": True, "message": result}
        # 422: the files were read and refused; the node keeps what it had
        status = 422 if isinstance(result, dict) and result.get("ok") is False else 200
        return status, _JSON, _json(result), []


async def _drain(receive: ASGIReceiveCallable) -> None:
    """Read the request body (the endpoint takes none) so the connection stays usable."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _header(scope: HTTPScope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _client(scope: HTTPScope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=1, default=str) + "\n").encode()


# --- serving ----------------------------------------------------------------------------


class _QuietLogger(HypercornLogger):
    """hypercorn's logger without its "Running on ..." line (admin_listening says it)."""

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        return None


async def serve_admin(node: NodeView, *,
                      task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
    """Serve the admin endpoint of ``[admin]`` until cancelled; ``nursery.start`` returns
    the bound port once it listens (None, at once, when the config has no ``[admin]``)."""
    admin = node.config.admin
    if admin is None:
        task_status.started(None)
        return
    config = HypercornConfig()
    host = f"[{admin.host}]" if ":" in admin.host else admin.host
    config.bind = [f"{host}:{admin.port}"]
    config.errorlog = logging.getLogger("router.admin.http")
    config.accesslog = None
    config.logger_class = _QuietLogger
    config.include_server_header = False
    config.graceful_timeout = 1.0

    listening = False
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, AdminApp(node), config)
            port = int(binds[0].rsplit(":", 1)[1])
            listening = True
            log_event(log, logging.INFO, "admin_listening", host=admin.host, port=port,
                      url=f"http://{host}:{port}", node=node.config.node.id)
            task_status.started(port)
    except BaseException as exc:
        bind_error = None if listening else _os_error(exc)
        if bind_error is None:
            raise
        reason = bind_error.strerror or str(bind_error)
        log_event(log, logging.ERROR, "admin_failed", host=admin.host, port=admin.port,
                  reason=reason)
        raise AdminBindError(bind_error.errno or 0,
                             f"admin endpoint {host}:{admin.port}: {reason}") from exc


class AdminBindError(OSError):
    """The admin endpoint cannot listen where ``[admin]`` says (port in use, bad host)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError inside (possibly nested) exception groups, from hypercorn's bind."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None

