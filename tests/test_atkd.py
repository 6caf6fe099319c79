"""ATKD against a slow, obviously-correct reference (plain Python float64 math, one token at a time):
decomposition identity, hard/easy split, value and gradient, masking, extreme logits, the reverse
variant, sparse teacher, and exactness of the batch quantile under chunking."""

from __future__ import annotations

import math

import pytest
import torch
from kdtool.objectives.atkd import decouple, lower_quantile, tkd_dkd

import kdtool
from kdtool.engine import token_loss_sum
from kdtool.errors import UserError
from kdtool.objective import IGNORE_INDEX, rows_of_stats
from kdtool.registry import describe_options, get_class
from kdtool.teacher import TeacherSignal

INF = math.inf

# ---------------------------------------------------------------- slow reference


def _lse(xs: list[float]) -> float:
    finite = [x for x in xs if x != -INF]
    if not finite:
        return -INF
    m = max(finite)
    return m + math.log(sum(math.exp(x - m) for x in finite))


def _kl(log_a: list[float], log_b: list[float]) -> float:
    """KL(a ‖ b) from log-probabilities; 0 · log(0/·) = 0."""
    total = 0.0
    for la, lb in zip(log_a, log_b, strict=True):
        if la != -INF and math.exp(la) > 0:
            total += math.exp(la) * (la - lb)
    return total


def _split(row, g: int, tau: float) -> tuple[list[float], list[float] | None]:
    """([log p_g, log(1 − p_g)], log p̂ over v ≠ g or None when p̂ is undefined), from logits."""
    z = [float(x) / tau for x in row]
    log_z = _lse(z)
    rest = [z[v] for v in range(len(z)) if v != g]
    log_rest = _lse(rest)
    hat = None if log_rest == -INF else [x - log_rest for x in rest]
    return [z[g] - log_z, log_rest - log_z], hat


def ref_token(s_row, t_row, g: int, opts: dict) -> tuple[float, float, float]:
    """(TKD, DKD, UnC) of one token."""
    tau = opts.get("temperature", 1.0)
    (t_bin, t_hat), (s_bin, s_hat) = _split(t_row, g, tau), _split(s_row, g, tau)
    if opts.get("base", "fkl") == "fkl":
        first, second = (t_bin, t_hat), (s_bin, s_hat)
    else:
        first, second = (s_bin, s_hat), (t_bin, t_hat)
    tkd = _kl(first[0], second[0])
    if first[1] is None:
        dkd = 0.0
    else:
        dkd = _kl(first[1], second[1] if second[1] is not None else [-INF] * len(first[1]))
    return tkd * tau**2, dkd * tau**2, math.exp(t_bin[1])


def ref_atkd(student, teacher, labels, opts: dict) -> tuple[float, dict[str, float]]:
    """L = λ·mean_easy(DKD) + (1 − λ)·mean_hard(TKD + DKD), split at the lower quantile of UnC."""
    lam, frac = opts.get("lambda", 0.2), opts.get("hard_fraction", 0.5)
    toks = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            g = int(labels[b, t])
            if g != IGNORE_INDEX:
                toks.append(ref_token(student[b, t], teacher[b, t], g, opts))
    if not toks:
        return 0.0, {}
    uncs = sorted(u for _, _, u in toks)
    threshold = uncs[int((1 - frac) * (len(toks) - 1) + 1e-9)]
    hard = [x for x in toks if x[2] >= threshold]
    easy = [x for x in toks if x[2] < threshold]

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    loss = lam * mean([d for _, d, _ in easy]) + (1 - lam) * mean([t + d for t, d, _ in hard])
    metrics = {
        "hard_fraction": len(hard) / len(toks),
        "uncertainty": mean([u for _, _, u in toks]),
        "tkd_hard": mean([t for t, _, _ in hard]),
        "dkd_hard": mean([d for _, d, _ in hard]),
        "tkd_easy": mean([t for t, _, _ in easy]),
        "dkd_easy": mean([d for _, d, _ in easy]),
    }
    return loss, metrics


