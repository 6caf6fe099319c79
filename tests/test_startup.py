"""Start-up budget: the CLI layer imports no heavy library until a command needs one.

Wall-clock limits would be flaky on a shared CI machine, so the tests check the cause instead:
which of torch, transformers, numpy, matplotlib, evaluate and datasets are in ``sys.modules``
after importing the CLI, or after running a command to its end in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "numpy", "matplotlib", "evaluate", "datasets")

# Runs kdtool's console entry point with the given arguments and, at interpreter exit (after
# typer's sys.exit), writes which heavy modules got imported to the file named by argv[1].
RUNNER = f"""
import atexit, json, sys
out, sys.argv = sys.argv[1], ["kdtool", *sys.argv[2:]]
def dump():
    with open(out, "w") as f:
        json.dump(sorted(m for m in {HEAVY!r} if m in sys.modules), f)
atexit.register(dump)
from kdtool.cli import main
main()
"""


def run_cli(tmp_path, *args):
    """(completed process, heavy modules imported) for ``kdtool ARGS`` in a fresh interpreter."""
    dump = tmp_path / "modules.json"
    env = {**os.environ, "COLUMNS": "400"}  # wide enough that no option name is folded
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(dump), *args], capture_output=True, text=True, env=env, timeout=120
    )
    return proc, json.loads(dump.read_text())


def test_importing_the_cli_imports_no_heavy_library():
    code = f"import kdtool.cli, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("distill", "--help"),
        ("compare", "--help"),
        ("cache-logits", "--help"),
        ("eval", "rougel", "--help"),
        ("demo", "--help"),
    ],
)
def test_help_imports_no_heavy_library(tmp_path, args):
    proc, heavy = run_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert heavy == []


def test_objectives_lists_every_option_without_torch(tmp_path):
    from kdtool.registry import available, describe_options

    proc, heavy = run_cli(tmp_path, "objectives")
    assert proc.returncode == 0, proc.stderr
    assert heavy == []
    for name, cls in available().items():
        assert f"│ {name} " in proc.stdout, name
        for option, _, _ in describe_options(cls):
            assert option in proc.stdout, f"{name}: {option}"


def test_a_config_mistake_is_reported_before_torch_is_imported(tmp_path):
    """`distill` validates its configuration first: a wrong flag costs no model-library import."""
    args = ("distill", "--objective", "nope", "--student", "s", "--data", "d", "--output", str(tmp_path))
    proc, heavy = run_cli(tmp_path, *args)
    assert proc.returncode == 1
    assert "unknown objective 'nope'" in proc.stderr
    assert heavy == []


def test_lazy_torch_imports_on_first_use():
    code = (
        "import sys; from kdtool.lazy import torch; before = 'torch' in sys.modules; "
        "t = torch.ones(2); print(before, 'torch' in sys.modules, float(t.sum()), torch.Tensor is type(t))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "2.0", "True"]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (POSIX)")
def test_distill_says_what_it_waits_for_on_a_terminal(tiny_dir, tmp_path):
    """The first line comes before torch is imported: a transient status on a terminal (and
    nothing at all when stderr is a file or pipe, so logs and one-line errors stay clean)."""
    master, slave = os.openpty()
    args = ["--student", str(tiny_dir / "student"), "--data", str(tmp_path / "missing.jsonl")]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kdtool",
            "distill",
            *args,
            "--output",
            str(tmp_path / "r"),
            "--objective",
            "sft",
        ],
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other end closed: the process is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 1
    assert text.index("importing torch and transformers") < text.index("data file not found")


def test_console_script_skips_the_exit_time_collection(tmp_path):
    """``kdtool`` (``kdtool.launch:run`` → ``kdtool.cli.run``, also ``python -m kdtool``) freezes the
    heap before the interpreter exits, so shutdown does not garbage-collect torch's and transformers'
    objects; ``main`` (called in-process by tests and embedding programs) does not."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["kdtool"] == "kdtool.launch:run"
    assert "from kdtool.launch import run" in (ROOT / "src" / "kdtool" / "__main__.py").read_text()
    assert "cli_run()" in (ROOT / "src" / "kdtool" / "launch.py").read_text()
    code = (
        "import atexit, gc, sys\n"
        "out, entry, sys.argv = sys.argv[1], sys.argv[2], ['kdtool', 'objectives']\n"
        "atexit.register(lambda: open(out, 'w').write(str(gc.get_freeze_count())))\n"
        "import kdtool.cli\n"
        "getattr(kdtool.cli, entry)()\n"
    )
    counts = {}
    for entry in ("run", "main"):
        out = tmp_path / f"{entry}.txt"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(out), entry], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        counts[entry] = int(out.read_text())
    assert counts["run"] > 0 and counts["main"] == 0


def test_the_launcher_imports_only_the_standard_library():
    """``kdtool.launch`` may re-execute the process (``kdtool.allocator``) before the CLI starts:
    what it imports first is paid twice, so it is the standard library and kdtool's allocator only."""
    code = (
        "import sys; before = set(sys.modules); import kdtool.launch, kdtool.allocator; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().replace("'", '"')))
    assert loaded - set(sys.stdlib_module_names) == {"kdtool"}, loaded


def test_the_package_exports_its_names_on_first_use():
    code = (
        "import sys, kdtool; lazy = 'pydantic' not in sys.modules; "
        "from kdtool import IGNORE_INDEX, Objective, get_objective; "
        "print(lazy, IGNORE_INDEX, issubclass(type(get_objective('fkl')), Objective))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "-100", "True"]
    import kdtool

    assert set(kdtool.__all__) == {"__version__", *kdtool._EXPORTS}
    assert all(getattr(kdtool, name) is not None for name in kdtool.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdtool.nope  # noqa: B018
