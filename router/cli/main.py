"""The ``ocpp-router`` command line.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. A user's mistake is one
clear sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import os
import signal
import ssl
import sys
from collections.abc import Sequence

import trio

from router import config as config_mod
from router import logs
from router.cli import admin_views as admin_cli
from router.cli import policy_tools as policy_cli
from router.passwords import hash_password

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocpp-router",
        description="OCPP-J router and security gateway (edge gateway, overlay node, firewall).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="three chained nodes on loopback with demo CSMSs, "
                          "stations, a firewall, a secondary and a failover, narrated")
    demo.add_argument("--stations", type=int, default=3,
                      help="simulated stations at each of the three nodes (default 3)")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--log-level", default="error",
                      choices=["debug", "info", "warning", "error"],
                      help="the nodes' JSON log lines on stderr (default error: the demo "
                      "tells the events that matter itself)")

    run = sub.add_parser("run", help="run a node until SIGINT/SIGTERM")
    run.add_argument("--config", required=True, help="the node's TOML config file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("--config", required=True, help="the node's TOML config file")

    sub.add_parser("hash-password", help="read a password on stdin, print its hash for a config")
    policy_cli.add_commands(sub)
    admin_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m router``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config, args.log_level)
        if args.command == "check":
            return _check(args.config)
        if args.command == "hash-password":
            return _hash_password()
        if args.command == "demo":
            from router.cli.demo import run_demo

            return run_demo(args.stations, args.duration, args.log_level)
        if args.command in ("keys", "sign", "policy"):
            return policy_cli.run_command(args)
        if args.command in admin_cli.COMMANDS:
            return admin_cli.run_command(args)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_USAGE


def _load_or_explain(path: str) -> config_mod.Config | None:
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(f"ocpp-router: {problem}", file=sys.stderr)
        return None
    # files that exist can still be unusable: load the TLS material the way run will
    from router.net.tls import server_context

    try:
        server_context(cfg.listen)
    except (ssl.SSLError, OSError) as exc:
        print(f"ocpp-router: {path}: listen.tls_cert / listen.tls_key / listen.tls_ca: "
              f"cannot load: {exc}", file=sys.stderr)
        return None
    if cfg.policy is not None:
        policy_problems = policy_cli.check_policy_file(cfg.policy.file)
        if policy_problems:
            for line in policy_problems:
                print(f"ocpp-router: {line}", file=sys.stderr)
            return None
    from router.overlay.trust import TrustError, load_trusted
    from router.relay.gate import Gate, GateError

    try:
        Gate.from_config(cfg).close()
        if cfg.trust is not None:
            load_trusted(cfg.trust)
    except (GateError, TrustError) as exc:
        print(f"ocpp-router: {path}: {exc}", file=sys.stderr)
        return None
    return cfg


def _check(path: str) -> int:
    cfg = _load_or_explain(path)
    if cfg is None:
        return EXIT_USAGE
    print(f"{path}: ok (node {cfg.node.id}, {len(cfg.stations)} station entries, "
          f"{len(cfg.backends)} backends)")
    return EXIT_OK


def _hash_password() -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("ocpp-router: hash-password: empty password", file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(password))
    return EXIT_OK


def _run(path: str, log_level: str) -> int:
    cfg = _load_or_explain(path)
    if cfg is None:
        return EXIT_USAGE
    # OCPP_ROUTER_LOG_BUFFER=0: every line written at once (a test reading the log as it
    # happens, an operator tailing a quiet node); the default buffers info lines
    logs.setup(log_level, buffered=os.environ.get("OCPP_ROUTER_LOG_BUFFER") != "0")
    keep_gc = tune_gc()
    from router.admin import AdminBindError
    from router.backends.outbox import OutboxError
    from router.channels.channel import TunnelBindError

    try:
        trio.run(serve_until_signalled, cfg, keep_gc)
    except BaseException as exc:
        # trio hands errors from the node's nursery over inside exception groups
        cause = exc
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]
        if isinstance(cause, AdminBindError | OutboxError | TunnelBindError):
            print(f"ocpp-router: {cause}", file=sys.stderr)
            return EXIT_RUNTIME
        if isinstance(cause, OSError):
            print(f"ocpp-router: cannot listen on {cfg.listen.host}:{cfg.listen.port}: "
                  f"{cause.strerror or cause}", file=sys.stderr)
            return EXIT_RUNTIME
        raise
    return EXIT_OK


def tune_gc() -> bool:
    """Make the cyclic garbage collector cheap for a long-running forwarder.

    Almost everything the hot path allocates is freed by reference counting; the
    collector is only needed for rare cycles. Startup objects are frozen out of its
    scans, and young collections run less often; the node's GC housekeeper freezes what
    stations bring (router/gcwatch.py). See docs/architecture.md for figures. False when
    ``OCPP_ROUTER_GC=default`` keeps CPython's settings (and no housekeeper runs).
    """
    if os.environ.get("OCPP_ROUTER_GC") == "default":
        return False
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    return True


async def _flush_logs(every_s: float = 0.1) -> None:
    """Buffered info lines reach the log at most ``every_s`` late."""
    try:
        while True:
            await trio.sleep(every_s)
            logs.flush()
    finally:
        logs.flush()


async def serve_until_signalled(cfg: config_mod.Config, keep_gc: bool = False) -> None:
    """Run a node until SIGINT or SIGTERM, then shut it down cleanly; ``keep_gc``: the
    collector was tuned (:func:`tune_gc`), so the node's housekeeper runs too."""
    from router.admin import serve_admin
    from router.node import Node

    node = Node(cfg, keep_gc=keep_gc)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_flush_logs)
            await nursery.start(node.run)
            await nursery.start(serve_admin, node)  # [admin]: returns at once without it
            async for signum in signals:
                if signum == signal.SIGHUP:
                    node.reload()  # logs what happened; an invalid file keeps the old one
                    continue
                break
            await node.shutdown()
            nursery.cancel_scope.cancel()
