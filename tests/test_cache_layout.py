"""kdtool.cache is a package of small modules whose imports run one way (no cycles), that the
rest of kdtool reaches through its ``__init__`` re-exports, and that loads without the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parents[1] / "src" / "kdtool" / "cache"

TRAINING = {"kdtool.trainer", "kdtool.train_setup", "kdtool.engine", "kdtool.steps"}
# module -> the cache modules it may import: a layering, so the graph is acyclic by construction
ALLOWED = {
    "config": set(),
    "codec": set(),
    "manifest": set(),
    "teacher_pass": {"config", "codec"},
    "build": {"config", "codec", "manifest", "teacher_pass"},
    "read": {"config", "codec", "manifest"},
}


def kdtool_imports(path: Path) -> set[str]:
    """Every ``kdtool.*`` module imported anywhere in ``path`` (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kdtool")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdtool"):
            found.add(node.module)
    return found


def test_every_cache_module_has_a_place_in_the_layering():
    modules = {p.stem for p in CACHE.glob("*.py")} - {"__init__"}
    assert modules == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_cache_modules_import_only_the_layers_below(module):
    imported = kdtool_imports(CACHE / f"{module}.py")
    siblings = {m.removeprefix("kdtool.cache.") for m in imported if m.startswith("kdtool.cache.")}
    assert siblings <= ALLOWED[module], f"{module} imports {siblings - ALLOWED[module]}"
    assert "kdtool.cache" not in imported  # the package __init__ imports every module: a cycle
    outside = {m for m in imported if not m.startswith("kdtool.cache")}
    assert not outside & {*TRAINING, "kdtool.cli", "kdtool.config"}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_cache_modules_stay_small(module):
    assert len((CACHE / f"{module}.py").read_text().splitlines()) <= 350


def test_importing_the_cache_loads_no_trainer_and_keeps_the_public_names():
    code = (
        "import sys; from kdtool.cache import CacheConfig, TeacherCache, build_cache, read_manifest; "
        "from kdtool.cache import teacher_top_k, quantize_q8, dequantize_q8, indices_to; "
        f"print(sorted(m for m in {sorted(TRAINING | {'kdtool.config'})} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
