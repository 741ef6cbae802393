"""The ``routes``, ``links`` and ``fetch`` commands of ``ocpp-router``: a running node's
tables, and a file it fetches from another node (``POST /fetch``, router/channels/).

Both ask the node's admin endpoint (``[admin]``; ``GET /routes``, ``GET /links``) and
print readable tables, or the JSON itself with ``--json``. :func:`add_commands` registers
them on the main parser's subparsers and :func:`run_command` runs the parsed command;
:func:`main` runs them alone (``python -m router.cli.admin_views``).

Exit codes: 0 ok, 1 the node could not be asked (unreachable, HTTP error), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

__all__ = ["COMMANDS", "add_commands", "fetch", "format_links", "format_routes", "main",
           "run_command", "table"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
#: The top-level commands this module handles (``args.command``).
COMMANDS = ("routes", "links", "fetch")
_PROG = "ocpp-router"


class _UserError(Exception):
    """A mistake the user can fix: reported as one sentence, exit 2."""


class _Unreachable(Exception):
    """The admin endpoint did not answer as expected: reported as one sentence, exit 1."""


def add_commands(subparsers: Any) -> None:
    """Register ``routes`` and ``links`` on the result of ``add_subparsers()``."""
    for name, helptext in (("routes", "print the route table of a running node"),
                           ("links", "print the stations, backends, peers and secondaries "
                                     "of a running node")):
        cmd = subparsers.add_parser(name, help=helptext)
        cmd.add_argument("--admin", required=True, metavar="URL",
                         help="the node's admin endpoint, e.g. http://127.0.0.1:9090")
        cmd.add_argument("--json", action="store_true", help="print the JSON as served")
        cmd.add_argument("--timeout", type=float, default=5.0,
                         help="seconds to wait for the node (default 5)")
    cmd = subparsers.add_parser("fetch", help="make a running node fetch a file another node "
                                              "serves (resumed after a broken route, SHA-256 "
                                              "checked) into its files_dir")
    cmd.add_argument("--admin", required=True, metavar="URL",
                     help="the fetching node's admin endpoint, e.g. http://127.0.0.1:9090")
    cmd.add_argument("--node", required=True, help="the node that serves the file")
    cmd.add_argument("--path", required=True, help="the file, relative to its files_dir")
    cmd.add_argument("--out", required=True, help="where it goes, relative to this node's "
                                                  "files_dir")
    cmd.add_argument("--timeout", type=float, default=600.0,
                     help="seconds the node keeps trying (default 600)")


def run_command(args: argparse.Namespace) -> int:
    """Run a command registered by :func:`add_commands`; returns the exit code."""
    try:
        if args.command not in COMMANDS:
            raise _UserError(f"unknown command {args.command!r}")
        if args.command == "fetch":
            return _fetch_file(args)
        data = fetch(args.admin, "/" + args.command, args.timeout)
        if args.json:
            print(json.dumps(data, indent=2))
        elif args.command == "routes":
            print(format_routes(data))
        else:
            print(format_links(data))
        return EXIT_OK
    except _UserError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _Unreachable as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


def _fetch_file(args: argparse.Namespace) -> int:
    query = urlencode({"node": args.node, "path": args.path, "out": args.out,
                       "timeout_s": max(1, int(args.timeout))})
    data = fetch(args.admin, f"/fetch?{query}", args.timeout + 30, method="POST",
                 accept_status=(502,))
    if data.get("ok"):
        print(f"{args.out}: {data.get('bytes')} bytes, sha256 {data.get('sha256')}, "
              f"{data.get('attempts')} attempt(s), {data.get('received')} bytes received")
        return EXIT_OK
    print(f"{_PROG}: fetch failed: {data.get('error')}", file=sys.stderr)
    return EXIT_RUNTIME


def fetch(admin: str, path: str, timeout: float = 5.0, *, method: str = "GET",
          accept_status: tuple[int, ...] = ()) -> dict[str, Any]:
    """Ask ``path`` of the admin endpoint at ``admin`` and decode its JSON (also from an
    error answer whose status is in ``accept_status``)."""
    base = admin if "://" in admin else "http://" + admin
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _UserError(f"--admin {admin!r}: expected a URL like http://127.0.0.1:9090")
    url = base.rstrip("/") + path
    try:
        request = urllib.request.Request(url, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code not in accept_status:
            raise _Unreachable(f"{url}: the node answered HTTP {exc.code} {exc.reason}") \
                from None
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Unreachable(f"cannot reach the admin endpoint at {url}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise _Unreachable(f"{url}: the answer is not JSON (is this an admin endpoint?)") \
            from None
    if not isinstance(data, dict):
        raise _Unreachable(f"{url}: unexpected answer (a JSON object was expected)")
    return data


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], int | float) and not isinstance(r[i], bool)
                                  for r in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w)
               for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]),
                      *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " > ".join(str(v) for v in value) or "-"
    return str(value)


def format_routes(data: dict[str, Any]) -> str:
    """The ``/routes`` answer as a table: one line per destination, its best route."""
    routes = data.get("routes", [])
    rows = [[r.get("destination"), "(local)" if r.get("local") else r.get("next_hop"),
             r.get("distance"), r.get("priority"), r.get("alternatives"), r.get("path") or None]
            for r in routes]
    head = f"routes of {data.get('node', '?')}: {len(routes)} destination(s)"
    return head + "\n\n" + table(
        ["DESTINATION", "NEXT HOP", "DISTANCE", "PRIORITY", "OTHERS", "PATH (origin first)"],
        rows)


def format_links(data: dict[str, Any]) -> str:
    """The ``/links`` answer as four tables: stations, backends, peers, secondaries."""
    stations = data.get("stations", [])
    backends = data.get("backends", [])
    peers = data.get("peers", [])
    secondaries = data.get("secondaries", [])
    parts = [f"links of {data.get('node', '?')}"]
    parts.append(f"\nstations ({len(stations)})\n" + table(
        ["IDENTITY", "WHERE", "SUBPROTOCOL", "BACKEND", "VIA PEER", "STATION LINK",
         "BACKEND LINK", "TARGET"],
        [[s.get("identity"), s.get("where"), s.get("subprotocol"), s.get("backend"),
          s.get("via_peer"), s.get("station_link"), s.get("backend_link"),
          s.get("backend_target")] for s in stations]))
    parts.append(f"\nbackends ({len(backends)})\n" + table(
        ["NAME", "ROLE", "TARGET", "STATIONS"],
        [[b.get("name"), b.get("role"), b.get("url") or f"SRV {b.get('srv')}", b.get("stations")]
         for b in backends]))
    parts.append(f"\npeers ({len(peers)})\n" + table(
        ["PEER", "STATE", "ENCODING", "ROUTES IN", "ADVERTISED", "STATIONS"],
        [[p.get("id"), p.get("state"), p.get("encoding"), p.get("routes_learned"),
          p.get("routes_advertised"), p.get("stations_bound")] for p in peers]))
    parts.append(f"\nsecondaries ({len(secondaries)})\n" + table(
        ["NAME", "QUEUED", "CAPACITY", "BACKLOG", "LINKS", "DELIVERED", "SPILLED", "REPLAYED",
         "DROPPED"],
        [[s.get("name"), s.get("queued"), s.get("queue_capacity"), s.get("backlog"),
          s.get("links"), s.get("delivered"), s.get("spilled"), s.get("replayed"),
          s.get("dropped")] for s in secondaries]))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``routes`` or ``links`` without the rest of the command line."""
    parser = argparse.ArgumentParser(prog=_PROG, description="a running node's tables")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
