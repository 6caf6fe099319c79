"""Shared fixtures: everything is built offline from configs (no hub)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is about twice as fast as two on the 2-core CI machine (measured),
# and CLI subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` (not a package) imported as a module, e.g. ``load_benchmark("gpu_check")``."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run_flags(tiny_dir: Path, out: Path, **overrides):
    """The distill flags most trainer tests share: fkl from the tiny pair, batch 4, lr 1e-2, seed 3."""
    return dict(
        objective="fkl",
        teacher=str(tiny_dir / "teacher"),
        student=str(tiny_dir / "student"),
        data=str(tiny_dir / "data" / "train.jsonl"),
        output=str(out),
        batch_size=4,
        lr=1e-2,
        log_every=1,
        progress=False,
        seed=3,
        **overrides,
    )


@pytest.fixture(scope="session")
def tokenizer():
    from kdtool.synthetic import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny teacher/student pair and a small synthetic data set on disk."""
    from kdtool.synthetic import save_model, write_dataset

    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root / "data", n_train=96, n_test=16, seed=0)
    save_model(root / "teacher", tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=1)
    save_model(root / "student", tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=128, seed=2)
    return root


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``kdtool ARGS...`` in this process through the console entry point (``kdtool.cli.main``,
    which turns a ``UserError`` into one line): returns ``(exit code, stderr + stdout)``.

    Faster than a subprocess (no interpreter start, no second torch import); an exception that
    escapes ``main`` (a traceback for a user) fails the test where it happens.
    """
    import sys

    from kdtool.cli import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["kdtool", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.err + out.out

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
