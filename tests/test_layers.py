"""The one rule of imports: a module imports only from layers below its own.

Every import counts: at module level, under ``TYPE_CHECKING`` and inside functions. Two
packages of one layer never import each other; inside one package, modules may import
each other as long as no cycle forms. The layers are docs/architecture.md's.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "policies", "topology")

# top to bottom; a unit is a package (its modules) or a single module
LAYERS: tuple[tuple[str, ...], ...] = (
    ("router.__main__",),  # python -m router
    ("router.cli",),  # the command line: builds a node, serves its admin endpoint
    ("router.demo",),  # the demo scene: three nodes, DNS, CSMSs and stations on loopback
    ("router.node", "router.admin"),  # the composition root; the admin endpoint (a NodeView)
    ("router.listener", "router.channels"),  # who connects, sent where; tunnels, files
    ("router.overlay", "router.backends"),  # peers and forwarding; dialer and duplication
    ("router.relay",),  # one station's traffic
    ("router.net",),  # WebSocket links, handshakes, TLS, DNS
    ("router.config", "router.gcwatch"),  # validated config objects; GC pause timing
    ("router.wire", "router.logs", "router.stats", "router.passwords", "router"),  # base
    ("topology", "policies"),  # the sans-IO cores
)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def imports_of(path: Path) -> set[str]:
    """The project modules a file imports, wherever the import statement stands."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from a.b import c`` imports the module a.b.c when there is one
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                     else node.module for alias in node.names]
        else:
            continue
        out.update(name for name in names if name.split(".")[0] in PACKAGES)
    return out


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest unit name that contains it."""
    best: tuple[int, str] | None = None
    for index, units in enumerate(LAYERS):
        for unit in units:
            inside = module == unit or (module.startswith(unit + ".") and unit != "router")
            if inside and (best is None or len(unit) > len(best[1])):
                best = (index, unit)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and the docs"
    return best


GRAPH = {module: imports_of(path) for module, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        unit_of(module)


def test_imports_go_down_never_sideways_or_up() -> None:
    wrong = []
    for module, imported in GRAPH.items():
        layer, unit = unit_of(module)
        for target in sorted(imported):
            if target not in MODULES:
                continue
            target_layer, target_unit = unit_of(target)
            if target_unit == unit:
                continue  # within one package: the cycle test below applies
            if target_layer <= layer:
                how = "sideways" if target_layer == layer else "up"
                wrong.append(f"{module} imports {target} ({how}: {unit} -> {target_unit})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    """No cycle among all modules (this also covers modules inside one package)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target not in MODULES:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_hidden_imports(tmp_path: Path) -> None:
    """Imports under TYPE_CHECKING and inside functions are counted."""
    source = tmp_path / "example.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from router.node import Node\n"
        "def f() -> None:\n    from router.listener import Refused\n"
        "import router.net.dns\n"
        "from router.relay import ledger\n")
    assert imports_of(source) == {"router.node", "router.listener", "router.net.dns",
                                  "router.relay.ledger"}


def test_an_upward_import_is_caught() -> None:
    """The layer order itself: relay is below overlay, so relay -> overlay is up."""
    relay, overlay = unit_of("router.relay.session"), unit_of("router.overlay.mesh")
    assert relay[0] > overlay[0]
    assert unit_of("router.backends.duplication")[0] == overlay[0]  # one layer: no imports


def test_no_module_over_600_lines() -> None:
    long = {module: n for module, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > 600}
    assert not long, long


def test_sans_io_parts_of_the_runtime_import_no_io() -> None:
    """The codecs, the call ledger and the peer-link codec are plain calls, like the cores."""
    sans_io = [*(ROOT / "router" / "wire").glob("*.py"), ROOT / "router/relay/ledger.py",
               ROOT / "router/overlay/codec.py"]
    for path in sans_io:
        text = path.read_text()
        for banned in ("import trio", "from trio", "import socket", "import asyncio"):
            assert banned not in text, f"{path} imports I/O ({banned})"
