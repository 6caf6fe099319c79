"""kdtool.rollout: KV-cached sampling from the student and from the teacher-mixed proposal."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdtool.divergence import kl
from kdtool.evaluation.sequence_kl import sequence_reverse_kl
from kdtool.sampling import Rollout, filter_top_k_top_p, left_pad, mix_log_probs, sample
from toy_lm import EOS, TableLM, all_responses, sequence_logprobs

V, T = 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


def gpt2(seed: int, vocab: int = 11) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def table_sample(n: int, alpha: float, seed: int = 0, **kw) -> Rollout:
    student, teacher = TableLM(V, 1 + T, seed=1), TableLM(V, 1 + T, seed=2)
    ids = torch.ones(n, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return sample(
        student,
        ids,
        torch.ones_like(ids),
        eos_token_id=EOS,
        pad_token_id=EOS,
        max_new_tokens=T,
        teacher=teacher,
        alpha=alpha,
        generator=g,
        **kw,
    )


def check_masks(out: Rollout, eos: int, pad: int, max_new: int) -> None:
    ids, mask = out.response_ids, out.response_mask
    assert ids.shape[1] <= max_new
    for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n), "the mask is a prefix"
        assert eos not in row[: n - 1], "no EOS before the last valid token"
        assert row[n - 1] == eos or n == ids.shape[1] == max_new, "ends with EOS or at max_new_tokens"
        assert all(t == pad for t in row[n:]), "pad after the first EOS"
    for t in (out.student_logprobs, out.teacher_logprobs, out.proposal_logprobs, out.step_kl):
        assert t is not None and bool((t[~mask] == 0).all())


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_eos_max_tokens_and_masks():
    out = table_sample(200, alpha=0.2)
    check_masks(out, EOS, EOS, T)
    assert int(out.lengths.min()) > 0 and int(out.lengths.max()) == T
    assert (out.lengths < T).any() and (out.response_ids == EOS).any()


def test_gpt2_eos_and_max_tokens_with_distinct_pad():
    student, teacher = gpt2(0), gpt2(1)
    ids, mask = left_pad([[3, 4, 5, 6], [7, 2], [9]], pad_id=0)
    g = torch.Generator().manual_seed(0)
    kw = dict(pad_token_id=0, teacher=teacher, alpha=0.5, generator=g)
    out = sample(student, ids, mask, eos_token_id=1, max_new_tokens=9, **kw)
    check_masks(out, eos=1, pad=0, max_new=9)
    never = sample(student, ids, mask, eos_token_id=None, max_new_tokens=5, **kw)
    assert never.response_mask.all() and never.response_ids.shape == (3, 5)


def test_stops_early_when_every_row_has_ended():
    student = TableLM(V, 1 + T, seed=1)
    with torch.no_grad():
        student.head.weight.zero_()
        student.head.weight[EOS] = 50.0  # EOS is certain
    ids = torch.ones(5, 1, dtype=torch.long)
    out = sample(student, ids, torch.ones_like(ids), eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=T)
    assert out.response_ids.shape == (5, 1) and out.response_mask.all()
    full = sample(
        student,
        ids,
        torch.ones_like(ids),
        eos_token_id=EOS,
        pad_token_id=EOS,
        max_new_tokens=T,
        stop_early=False,
    )
    assert full.response_ids.shape == (5, T) and full.lengths.tolist() == [1] * 5


def test_kv_cache_with_left_padding_matches_a_full_forward():
    """Per-token log-probs and step KL recorded while sampling (KV cache, left-padded prompts of
    different lengths) equal a plain full forward over each row's unpadded prompt + response."""
    student, teacher = gpt2(0), gpt2(1)
    prompts = [[3, 4, 5, 6, 2], [7, 2], [9, 8, 4]]
    ids, mask = left_pad(prompts, pad_id=0)
    out = sample(
        student,
        ids,
        mask,
        eos_token_id=1,
        pad_token_id=0,
        max_new_tokens=6,
        teacher=teacher,
        alpha=0.3,
        temperature=0.7,
        generator=torch.Generator().manual_seed(3),
    )
    for b, prompt in enumerate(prompts):
        n = int(out.lengths[b])
        seq = torch.tensor([prompt + out.response_ids[b, :n].tolist()])
        with torch.no_grad():
            zs = student(seq).logits[0, len(prompt) - 1 : -1]
            zt = teacher(seq).logits[0, len(prompt) - 1 : -1]
        lq, lp = torch.log_softmax(zs / 0.7, -1), torch.log_softmax(zt, -1)
        y = seq[0, len(prompt) :, None]
        torch.testing.assert_close(
            out.student_logprobs[b, :n], lq.gather(-1, y).squeeze(-1), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            out.teacher_logprobs[b, :n], lp.gather(-1, y).squeeze(-1), atol=1e-5, rtol=0
        )
        mixed = mix_log_probs(lp, lq, 0.3).gather(-1, y).squeeze(-1)
        torch.testing.assert_close(out.proposal_logprobs[b, :n], mixed, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.step_kl[b, :n], kl(lq, lp), atol=1e-5, rtol=0)


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = table_sample(64, 0.2, seed=5), table_sample(64, 0.2, seed=5), table_sample(64, 0.2, seed=6)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.student_logprobs, b.student_logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def counts_chi2(out: Rollout, probs: dict[tuple[int, ...], float]) -> float:
    """Pearson χ² of the sampled complete responses against exact probabilities (normalised by
    its degrees of freedom: ≈ 1 ± √(2/df) when the samples follow ``probs``)."""
    seen = Counter(
        tuple(row[: int(n)]) for row, n in zip(out.response_ids.tolist(), out.lengths.tolist(), strict=True)
    )
    n = out.response_ids.shape[0]
    assert set(seen) <= set(probs)
    chi2 = sum((seen.get(y, 0) - n * p) ** 2 / (n * p) for y, p in probs.items())
    return chi2 / (len(probs) - 1)


