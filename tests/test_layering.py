"""The import graph keeps the shape the README promises.

- Everything is imported under its own namespace: `relaybeat.relay`, never a top-level `relay`.
- The pure core imports no I/O library: no asyncio, SQL, MQTT, HTTP or threads.
- Dependencies point one way: relay <- monitor <- api <- the CLI (relaybeat.*); nothing imports the CLI.
- Only one module imports amqtt.
- No import cycles between modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relaybeat"
FOLDERS = ("relay", "monitor", "api", "migrations", "broker_config")
PURE_CORE = (
    "relaybeat.relay.wire",
    "relaybeat.relay.assembler",
    "relaybeat.relay.watch",
    "relaybeat.relay.sparkplug",
    "relaybeat.relay.packets",
    "relaybeat.monitor.detector",
    "relaybeat.monitor.columns",
    "relaybeat.monitor.dating",
    "relaybeat.monitor.states",
    "relaybeat.monitor.notify",
    "relaybeat.monitor.availability",
    "relaybeat.monitor.quality",
    "relaybeat.monitor.maintenance",
    "relaybeat.monitor.records",
    "relaybeat.broker_config.policy",
    "relaybeat.errors",
)
IO_LIBRARIES = ("asyncio", "sqlalchemy", "alembic", "amqtt", "aiomqtt", "paho", "fastapi", "starlette", "httpx",
                "uvicorn", "socket", "threading", "subprocess")  # fmt: skip
# The composition root: the CLI and what only it uses. Nothing in relay/, monitor/ or api/ imports these.
COMPOSITION_ROOT = (
    "relaybeat.cli",
    "relaybeat.serve",
    "relaybeat.monitor_server",
    "relaybeat.demo",
    "relaybeat.people",
    "relaybeat.__main__",
)
LAYERS = {"relaybeat.relay": 0, "relaybeat.monitor": 1, "relaybeat.api": 2}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in FOLDERS:
        parts.insert(0, "relaybeat")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for folder in ("relaybeat", *FOLDERS):
        for path in (ROOT / folder).rglob("*.py"):
            if not path.is_relative_to(PACKAGE) or path.parent == PACKAGE:  # skip the symlinked copies
                found[module_name(path)] = path
    return found


def imports_of(path: Path, name: str) -> Iterator[str]:
    """Absolute names of what a module imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


MODULES = modules()
GRAPH = {name: set(imports_of(path, name)) for name, path in MODULES.items()}


def test_the_packages_are_found_through_the_namespace() -> None:
    for name in ("relaybeat.relay.wire", "relaybeat.monitor.detector", "relaybeat.api.app", "relaybeat.cli"):
        assert name in MODULES, f"{name} not found: is relaybeat/{name.split('.')[1]} a symlink to the folder?"
    for folder in FOLDERS:
        assert (PACKAGE / folder).resolve() == (ROOT / folder).resolve(), f"relaybeat/{folder} must point at {folder}/"


@pytest.mark.parametrize("folder", ["relaybeat", *FOLDERS, "tests", "bench"])
def test_nothing_imports_the_old_top_level_names(folder: str) -> None:
    offenders = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not offenders, "import these as relaybeat.<name>:\n" + "\n".join(offenders)


@pytest.mark.parametrize("core", PURE_CORE)
def test_the_pure_core_imports_no_io(core: str) -> None:
    bad = sorted(i for i in GRAPH[core] if i.split(".")[0] in IO_LIBRARIES)
    assert not bad, f"{core} is pure (no I/O, no clock) but imports {bad}"
    inner = sorted(i for i in GRAPH[core] if i.startswith("relaybeat.") and _module_of(i) not in PURE_CORE)
    assert not inner, f"{core} imports non-core modules {inner}"


def _module_of(imported: str) -> str:
    """The module an import names (`from a.b import C` -> a.b)."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported


def test_nothing_imports_the_composition_root() -> None:
    bad = [
        f"{name} imports {_module_of(i)}"
        for name, imported in GRAPH.items()
        if name not in COMPOSITION_ROOT
        for i in imported
        if _module_of(i) in COMPOSITION_ROOT
    ]
    assert not bad, "\n".join(sorted(set(bad)))


def test_dependencies_point_one_way() -> None:
    """relay knows nothing of monitor or api; monitor nothing of api."""

    def layer(name: str) -> int | None:
        return next((n for prefix, n in LAYERS.items() if name == prefix or name.startswith(prefix + ".")), None)

    bad = sorted(
        f"{name} -> {_module_of(i)}"
        for name, imported in GRAPH.items()
        if (own := layer(name)) is not None
        for i in imported
        if (other := layer(_module_of(i))) is not None and other > own
    )
    assert not bad, "\n".join(bad)


def test_only_one_module_imports_amqtt() -> None:
    users = sorted(name for name, imported in GRAPH.items() if any(i.split(".")[0] == "amqtt" for i in imported))
    assert len(users) == 1, f"amqtt is imported by {users}: keep every amqtt access in one adapter"


def test_there_are_no_import_cycles() -> None:
    edges = {name: {_module_of(i) for i in imported} & MODULES.keys() - {name} for name, imported in GRAPH.items()}
    for name in edges:  # a package imports its own submodules on purpose only: ignore package -> child
        edges[name] = {m for m in edges[name] if not m.startswith(name + ".")}
    cycles = _strongly_connected(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


# What a leaf or relay host must not load: the monitor's SQL, HTTP server and numerical libraries.
MONITOR_ONLY_LIBRARIES = ("sqlalchemy", "alembic", "fastapi", "starlette", "uvicorn", "numpy", "aiosqlite", "psycopg")
LEAF_AND_RELAY_START = f"""
import sys
from pathlib import Path
from relaybeat import cli
from relaybeat.relay.leaf import run_leaf
from relaybeat.relay.service import RelayService
from relaybeat.serve import serve_relay
from relaybeat.settings import LeafFlags, RelayFlags, leaf_start, relay_start
example = Path({str(ROOT / "relaybeat.example.toml")!r})
leaf_start(LeafFlags(id="web-1", broker="mqtt://127.0.0.1:1"), {{}}, example)
relay_start(RelayFlags(id="r1", upstream="mqtt://127.0.0.1:1"), {{}}, example)
print(" ".join(sorted(set({MONITOR_ONLY_LIBRARIES!r}) & set(sys.modules))))
"""


def test_a_leaf_or_relay_starts_without_the_monitors_libraries() -> None:
    """`relaybeat leaf` used to import SQLAlchemy, Alembic, FastAPI and numpy: 3-5 s and ~110 MB on a host
    that only beats. The deployment file parsed here has every section (monitor, api, notify, ...)."""
    done = subprocess.run(
        [sys.executable, "-c", LEAF_AND_RELAY_START], capture_output=True, text=True, cwd=ROOT, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