def numeric_grad(s, t, labels, opts, eps=1e-6):
    grad = torch.zeros_like(s)
    flat = s.reshape(-1)
    for i in range(flat.numel()):
        old = float(flat[i])
        flat[i] = old + eps
        up = ref_atkd(s, t, labels, opts)[0]
        flat[i] = old - eps
        down = ref_atkd(s, t, labels, opts)[0]
        flat[i] = old
        grad.reshape(-1)[i] = (up - down) / (2 * eps)
    return grad


# ---------------------------------------------------------------- data


def batch(seed=0, B=2, T=3, V=5, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    t = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = IGNORE_INDEX  # a masked prompt token
    labels[1, -1] = IGNORE_INDEX  # padding
    return s, t, labels


def extreme_batch(dtype=torch.float64):
    """±1e4-scale logits, −inf at the same entries in both models, p_g → 1, all mass on g."""
    s, t, labels = batch(seed=5, B=2, T=4, V=6, scale=1.0)
    s, t = s * 1e4, t * 1e4
    s[..., -2:] = -INF  # e.g. padded embedding rows
    t[..., -2:] = -INF
    labels = labels.clamp(max=3).masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
    labels[0, 1], labels[0, 2], labels[1, 0] = 0, 1, 2
    t[0, 1, 0] = 1e5  # teacher p_g = 1 − exp(−huge): UnC = 0 in floating point, p̂ still defined
    s[0, 2, [0, 2, 3]] = -INF  # only the target is finite in both: p̂ and q̂ undefined
    t[0, 2, [0, 2, 3]] = -INF
    s[1, 0, 2] = -INF  # the target itself is masked in both models: p_g = q_g = 0, UnC = 1
    t[1, 0, 2] = -INF
    return s.to(dtype), t.to(dtype), labels


CASES = [
    {},
    {"lambda": 0.5, "hard_fraction": 0.3},
    {"temperature": 2.0, "hard_fraction": 0.8},
    {"base": "rkl"},
    {"base": "rkl", "lambda": 0.7, "temperature": 0.5},
]


# ---------------------------------------------------------------- the decomposition


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_equals_tkd_plus_uncertainty_times_dkd(dtype):
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(64, 50, generator=g, dtype=dtype) * 3 for _ in range(2))
    labels = torch.randint(0, 50, (64,), generator=g)
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    p, q = decouple(t, labels), decouple(s, labels)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for first, second, log_first, log_second in ((p, q, log_p, log_q), (q, p, log_q, log_p)):
        tkd, dkd = tkd_dkd(first, second)
        full = (log_first.exp() * (log_first - log_second)).sum(-1)
        torch.testing.assert_close(tkd + first.log_binary[:, 1].exp() * dkd, full, **tol)
    # b^p and p̂ are what they claim to be
    torch.testing.assert_close(p.log_binary[:, 0], log_p.gather(-1, labels[:, None]).squeeze(-1), **tol)
    torch.testing.assert_close(p.log_binary.exp().sum(-1), torch.ones(64, dtype=dtype), **tol)
    torch.testing.assert_close(p.log_hat.exp().sum(-1), torch.ones(64, dtype=dtype), **tol)
    assert (p.log_hat.gather(-1, labels[:, None]) == -INF).all()


def test_lambda_half_all_hard_is_half_of_tkd_plus_dkd():
    s, t, labels = batch(B=3, T=6, V=9)
    loss, metrics = kdtool.get_objective("atkd", **{"lambda": 0.5, "hard_fraction": 1.0}).loss(s, t, labels)
    keep = labels != IGNORE_INDEX
    tkd, dkd = tkd_dkd(decouple(t[keep], labels[keep]), decouple(s[keep], labels[keep]))
    assert float(loss) == pytest.approx(float(0.5 * (tkd + dkd).mean()), rel=1e-12)
    per_token = [ref_token(s[b, i], t[b, i], int(labels[b, i]), {}) for b, i in keep.nonzero().tolist()]
    assert float(loss) == pytest.approx(0.5 * sum(a + d for a, d, _ in per_token) / len(per_token), rel=1e-10)
    assert metrics["hard_fraction"] == 1.0