def exact_probs(model: TableLM) -> dict[tuple[int, ...], float]:
    responses = all_responses(V, T)
    with torch.no_grad():
        lp = sequence_logprobs(model, [1], responses)
    return dict(zip(responses, lp.exp().tolist(), strict=True))


def test_alpha_one_samples_the_teacher_alpha_zero_the_student():
    """Statistical check over all 40 complete responses: with α = 1 the samples follow the
    teacher's sequence distribution (and not the student's), with α = 0 the student's.
    df = 39, so χ²/df has standard deviation ≈ 0.23; the bound 2 is > 4 standard deviations."""
    teacher_p, student_q = exact_probs(TableLM(V, 1 + T, seed=2)), exact_probs(TableLM(V, 1 + T, seed=1))
    from_teacher = table_sample(4000, alpha=1.0, seed=11)
    from_student = table_sample(4000, alpha=0.0, seed=12)
    assert counts_chi2(from_teacher, teacher_p) < 2.0
    assert counts_chi2(from_teacher, student_q) > 10.0
    assert counts_chi2(from_student, student_q) < 2.0
    assert counts_chi2(from_student, teacher_p) > 10.0
    m = from_teacher.response_mask
    torch.testing.assert_close(from_teacher.proposal_logprobs[m], from_teacher.teacher_logprobs[m])
    torch.testing.assert_close(from_student.proposal_logprobs, from_student.student_logprobs, rtol=0, atol=0)
    assert torch.equal(from_student.importance_weights, torch.ones_like(from_student.importance_weights))


def test_mixed_proposal_first_token_frequencies():
    """α = 0.5: the first token follows ½p + ½q (χ² over the 4 tokens, df = 3)."""
    out = table_sample(6000, alpha=0.5, seed=2)
    student, teacher = TableLM(V, 1 + T, seed=1), TableLM(V, 1 + T, seed=2)
    with torch.no_grad():
        root = torch.ones(1, 1, dtype=torch.long)
        mix = 0.5 * torch.softmax(student(root).logits[0, -1], -1) + 0.5 * torch.softmax(
            teacher(root).logits[0, -1], -1
        )
    seen = torch.bincount(out.response_ids[:, 0], minlength=V).float()
    expected = mix * out.response_ids.shape[0]
    chi2 = float(((seen - expected) ** 2 / expected).sum())
    assert chi2 < 3 + 4 * math.sqrt(6)


def test_top_k_one_is_greedy_and_filters_renormalise():
    lp = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), -1)
    k2 = filter_top_k_top_p(lp, top_k=2)
    assert torch.isinf(k2[0, [0, 3]]).all() and math.isclose(float(k2.exp().sum()), 1.0, rel_tol=1e-6)
    p = lp.exp()[0].sort(descending=True).values  # 0.665, 0.245, ...
    nucleus = filter_top_k_top_p(lp, top_p=float(p[0]) + 0.01)  # needs the top two tokens
    assert torch.isfinite(nucleus[0]).sum() == 2
    assert torch.isfinite(filter_top_k_top_p(lp, top_p=0.05)[0]).sum() == 1
    assert torch.equal(filter_top_k_top_p(lp), lp)

    student = gpt2(0)
    ids, mask = left_pad([[3, 4], [5]], pad_id=0)
    out = sample(student, ids, mask, eos_token_id=None, pad_token_id=0, max_new_tokens=4, top_k=1)
    greedy = student.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out.response_ids, greedy[:, ids.shape[1] :])
    assert torch.allclose(out.proposal_logprobs, torch.zeros_like(out.proposal_logprobs))


