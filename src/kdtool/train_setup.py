"""Everything the training loop needs before its first step: data, models, the step context, the
optimizer and its schedule. Each ``setup_*`` helper does one thing and is called once per run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdtool import distributed
from kdtool.chat import end_of_turn_ids
from kdtool.config import DistillConfig
from kdtool.context import RunSettings, StepContext
from kdtool.data import BatchLoader, LoadReport, TokenizedDataset, load_examples, split_examples
from kdtool.distributed import DistInfo
from kdtool.models import compute_dtype, load_model, load_tokenizer, shared_vocab_size
from kdtool.objective import Objective
from kdtool.onpolicy import RolloutStep
from kdtool.steps import Step, TokenStep


@dataclass
class Models:
    """The student (trainable), the teacher (eval mode, no grad) and their shared vocabulary, plus
    the sharded teacher's wrapper under ``--fsdp-teacher`` (every teacher call goes through it)."""

    student: Any
    teacher: Any | None
    vocab_size: int
    teacher_forward: nn.Module | None = None


def make_step(objective: Objective[Any]) -> Step:
    """The rollout step for objectives that learn from the student's samples, else the token step."""
    return RolloutStep(objective) if objective.needs_rollouts else TokenStep(objective)


def setup_data(
    cfg: DistillConfig, tokenizer: Any
) -> tuple[TokenizedDataset, TokenizedDataset | None, LoadReport]:
    report = LoadReport()
    kw: dict[str, Any] = dict(
        prompt_field=cfg.prompt_field,
        response_field=cfg.response_field,
        skip_bad_lines=cfg.skip_bad_lines,
        template=cfg.prompt_template(),
        report=report,
    )
    examples = load_examples(cfg.data, **kw, prompts_only=cfg.all_responses_sampled)
    if cfg.eval_data:
        train, held = examples, load_examples(cfg.eval_data, **kw)
    else:
        train, held = split_examples(examples, cfg.eval_fraction, cfg.seed)
    make = lambda exs: TokenizedDataset(exs, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.template)  # noqa: E731
    return make(train), (make(held) if held else None), report


def setup_models(
    cfg: DistillConfig, tokenizer: Any, device: torch.device, info: DistInfo = DistInfo()
) -> Models:
    """Load the student and, unless a cache replaces it, the teacher (bf16 on CUDA unless
    ``--dtype float32``); a teacher given to an objective that does not train on it (sft) still
    measures held-out KL."""
    trust = cfg.trust_remote_code
    student = load_model(cfg.student, device, trust_remote_code=trust)
    teacher = teacher_forward = teacher_tok = None
    if cfg.teacher and not cfg.teacher_cache:
        teacher_tok = load_tokenizer(cfg.teacher, trust)
        teacher_dtype = compute_dtype(cfg.dtype, device) or torch.float32
        if cfg.fsdp_teacher and info.enabled:
            teacher_forward = distributed.load_sharded_teacher(
                cfg.teacher, teacher_dtype, info, device, trust
            )
            teacher = teacher_forward.teacher
        else:
            budget = teacher_memory_budget(student, device) if cfg.teacher_device_map == "auto" else None
            teacher = load_model(
                cfg.teacher,
                device,
                teacher_dtype,
                cfg.teacher_device_map,
                trust_remote_code=trust,
                max_memory=budget,
            )
        teacher = teacher.eval().requires_grad_(False)
    vocab = shared_vocab_size(teacher_tok, tokenizer, teacher, student)
    return Models(student, teacher, vocab, teacher_forward)


def teacher_memory_budget(student: nn.Module, device: torch.device) -> dict[int | str, int] | None:
    """``max_memory`` for ``--teacher-device-map auto``: accelerate fills GPU 0 first, but the
    student trains on its device, so that one is offered only what remains after the student's
    gradients and AdamW moments (3 × its fp32 weights, already loaded) and a quarter of the
    device for activations; the other GPUs get their free memory, then CPU RAM.
    """
    if device.type != "cuda":
        return None
    import psutil

    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    here = device.index if device.index is not None else torch.cuda.current_device()
    budget: dict[int | str, int] = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        budget[i] = max(0, free - 3 * weights - total // 4) if i == here else int(free * 0.95)
    budget["cpu"] = int(psutil.virtual_memory().available * 0.9)
    return budget


def setup_teacher_cache(cfg: DistillConfig, tokenizer: Any) -> Any | None:
    if not cfg.teacher_cache:
        return None
    from kdtool.cache import TeacherCache

    return TeacherCache.open(cfg.teacher_cache, tokenizer=tokenizer, config=cfg)


def setup_context(
    cfg: DistillConfig,
    models: Models,
    tokenizer: Any,
    device: torch.device,
    info: DistInfo,
    train_ds: TokenizedDataset,
) -> StepContext:
    """The step context of this rank (the sharded calls are attached by ``attach_sharding``)."""
    return StepContext(
        student=models.student,
        teacher=models.teacher,
        teacher_cache=setup_teacher_cache(cfg, tokenizer),
        tokenizer=tokenizer,
        vocab_size=models.vocab_size,
        device=device,
        stop_token_ids=tuple(end_of_turn_ids(tokenizer)),
        chunk_size=cfg.chunk_size,
        autocast_dtype=compute_dtype(cfg.dtype, device),
        generator=torch.Generator(device=device).manual_seed(cfg.seed + info.rank),
        settings=RunSettings.of(cfg),
        train_dataset=train_ds,
        dist=info,
    )


def attach_sharding(
    ctx: StepContext, step_module: nn.Module, models: Models, info: DistInfo, device: torch.device
) -> None:
    """Under FSDP2 every call of a sharded model goes through the module its root owns (hooks
    gather the parameters there), and loops around such calls agree on their bounds over ranks."""
    sharded = distributed.is_sharded(step_module)
    if sharded:
        ctx.student_call = step_module
    if models.teacher_forward is not None:
        ctx.teacher_forward = models.teacher_forward
        ctx.teacher_call = models.teacher_forward.model_call  # type: ignore[assignment]
    if sharded or models.teacher_forward is not None:
        ctx.rank_sync = distributed.RankSync(info, device)


def total_steps(cfg: DistillConfig, loader: BatchLoader) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * loader.batches_per_epoch() / cfg.grad_accum))


def setup_optimizer(cfg: DistillConfig, student: Any, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases and norms) with warm-up then cosine / linear / constant."""
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
