"""minillm — MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543): on-policy sequence-level reverse KL.

    min_θ  L(θ) = KL[q_θ(y|x) ‖ p(y|x)],   y sampled from the student (mixed with the teacher).

With r_t = log p(y_t|y_<t, x) − log q_θ(y_t|y_<t, x) and R_t = Σ_{t'≥t} r_{t'}, the policy gradient
splits into (paper eq. 4–5)

    ∇L = Σ_t ∇ KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x))        (∇L)_Single: exact over the vocabulary
       − E_{y∼q_θ} Σ_t R_{t+1} ∇ log q_θ(y_t|y_<t, x)     (∇L)_Long

and is stabilised by four tricks, each one option below:
  1. single-step decomposition (``single_step``);
  2. teacher-mixed sampling y_t ~ p̃ = α·p + (1 − α)·q_θ with importance weights w_t = q_θ(y_t)/p̃(y_t)
     (``alpha``, ``importance_weights``);
  3. length normalisation of the future reward (``length_norm``);
  4. PPO-style ratio clipping over several inner epochs per rollout buffer (``clip_eps``, ``inner_epochs``);
plus a language-modelling loss on a corpus (``lm_loss``, ``lm_data``): L = L_MiniLLM + L_PT.

The official code (microsoft/LMOps, ``minillm/``) differs from the paper in places; every difference
is a named option, and the defaults follow the official code (it produced the paper's numbers):
rewards are scaled by 1/0.5 and clipped to ±100, the future reward *includes* r_t and is discounted by
γ = 0.95, advantages are whitened, and the single-step term is not multiplied by w_t.

With ``include_current_reward=false, gamma=1, length_norm=false, whiten=false, reward_scaling=1,
reward_clip=null, clip_eps=null, normalise_by=sequences`` and either ``alpha=0`` or
``importance_weights=per_decision``, the first PPO step's gradient is an unbiased estimate of ∇L;
``tests/test_minillm_enumeration.py`` checks this against enumeration on a toy.

The math lives in plain functions on tensors (``token_rewards``, ``rewards_to_go``, ``masked_whiten``,
``prefix_weights``, ``policy_loss``, ``single_step_kl``, ``minillm_token_losses``) so it is tested
without models; the class only moves data between ``kdtool.rollout`` and the trainer, and hands the
sampled tokens' terms to the chunked engine as a token-level loss (``SampledTokenLoss``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kdtool.divergence import kl
from kdtool.objective import IGNORE_INDEX, Metrics, Objective, ObjectiveOptions, token_metric
from kdtool.teacher import TeacherSignal

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from kdtool.lazy import torch

# --------------------------------------------------------------------------------------------
# The math, on plain tensors. Per-token tensors are [B, T] (or flat [N]); mask marks tokens
# up to and including the first EOS (a prefix of each row).
# --------------------------------------------------------------------------------------------


def token_rewards(
    teacher_logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    scaling: float = 1.0,
    clip: float | None = None,
) -> Tensor:
    """r_t = clip((log p(y_t) − log q_old(y_t)) / scaling, ±clip), 0 outside the mask. ``[B, T]``."""
    rewards = (teacher_logprobs - old_logprobs) / scaling
    if clip is not None:
        rewards = rewards.clamp(-clip, clip)
    return rewards * mask


def rewards_to_go(
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    include_current: bool = False,
    length_norm: bool = False,
    weights: Tensor | None = None,
) -> Tensor:
    """The long-term advantage A_t of each sampled token. ``[B, T] -> [B, T]``.

    With H_t = r_t + γ · w_{t+1} · H_{t+1} (H past the end = 0; w ≡ 1 unless per-decision
    importance weights are given):

        include_current = False (paper):   A_t = γ · w_{t+1} · H_{t+1}   = R_{t+1}
        include_current = True (official): A_t = H_t                     = R_t

    ``length_norm`` divides A_t by the number of rewards it sums (T − t + 1, resp. T − t;
    at least 1): the paper's R^Norm and the official code's division by the remaining length.
    """
    mask = mask.to(rewards.dtype)
    w = torch.ones_like(rewards) if weights is None else weights * mask
    width = rewards.shape[-1]
    future = torch.zeros_like(rewards)  # γ · w_{t+1} · H_{t+1}
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(width)):
        future[..., t] = running
        running = (rewards[..., t] + running) * mask[..., t]  # H_t
        running = gamma * w[..., t] * running  # what position t − 1 sees
    advantages = (rewards + future) if include_current else future
    if length_norm:
        remaining = mask.flip(-1).cumsum(-1).flip(-1)  # T − t + 1 on valid positions
        count = remaining if include_current else remaining - 1
        advantages = advantages / count.clamp(min=1)
    return advantages * mask


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries only (0 outside the mask)."""
    mask = mask.bool()
    picked = values[mask]
    if picked.numel() < 2:
        return torch.zeros_like(values)
    mean, var = picked.mean(), picked.var(unbiased=False)
    return ((values - mean) * torch.rsqrt(var + eps)).masked_fill(~mask, 0.0)