def test_lower_quantile_matches_torch_median_and_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 10, 31, 64):
        u = torch.rand(n, generator=g, dtype=torch.float64)
        assert lower_quantile(u, 0.5) == torch.median(u)  # the official code's threshold
        for q in (0.0, 0.2, 0.3, 0.5, 0.7, 0.75, 1.0):
            assert lower_quantile(u, q) == torch.quantile(u, q, interpolation="lower"), (n, q)


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("opts", CASES)
def test_value_gradient_and_metrics_match_reference(opts):
    s, t, labels = batch()
    s_var = s.clone().requires_grad_(True)
    loss, metrics = kdtool.get_objective("atkd", **opts).loss(s_var, t, labels)
    loss.backward()
    expected, expected_metrics = ref_atkd(s, t, labels, opts)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics == pytest.approx(expected_metrics, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(s_var.grad, numeric_grad(s.clone(), t, labels, opts), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("opts", [{}, {"base": "rkl"}])
def test_split_uses_the_teacher_uncertainty_with_ties_going_to_hard(opts):
    # Teacher rows chosen so that UnC is known: a one-hot-ish teacher is easy, a flat one hard.
    V = 4
    t = torch.zeros(1, 5, V, dtype=torch.float64)
    t[0, :2, 0] = 8.0  # targets 0 -> confident teacher, low UnC
    labels = torch.tensor([[0, 0, 1, 2, 3]])
    s = torch.randn(1, 5, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, metrics = kdtool.get_objective("atkd", **opts).loss(s, t, labels)
    # UnC = [ε, ε, u, u, u] with ties at the median: the three flat-teacher tokens are hard.
    assert metrics["hard_fraction"] == pytest.approx(3 / 5)
    assert ref_atkd(s, t, labels, opts)[1]["hard_fraction"] == pytest.approx(3 / 5)


def test_masked_positions_do_not_matter_and_all_masked_is_zero():
    s, t, labels = batch(B=2, T=5, V=7)
    obj = kdtool.get_objective("atkd")
    base, _ = obj.loss(s, t, labels)
    s2, t2 = s.clone(), t.clone()
    s2[0, 0] = 1e3 * torch.randn_like(s2[0, 0])
    t2[1, -1] = 50.0  # a masked token must not move the quantile either
    again, _ = obj.loss(s2, t2, labels)
    assert float(base) == pytest.approx(float(again), rel=1e-12)
    for opts in CASES:
        masked = torch.full_like(labels, IGNORE_INDEX)
        s_var = s.float().requires_grad_(True)
        loss, metrics = kdtool.get_objective("atkd", **opts).loss(s_var, t.float(), masked)
        loss.backward()
        assert float(loss.detach()) == 0.0
        assert torch.isfinite(s_var.grad).all() and float(s_var.grad.abs().sum()) == 0.0
        assert all(v == 0.0 for v in metrics.values())


def test_one_valid_token_and_identical_models_give_zero():
    s, t, labels = batch(B=2, T=5, V=7)
    for opts in CASES:
        assert abs(float(kdtool.get_objective("atkd", **opts).loss(s, s.clone(), labels)[0])) < 1e-12
    one = torch.full_like(labels, IGNORE_INDEX)
    one[1, 2] = 3
    loss, metrics = kdtool.get_objective("atkd").loss(s, t, one)
    tkd, dkd, _ = ref_token(s[1, 2], t[1, 2], 3, {})
    assert metrics["hard_fraction"] == 1.0  # a lone token is its own median: hard
    assert float(loss) == pytest.approx(0.8 * (tkd + dkd), rel=1e-10)


@pytest.mark.parametrize("opts", CASES)
def test_extreme_logits_value_and_gradient(opts):
    s, t, labels = extreme_batch()
    obj = kdtool.get_objective("atkd", **opts)
    expected, _ = ref_atkd(s, t, labels, opts)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        s_var = s.detach().clone().to(dtype).requires_grad_(True)
        loss, metrics = obj.loss(s_var, t.to(dtype), labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s_var.grad).all(), dtype
        assert all(math.isfinite(v) for v in metrics.values())
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-3 if dtype == torch.float32 else 1e-9)
        grads[dtype] = s_var.grad.double()
    assert (grads[torch.float64][s == -INF] == 0).all()
    torch.testing.assert_close(grads[torch.float64], numeric_grad(s.clone(), t, labels, opts, eps=1e-3))
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64], rtol=1e-3, atol=1e-4)


