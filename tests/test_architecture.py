"""The structure the architecture section of the README promises, checked on the source itself:
the import graph of ``kdtool`` (``kdtool.objectives`` included) is acyclic, counting imports inside
functions and under ``TYPE_CHECKING``; objectives import only the math layers; no module is long."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 350
# What an objective may import: the signal, the divergences and the objective base (plus errors,
# the lazy torch import, the label convention, policy-gradient math, the on-policy declarations and
# sibling objectives). Names under TYPE_CHECKING are types only and may come from anywhere acyclic.
OBJECTIVE_DEPENDENCIES = {
    "kdtool.objective",
    "kdtool.teacher",
    "kdtool.divergence",
    "kdtool.sparse",
    "kdtool.errors",
    "kdtool.lazy",
    "kdtool.targets",
    "kdtool.policy_gradient",
    "kdtool.rollout_spec",
}


def modules() -> dict[str, Path]:
    """Module name -> file, for src/kdtool and objectives/ (mapped to kdtool.objectives)."""
    found = {}
    for path in (ROOT / "src" / "kdtool").rglob("*.py"):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "objectives").glob("*.py"):
        found["kdtool.objectives" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


def imported(tree: ast.AST, module: str, is_package: bool, known: Iterable[str]) -> dict[str, bool]:
    """kdtool modules imported anywhere in ``tree`` -> whether some import of it runs (not only
    under ``if TYPE_CHECKING``)."""
    known = set(known)
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for child in node.body for n in ast.walk(child)}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and (name != "kdtool" or isinstance(node, ast.ImportFrom)):
                out[name] = out.get(name, False) or id(node) not in type_only
    return out


def graph() -> dict[str, dict[str, bool]]:
    mods = modules()
    return {
        name: imported(ast.parse(path.read_text()), name, path.stem == "__init__", mods)
        for name, path in mods.items()
    }


def find_cycle(edges: dict[str, Iterable[str]]) -> list[str] | None:
    """A cycle of the directed graph as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in list(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_the_graph_sees_function_local_and_type_checking_imports():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kdtool.steps import Step\n"
        "def f():\n    from kdtool.engine import token_loss_sum\n"
        "from . import targets\n"
    )
    known = {"kdtool", "kdtool.steps", "kdtool.engine", "kdtool.targets", "kdtool.x"}
    assert imported(tree, "kdtool.x", False, known) == {
        "kdtool.steps": False,
        "kdtool.engine": True,
        "kdtool.targets": True,
        "kdtool": True,
    }


def test_kdtool_imports_run_one_way():
    edges = {name: [n for n in deps if n != "kdtool"] for name, deps in graph().items()}
    assert set(edges) >= {"kdtool.trainer", "kdtool.objectives.minillm", "kdtool.steps"}
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges) or [])}"


def test_objectives_depend_only_on_the_math_layers():
    for name, deps in graph().items():
        if not name.startswith("kdtool.objectives."):
            continue
        runtime = {d for d, runs in deps.items() if runs and not d.startswith("kdtool.objectives")}
        assert runtime <= OBJECTIVE_DEPENDENCIES, (name, sorted(runtime - OBJECTIVE_DEPENDENCIES))


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_350_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{modules()[name].relative_to(ROOT)} has {lines} lines (split it by job)"
