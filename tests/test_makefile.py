"""The README's make commands set themselves up on a fresh clone, once.

``make -n`` (a dry run) in a copy of the Makefile shows what each command would run, so the
install logic is checked without installing anything; CI (``.ci/run``) runs the real thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "demo-quick", "test", "test-fast", "lint", "bench", "bench-chunk", "bench-peers")
INSTALL = ("python3 -m venv .venv", "pip install -q torch==2.13.0", 'pip install -q -e ".[dev,dist]"')

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(clone: Path, target: str) -> list[str]:
    proc = subprocess.run(["make", "-n", target], cwd=clone, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def index_of(lines: list[str], text: str) -> int:
    return next((i for i, line in enumerate(lines) if text in line), -1)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """What a fresh clone has that the Makefile reads: no .venv."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def installed(clone: Path) -> None:
    """Pretend a finished install: the venv's python and a stamp newer than pyproject.toml."""
    python = clone / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    stamp = clone / ".venv" / ".installed"
    stamp.touch()
    later = (clone / "pyproject.toml").stat().st_mtime + 10
    os.utime(python, (later, later))
    os.utime(stamp, (later, later))


@pytest.mark.parametrize("target", COMMANDS)
def test_first_use_installs_torch_first_then_runs(clone, target):
    lines = dry_run(clone, target)
    steps = [index_of(lines, text) for text in INSTALL]
    assert all(i >= 0 for i in steps), lines
    assert steps == sorted(steps), f"install steps out of order: {lines}"
    assert index_of(lines, "touch .venv/.installed") > steps[-1]
    # the command itself runs after the install, in the same invocation
    assert len(lines) > index_of(lines, "touch .venv/.installed") + 1, lines


@pytest.mark.parametrize("target", COMMANDS)
def test_second_use_does_not_install_again(clone, target):
    installed(clone)
    lines = dry_run(clone, target)
    assert lines, "the command itself must still run"
    assert all(index_of(lines, text) < 0 for text in INSTALL), lines


def test_changed_pyproject_reinstalls(clone):
    installed(clone)
    later = (clone / ".venv" / ".installed").stat().st_mtime + 10
    os.utime(clone / "pyproject.toml", (later, later))
    lines = dry_run(clone, "test")
    assert index_of(lines, 'pip install -q -e ".[dev,dist]"') >= 0
    assert index_of(lines, "python3 -m venv") < 0  # the venv itself is kept


def test_make_install_is_kept(clone):
    assert index_of(dry_run(clone, "install"), "pip install -q torch==2.13.0") >= 0


def test_ci_starts_with_make_test_on_the_fresh_clone():
    commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith("make")
    ]
    assert commands[:2] == ["make test", "make lint"]
    assert "make install" not in commands
    assert "make demo-quick" in commands