def test_bf16_inputs_agree_with_fp32():
    s, t, labels = batch(B=4, T=8, V=32, scale=2.0)
    obj = kdtool.get_objective("atkd")
    full, _ = obj.loss(s.float(), t.float(), labels)
    half, _ = obj.loss(s.bfloat16(), t.bfloat16(), labels)
    assert float(half) == pytest.approx(float(full), rel=5e-2, abs=5e-3)


# ---------------------------------------------------------------- chunking, lazy and sparse teachers


def _two_phase(obj, s, teacher: TeacherSignal, labels, chunk: int):
    """What a chunked engine does: uncertainties chunk by chunk, one split, then losses chunk by chunk."""
    n = labels.shape[0]
    pieces = [
        obj.token_stats(teacher.rows(slice(i, i + chunk)), labels[i : i + chunk]) for i in range(0, n, chunk)
    ]
    stats = obj.batch_stats({k: torch.cat([p[k] for p in pieces]) for k in pieces[0]})
    total, sums = s.sum() * 0.0, {}
    for i in range(0, n, chunk):
        rows = slice(i, i + chunk)
        losses, metrics = obj.token_losses(
            s[rows], teacher.rows(rows), labels[rows], rows_of_stats(stats, rows)
        )
        total = total + losses.sum()
        for k, (v, c) in metrics.items():
            a, b = sums.get(k, (0.0, 0.0))
            sums[k] = (a + float(v), b + float(c))
    return total, {k: v / max(c, 1.0) for k, (v, c) in sums.items()}


@pytest.mark.parametrize("opts", [{}, {"base": "rkl", "hard_fraction": 0.3}])
def test_chunked_two_phase_equals_one_pass(opts):
    s, t, labels = batch(B=3, T=7, V=11)
    keep = labels != IGNORE_INDEX
    s, t, labels = s[keep], t[keep], labels[keep]
    obj = kdtool.get_objective("atkd", **opts)
    whole, whole_metrics = obj.loss(s, t, labels)
    for chunk in (1, 3, 7, 100):
        total, metrics = _two_phase(obj, s, TeacherSignal.dense(t), labels, chunk)
        assert float(total) / labels.numel() == pytest.approx(float(whole), rel=1e-12), chunk
        assert metrics == pytest.approx(whole_metrics, rel=1e-6), chunk


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 9, 1000])
def test_engine_with_lazy_teacher_matches_loss(chunk_size):
    g = torch.Generator().manual_seed(2)
    n, h, v = 17, 6, 13
    s_head, t_head = torch.nn.Linear(h, v + 3).double(), torch.nn.Linear(h, v).double()
    s_hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    obj = kdtool.get_objective("atkd")
    teacher = TeacherSignal.lazy(t_hidden, t_head, v)
    total, metrics = token_loss_sum(obj, s_hidden, s_head, teacher, labels, v, chunk_size)
    (grad,) = torch.autograd.grad(total, s_hidden)
    with torch.no_grad():
        t_logits = t_head(t_hidden)
    ref_hidden = s_hidden.detach().clone().requires_grad_(True)
    expected, expected_metrics = obj.loss(s_head(ref_hidden)[:, :v], t_logits, labels)
    (expected * n).backward()
    assert float(total.detach()) == pytest.approx(float(expected.detach()) * n, rel=1e-12)
    torch.testing.assert_close(grad, ref_hidden.grad)
    assert {k: float(a) / float(c) for k, (a, c) in metrics.items()} == pytest.approx(expected_metrics)


def test_sparse_teacher_is_the_top_k_distribution():
    s, t, labels = batch(B=2, T=6, V=12)
    keep = labels != IGNORE_INDEX
    s, t, labels = s[keep], t[keep], labels[keep]
    k = 4
    values, indices = t.topk(k, -1)
    labels[0] = indices[0, 1]  # the target among the stored entries ...
    labels[1] = t[1].argmin()  # ... and outside them: p_g = 0, UnC = 1, hard
    truncated = torch.full_like(t, -INF).scatter(-1, indices, values)
    obj = kdtool.get_objective("atkd", hard_fraction=0.4)
    sparse, sparse_metrics = obj.loss(s, TeacherSignal.sparse(values, indices, t.shape[-1]), labels)
    dense, dense_metrics = obj.loss(s, truncated, labels)
    assert float(sparse) == pytest.approx(float(dense), rel=1e-12)
    assert float(sparse) == pytest.approx(
        ref_atkd(s[None], truncated[None], labels[None], {"hard_fraction": 0.4})[0]
    )
    assert sparse_metrics == pytest.approx(dense_metrics)
    stats = obj.token_stats(TeacherSignal.sparse(values, indices, t.shape[-1]), labels)
    assert float(stats["uncertainty"][1]) == 1.0
    with pytest.raises(UserError, match="base=rkl"):
        kdtool.get_objective("atkd", base="rkl").loss(s, TeacherSignal.sparse(values, indices, 12), labels)