def prefix_weights(weights: Tensor, mask: Tensor) -> Tensor:
    """c_t = Π_{s<t} w_s: the exact importance weight of the prefix y_<t. ``[B, T]``."""
    log_w = weights.clamp(min=1e-30).log() * mask
    return (log_w.cumsum(-1) - log_w).exp()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    clip_eps: float | None,
) -> tuple[Tensor, Tensor]:
    """PPO-clipped surrogate per token (official ``_pg_loss``), differentiable in ``logprobs``.

        ρ_t = exp(log q_θ(y_t) − log q_old(y_t)) · w_t        (= q_θ / p̃ under mixing)
        L_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    At θ = θ_old, ∇L_t = −A_t w_t ∇ log q_θ(y_t): the importance-weighted policy gradient.

    Returns:
        ``(loss, clipped)``: per-token losses and where the clipped branch is the active one.
    """
    ratio = (logprobs - old_logprobs).exp() * weights
    unclipped = -advantages * ratio
    if clip_eps is None:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def single_step_kl(student_logits: Tensor, teacher_log_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q_θ(·|y_<t) ‖ p(·|y_<t)) exactly over the vocabulary: ``[N, V] -> [N]``."""
    return kl(torch.log_softmax(student_logits.float() / temperature, dim=-1), teacher_log_probs)


def minillm_token_losses(
    logprobs: Tensor,
    step_kl: Tensor | None,
    tokens: dict[str, Tensor],
    clip_eps: float | None,
    single_step_weight: float,
) -> tuple[Tensor, Metrics]:
    """Per-token MiniLLM loss on N sampled tokens (everything but the LM term).

        loss_t = c_t · max(−A_t ρ_t, −A_t clip(ρ_t)) + β · s_t · KL(q_θ(·|y_<t) ‖ p(·|y_<t))

    Args:
        logprobs: ``[N]`` log q_θ(y_t | y_<t) under the current parameters (with grad).
        step_kl: ``[N]`` single-step KL under the current parameters, or ``None`` (term off).
        tokens: the rollout buffer's per-token tensors ``[N]``: ``old_logprobs``, ``advantages``,
            ``ratio_weights`` (w_t), ``prefix_weights`` (c_t) and ``single_step_weights`` (s_t).
        clip_eps: PPO clip range (``None`` = no clipping).
        single_step_weight: β.
    """
    pg, clipped = policy_loss(
        logprobs, tokens["old_logprobs"], tokens["advantages"], tokens["ratio_weights"], clip_eps
    )
    losses = tokens["prefix_weights"] * pg
    metrics: Metrics = {"pg_loss": token_metric(pg), "clip_fraction": token_metric(clipped.float())}
    if step_kl is not None:
        losses = losses + single_step_weight * tokens["single_step_weights"] * step_kl
        metrics["single_step_kl"] = token_metric(step_kl)
    return losses, metrics


class SampledTokenLoss(Objective):
    """``minillm_token_losses`` as a token-level objective on the sampled tokens, so the engine
    (``kdtool.engine.token_loss_sum``) computes it chunk by chunk like any other: at most one
    ``[chunk, V]`` block of logits per model at a time. The labels are the sampled tokens y_t; the
    rollout buffer's per-token tensors ride along as per-token statistics (sliced per chunk).
    """

    name = "minillm-sampled-tokens"
    description = "MiniLLM's policy-gradient and single-step terms on sampled tokens (internal)."

    def __init__(self, options: MiniLLMOptions, tokens: dict[str, Tensor]) -> None:
        super().__init__(options)
        self.tokens = tokens  # [N] each

    def batch_stats(self, token_stats: dict[str, Tensor]) -> dict[str, Any]:
        return dict(self.tokens)

    def token_losses(
        self, student_logits: Tensor, teacher: TeacherSignal, labels: Tensor, stats: dict[str, Any]
    ) -> tuple[Tensor, Metrics]:
        o: MiniLLMOptions = self.options  # type: ignore[assignment]
        log_q = torch.log_softmax(student_logits.float() / o.temperature, dim=-1)  # [n, V]
        logprobs = log_q.gather(-1, labels[:, None]).squeeze(-1)  # log q_θ(y_t | y_<t)
        step_kl = kl(log_q, teacher.dense_log_probs())  # KL(q_θ(·|y_<t) ‖ p(·|y_<t))
        losses, metrics = minillm_token_losses(
            logprobs, step_kl if o.single_step else None, stats, o.clip_eps, o.single_step_weight
        )
        metrics.setdefault("single_step_kl", token_metric(step_kl))  # logged even when the term is off
        return losses, metrics


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


class MiniLLMOptions(ObjectiveOptions):
    # sampling
    alpha: float = Field(
        0.2, ge=0, le=1, description="Teacher-mix weight α: sample from α·p + (1−α)·q (paper & official 0.2)."
    )
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature τ (official 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the proposal (official 1 = off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the proposal (official 0 = off).")
    max_new_tokens: int = Field(
        256, gt=0, description="Max sampled tokens per response, also capped by max_length (official 256)."
    )
    rollout_batch_size: int = Field(
        256, gt=0, description="Rollouts collected per buffer (official 256 = 16/GPU × 16 GPUs)."
    )
    mini_batch_size: int | None = Field(
        None, gt=0, description="Rollouts per PPO micro-batch (default: --batch-size)."
    )
    inner_epochs: int = Field(4, gt=0, description="PPO epochs over each rollout buffer (official 4).")
    # rewards and advantages
    reward_scaling: float = Field(
        0.5, gt=0, description="Rewards are divided by this (official 0.5; paper: 1 = none)."
    )
    reward_clip: float | None = Field(
        100.0, gt=0, description="Clip scaled rewards to ±this (official 100; null = off)."
    )
    gamma: float = Field(
        0.95, ge=0, le=1, description="Discount γ of future rewards (official 0.95; paper 1)."
    )
    include_current_reward: bool = Field(
        True,
        description="Advantage R_t includes r_t (official) instead of R_{t+1} (paper; unbiased with single_step).",
    )
    length_norm: bool = Field(
        True, description="Divide the future reward by its number of terms (paper & official)."
    )
    whiten: bool = Field(
        True,
        description="Whiten advantages over the rollout buffer (official, per mini-batch there; paper: no).",
    )
    # PPO
    clip_eps: float | None = Field(
        0.2, gt=0, description="PPO clip range ε of the ratio q_θ/p̃ (official 0.2; null = no clipping)."
    )
    importance_weights: Literal["token", "per_decision", "none"] = Field(
        "token",
        description="Correct teacher-mixed sampling with the per-token w_t = q/p̃ (paper & official; biased "
        "beyond one token), exact per-decision prefix products (kdtool; unbiased), or not at all.",
    )
    # single-step term
    single_step: bool = Field(True, description="Add the exact single-step KL term (paper & official).")
    single_step_weight: float = Field(1.0, ge=0, description="Weight of the single-step term (official 1).")
    single_step_importance: bool = Field(
        False, description="Multiply the single-step term by w_t (paper) or not (official)."
    )
    # language-modelling term
    lm_loss: bool = Field(True, description="Add the LM loss L_PT on lm_data (paper & official).")
    lm_weight: float = Field(1.0, ge=0, description="Weight of L_PT (official lm_coef 1).")
    lm_kd_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="L_PT = (1−r)·CE + r·cross-entropy to the teacher (official kd_ratio 0.5).",
    )
    lm_data: str | None = Field(
        None,
        description="LM corpus: .txt (a document per line), JSONL with 'text', or instruction data "
        "(default: the training responses).",
    )
    lm_batch_size: int | None = Field(
        None, gt=0, description="LM examples per micro-batch (default: --batch-size)."
    )
    normalise_by: Literal["tokens", "sequences"] = Field(
        "tokens",
        description="Divide the loss by response tokens (official) or by sequences (the exact "
        "sequence-level gradient).",
    )


# --------------------------------------------------------------------------------------------
# The rollout buffer
# --------------------------------------------------------------------------------------------

TOKEN_KEYS = (
    "old_logprobs",
    "advantages",
    "ratio_weights",
    "prefix_weights",
    "single_step_weights",
    "rewards",
)


@dataclass
class Buffer:
    """Rollouts of one collection round, one entry per response, all on the CPU.

    ``prompts[i]`` / ``responses[i]`` are 1-D token ids; ``tokens[k][i]`` is the per-token
    quantity k ``[len(responses[i])]``; ``sequence_kl[i]`` the sequence reverse-KL estimate.
    """

    prompts: list[Tensor] = field(default_factory=list)
    responses: list[Tensor] = field(default_factory=list)
    tokens: dict[str, list[Tensor]] = field(default_factory=lambda: {k: [] for k in TOKEN_KEYS})
    sequence_kl: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.responses)

    def state(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "responses": self.responses,
            "tokens": self.tokens,
            "kl": self.sequence_kl,
        }

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` responses."""
        self.prompts, self.responses, self.sequence_kl = (
            self.prompts[:n],
            self.responses[:n],
            self.sequence_kl[:n],
        )
        self.tokens = {k: v[:n] for k, v in self.tokens.items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Buffer:
        return cls(state["prompts"], state["responses"], state["tokens"], state["kl"])


def prompts_of(batch: dict[str, Tensor]) -> list[Tensor]:
    """The prompt tokens of each row of a training batch (positions with label −100)."""
    keep = (batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()
    return [row[k] for row, k in zip(batch["input_ids"], keep, strict=True)]


def collate_rollouts(buffer: Buffer, rows: list[int], pad_id: int) -> dict[str, Tensor]:
    """A micro-batch in the trainer's layout: right-padded prompt + response, labels on the
    response (so ``labels[:, 1:] != -100`` selects the sampled tokens in row-major order), and
    the buffer's per-token tensors flattened in that same order as ``tok_<name>`` ``[N]``."""
    prompts, responses = [buffer.prompts[i] for i in rows], [buffer.responses[i] for i in rows]
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    targets = [
        torch.cat([torch.full_like(p, IGNORE_INDEX), r]) for p, r in zip(prompts, responses, strict=True)
    ]
    pad_sequence = torch.nn.utils.rnn.pad_sequence
    out = {
        "input_ids": pad_sequence(seqs, batch_first=True, padding_value=pad_id),
        "attention_mask": pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True),
        "labels": pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX),
    }
    for k in TOKEN_KEYS:
        out[f"tok_{k}"] = torch.cat([buffer.tokens[k][i] for i in rows])
    out["seq_kl"] = torch.stack([buffer.sequence_kl[i] for i in rows])
    out["seq_len"] = torch.tensor([r.numel() for r in responses], dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


class MiniLLM(Objective):
    name = "minillm"
    description = (
        "MiniLLM: on-policy sequence-level reverse KL (policy gradient, teacher mixing, PPO clip, LM loss)."
    )
    Options = MiniLLMOptions
    on_policy = True

    def __init__(self, options: ObjectiveOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._resume: dict[str, Any] | None = None  # set by load_state_dict, used by batches
        self._capture: Callable[[], dict[str, Any]] | None = None
        self._at_boundary: Callable[[], bool] | None = None
        self._boundary: dict[str, Any] | None = None

    @property
    def opt(self) -> MiniLLMOptions:
        return self.options  # type: ignore[return-value]

    # -- rollouts -> buffer ---------------------------------------------------------------

    def token_tensors(self, rollout: Any) -> dict[str, Tensor]:
        """The buffer's per-token tensors ``[B, T]`` for one ``Rollout`` (advantages not yet whitened)."""
        o = self.opt
        mask = rollout.response_mask.float()
        old = rollout.student_logprobs
        w = rollout.importance_weights if o.importance_weights != "none" else torch.ones_like(old)
        prefix = prefix_weights(w, mask) if o.importance_weights == "per_decision" else torch.ones_like(old)
        rewards = token_rewards(rollout.teacher_logprobs, old, mask, o.reward_scaling, o.reward_clip)
        adv = rewards_to_go(
            rewards,
            mask,
            o.gamma,
            o.include_current_reward,
            o.length_norm,
            weights=w if o.importance_weights == "per_decision" else None,
        )
        if o.importance_weights == "per_decision":
            single = prefix
        elif o.importance_weights == "token" and o.single_step_importance:
            single = w
        else:
            single = torch.ones_like(old)
        raw = (rollout.teacher_logprobs - old) * mask
        return {
            "old_logprobs": old,
            "advantages": adv,
            "ratio_weights": w,
            "prefix_weights": prefix,
            "single_step_weights": single,
            "rewards": raw,
        }

    def add_to_buffer(self, buffer: Buffer, rollout: Any) -> None:
        per_token = self.token_tensors(rollout)
        mask = rollout.response_mask
        # Sequence reverse-KL estimate Σ_t c_t KL_t with exact prefix weights: unbiased under mixing.
        w = rollout.importance_weights
        seq_kl = (prefix_weights(w, mask.float()) * rollout.step_kl * mask).sum(1)
        lengths = mask.sum(1).tolist()
        buffer.prompts += [
            ids[keep].cpu() for ids, keep in zip(rollout.prompt_ids, rollout.prompt_mask.bool(), strict=True)
        ]
        buffer.responses += list(rollout.response_ids[mask].cpu().split(lengths))
        for k in TOKEN_KEYS:  # flatten the valid tokens row-major, then cut per response
            buffer.tokens[k] += list(per_token[k][mask].float().cpu().split(lengths))
        buffer.sequence_kl += list(seq_kl.float().cpu().unbind())

    def finish_buffer(self, buffer: Buffer) -> None:
        """Whiten the advantages over all tokens of the buffer (the official code whitens each
        mini-batch, padding included; the buffer is the larger and cleaner sample)."""
        if not self.opt.whiten or not len(buffer):
            return
        lengths = [len(a) for a in buffer.tokens["advantages"]]
        flat = torch.cat(buffer.tokens["advantages"])
        white = masked_whiten(flat, torch.ones_like(flat, dtype=torch.bool))
        buffer.tokens["advantages"] = list(white.split(lengths))

    def collect(self, prompt_batches: Iterator[dict[str, Tensor]], ctx: Any) -> Buffer:
        """Sample ``rollout_batch_size`` responses (no grad, both models in eval mode)."""
        from kdtool.errors import UserError
        from kdtool.rollout import left_pad, sample

        o = self.opt
        if ctx.teacher is None:
            raise ValueError("minillm needs a live teacher (a sparse teacher cache cannot score samples)")
        tok = ctx.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Under FSDP2 every model call goes through the module the wrapper owns, and the loops
        # agree on their bounds over ranks (``rank_sync``), so that all ranks make the same forward
        # passes; without sharding, nothing is collective here and each rank stops on its own.
        sync = ctx.extras.get("rank_sync")
        calls = {
            "student_call": ctx.extras.get("student_call"),
            "teacher_call": ctx.extras.get("teacher_call"),
        }
        was_training = ctx.student.training
        ctx.student.eval()
        buffer = Buffer()
        try:
            while (
                sync.any(len(buffer) < o.rollout_batch_size) if sync else len(buffer) < o.rollout_batch_size
            ):
                prompts = prompts_of(next(prompt_batches))
                if any(len(p) == 0 for p in prompts):
                    raise UserError("minillm samples a response to each prompt: every example needs a prompt")
                ids, mask = left_pad(prompts, pad)
                limit = o.max_new_tokens
                if ctx.config is not None:
                    limit = max(1, min(limit, ctx.config.max_length - ids.shape[1]))
                with ctx.autocast():
                    rollout = sample(
                        ctx.student,
                        ids.to(ctx.device),
                        mask.to(ctx.device),
                        eos_token_id=tok.eos_token_id,
                        pad_token_id=pad,
                        max_new_tokens=limit,
                        teacher=ctx.teacher,
                        alpha=o.alpha,
                        temperature=o.temperature,
                        top_k=o.top_k,
                        top_p=o.top_p,
                        generator=ctx.generator,
                        vocab_size=ctx.vocab_size,
                        any_rank=sync.any if sync else None,
                        **calls,
                    )
                self.add_to_buffer(buffer, rollout)
        finally:
            ctx.student.train(was_training)
        if sync:  # a short last data batch can leave ranks with more rollouts: equal PPO plans
            buffer.truncate(sync.min(len(buffer)))
        self.finish_buffer(buffer)
        return buffer

    def schedule(self, n: int, batch_size: int, shuffle: torch.Generator) -> list[list[int]]:
        """Row indices of every PPO micro-batch: ``inner_epochs`` shuffled passes over the buffer."""
        out = []
        for _ in range(self.opt.inner_epochs):
            order = torch.randperm(n, generator=shuffle).tolist()
            out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
        return out

    # -- the trainer interface ------------------------------------------------------------

    def batches(self, loader: Iterable[dict[str, Tensor]], ctx: Any) -> Iterator[dict[str, Tensor]]:
        """Prompt batches → rollout buffer → ``inner_epochs`` × shuffled PPO micro-batches (each
        with an LM batch attached when the LM loss is on), then a fresh buffer, forever."""
        o = self.opt
        cfg = ctx.config
        seed = cfg.seed if cfg is not None else 0
        accum = cfg.grad_accum if cfg is not None else 1
        mini = o.mini_batch_size or (cfg.batch_size if cfg is not None else 8)
        shuffle = torch.Generator().manual_seed(seed + 7919 * (1 + _rank(ctx)))
        prompts = iter(loader)
        lm_loader = self._lm_loader(ctx) if o.lm_loss and o.lm_weight > 0 else None
        lm_batches = iter(lm_loader) if lm_loader is not None else None
        buffer, plan, cursor, served = Buffer(), [], 0, 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            buffer, plan, cursor = Buffer.from_state(state["buffer"]), state["plan"], state["cursor"]
            shuffle.set_state(state["shuffle"])
            if ctx.generator is not None and state.get("generator") is not None:
                ctx.generator.set_state(state["generator"])
            if lm_loader is not None and state.get("lm") is not None:
                lm_loader.load_state_dict(state["lm"])

        def capture() -> dict[str, Any]:
            return {
                "buffer": buffer.state(),
                "plan": plan,
                "cursor": cursor,
                "shuffle": shuffle.get_state(),
                "generator": ctx.generator.get_state() if ctx.generator is not None else None,
                "lm": lm_loader.state_dict() if lm_loader is not None else None,
            }

        def at_boundary() -> bool:
            return served % accum == 0

        self._capture, self._at_boundary = capture, at_boundary
        while True:
            if at_boundary():  # a new optimizer step starts: where an interrupted step resumes from
                self._boundary = capture()
            if cursor >= len(plan):
                buffer = self.collect(prompts, ctx)
                plan, cursor = self.schedule(len(buffer), mini, shuffle), 0
            batch = collate_rollouts(buffer, plan[cursor], _pad_id(ctx))
            if lm_batches is not None:
                batch.update({f"lm_{k}": v for k, v in next(lm_batches).items()})
            cursor += 1
            served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Rollout buffer, position in it and RNG states as of the last optimizer-step boundary
        (the trainer saves between steps; after an interrupt, the interrupted step is replayed)."""
        if self._capture is None or self._at_boundary is None:
            return {}
        return self._capture() if self._at_boundary() else (self._boundary or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state or None

    def micro_batch_loss(self, ctx: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Metrics]:
        """``(loss_sum, count, metrics)`` of one PPO micro-batch (+ its LM batch).

        count = response tokens (``normalise_by=tokens``) or sequences; the trainer divides the
        accumulated gradient by the summed count once.
        """
        from kdtool.engine import token_loss_sum
        from kdtool.models import hidden_states, output_head
        from kdtool.steps import target_mask, teacher_signal, to_device

        o = self.opt
        batch = to_device(batch, ctx.device)
        seqs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        labels, mask = target_mask(seqs)
        targets = labels[mask]  # [N] the sampled tokens, row-major
        teacher = teacher_signal(self, ctx, seqs, mask)
        tokens = {k: batch[f"tok_{k}"].float() for k in TOKEN_KEYS}
        with ctx.autocast():
            hidden = hidden_states(ctx.student, seqs["input_ids"], seqs["attention_mask"])[:, :-1][mask]
            loss_sum, metrics = token_loss_sum(
                SampledTokenLoss(o, tokens),
                hidden,
                output_head(ctx.student),
                teacher,
                targets,
                ctx.vocab_size,
                ctx.chunk_size,
            )
        n_seq = torch.tensor(float(batch["seq_kl"].numel()), device=ctx.device)
        count = mask.sum() if o.normalise_by == "tokens" else n_seq
        metrics.update(
            rkl=(batch["seq_kl"].sum(), n_seq),
            response_length=(batch["seq_len"].sum(), n_seq),
            reward=token_metric(tokens["rewards"]),
            importance_weight=token_metric(tokens["ratio_weights"]),
        )
        if o.lm_loss and o.lm_weight > 0 and "lm_input_ids" in batch:
            lm_sum, lm_n = self.lm_terms(ctx, batch)
            # L_PT is a mean over its own tokens (official), weighted against the rollout count.
            loss_sum = loss_sum + o.lm_weight * lm_sum / lm_n.clamp(min=1) * count
            metrics["lm_loss"] = (lm_sum.detach(), lm_n)
        return loss_sum.float(), count, metrics

    # -- the LM term ----------------------------------------------------------------------

    def lm_objective(self) -> Objective:
        from kdtool.registry import get_objective

        r = self.opt.lm_kd_ratio
        return get_objective("fkl", ce_weight=1 - r) if r > 0 else get_objective("sft")

    def lm_terms(self, ctx: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        from kdtool.steps import token_micro_batch_loss

        lm = {k[3:]: v for k, v in batch.items() if k.startswith("lm_")}
        lm_sum, lm_n, _ = token_micro_batch_loss(self.lm_objective(), ctx, lm)
        return lm_sum, lm_n.to(lm_sum.device).float()

    def _lm_loader(self, ctx: Any) -> Any:
        from kdtool.data import BatchLoader, TokenizedDataset

        cfg = ctx.config
        size = self.opt.lm_batch_size or (cfg.batch_size if cfg is not None else 8)
        dist = ctx.extras.get("dist")
        rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
        if self.opt.lm_data:
            max_length = cfg.max_length if cfg is not None else 512
            examples = load_lm_examples(self.opt.lm_data)
            dataset = TokenizedDataset(
                examples, ctx.tokenizer, max_length, getattr(cfg, "max_prompt_length", None)
            )
        else:
            dataset = ctx.extras.get("train_dataset")
            if dataset is None:
                raise ValueError("minillm's LM loss needs lm_data or the trainer's training set")
        seed = (cfg.seed if cfg is not None else 0) + 1  # its own order, not the prompts'
        return BatchLoader(dataset, size, seed, rank=rank, world=world)


def load_lm_examples(path: str | Path) -> list[Any]:
    """An LM corpus as examples whose whole text is the target.

    ``.txt``: one document per non-empty line; JSONL/JSON with a ``text`` field: one document per
    record; anything else is read as instruction data (prompt masked, response trained).
    """
    from kdtool.data import Example, load_examples
    from kdtool.errors import UserError
    from kdtool.files import json_records, read_text

    path = Path(path)
    if not path.is_file():
        raise UserError(f"lm_data file not found: {path}")
    if path.suffix == ".txt":
        docs = [line for line in read_text(path).splitlines() if line.strip()]
    else:
        records = list(json_records(path))
        first = records[0][1] if records else None
        if not (isinstance(first, dict) and "text" in first):
            return load_examples(path)
        docs = []
        for where, record in records:
            if not (isinstance(record, dict) and isinstance(record.get("text"), str)):
                raise UserError(f"{where}: expected an object with a string field 'text' (as line 1)")
            docs.append(record["text"])
    if not docs:
        raise UserError(f"{path}: no documents found")
    return [Example(prompt="", response=d, index=i) for i, d in enumerate(docs)]


def _rank(ctx: Any) -> int:
    dist = ctx.extras.get("dist") if ctx.extras else None
    return dist.rank if dist is not None else 0


def _pad_id(ctx: Any) -> int:
    tok = ctx.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


__all__ = [
    "MiniLLM",
    "MiniLLMOptions",
    "masked_whiten",
    "minillm_token_losses",
    "policy_loss",
    "prefix_weights",
    "rewards_to_go",
    "single_step_kl",
    "token_rewards",
]
