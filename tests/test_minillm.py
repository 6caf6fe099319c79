"""minillm: the math on plain tensors, every ablation switch, and the trainer integration."""

from __future__ import annotations

import json

import pytest
import torch
from kdtool.objectives.minillm import MiniLLM, MiniLLMOptions

from kdtool.context import RunSettings, StepContext
from kdtool.errors import UserError
from kdtool.lm_corpus import load_lm_examples
from kdtool.onpolicy import RolloutStep
from kdtool.policy_gradient import masked_whiten, policy_loss, prefix_weights, rewards_to_go, token_rewards
from kdtool.registry import available, get_objective
from kdtool.rollout import Buffer, collate, collect
from kdtool.sampling import sample
from toy_lm import EOS, TableLM, toy_context
from toy_lm import prompt_batch as toy_prompts

V, T = 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


# ------------------------------------------------------------------ the math, against loops


def ref_rewards_to_go(r, m, gamma, include_current, length_norm, w=None):
    """Slow reference: explicit double loop over (t, t')."""
    out = torch.zeros_like(r)
    for b in range(r.shape[0]):
        n = int(m[b].sum())
        for t in range(n):
            start = t if include_current else t + 1
            total, terms = 0.0, 0
            for u in range(start, n):
                weight = 1.0
                for s in range(t + 1, u + 1):
                    weight *= float(w[b, s]) if w is not None else 1.0
                total += gamma ** (u - t) * weight * float(r[b, u])
                terms += 1
            out[b, t] = total / max(terms, 1) if length_norm else total
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("include_current", [False, True])
@pytest.mark.parametrize("length_norm", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_rewards_to_go_matches_explicit_sums(gamma, include_current, length_norm, weighted):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    r = r * m
    w = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    got = rewards_to_go(r, m, gamma, include_current, length_norm, weights=w)
    torch.testing.assert_close(got, ref_rewards_to_go(r, m, gamma, include_current, length_norm, w))


def test_token_rewards_scale_clip_and_mask():
    lp = torch.tensor([[-1.0, -2.0, -50.0]])
    lq = torch.tensor([[-2.0, -1.0, -1.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert token_rewards(lp, lq, m).tolist() == [[1.0, -1.0, 0.0]]
    assert token_rewards(lp, lq, m, scaling=0.5).tolist() == [[2.0, -2.0, 0.0]]
    assert token_rewards(lp, lq, torch.ones_like(m), scaling=0.5, clip=10.0).tolist() == [[2.0, -2.0, -10.0]]


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    y = masked_whiten(x, m)
    assert abs(float(y[m].mean())) < 1e-6 and abs(float(y[m].std(unbiased=False)) - 1) < 1e-4
    assert bool((y[~m] == 0).all())


def test_prefix_weights_are_exclusive_products():
    w = torch.tensor([[2.0, 0.5, 3.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(prefix_weights(w, m), torch.tensor([[1.0, 2.0, 1.0, 3.0]]))


def test_policy_loss_gradient_and_clipping():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    w = torch.tensor([1.0, 1.0, 1.5, 1.5])  # the last two start outside [0.8, 1.2]
    loss, clipped = policy_loss(new, old, adv, w, clip_eps=0.2)
    loss.sum().backward()
    # ρ = w: inside the range the gradient is −A·w; A > 0 with ρ > 1 + ε is clipped (no gradient);
    # A < 0 with ρ > 1 + ε keeps the unclipped, pessimistic branch.
    torch.testing.assert_close(new.grad, torch.tensor([-1.0, 1.0, 0.0, 1.5]))
    assert clipped.tolist() == [False, False, True, False]
    loss_off, clipped_off = policy_loss(new, old, adv, w, clip_eps=None)
    torch.testing.assert_close(loss_off, -adv * w)
    assert not clipped_off.any()


# ------------------------------------------------------------------ the objective on a toy


def toy_ctx(seed: int = 0) -> StepContext:
    student, teacher = TableLM(V, 1 + T, seed=1), TableLM(V, 1 + T, seed=2)
    teacher.requires_grad_(False)
    return toy_context(student, teacher, seed)


def buffer_of(objective: MiniLLM, rollout) -> Buffer:
    """The rollout buffer the rollout stream would hold for ``rollout``."""
    buffer = Buffer()
    buffer.add(rollout, *objective.rollout_tensors(rollout))
    objective.finish_buffer(buffer.tokens)
    return buffer


def collected(objective: MiniLLM, prompts, ctx: StepContext) -> Buffer:
    settings = objective.rollout_settings(ctx.settings)
    buffer = collect(iter(prompts), ctx, settings, objective.rollout_tensors)
    objective.finish_buffer(buffer.tokens)
    return buffer


def prompt_batch(n: int) -> dict[str, torch.Tensor]:
    return toy_prompts([1], n)


def lm_batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    ids = torch.cat([torch.ones(n, 1, dtype=torch.long), torch.randint(1, V, (n, 2), generator=g)], 1)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"aux_input_ids": ids, "aux_attention_mask": torch.ones_like(ids), "aux_labels": labels}


def loss_of(options: dict, rollout=None, n: int = 64) -> float:
    """The micro-batch loss of one buffer (from ``rollout``, or freshly sampled with seed 0)."""
    objective = MiniLLM(MiniLLMOptions(**{"rollout_batch_size": n, "max_new_tokens": T} | options))
    ctx = toy_ctx()
    buffer = (
        collected(objective, [prompt_batch(n)], ctx) if rollout is None else buffer_of(objective, rollout)
    )
    batch = collate(buffer, list(range(len(buffer))), EOS) | lm_batch(8)
    loss_sum, count, _ = RolloutStep(objective).loss(ctx, batch)
    assert torch.isfinite(loss_sum)
    return float((loss_sum / count).detach())


@pytest.fixture(scope="module")
def mixed_rollout():
    ctx = toy_ctx()
    prompts = prompt_batch(64)
    return sample(
        ctx.student,
        prompts["input_ids"],
        prompts["attention_mask"],
        eos_token_id=EOS,
        pad_token_id=EOS,
        max_new_tokens=T,
        teacher=ctx.teacher,
        alpha=0.5,
        generator=torch.Generator().manual_seed(4),
    )


# (option, changed value, other options of the baseline): whitening removes any common scale of
# the advantages, so reward_scaling only shows without it (or where rewards reach reward_clip).
BUFFER_SWITCHES = [
    ("single_step", False, {}),
    ("single_step_weight", 0.5, {}),
    ("single_step_importance", True, {}),
    ("include_current_reward", False, {}),
    ("length_norm", False, {}),
    ("whiten", False, {}),
    ("gamma", 1.0, {}),
    ("reward_scaling", 1.0, {"whiten": False}),
    ("reward_clip", 0.3, {}),
    ("clip_eps", None, {}),
    ("importance_weights", "none", {}),
    ("importance_weights", "per_decision", {}),
    ("lm_loss", False, {}),
    ("lm_weight", 0.5, {}),
    ("lm_kd_ratio", 0.0, {}),
    ("normalise_by", "sequences", {}),
    ("temperature", 0.7, {}),
]


@pytest.mark.parametrize(
    ("name", "value", "baseline"), BUFFER_SWITCHES, ids=[f"{n}={v}" for n, v, _ in BUFFER_SWITCHES]
)
def test_each_switch_changes_the_loss_on_the_same_rollouts(mixed_rollout, name, value, baseline):
    base = loss_of(baseline, mixed_rollout)
    assert MiniLLMOptions().model_dump()[name] != value
    assert loss_of(baseline | {name: value}, mixed_rollout) != pytest.approx(base, rel=1e-6, abs=1e-9)


SAMPLING_SWITCHES = [("alpha", 0.0), ("alpha", 1.0), ("top_k", 2), ("top_p", 0.5), ("max_new_tokens", 1)]


@pytest.mark.parametrize(("name", "value"), SAMPLING_SWITCHES, ids=[f"{n}={v}" for n, v in SAMPLING_SWITCHES])
def test_each_sampling_switch_changes_the_loss(name, value):
    assert loss_of({name: value}) != pytest.approx(loss_of({}), rel=1e-6, abs=1e-9)


def test_first_ppo_step_has_ratio_one_and_no_clipping_without_mixing():
    objective = MiniLLM(MiniLLMOptions(alpha=0.0, rollout_batch_size=32, max_new_tokens=T, lm_loss=False))
    ctx = toy_ctx()
    buffer = collected(objective, [prompt_batch(32)], ctx)
    _, _, metrics = RolloutStep(objective).loss(ctx, collate(buffer, list(range(32)), EOS))
    assert float(metrics["clip_fraction"][0]) == 0.0
    assert float(metrics["importance_weight"][0] / metrics["importance_weight"][1]) == 1.0


def test_batches_schedule_inner_epochs_and_attach_lm_batches(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n\nbca\n")

    class CharTok:  # the LM data is tokenised by the trainer's tokenizer
        pad_token_id = eos_token_id = EOS

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1 + "abc".index(c) for c in text]}

    objective = MiniLLM(
        MiniLLMOptions(
            rollout_batch_size=12, mini_batch_size=5, inner_epochs=3, max_new_tokens=T, lm_data=str(corpus)
        )
    )
    ctx = toy_ctx()
    ctx.tokenizer = CharTok()
    ctx.settings = RunSettings(seed=0, grad_accum=1, batch_size=6, max_length=8)
    loader = iter([prompt_batch(6)] * 100)
    stream = RolloutStep(objective).stream(loader, ctx)
    per_buffer = 3 * 3  # 3 epochs × ceil(12 / 5) micro-batches
    batches = [next(stream) for _ in range(per_buffer + 1)]
    sizes = [b["seq_rkl"].numel() for b in batches[:per_buffer]]
    assert sizes == [5, 5, 2] * 3
    assert all(b["aux_input_ids"].shape[0] == 2 for b in batches)  # both documents, batch size 6


def test_lm_data_formats(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\n\nsecond doc\n")
    assert [e.response for e in load_lm_examples(txt)] == ["first doc", "second doc"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n")
    (ex,) = load_lm_examples(jl)
    assert (ex.prompt, ex.response) == ("", "hello")
    inst = tmp_path / "i.jsonl"
    inst.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    (ex,) = load_lm_examples(inst)
    assert ex.response == "hi" and "Say hi." in ex.prompt
    with pytest.raises(UserError, match="not found"):
        load_lm_examples(tmp_path / "missing.txt")


def test_registered_with_validated_options():
    assert available()["minillm"] is MiniLLM and MiniLLM.needs_rollouts and not MiniLLM.scores_references
    objective = get_objective("minillm", alpha=0.1, gamma=1.0)
    assert objective.options.alpha == 0.1
    with pytest.raises(UserError, match="alpha"):
        get_objective("minillm", alpha=1.5)
    with pytest.raises(UserError, match="no_such_option"):
        get_objective("minillm", no_such_option=1)


def test_example_config_options_validate():
    from pathlib import Path

    from kdtool.config import resolve

    path = Path(__file__).resolve().parents[1] / "examples" / "gpt2-dolly-minillm.yaml"
    cfg = resolve(path, {"output": "runs/x"})
    objective = get_objective(cfg.objective, **cfg.objective_options)
    assert isinstance(objective, MiniLLM) and objective.options.mini_batch_size * cfg.grad_accum == 64


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
@pytest.mark.parametrize("single_step", [True, False])
def test_sampled_token_terms_through_the_chunked_engine_match_full_logits(
    mixed_rollout, chunk_size, single_step
):
    """micro_batch_loss (engine, chunked) == the same terms from full [N, V] logits, value and gradient."""
    from kdtool.objectives.minillm import minillm_token_losses

    opts = MiniLLMOptions(rollout_batch_size=64, max_new_tokens=T, lm_loss=False, single_step=single_step)
    objective = MiniLLM(opts)
    batch = collate(buffer_of(objective, mixed_rollout), list(range(64)), EOS)

    ctx = toy_ctx()
    ctx.chunk_size = chunk_size
    loss, count, metrics = RolloutStep(objective).loss(ctx, batch)
    loss.backward()
    grad = ctx.student.head.weight.grad.clone()

    # Reference: plain autograd on every position's full logits, masked to the response tokens.
    ref_ctx = toy_ctx()
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    mask = labels[:, 1:] != -100
    log_q = torch.log_softmax(ref_ctx.student(ids, am).logits[:, :-1][mask].double(), -1)
    log_p = torch.log_softmax(ref_ctx.teacher(ids, am).logits[:, :-1][mask].double(), -1)
    y = labels[:, 1:][mask]
    step_kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    tokens = {k[4:]: v.double() for k, v in batch.items() if k.startswith("tok_")}
    ref, _ = minillm_token_losses(
        log_q.gather(-1, y[:, None]).squeeze(-1), step_kl if single_step else None, tokens, opts.clip_eps, 1.0
    )
    ref.sum().backward()
    assert int(count) == int(mask.sum()) > 0
    torch.testing.assert_close(loss.double(), ref.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_ctx.student.head.weight.grad.double(), rtol=1e-4, atol=1e-6)
    assert float(metrics["single_step_kl"][0]) == pytest.approx(float(step_kl.detach().sum()), rel=1e-5)