# ---------------------------------------------------------------- options


def test_options_alias_defaults_and_validation():
    obj = kdtool.get_objective("atkd", **{"lambda": 0.4})
    assert obj.options.lambda_ == 0.4
    assert kdtool.get_objective("atkd", lambda_=0.3).options.lambda_ == 0.3
    defaults = kdtool.get_objective("atkd").options
    assert (defaults.base, defaults.lambda_, defaults.hard_fraction, defaults.temperature) == (
        "fkl",
        0.2,
        0.5,
        1.0,
    )
    names = [name for name, _, _ in describe_options(get_class("atkd"))]
    assert names == ["base", "lambda", "hard_fraction", "temperature"]
    for bad in ({"lambda": 1.5}, {"hard_fraction": 0.0}, {"base": "jsd"}, {"temperature": 0}, {"gamma": 1}):
        with pytest.raises(UserError):
            kdtool.get_objective("atkd", **bad)


# ---------------------------------------------------------------- end to end


def _records(run):
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_distill_cli_on_the_builtin_task(tiny_dir, tmp_path):
    """`kdtool distill --objective atkd` trains the tiny student and its held-out losses go down."""
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["distill", "--objective", "atkd", "-O", "lambda=0.2", "-O", "hard_fraction=0.5"]
    args += ["--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student")]
    args += [
        "--data",
        str(tiny_dir / "data" / "train.jsonl"),
        "--eval-data",
        str(tiny_dir / "data" / "test.jsonl"),
    ]
    args += ["--output", str(out), "--no-progress", "--max-steps", "20", "--batch-size", "8", "--lr", "1e-2"]
    args += ["--eval-every", "10", "--log-every", "5"]
    proc = subprocess.run(
        [sys.executable, "-m", "kdtool", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    records = _records(out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    assert evals[-1]["eval_fkl"] < evals[0]["eval_fkl"]
    train = [r for r in records if "lr" in r]
    assert len(train) == 4 and all(0.4 < r["hard_fraction"] < 0.7 for r in train)
    assert all(k in train[-1] for k in ("uncertainty", "tkd_hard", "dkd_hard", "tkd_easy", "dkd_easy"))


@pytest.mark.slow
def test_reverse_variant_trains_with_accumulation_and_chunks(tiny_dir, tmp_path):
    from kdtool import trainer
    from kdtool.config import resolve

    flags = dict(
        objective="atkd", objective_options={"base": "rkl", "lambda": 0.5}, grad_accum=2, chunk_size=7
    )
    flags |= dict(teacher=str(tiny_dir / "teacher"), student=str(tiny_dir / "student"), progress=False)
    flags |= dict(
        data=str(tiny_dir / "data" / "train.jsonl"), eval_data=str(tiny_dir / "data" / "test.jsonl")
    )
    flags |= dict(output=str(tmp_path / "run"), max_steps=10, batch_size=4, lr=1e-2, eval_every=10)
    evals = [r for r in _records(trainer.train(resolve(None, flags))) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_rkl"] < evals[0]["eval_rkl"]


def test_a_sparse_cache_with_base_rkl_is_refused_when_the_config_is_validated():
    """Reverse KL to a top-k teacher is infinite: refused before any model loads, not at the first batch."""
    from kdtool.config import resolve
    from kdtool.errors import UserError

    base = dict(student="s", data="d", output="o", teacher_cache="c", objective="atkd")
    resolve(None, base)  # base=fkl trains from a cache
    with pytest.raises(UserError, match="cannot train from a sparse --teacher-cache with these options"):
        resolve(None, dict(base, objective_options={"base": "rkl"}))
