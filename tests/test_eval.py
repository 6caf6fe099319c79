"""Held-out evaluation: one teacher and one student forward per batch for every probe, the
same values as a plain full-logit computation, and a default schedule that stays cheap."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from kdtool import held_out, train_setup, trainer
from kdtool.config import resolve
from kdtool.context import StepContext
from kdtool.data import BatchLoader, TokenizedDataset, load_examples
from kdtool.models import load_model, load_tokenizer
from kdtool.registry import get_objective
from kdtool.steps import TokenStep

BATCH, BATCHES, TAU, CE_WEIGHT = 4, 3, 2.0, 0.5


def flags_for(tiny_dir, out, **overrides):
    flags = dict(
        objective="fkl",
        objective_options={"temperature": TAU, "ce_weight": CE_WEIGHT},
        teacher=str(tiny_dir / "teacher"),
        student=str(tiny_dir / "student"),
        data=str(tiny_dir / "data" / "train.jsonl"),
        output=str(out),
        batch_size=BATCH,
        progress=False,
        seed=3,
    )
    return flags | overrides


def count_forwards(model, counter, role):
    """Count calls of the base model: every kdtool forward (``models.hidden_states``) goes through it."""
    model.base_model.register_forward_pre_hook(lambda module, args: counter.update([(role, module.training)]))


@pytest.fixture()
def setup(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_dir / "student"))
    student = load_model(str(tiny_dir / "student"))
    teacher = load_model(str(tiny_dir / "teacher")).eval().requires_grad_(False)
    counter: Counter = Counter()
    count_forwards(student, counter, "student")
    count_forwards(teacher, counter, "teacher")
    ctx = StepContext(
        student=student,
        teacher=teacher,
        teacher_cache=None,
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        device=torch.device("cpu"),
        chunk_size=7,  # several chunks per batch, and a short last one
    )
    examples = load_examples(str(tiny_dir / "data" / "test.jsonl"))
    dataset = TokenizedDataset(examples, tokenizer, 128, None)
    cfg = resolve(None, flags_for(tiny_dir, tmp_path / "run", eval_batches=BATCHES))
    objective = get_objective("fkl", temperature=TAU, ce_weight=CE_WEIGHT)
    return ctx, objective, dataset, cfg, counter


def plain_metrics(ctx, dataset):
    """The old way, written out: full logits of both models, plain formulas, token-weighted mean."""
    sums, tokens = Counter(), 0
    loader = BatchLoader(dataset, BATCH, seed=0, shuffle=False)
    for _, batch in zip(range(BATCHES), loader, strict=False):
        ids, am = batch["input_ids"], batch["attention_mask"]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        with torch.no_grad():
            zs = (
                ctx.student(input_ids=ids, attention_mask=am)
                .logits[:, :-1][mask][:, : ctx.vocab_size]
                .double()
            )
            zt = (
                ctx.teacher(input_ids=ids, attention_mask=am)
                .logits[:, :-1][mask][:, : ctx.vocab_size]
                .double()
            )
        log_q, log_p = zs.log_softmax(-1), zt.log_softmax(-1)
        ce = -log_q.gather(1, labels[mask].unsqueeze(1)).squeeze(1)
        fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
        rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
        log_q_t, log_p_t = (zs / TAU).log_softmax(-1), (zt / TAU).log_softmax(-1)
        kl_t = (log_p_t.exp() * (log_p_t - log_q_t)).sum(-1) * TAU**2
        loss = (1 - CE_WEIGHT) * kl_t + CE_WEIGHT * ce
        for name, values in (("ce", ce), ("fkl", fkl), ("rkl", rkl), ("loss", loss)):
            sums[f"eval_{name}"] += float(values.sum())
        tokens += int(mask.sum())
    return {k: v / tokens for k, v in sums.items()}


def test_eval_metrics_equal_a_plain_full_logit_computation(setup):
    ctx, objective, dataset, cfg, _ = setup
    got = held_out.evaluate(ctx, objective, dataset, cfg)
    want = plain_metrics(ctx, dataset)
    assert sorted(got) == ["eval_ce", "eval_fkl", "eval_loss", "eval_rkl"]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("through_module", [False, True])
def test_one_teacher_and_one_student_forward_per_eval_batch(setup, through_module):
    """Four probes (ce, fkl, rkl, the objective's loss) share the two forwards of each batch;
    the (DDP/FSDP-wrappable) StepModule path shares them too."""
    ctx, objective, dataset, cfg, counter = setup
    forward = trainer.StepModule(ctx.student, TokenStep(objective), ctx) if through_module else None
    metrics = held_out.evaluate(ctx, objective, dataset, cfg, forward)
    assert len(metrics) == 4
    assert counter == {("student", False): BATCHES, ("teacher", False): BATCHES}
    assert metrics == pytest.approx(held_out.evaluate(ctx, objective, dataset, cfg))


def test_without_a_teacher_only_the_student_runs(setup):
    ctx, _, dataset, cfg, counter = setup
    ctx.teacher = None
    metrics = held_out.evaluate(ctx, get_objective("sft"), dataset, cfg)
    assert list(metrics) == ["eval_ce"]
    assert counter == {("student", False): BATCHES}


def evals_in_a_run(steps, every):
    """The steps at which the trainer evaluates: 0, every `every` steps, and the last step."""
    return len({0, steps} | set(range(every, steps + 1, every)))


@pytest.mark.parametrize("steps", [40, 41, 99, 100, 333, 1781, 20_000])
@pytest.mark.parametrize("grad_accum", [1, 4])
@pytest.mark.parametrize("held_out", [1, 6, 10_000])
def test_default_schedule_reads_at_most_a_tenth_of_the_training_batches(
    tmp_path, steps, grad_accum, held_out
):
    cfg = resolve(
        None, dict(student="s", data="d", output=str(tmp_path), objective="sft", grad_accum=grad_accum)
    )
    every, batches = cfg.eval_schedule(steps, held_out)
    assert 1 <= batches <= held_out
    assert evals_in_a_run(steps, every) * batches <= 0.1 * steps * grad_accum
    if steps >= 1000:  # long runs: ten evals, and enough batches to mean something
        assert every == steps // 10 and batches >= min(held_out, 4)


def test_explicit_schedule_is_kept(tmp_path):
    cfg = resolve(None, dict(student="s", data="d", output=str(tmp_path), objective="sft", eval_every=7))
    assert cfg.model_copy(update={"eval_batches": 3}).eval_schedule(100, 50) == (7, 3)


def test_default_run_spends_under_a_tenth_of_its_forwards_on_eval_and_reports_the_time(
    tiny_dir, tmp_path, monkeypatch
):
    """Counted, not timed: a run with the default schedule; its summary states the eval time."""
    counter: Counter = Counter()

    def counting_load_model(name, *args, **kwargs):
        model = load_model(name, *args, **kwargs)
        count_forwards(model, counter, "teacher" if name.endswith("teacher") else "student")
        return model

    monkeypatch.setattr(train_setup, "load_model", counting_load_model)
    out = trainer.train(resolve(None, flags_for(tiny_dir, tmp_path / "run", max_steps=40, lr=1e-2)))
    train_forwards, eval_forwards = counter[("student", True)], counter[("student", False)]
    assert train_forwards == 40
    assert 0 < eval_forwards <= 0.1 * train_forwards
    assert counter[("teacher", False)] == train_forwards + eval_forwards
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_ce" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert {"eval_ce", "eval_fkl", "eval_rkl", "eval_loss"} <= evals[-1].keys()
    summary = json.loads((out / "kdtool.json").read_text())
    assert 0 < summary["eval_time_s"] <= summary["wall_time_s"]
    # both rounded to 10 ms in the summary
    assert summary["eval_share"] * summary["wall_time_s"] == pytest.approx(summary["eval_time_s"], abs=0.01)


def test_shared_engine_pass_equals_each_objective_on_its_own():
    """`token_loss_sums` over every token-level objective == `token_loss_sum` for each alone, bit for bit."""
    from kdtool.engine import token_loss_sum, token_loss_sums
    from kdtool.registry import available
    from kdtool.teacher import TeacherSignal

    g = torch.Generator().manual_seed(0)
    n, h, v = 29, 8, 40
    hidden, teacher_hidden = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    student_head, teacher_head = torch.nn.Linear(h, v + 3), torch.nn.Linear(h, v)
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = TeacherSignal.lazy(teacher_hidden, teacher_head, v)
    objectives = {name: cls() for name, cls in available().items() if cls.scores_references}
    objectives["loss"] = objectives[
        "fkl"
    ]  # the held-out `loss` probe of an fkl run: one object, computed once
    with torch.no_grad():
        shared = token_loss_sums(objectives, hidden, student_head, teacher, labels, v, chunk_size=8)
        for name, objective in objectives.items():
            alone, metrics = token_loss_sum(objective, hidden, student_head, teacher, labels, v, chunk_size=8)
            assert torch.equal(shared[name][0], alone), name
            assert shared[name][1].keys() == metrics.keys(), name
    # ... and equal to the training path's value (with gradients: closed forms, local autograd)
    trainable = hidden.clone().requires_grad_(True)
    for name, objective in objectives.items():
        trained, _ = token_loss_sum(objective, trainable, student_head, teacher, labels, v, chunk_size=8)
        assert torch.equal(shared[name][0], trained.detach()), name


def test_the_loss_probe_reuses_an_identical_probe():
    """An fkl run's objective *is* the fkl probe (computed once); other options keep their own object."""
    from types import SimpleNamespace

    from kdtool.held_out import eval_probes

    ctx = SimpleNamespace(teacher=object(), teacher_cache=None)
    cfg = SimpleNamespace(eval_data=None)
    default = eval_probes(ctx, get_objective("fkl"), cfg)
    assert default["loss"] is default["fkl"]
    hot = get_objective("fkl", temperature=2.0)
    assert eval_probes(ctx, hot, cfg)["loss"] is hot
    assert eval_probes(ctx, get_objective("rkl"), cfg)["loss"] is not None
