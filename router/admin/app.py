"""The admin endpoint as an ASGI application, and serving it with hypercorn on trio."""

from __future__ import annotations

import inspect
import ipaddress
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from prometheus_client.registry import CollectorRegistry

from router.admin.drawing import STYLE_SOURCE, render_page, render_svg
from router.admin.health import HealthCheck
from router.admin.live import WINDOW_S, RateMeter, counters, live_view
from router.admin.metrics import NodeCollector, render_metrics
from router.admin.topology import topology_model
from router.admin.view import NodeView
from router.admin.views import links_view, routes_view
from router.channels.fetching import fetch
from router.logs import log_event

log = logging.getLogger("router.admin")


_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_HTML = b"text/html; charset=utf-8"
_SVG = b"image/svg+xml"
_JS = b"text/javascript; charset=utf-8"
_GET_PATHS = ("/healthz", "/metrics", "/routes", "/links", "/live", "/topology",
              "/topology.svg", "/topology.js")
# the page's script, served from here so that the policy below admits it and nothing inline
_SCRIPT = resources.files("router.admin").joinpath("topology.js").read_bytes()
# on every answer: scripts only from this endpoint, fetches only to it, the page's one
# style block by its hash, no framing, no forms, no referrer, no type sniffing
_SECURITY_HEADERS = [
    (b"content-security-policy",
     f"default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; "
     f"style-src {STYLE_SOURCE}; base-uri 'none'; form-action 'none'; "
     f"frame-ancestors 'none'".encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# a Host header value (RFC 9110 7.2): a bracketed IPv6 literal or a name / IPv4, then a port
_AUTHORITY = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::\d{0,5})?")
# an Origin header value (RFC 6454 6.1): scheme "://" authority, nothing after it
_ORIGIN = re.compile(r"(?:http|https)://(?P<authority>[^/?#@\s]+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class HostRule:
    """Which ``Host`` values the endpoint answers: IP literals, ``localhost`` and the
    names of ``[admin] allowed_hosts``. A DNS-rebinding page reaches the endpoint under
    its own name, so a request naming anything else is refused (421)."""

    names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, allowed_hosts: Iterable[str], bind_host: str | None = None) -> HostRule:
        """The rule for a config: its allowed names and the name it binds to, if a name."""
        names = {name.lower() for name in allowed_hosts}
        if bind_host and re.fullmatch(r"[A-Za-z0-9._-]+", bind_host):
            names.add(bind_host.lower())  # bound to a name (or IPv4): requests may use it
        return cls(frozenset(names))

    def accepts(self, authority: str) -> bool:
        """Whether a ``Host`` value (``name``, ``name:port``, ``[v6]:port`` ...) is ours."""
        m = _AUTHORITY.fullmatch(authority)
        if m is None:
            return False
        if m["v6"] is not None:
            return _is_ip(m["v6"], ipaddress.IPv6Address)
        name = m["name"].lower()
        return name == "localhost" or name in self.names or _is_ip(name, ipaddress.IPv4Address)


def _is_ip(text: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


class AdminApp:
    """The admin endpoint as an ASGI 3 application (no framework: a handful of routes)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        admin = node.config.admin
        self.hosts = (HostRule.of(admin.allowed_hosts, admin.host) if admin is not None
                      else HostRule())
        # requests refused by reason ("host", "origin"): metrics.py exports no such family,
        # so each refusal is also logged at WARNING with this running count
        self.refused: Counter[str] = Counter()
        self.health = HealthCheck(node)
        self.collector = NodeCollector(node)
        self.registry = CollectorRegistry()  # for prometheus_client's own tools
        self.registry.register(self.collector)
        self.meter = RateMeter()  # frame counters read over time, for /live's rates

    def take_reading(self) -> None:
        """Read the frame counters now: the baseline of the next look's rates."""
        self.meter.read(trio.current_time(), counters(self.node))

    async def keep_reading(self, every_s: float = WINDOW_S / 2) -> None:
        """Take a reading every ``every_s`` seconds, so a first look has recent rates."""
        while True:
            self.take_reading()
            await trio.sleep(every_s)

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
                   (b"cache-control", b"no-store"), *_SECURITY_HEADERS, *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body, "more_body": False})

    async def _route(self, scope: HTTPScope) -> tuple[int, bytes, bytes, list[tuple[bytes,
                                                                                     bytes]]]:
        path, method = scope["path"], scope["method"]
        hosts = _headers(scope, b"host")
        if len(hosts) != 1 or not self.hosts.accepts(hosts[0]):
            self._refuse(scope, "host", host=hosts[0][:200] if hosts else None)
            return 421, _TEXT, b"misdirected request: this Host is not served here\n", []
        if path == "/reload":
            if method != "POST":
                return 405, _TEXT, b"use POST\n", [(b"allow", b"POST")]
            return await self._reload(scope)
        if path == "/fetch":
            if method != "POST":
                return 405, _TEXT, b"use POST\n", [(b"allow", b"POST")]
            return await self._fetch(scope)
        if path not in _GET_PATHS:
            return 404, _TEXT, (b"not found; try /healthz /metrics /routes /links /live "
                                b"/topology\n"), []
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
        if path == "/topology.js":
            return 200, _JS, _SCRIPT, []
        topo = topology_model(self.node)
        live = live_view(self.node, topo, self.meter, trio.current_time())
        if path == "/live":
            return 200, _JSON, _json(live), []
        query = parse_qs(scope["query_string"].decode("latin-1"))
        refresh = query.get("refresh", [""])[0]
        # ASCII digits only: "²".isdigit() holds, and int() refuses it
        plain = refresh.isascii() and refresh.isdigit()
        refresh_s = int(refresh) if plain and 0 < int(refresh) <= 3600 else None
        return 200, _HTML, render_page(topo, live, refresh_s).encode(), []

    async def _reload(self, scope: HTTPScope) -> tuple[int, bytes, bytes,
                                                       list[tuple[bytes, bytes]]]:
        if self._cross_origin(scope):
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

    async def _fetch(self, scope: HTTPScope) -> tuple[int, bytes, bytes,
                                                      list[tuple[bytes, bytes]]]:
        """``POST /fetch?node=N&path=P&out=F[&timeout_s=S]``: this node fetches the file P
        that node N serves into F in its own files_dir (router/channels/), and answers
        when done (200) or given up (502), with what happened."""
        if self._cross_origin(scope):
            return 403, _TEXT, b"cross-origin fetch refused\n", []
        query = parse_qs(scope["query_string"].decode("utf-8", "replace"))
        node, name, out = (query.get(k, [""])[0] for k in ("node", "path", "out"))
        timeout = query.get("timeout_s", ["600"])[0]
        if (not (node and name and out) or not re.fullmatch(r"[0-9]{1,5}", timeout)
                or not 0 < int(timeout) <= 86400):
            return 400, _TEXT, b"give node, path and out (and timeout_s, 1-86400)\n", []
        log_event(log, logging.INFO, "admin_fetch", client=_client(scope), far_node=node[:48],
                  file=name[:255], out=out[:255])
        result = await fetch(self.node.channels, node, name, out, timeout_s=int(timeout))
        return (200 if result.get("ok") else 502), _JSON, _json(result), []

    def _cross_origin(self, scope: HTTPScope) -> bool:
        """A POST from a page of another origin (refused, counted and logged); scripts
        send no Origin."""
        origins = _headers(scope, b"origin")
        if origins and not self._same_origin(origins, _header(scope, b"host")):
            self._refuse(scope, "origin", origin=origins[0][:200])
            return True
        return False

    def _same_origin(self, origins: list[str], host: str) -> bool:
        """One Origin naming a host we serve, and the same authority as ``Host`` ("null",
        sent by sandboxed frames and some redirects, names none)."""
        if len(origins) != 1:
            return False
        m = _ORIGIN.fullmatch(origins[0])
        if m is None:
            return False
        authority = m["authority"]
        return self.hosts.accepts(authority) and authority.lower() == host.lower()

    def _refuse(self, scope: HTTPScope, reason: str, **fields: Any) -> None:
        self.refused[reason] += 1
        log_event(log, logging.WARNING, f"admin_{reason}_refused", client=_client(scope),
                  method=scope["method"], path=scope["path"][:200], **fields,
                  refused=self.refused[reason])


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


def _headers(scope: HTTPScope, name: bytes) -> list[str]:
    """Every value of a header, in order (a repeated Host or Origin is refused)."""
    return [value.decode("latin-1") for key, value in scope["headers"] if key.lower() == name]


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
            app = AdminApp(node)
            binds = await nursery.start(serve, app, config)
            nursery.start_soon(app.keep_reading)
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

