"""Payload validation against the official OCPP JSON schemas that ship in the ``ocpp`` package.

The schemas are found without importing ``ocpp`` (only its location is looked up), read
on first use of an action (or all at once with :meth:`SchemaValidator.preload`) and
compiled once: with ``fastjsonschema`` when installed
(a few microseconds per payload), else with ``jsonschema``'s validator for the schema's
draft. Action names come from peers, so they are only ever looked up in the list of
files that exist, never joined into a path.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["VERSIONS", "SchemaUnavailable", "SchemaValidator", "schema_root"]

#: OCPP version (the WebSocket subprotocol) -> (schema folder, request file, response file).
VERSIONS: dict[str, tuple[str, str, str]] = {
    "ocpp1.6": ("v16", "{}.json", "{}Response.json"),
    "ocpp2.0.1": ("v201", "{}Request.json", "{}Response.json"),
    "ocpp2.1": ("v21", "{}Request.json", "{}Response.json"),
}

_Check = Callable[[Any], str | None]


class SchemaUnavailable(RuntimeError):
    """The official schemas (the ``ocpp`` package) or every validator library is missing."""


def schema_root() -> Path | None:
    """The installed ``ocpp`` package's directory, or None when it is not installed."""
    spec = importlib.util.find_spec("ocpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _fast_compiler() -> Callable[[Mapping[str, Any]], _Check] | None:
    try:
        fastjsonschema: Any = importlib.import_module("fastjsonschema")
    except ImportError:
        return None

    def compile_schema(schema: Mapping[str, Any]) -> _Check:
        # use_default=False: by default the validator writes a schema's defaults into the
        # payload it checks, and the node forwards payloads unchanged
        validate = fastjsonschema.compile(dict(schema), use_default=False)
        failure = fastjsonschema.JsonSchemaException

        def check(payload: Any) -> str | None:
            try:
                validate(payload)
            except failure as exc:
                return str(getattr(exc, "message", exc))
            return None

        return check

    return compile_schema


def _jsonschema_compiler() -> Callable[[Mapping[str, Any]], _Check] | None:
    try:
        jsonschema: Any = importlib.import_module("jsonschema")
    except ImportError:
        return None

    def compile_schema(schema: Mapping[str, Any]) -> _Check:
        validator = jsonschema.validators.validator_for(schema)(schema)

        def check(payload: Any) -> str | None:
            error = jsonschema.exceptions.best_match(validator.iter_errors(payload))
            if error is None:
                return None
            where = "/".join(str(p) for p in error.absolute_path)
            return f"{where}: {error.message}" if where else str(error.message)

        return check

    return compile_schema


class SchemaValidator:
    """Validates payloads by OCPP version, action and kind; validators compiled on first use."""

    __slots__ = ("_compilers", "_files", "_root", "_validators", "engine")

    def __init__(self, root: Path | None = None) -> None:
        found = root if root is not None else schema_root()
        if found is None:
            raise SchemaUnavailable("schema validation needs the `ocpp` package "
                                    "(pip install ocpp), which ships the official schemas")
        compilers = [c for c in (_fast_compiler(), _jsonschema_compiler()) if c is not None]
        if not compilers:
            raise SchemaUnavailable("schema validation needs fastjsonschema or jsonschema")
        self._root = found
        self._compilers = compilers
        #: which library compiles first: "fastjsonschema" or "jsonschema"
        self.engine = "fastjsonschema" if _fast_compiler() is not None else "jsonschema"
        self._files: dict[str, frozenset[str]] = {}
        self._validators: dict[tuple[str, str], _Check] = {}

    def _available(self, folder: str) -> frozenset[str]:
        names = self._files.get(folder)
        if names is None:
            directory = self._root / folder / "schemas"
            names = frozenset(p.name for p in directory.glob("*.json"))
            self._files[folder] = names
        return names

    def validate(self, version: str, action: str, kind: str, payload: Any) -> str | None:
        """None when ``payload`` is valid, else one sentence saying what is wrong.

        ``kind`` is ``"call"`` (a request) or ``"result"`` (its answer).
        """
        layout = VERSIONS.get(version)
        if layout is None:
            return f"no official schemas for OCPP version {version!r}"
        folder, request, response = layout
        file_name = (request if kind == "call" else response).format(action)
        if file_name not in self._available(folder):
            return f"{action} is not an action of {version}"
        check = self._validators.get((folder, file_name))
        if check is None:
            try:
                check = self._compile(self._root / folder / "schemas" / file_name)
            except (SchemaUnavailable, OSError, ValueError) as exc:
                return f"{file_name}: cannot be used ({exc})"
            self._validators[(folder, file_name)] = check
        try:
            problem = check(payload)
        except Exception as exc:  # a peer's payload must never take the node down
            problem = f"cannot be validated ({type(exc).__name__})"
        if problem is None:
            return None
        return f"{file_name}: {problem[:200]}"

    def preload(self, version: str) -> int:
        """Compile every schema of ``version`` now (a few ms each); returns how many."""
        layout = VERSIONS.get(version)
        if layout is None:
            raise ValueError(f"no official schemas for OCPP version {version!r}")
        folder = layout[0]
        for file_name in sorted(self._available(folder)):
            if (folder, file_name) not in self._validators:
                self._validators[(folder, file_name)] = self._compile(
                    self._root / folder / "schemas" / file_name)
        return len(self._available(folder))

    def _compile(self, path: Path) -> _Check:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))
        last: Exception | None = None
        for compile_schema in self._compilers:
            try:
                return compile_schema(schema)
            except Exception as exc:  # a library that cannot compile this schema: try the next
                last = exc
        raise SchemaUnavailable(f"cannot compile {path.name}: {last}")