def test_teacher_mixing_needs_a_teacher_and_models_keep_their_mode():
    student = gpt2(0).train()
    ids, mask = left_pad([[3]], pad_id=0)
    with pytest.raises(ValueError, match="needs a teacher"):
        sample(student, ids, mask, eos_token_id=1, pad_token_id=0, max_new_tokens=2, alpha=0.2)
    sequence_reverse_kl(student, gpt2(1), ids, mask, eos_token_id=1, pad_token_id=0, max_new_tokens=3)
    assert student.training


def test_sequence_reverse_kl_is_the_exact_kl_on_average():
    student, teacher = TableLM(V, 1 + T, seed=1), TableLM(V, 1 + T, seed=2)
    responses = all_responses(V, T)
    with torch.no_grad():
        lq, lp = sequence_logprobs(student, [1], responses), sequence_logprobs(teacher, [1], responses)
    exact = float((lq.exp() * (lq - lp)).sum())
    ids = torch.ones(4000, 1, dtype=torch.long)
    est = sequence_reverse_kl(
        student,
        teacher,
        ids,
        torch.ones_like(ids),
        eos_token_id=EOS,
        pad_token_id=EOS,
        max_new_tokens=T,
        generator=torch.Generator().manual_seed(0),
    )
    se = float(est.std()) / math.sqrt(est.numel())
    assert abs(float(est.mean()) - exact) < 5 * se


class Calls:
    """A model call that records what it was given; ``hide_keep`` drops ``logits_to_keep`` (a
    model without it computes every position's logits)."""

    def __init__(self, model, hide_keep: bool = False):
        self.model, self.hide_keep, self.widths = model, hide_keep, []

    def __call__(self, **kw):
        if self.hide_keep:
            kw.pop("logits_to_keep", None)
        out = self.model(**kw)
        self.widths.append(out.logits.shape[1])
        return out


def gpt2_rollout(student_call=None, teacher_call=None, any_rank=None, seed=0):
    student, teacher = gpt2(1), gpt2(2)
    ids, mask = left_pad([[3, 4, 5, 6], [7, 8]], pad_id=0)
    g = torch.Generator().manual_seed(seed)
    out = sample(
        student,
        ids,
        mask,
        eos_token_id=1,
        pad_token_id=0,
        max_new_tokens=6,
        teacher=teacher,
        alpha=0.3,
        generator=g,
        student_call=student_call(student) if student_call else None,
        teacher_call=teacher_call(teacher) if teacher_call else None,
        any_rank=any_rank,
    )
    return out, g.get_state()


def assert_same_rollout(a: Rollout, b: Rollout, atol: float = 1e-6) -> None:
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    for name in ("student_logprobs", "teacher_logprobs", "proposal_logprobs", "step_kl"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol)


def test_prefill_keeps_only_the_last_logits_and_results_are_unchanged():
    calls, full = [], []
    keep, _ = gpt2_rollout(
        student_call=lambda m: calls.append(Calls(m)) or calls[-1],
        teacher_call=lambda m: calls.append(Calls(m)) or calls[-1],
    )
    every, _ = gpt2_rollout(
        student_call=lambda m: full.append(Calls(m, hide_keep=True)) or full[-1],
        teacher_call=lambda m: full.append(Calls(m, hide_keep=True)) or full[-1],
    )
    assert all(c.widths[0] == 1 for c in calls)  # prefill: [B, 1, V], not [B, P, V]
    assert all(c.widths[0] == 4 for c in full)  # the fallback computes all P positions
    assert_same_rollout(keep, every)


def test_idle_passes_keep_ranks_in_step_without_changing_the_samples():
    """Another rank still decodes for 4 more steps: this rank makes one forward per model per
    step, samples nothing more, and its generator ends where a lone run's ends."""
    alone, g_alone = gpt2_rollout()
    steps = alone.response_ids.shape[1]
    asked = []

    def any_rank(decoding: bool) -> bool:
        asked.append(decoding)
        return len(asked) <= steps + 4

    calls: list[Calls] = []
    synced, g_synced = gpt2_rollout(
        student_call=lambda m: calls.append(Calls(m)) or calls[-1],
        teacher_call=lambda m: calls.append(Calls(m)) or calls[-1],
        any_rank=any_rank,
    )
    assert_same_rollout(alone, synced, atol=0)
    assert torch.equal(g_alone, g_synced)
    assert [len(c.widths) for c in calls] == [steps + 4, steps + 4]
    assert asked[steps:] == [False] * 5  # done after its own steps; the 5th answer ends the loop
