"""Dependencies go one way: the core never imports Flower or the Flower layers, the server
side never imports the client side, no module cycles, and no benchmark script shadows an
installed module."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fedlowrank": ROOT / "fedlowrank", "fedlowrank.strategies": ROOT / "strategies", "fedlowrank.clients": ROOT / "clients"}
# fedlowrank.secure: the secure-aggregation protocol over Flower's crypto primitives, shared by both sides.
FLOWER_LAYERS = ("fedlowrank.strategies", "fedlowrank.clients", "fedlowrank.secure")


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the distribution: ``name -> (file, is_package)``."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return found


MODULES = modules()


def imported(name: str) -> set[str]:
    """Modules ``name`` imports anywhere in its file (function-level imports included)."""
    path, is_package = MODULES[name]
    base = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                target = f"{anchor}.{node.module}" if node.module else anchor
            out.add(target)
            out |= {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES}
    return out


def is_core(name: str) -> bool:
    return name.startswith("fedlowrank") and not name.startswith(FLOWER_LAYERS)


def test_the_core_imports_neither_flower_nor_the_flower_layers():
    bad = {m: sorted(i for i in imported(m) if i.split(".")[0] == "flwr" or i.startswith(FLOWER_LAYERS))
           for m in MODULES if is_core(m)}
    assert not {m: i for m, i in bad.items() if i}


def test_the_server_side_never_imports_the_client_side():
    bad = {m: sorted(i for i in imported(m) if i.startswith("fedlowrank.clients"))
           for m in MODULES if m.startswith("fedlowrank.strategies")}
    assert not {m: i for m, i in bad.items() if i}


def test_no_import_cycles_between_modules():
    # A package importing its own submodules (its __init__ re-exporting) is not a cycle.
    edges = {m: {i for i in imported(m) if i in MODULES and i != m and not (MODULES[i][1] and m.startswith(i + "."))} for m in MODULES}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_benchmark_script_shadows_an_installed_module():
    installed = set(importlib.metadata.packages_distributions())
    scripts = {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
    assert not scripts & installed, sorted(scripts & installed)
