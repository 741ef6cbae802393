"""The signature and policy commands of ``ocpp-router``: ``keys``, ``sign``, ``policy``.

:func:`add_commands` registers them on the main parser's subparsers and
:func:`run_command` runs the parsed command; :func:`check_policy_file` is what
``ocpp-router check`` calls for a config's ``[policy] file``. :func:`main` runs these
commands alone (``python -m router.cli.policy_tools``), for tests and scripts.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. A user's mistake is one
clear sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from policies.canonical import CanonicalError
from policies.firewall import Firewall
from policies.jws import CertificateError, load_certificate, self_signed_certificate, sign_jws
from policies.policy import MESSAGE_KINDS, PolicyError, check_policy, load_policy
from policies.schemas import VERSIONS, SchemaUnavailable
from policies.signatures import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    DIRECTIONS,
    KeyFormatError,
    SigningKey,
    parse_timestamp,
    sign_payload,
)

__all__ = ["COMMANDS", "add_commands", "check_policy_file", "main", "run_command"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
#: The top-level commands this module handles (``args.command``).
COMMANDS = ("keys", "sign", "policy")
_PROG = "ocpp-router"


class _UserError(Exception):
    """A mistake the user can fix: reported as one sentence, exit 2."""


def add_commands(subparsers: Any) -> None:
    """Register ``keys``, ``sign`` and ``policy`` on the result of ``add_subparsers()``."""
    keys = subparsers.add_parser("keys", help="make and inspect signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    new = keys_sub.add_parser("new", help="write a new private key (PEM), print its key id")
    new.add_argument("--out", required=True, help="where to write the private key")
    new.add_argument("--algorithm", default=DEFAULT_ALGORITHM, choices=ALGORITHMS,
                     help=f"key type (default {DEFAULT_ALGORITHM}, i.e. P-256)")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    public = keys_sub.add_parser("public", help="print a private key's public key (PEM) "
                                                "for a policy's [[keys]]")
    public.add_argument("--key", required=True, help="the private key (PEM)")
    public.add_argument("--out", help="write the PEM here instead of stdout")

    cert = keys_sub.add_parser("certificate",
                               help="write a self-signed X.509 certificate for a P-256 or "
                                    "RSA key (OCPP 2.1 Signed Messages), print its x5t#S256")
    cert.add_argument("--key", required=True, help="the private key (PEM), e.g. from keys new")
    cert.add_argument("--cn", required=True, help="the subject's common name")
    cert.add_argument("--days", type=int, default=365, help="validity (default 365 days)")
    cert.add_argument("--out", required=True, help="where to write the certificate (PEM)")
    cert.add_argument("--force", action="store_true", help="overwrite an existing file")

    sign = subparsers.add_parser("sign", help="sign a payload read from stdin, print it "
                                              "with its signatures")
    sign.add_argument("--key", required=True, help="the private key (PEM)")
    sign.add_argument("--action", required=True, help="the OCPP action, e.g. Reset")
    sign.add_argument("--direction", default="to-station", choices=DIRECTIONS,
                      help="where the message travels (default to-station)")
    sign.add_argument("--name", help="optional name stored in the signature")
    sign.add_argument("--description", help="optional description stored in the signature")
    sign.add_argument("--jws", action="store_true",
                      help="an OCPP 2.1 Signed Message instead: print the flattened JWS "
                           "payload of <action>-Signed (needs --cert)")
    sign.add_argument("--cert", help="with --jws: the signer's X.509 certificate (PEM)")
    sign.add_argument("--alg", choices=("ES256", "RS256", "RS384"),
                      help="with --jws: the algorithm (default ES256 or RS256 by key type)")
    sign.add_argument("--message-type", type=int, default=2, choices=(2, 3, 6),
                      help="with --jws: 2 CALL (default), 3 CALLRESULT, 6 SEND")

    policy = subparsers.add_parser("policy", help="check or explain a policy file")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True,
                                       metavar="SUBCOMMAND")
    check = policy_sub.add_parser("check", help="validate a policy file")
    check.add_argument("file", help="the policy file (TOML)")
    explain = policy_sub.add_parser("explain", help="say which rule decides a message and why")
    explain.add_argument("file", help="the policy file (TOML)")
    explain.add_argument("--action", required=True, help="the OCPP action")
    explain.add_argument("--direction", required=True, choices=DIRECTIONS)
    explain.add_argument("--source", required=True,
                         help="who sent it: backend name, node id or station id")
    explain.add_argument("--payload", help="a file with the JSON payload ('-' for stdin); "
                                           "default {}")
    explain.add_argument("--message", default="call", choices=MESSAGE_KINDS,
                         help="call (CALL or SEND, the default), result or error")
    explain.add_argument("--ocpp-version", choices=tuple(VERSIONS),
                         help="the link's OCPP version, for schema validation")
    explain.add_argument("--at", help="evaluate at this RFC 3339 UTC time (default: now)")


def run_command(args: argparse.Namespace) -> int:
    """Run a command registered by :func:`add_commands`; returns the exit code."""
    try:
        if args.command == "keys":
            if args.keys_command == "new":
                return _keys_new(args.out, args.algorithm, args.force)
            if args.keys_command == "certificate":
                return _keys_certificate(args)
            return _keys_public(args.key, args.out)
        if args.command == "sign":
            return _sign(args)
        if args.command == "policy":
            if args.policy_command == "check":
                return _policy_check(args.file)
            return _policy_explain(args)
    except _UserError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"{_PROG}: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"{_PROG}: unknown command {args.command!r}", file=sys.stderr)
    return EXIT_USAGE


def check_policy_file(path: str | Path) -> list[str]:
    """Every problem of a policy file (and the key files it names), one sentence each."""
    return [str(p) for p in check_policy(path)]


def main(argv: Sequence[str] | None = None) -> int:
    """These commands alone, as ``ocpp-router`` would run them."""
    parser = argparse.ArgumentParser(prog=_PROG)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser.parse_args(argv))


# --- keys --------------------------------------------------------------------------------


def _load_key(path: str) -> SigningKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _UserError(f"{path}: cannot read the key: {exc.strerror or exc}") from None
    try:
        return SigningKey.from_pem(data)
    except KeyFormatError as exc:
        raise _UserError(f"{path}: {exc}") from None


def _keys_new(out: str, algorithm: str, force: bool) -> int:
    key = SigningKey.generate(algorithm)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(out, flags, 0o600)  # a private key is readable by its owner only
    except FileExistsError:
        raise _UserError(f"{out} already exists (use --force to overwrite it)") from None
    except OSError as exc:
        raise _UserError(f"{out}: cannot write: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(key.private_pem())
    print(key.key_id)
    return EXIT_OK


def _keys_public(key_path: str, out: str | None) -> int:
    key = _load_key(key_path)
    if out is None:
        sys.stdout.write(key.public_pem().decode("ascii"))
        return EXIT_OK
    try:
        Path(out).write_bytes(key.public_pem())
    except OSError as exc:
        raise _UserError(f"{out}: cannot write: {exc.strerror or exc}") from None
    print(key.key_id)
    return EXIT_OK


def _keys_certificate(args: argparse.Namespace) -> int:
    try:
        private = serialization.load_pem_private_key(Path(args.key).read_bytes(), None)
    except OSError as exc:
        raise _UserError(f"{args.key}: cannot read the key: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise _UserError(f"{args.key}: not an unencrypted PEM private key ({exc})") from None
    if not ((isinstance(private, ec.EllipticCurvePrivateKey)
            and isinstance(private.curve, ec.SECP256R1))
            or (isinstance(private, rsa.RSAPrivateKey) and private.key_size >= 2048)):
        raise _UserError(f"{args.key}: Signed Messages take a P-256 key (ES256) or an RSA "
                         "key of 2048 bits or more (RS256, RS384)")
    try:
        pem = self_signed_certificate(private, args.cn, time.time(), args.days)
    except ValueError as exc:
        raise _UserError(str(exc)) from None
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.out, flags, 0o644)
    except FileExistsError:
        raise _UserError(f"{args.out} already exists (use --force to overwrite it)") from None
    except OSError as exc:
        raise _UserError(f"{args.out}: cannot write: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    print(load_certificate(pem).x5t)
    return EXIT_OK


# --- sign --------------------------------------------------------------------------------


def _read_json(text: str, what: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _UserError(f"{what} is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _UserError(f"{what} is not a JSON object (an OCPP payload is one)")
    return payload


def _sign(args: argparse.Namespace) -> int:
    if args.jws:
        return _sign_jws(args)
    key = _load_key(args.key)
    payload = _read_json(sys.stdin.read(), "the payload on stdin")
    try:
        signed = sign_payload(payload, args.action, args.direction, key, time.time(),
                              name=args.name, description=args.description)
    except CanonicalError as exc:
        raise _UserError(f"the payload cannot be signed: {exc}") from None
    except ValueError as exc:
        raise _UserError(f"the payload cannot be signed: {exc}") from None
    print(json.dumps(signed, ensure_ascii=False, separators=(",", ":")))
    return EXIT_OK


def _sign_jws(args: argparse.Namespace) -> int:
    if not args.cert:
        raise _UserError("--jws needs --cert: the signer's certificate")
    payload = _read_json(sys.stdin.read(), "the payload on stdin")
    if not isinstance(payload, dict):
        raise _UserError("the payload on stdin must be a JSON object")
    with open(args.cert, "rb") as cert, open(args.key, "rb") as key:
        cert_pem, key_pem = cert.read(), key.read()
    try:
        signed = sign_jws(payload, args.action, args.message_type, cert_pem, key_pem,
                          args.alg)
    except (CertificateError, ValueError) as exc:
        raise _UserError(f"cannot sign: {exc}") from None
    print(json.dumps(signed, separators=(",", ":")))
    return EXIT_OK


# --- policy ------------------------------------------------------------------------------


def _policy_check(path: str) -> int:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"{_PROG}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: ok ({len(policy.keys)} keys, {len(policy.rules)} rules, "
          f"default {policy.default.value})")
    return EXIT_OK


def _policy_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"{_PROG}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.payload is None:
        payload: dict[str, Any] = {}
    elif args.payload == "-":
        payload = _read_json(sys.stdin.read(), "the payload on stdin")
    else:
        try:
            text = Path(args.payload).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _UserError(f"{args.payload}: cannot read the payload: {exc}") from None
        payload = _read_json(text, args.payload)
    now = time.time()
    if args.at is not None:
        at = parse_timestamp(args.at)
        if at is None:
            raise _UserError(f"--at {args.at!r} is not an RFC 3339 UTC time "
                             "(like 2026-11-22T10:00:00Z)")
        now = at
    try:
        firewall = Firewall(policy)
    except SchemaUnavailable as exc:
        raise _UserError(str(exc)) from None
    explanation = firewall.explain(args.action, args.direction, args.source, payload, now,
                                   message=args.message, ocpp_version=args.ocpp_version)
    decision = explanation.decision
    print(f"decision: {decision.outcome.value}")
    if decision.rule is None:
        print("decided by: the default (no rule matched)")
    else:
        where = f" (line {explanation.line})" if explanation.line else ""
        print(f"decided by: rule {decision.rule!r}{where}")
    print(f"why: {decision.reason}")
    if decision.sign:
        print("then: the node adds its own signature before forwarding")
    if explanation.skipped:
        print("rules passed over:")
        for line in explanation.skipped:
            print(f"  {line}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
