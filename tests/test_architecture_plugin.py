"""The objective of docs/ARCHITECTURE.md's "Adding an objective", installed exactly as written there
(its code block as a module, its entry point), is listed, matches an independent computation, and
trains through the real trainer and engine."""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_flags
from kdtool import registry, trainer
from kdtool.config import resolve
from kdtool.engine import plain_token_loss_sum, token_loss_sum
from kdtool.teacher import TeacherSignal

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def blocks(language: str) -> list[str]:
    section = DOC.read_text().split("## Adding an objective", 1)[1]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The documented module on sys.path and its documented entry point in the registry."""
    (code,), (toml,) = blocks("python"), blocks("toml")
    name, value = re.search(r'^([\w-]+) = "([\w.:]+)"$', toml, flags=re.M).groups()
    (tmp_path / f"{value.split(':')[0]}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry.entry_points
    extra = EntryPoint(name=name, value=value, group=registry.GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), extra])
    registry.reload()
    yield name
    registry.reload()
    sys.modules.pop(value.split(":")[0], None)


def test_the_documented_objective_takes_at_most_15_lines():
    (code,), (toml,) = blocks("python"), blocks("toml")
    lines = [line for line in (code + toml).splitlines() if line.strip()]
    assert len(lines) <= 15, len(lines)


def test_it_is_listed_and_its_loss_is_cross_entropy_to_the_teacher_argmax(plugin, cli):
    code, out = cli("objectives")
    assert code == 0 and plugin in out
    objective = registry.get_objective(plugin)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    student.requires_grad_(True)
    loss, metrics = objective.loss(student, teacher, labels)
    keep = labels != -100
    want = torch.nn.functional.cross_entropy(student[keep], teacher[keep].argmax(-1))
    torch.testing.assert_close(loss, want)
    assert metrics["agree"] == pytest.approx(float((teacher[keep].argmax(-1) == labels[keep]).float().mean()))
    # the chunked engine (fused path) equals full logits, value and gradient
    hidden, head = torch.randn(9, 6, generator=g, requires_grad=True), torch.nn.Linear(6, 11)
    signal = TeacherSignal.lazy(torch.randn(9, 6, generator=g), torch.nn.Linear(6, 11), 11)
    rows = torch.randint(0, 11, (9,), generator=g)
    chunked, _ = token_loss_sum(objective, hidden, head, signal, rows, 11, chunk_size=4)
    (grad,) = torch.autograd.grad(chunked, hidden)
    plain, _ = plain_token_loss_sum(objective, hidden, head, signal, rows, 11)
    (want_grad,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(grad, want_grad)


def test_it_trains_through_kdtool_distill(plugin, tiny_dir, tmp_path):
    flags = tiny_run_flags(tiny_dir, tmp_path / "run", max_steps=3, eval_batches=1) | {"objective": plugin}
    out = trainer.train(resolve(None, flags))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all("agree" in r for r in steps)
    assert "eval_loss" in records[-1]  # held-out probe of the objective's own loss
