"""The one training loop, for every objective.

batches → (rollouts, if the objective makes them) → teacher signal → student forward →
objective loss sum → backward (gradient accumulation) → divide by the step's token count →
clip → AdamW → warmup + cosine → periodic eval → atomic checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import nn

from kdtool import checkpoint, distributed, lora
from kdtool.config import DistillConfig, read_config_file
from kdtool.data import BatchLoader, LoadReport, Template, TokenizedDataset, load_examples, split_examples
from kdtool.distributed import DistInfo
from kdtool.errors import UserError
from kdtool.models import load_model, load_tokenizer, shared_vocab_size
from kdtool.objective import Objective
from kdtool.progress import TrainProgress
from kdtool.registry import get_objective
from kdtool.steps import StepContext, eval_micro_batch
from kdtool.trackers import Trackers, require_installed

# Fields that make a run *this* run: resuming with any of them changed is refused.
IDENTITY_FIELDS = (
    "objective",
    "objective_options",
    "student",
    "teacher",
    "teacher_cache",
    "data",
    "seed",
    "batch_size",
    "grad_accum",
    "lr",
    "max_length",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)


@dataclass
class Run:
    """Paths of a run directory."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    eval_time: float = 0.0  # seconds of `elapsed` spent in held-out evaluation
    history: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def template_of(cfg: DistillConfig) -> Template:
    default = Template()
    return Template(cfg.template_no_input or default.no_input, cfg.template_with_input or default.with_input)


def prepare_output(
    cfg: DistillConfig, run: Run, resume: bool, overwrite: bool, console: Console | None = None
) -> bool:
    """Decide between a fresh run and a resume; refuse to clobber another run. Returns ``resuming``.

    ``--resume`` on a run that wrote its config but no checkpoint yet (killed during start-up)
    starts it afresh, with a notice on ``console``, when the config matches.
    """
    if run.root.exists() and any(run.root.iterdir()):
        if overwrite:
            shutil.rmtree(run.root)
        elif resume:
            if not run.config.is_file():
                raise UserError(f"--resume: {run.root} holds no kdtool run to resume (no config.yaml)")
            saved = read_config_file(run.config)
            now = cfg.model_dump(mode="json")
            changed = [k for k in IDENTITY_FIELDS if saved.get(k) != now.get(k)]
            if changed:
                raise UserError(f"--resume: {run.root} was started with different {', '.join(changed)}")
            if checkpoint.latest(run.checkpoints) is None:
                if console is not None:
                    console.print(
                        f"--resume: {run.root} stopped before its first checkpoint; starting it afresh"
                    )
                return False
            return True
        elif run.config.is_file():
            raise UserError(
                f"output directory {run.root} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        else:
            raise UserError(
                f"output directory {run.root} is not empty; pass --overwrite to replace its contents"
            )
    run.root.mkdir(parents=True, exist_ok=True)
    return False


def setup_models(
    cfg: DistillConfig, tokenizer: Any, device: torch.device, info: DistInfo = DistInfo()
) -> tuple[Any, Any | None, int, nn.Module | None]:
    """Student (trainable), teacher (eval mode, no grad) and their shared vocabulary, plus the
    sharded teacher's wrapper under ``--fsdp-teacher`` (every teacher call must go through it).

    The teacher is bf16 on CUDA unless ``--dtype float32`` asks for full precision.
    """
    trust = cfg.trust_remote_code
    student = load_model(cfg.student, device, trust_remote_code=trust)
    teacher = teacher_forward = None
    teacher_tok = None
    # A teacher given to an objective that does not train on it (sft) still measures held-out KL.
    if cfg.teacher and not cfg.teacher_cache:
        teacher_tok = load_tokenizer(cfg.teacher, trust)
        low = device.type == "cuda" and cfg.dtype != "float32"
        teacher_dtype = torch.bfloat16 if low else torch.float32
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
    return student, teacher, vocab, teacher_forward


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


def get_objective_class(cfg: DistillConfig) -> type[Objective]:
    from kdtool.registry import get_class

    return get_class(cfg.objective)


def setup_data(
    cfg: DistillConfig, tokenizer: Any
) -> tuple[TokenizedDataset, TokenizedDataset | None, LoadReport]:
    report = LoadReport()
    kw = dict(
        prompt_field=cfg.prompt_field,
        response_field=cfg.response_field,
        skip_bad_lines=cfg.skip_bad_lines,
        template=template_of(cfg),
        report=report,
    )
    examples = load_examples(cfg.data, **kw)  # type: ignore[arg-type]
    if cfg.eval_data:
        train, held = examples, load_examples(cfg.eval_data, **kw)  # type: ignore[arg-type]
    else:
        train, held = split_examples(examples, cfg.eval_fraction, cfg.seed)
    make = lambda exs: TokenizedDataset(exs, tokenizer, cfg.max_length, cfg.max_prompt_length)  # noqa: E731
    return make(train), (make(held) if held else None), report


def setup_teacher_cache(cfg: DistillConfig, tokenizer: Any) -> Any | None:
    if not cfg.teacher_cache:
        return None
    from kdtool.cache import TeacherCache

    return TeacherCache.open(cfg.teacher_cache, tokenizer=tokenizer, config=cfg)


def total_steps(cfg: DistillConfig, loader: BatchLoader) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * loader.batches_per_epoch() / cfg.grad_accum))


def setup_optimizer(cfg: DistillConfig, student: Any, steps: int) -> tuple[torch.optim.Optimizer, Any]:
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


def autocast_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class StepModule(nn.Module):
    """The student plus one micro-batch's loss as a module, so that DistributedDataParallel
    sees a real ``forward`` (its reducer prepares there) whatever the objective computes."""

    def __init__(self, student: nn.Module, objective: Objective, ctx: StepContext):
        super().__init__()
        self.student = student  # the only registered submodule: the teacher is never synced
        self.objective, self.ctx = objective, ctx

    def forward(
        self,
        batch: dict[str, torch.Tensor] | None = None,
        step: Callable[[StepContext, dict[str, torch.Tensor]], Any] | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """The objective's ``(loss_sum, n_tokens, metrics)``; or ``step(ctx, batch)`` when given, so
        that evaluation runs through the (possibly sharded) module too; without a batch,
        ``student(**model_kwargs)`` (a rollout step), so that under FSDP2 every student call goes
        through this root unit."""
        if batch is None:
            return self.student(**model_kwargs)
        if step is None:
            return self.objective.micro_batch_loss(self.ctx, batch)
        return step(self.ctx, batch)


def wrap_for_ranks(module: StepModule, info: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP by default, FSDP2 with ``--fsdp``; a single process runs the module as it is."""
    if not info.enabled:
        return module
    if fsdp:
        return distributed.shard(module, module.student)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def is_sharded(module: nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")


def train_step(
    objective: Objective,
    ctx: StepContext,
    micro_batches: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: DistillConfig,
    step_module: nn.Module | None = None,
    info: DistInfo = DistInfo(),
) -> tuple[float, int, dict[str, float]]:
    """One optimizer step over ``grad_accum`` micro-batches (on every rank). Returns (loss, tokens, metrics)."""
    ctx.student.train()
    module = step_module or StepModule(ctx.student, objective, ctx)
    optimizer.zero_grad(set_to_none=True)
    loss_total, tokens = 0.0, 0
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i in range(cfg.grad_accum):
        # Under DDP/FSDP, gradients are reduced once, on the last micro-batch.
        with distributed.set_gradient_sync(module, i == cfg.grad_accum - 1):
            loss_sum, n_tokens, metrics = module(next(micro_batches))
            loss_sum.backward()
        loss_total += float(loss_sum.detach())
        tokens += int(n_tokens)
        for name, (total, count) in metrics.items():
            sums[name][0] += float(total)
            sums[name][1] += float(count)
    names = sorted(sums)
    reduced = distributed.all_reduce_sum(
        [loss_total, float(tokens)] + [v for n in names for v in sums[n]], info, ctx.device
    )
    loss_total, tokens = reduced[0], int(reduced[1])
    # Normalise once, by the token count of the whole step over all ranks: batch 1 × accum 8
    # == batch 8 × accum 1 == 2 ranks × batch 4. DDP has averaged over ranks, hence × world.
    scale = info.world / max(tokens, 1)
    for p in ctx.student.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    out = {n: reduced[2 + 2 * i] / max(reduced[3 + 2 * i], 1.0) for i, n in enumerate(names)}
    if cfg.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(ctx.student.parameters(), cfg.max_grad_norm)
        out["grad_norm"] = distributed.as_float(norm)
    optimizer.step()
    scheduler.step()
    return loss_total / max(tokens, 1), tokens, out


def eval_probes(ctx: StepContext, objective: Objective, cfg: DistillConfig) -> dict[str, Objective]:
    """What held-out evaluation measures: student cross-entropy on the references (always), forward
    and reverse KL to a live teacher, and the objective's own loss for token-level objectives."""
    from kdtool.registry import get_objective as make

    probes: dict[str, Objective] = {"ce": make("sft")}
    if ctx.teacher is not None:
        probes.update(fkl=make("fkl"), rkl=make("rkl"))
        if not objective.on_policy:
            probes["loss"] = objective
    elif ctx.teacher_cache is not None and not cfg.eval_data:
        probes["loss"] = objective  # the held-out split comes from --data, so the cache covers it
    return probes


@torch.no_grad()
def evaluate(
    ctx: StepContext,
    objective: Objective,
    dataset: TokenizedDataset | None,
    cfg: DistillConfig,
    forward: nn.Module | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Held-out metrics ``eval_<probe>`` (see ``eval_probes``), token-weighted over the batches.

    Each batch costs one teacher and one student forward, shared by every probe. ``forward`` (a
    ``StepModule``, possibly FSDP-sharded) runs them; by default the plain student.
    ``max_batches`` (default ``cfg.eval_batches``, else all) bounds the batches read.
    """
    if dataset is None:
        return {}
    probes = eval_probes(ctx, objective, cfg)
    step = partial(eval_micro_batch, probes)
    ctx.student.eval()
    sums: dict[str, float] = defaultdict(float)
    tokens = 0
    loader = BatchLoader(dataset, cfg.batch_size, seed=0, shuffle=False)
    limit = min(max_batches or cfg.eval_batches or loader.batches_per_epoch(), loader.batches_per_epoch())
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        loss_sums, n = step(ctx, batch) if forward is None else forward(batch, step)
        for name, loss_sum in loss_sums.items():
            sums[name] += float(loss_sum)
        tokens += int(n)
    return {f"eval_{k}": v / max(tokens, 1) for k, v in sums.items()}


def rank_state(objective: Objective, ctx: StepContext) -> dict[str, Any]:
    """What differs between ranks besides the RNGs: the sampling generator (seeded per rank) and
    the objective's own state (minillm: this rank's rollout buffer and its position in it)."""
    out: dict[str, Any] = {}
    if ctx.generator is not None:
        out["generator"] = ctx.generator.get_state()
    if hasattr(objective, "state_dict"):
        out["objective"] = objective.state_dict()
    return out


def trainer_state(
    state: TrainState,
    loader_state: dict[str, int],
    rng: list[dict[str, Any]],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    ranks: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint's trainer state; ``ranks`` holds every rank's ``rank_state``, rank 0's also at
    the top level (where a single-process checkpoint has always kept it)."""
    out = {
        "step": state.step,
        "tokens": state.tokens,
        "elapsed": state.elapsed,
        "eval_time": state.eval_time,
        "loader": loader_state,
        "rng": rng,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        **ranks[0],
    }
    if len(ranks) > 1:
        out["ranks"] = ranks
    return out


def restore(
    saved: dict[str, Any],
    state: TrainState,
    loader: BatchLoader,
    scheduler: Any,
    objective: Objective,
    ctx: StepContext,
    info: DistInfo = DistInfo(),
) -> None:
    state.step, state.tokens, state.elapsed = saved["step"], saved["tokens"], saved["elapsed"]
    state.eval_time = saved.get("eval_time", 0.0)  # absent from checkpoints of older versions
    loader.load_state_dict(saved["loader"])
    scheduler.load_state_dict(saved["scheduler"])
    rngs = saved["rng"]
    if len(rngs) != info.world:
        raise UserError(
            f"--resume: the checkpoint was written by {len(rngs)} process(es); relaunch with that many"
        )
    checkpoint.set_rng_state(rngs[info.rank])
    mine = saved["ranks"][info.rank] if "ranks" in saved else saved
    if ctx.generator is not None and "generator" in mine:
        ctx.generator.set_state(mine["generator"])
    if hasattr(objective, "load_state_dict") and "objective" in mine:
        objective.load_state_dict(mine["objective"])


def log(run: Run, record: dict[str, Any], trackers: Trackers | None = None) -> None:
    """One line of ``metrics.jsonl``, forwarded to the ``--report-to`` trackers."""
    with run.metrics.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if trackers is not None:
        trackers.log(record)


def train(
    cfg: DistillConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None
) -> Path:
    """Run a distillation described by ``cfg``; returns the run directory (final student inside).

    Under torchrun/accelerate every rank runs this; only rank 0 writes files.
    """
    console = console or Console(stderr=True)
    require_installed(cfg.report_to)  # before anything slow, on every rank alike
    if cfg.lora:
        lora.require_peft_installed()
    if cfg.teacher_device_map and distributed.world_size_from_env() > 1:
        # Every rank would spread a whole teacher over all GPUs of the node (N copies fighting for
        # the same memory); --fsdp-teacher shards one teacher over the ranks instead.
        raise UserError(
            "--teacher-device-map is for one process; under torchrun with several processes use --fsdp-teacher"
        )
    info, device = distributed.setup(cfg.device, cfg.dist_timeout_minutes)
    try:
        return _train(cfg, resume, overwrite, console, info, device)
    finally:
        distributed.teardown(info)


def _train(
    cfg: DistillConfig, resume: bool, overwrite: bool, console: Console, info: DistInfo, device: torch.device
) -> Path:
    run = Run(Path(cfg.output))
    decision: bool | UserError = False
    if info.is_main:
        try:
            decision = prepare_output(cfg, run, resume, overwrite, console)
        except UserError as exc:
            decision = exc
    decision = distributed.broadcast_object(decision, info)
    if isinstance(decision, UserError):
        raise decision
    resuming = decision
    seed_everything(cfg.seed)
    objective = get_objective(cfg.objective, **cfg.objective_options)
    tokenizer = load_tokenizer(cfg.student, cfg.trust_remote_code)
    # Data first: a malformed line should stop the run before a large model is loaded.
    train_ds, eval_ds, report = setup_data(cfg, tokenizer)
    student, teacher, vocab, teacher_forward = setup_models(cfg, tokenizer, device, info)
    # LoRA layers go into `student` in place: everything below trains the same module; the
    # PeftModel around it only saves and loads the adapter.
    adapter = lora.apply_lora(student, cfg) if cfg.lora else None
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    loader = BatchLoader(train_ds, cfg.batch_size, cfg.seed, rank=info.rank, world=info.world)
    steps = total_steps(cfg, loader)
    ctx = StepContext(
        student=student,
        teacher=teacher,
        teacher_cache=setup_teacher_cache(cfg, tokenizer),
        tokenizer=tokenizer,
        vocab_size=vocab,
        device=device,
        chunk_size=cfg.chunk_size,
        autocast_dtype=autocast_dtype(cfg, device),
        generator=torch.Generator(device=device).manual_seed(cfg.seed + info.rank),
        config=cfg,
        extras={"train_dataset": train_ds, "dist": info},
    )
    # Shard/wrap before the optimizer exists: FSDP2 replaces the parameters with DTensors.
    step_module = wrap_for_ranks(StepModule(student, objective, ctx), info, device, cfg.fsdp)
    sharded = is_sharded(step_module)
    # Every call of a sharded model goes through the module its FSDP2 root owns (hooks gather the
    # parameters there), and loops around such calls agree on their bounds across ranks.
    if sharded:
        ctx.extras["student_call"] = step_module
    if teacher_forward is not None:
        ctx.extras["teacher_forward"] = teacher_forward
        ctx.extras["teacher_call"] = teacher_forward.model_call  # type: ignore[attr-defined]
    if sharded or teacher_forward is not None:
        ctx.extras["rank_sync"] = distributed.RankSync(info, device)
    # With anything sharded, evaluation is a collective: every rank runs it, rank 0 logs.
    eval_everywhere = sharded or "teacher_forward" in ctx.extras
    eval_module = getattr(step_module, "module", step_module)  # DDP's inner module: no sync in eval
    optimizer, scheduler = setup_optimizer(cfg, student, steps)
    state = TrainState()
    main = info.is_main
    # Only rank 0 reports; a resumed run opens a new tracker run that continues at its step.
    # Opened before config.yaml is written, so a tracker that cannot start leaves no run behind.
    trackers = Trackers()
    if main:
        trackers = Trackers.open(cfg.report_to, run.root, cfg.model_dump(mode="json"), config_yaml)
    if resuming:
        last = checkpoint.latest(run.checkpoints)
        assert last is not None
        saved = checkpoint.load_state(last)
        weights = checkpoint.load_student_state(last)
        if adapter is not None:
            lora.load_adapter_state(adapter, weights)
            optimizer.load_state_dict(saved["optimizer"])
        else:
            distributed.load_full_state(student, optimizer, weights, saved["optimizer"], sharded)
        restore(saved, state, loader, scheduler, objective, ctx, info)
        if main:
            console.print(f"resuming {run.root} from {last.name}")
    elif main:
        run.config.write_text(config_yaml)
        run.metrics.write_text("")
        start = {
            "event": "start",
            "examples": len(train_ds),
            "eval_examples": len(eval_ds or []),
            "truncated": train_ds.num_truncated,
            "bad_lines": len(report.bad_lines),
            "steps": steps,
            "world_size": info.world,
            "strategy": ("fsdp" if sharded else "ddp") if info.enabled else "single",
            "teacher_sharded": "teacher_forward" in ctx.extras,
            "trainable_parameters": lora.trainable_parameters(student)[0],
        }
        log(run, start)
    eval_every, eval_batches = cfg.eval_schedule(steps, held_out_batches(cfg, eval_ds))
    save_every = cfg.save_every or max(1, steps // 5)
    micro_batches = objective.batches(loader, ctx)
    # Snapshot taken at each step's start: an interrupted step is replayed exactly on resume.
    snapshot = (loader.state_dict(), checkpoint.rng_state())

    def save_checkpoint() -> Path:
        rngs = distributed.gather_objects(snapshot[1], info)  # every rank's RNG, restored per rank
        ranks = distributed.gather_objects(rank_state(objective, ctx), info)
        model_state = distributed.full_model_state(student, info, sharded)  # collectives under FSDP
        optim_state = distributed.full_optimizer_state(student, optimizer, sharded)
        where = run.checkpoints / f"step-{state.step:06d}"
        if main:
            ts = trainer_state(state, snapshot[0], rngs, optim_state, scheduler, ranks)
            # A LoRA checkpoint holds the adapter, not the frozen base.
            saver = student if adapter is None else adapter
            where = checkpoint.save(
                run.checkpoints, state.step, saver, ts, config_yaml, cfg.keep_checkpoints, model_state
            )
        distributed.barrier(info)
        return where

    def evaluate_and_log() -> None:
        began = time.perf_counter()
        if eval_everywhere:  # every rank takes part in the sharded forwards; rank 0 logs
            metrics = evaluate(ctx, objective, eval_ds, cfg, eval_module, eval_batches)
        else:  # no collectives inside: the other ranks wait at the barrier
            metrics = evaluate(ctx, objective, eval_ds, cfg, max_batches=eval_batches) if main else {}
        if main:
            log(run, {"step": state.step, **metrics}, trackers)
        distributed.barrier(info)
        state.eval_time += time.perf_counter() - began
        state.elapsed = time.perf_counter() - started

    window: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter() - state.elapsed  # `elapsed` (and `eval_time`) carry over a resume
    progress = TrainProgress(total=steps, enabled=cfg.progress and main, console=console, done=state.step)
    try:
        if not resuming:
            evaluate_and_log()
        with progress:
            while state.step < steps:
                loss, tokens, metrics = train_step(
                    objective, ctx, micro_batches, optimizer, scheduler, cfg, step_module, info
                )
                state.step += 1
                state.tokens += tokens
                state.elapsed = time.perf_counter() - started
                snapshot = (loader.state_dict(), checkpoint.rng_state())
                window["loss"].append(loss)
                window["tokens"].append(tokens)
                for k, v in metrics.items():
                    window[k].append(v)
                progress.update(state.step, loss, state.tokens / max(state.elapsed, 1e-9))
                if main and (state.step % cfg.log_every == 0 or state.step == steps):
                    record = {k: (sum(v) if k == "tokens" else sum(v) / len(v)) for k, v in window.items()}
                    speed = state.tokens / max(state.elapsed, 1e-9)
                    lr = scheduler.get_last_lr()[0]
                    log(
                        run,
                        {
                            "step": state.step,
                            "lr": lr,
                            "elapsed": state.elapsed,
                            "tokens_per_s": speed,
                            **record,
                        },
                        trackers,
                    )
                    window.clear()
                if state.step % eval_every == 0 or state.step == steps:
                    evaluate_and_log()
                if state.step % save_every == 0 and state.step < steps:
                    save_checkpoint()
    except KeyboardInterrupt:
        where = save_checkpoint()
        if main:
            console.print(f"interrupted: saved {where} (continue with --resume)")
        raise
    finally:
        trackers.close()  # every record went out inside the loop (the last eval included)
    save_checkpoint()
    final_state = distributed.full_model_state(student, info, sharded)
    if main:
        finish(run, cfg, student, tokenizer, template_of(cfg), state, train_ds, report, final_state, adapter)
    distributed.barrier(info)
    return run.root


def held_out_batches(cfg: DistillConfig, dataset: TokenizedDataset | None) -> int:
    """Batches of ``--batch-size`` in the held-out set (0 without one)."""
    return math.ceil(len(dataset) / cfg.batch_size) if dataset else 0


def student_device(student: Any) -> torch.device:
    try:
        return next(student.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def peak_memory(device: torch.device | None = None) -> dict[str, float]:
    """This process's peak resident memory, and peak CUDA allocation on ``device`` when it is a GPU (MB)."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device is not None and device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def finish(
    run: Run,
    cfg: DistillConfig,
    student: Any,
    tokenizer: Any,
    template: Template,
    state: TrainState,
    train_ds: TokenizedDataset,
    report: LoadReport,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter: Any | None = None,
) -> None:
    """Write the final student in Hugging Face format (or its LoRA adapter, and with ``--merge``
    the merged model) plus kdtool's run summary."""
    extra: dict[str, Any] = {}
    if adapter is not None:
        extra["lora"] = lora.summary(cfg, adapter)  # before merging unwraps the model
        lora.save_final(adapter, run.root, cfg.merge)
    else:
        student.save_pretrained(run.root, state_dict=state_dict)
    tokenizer.save_pretrained(run.root)
    summary = {
        "objective": cfg.objective,
        "objective_options": cfg.objective_options,
        "steps": state.step,
        "tokens": state.tokens,
        "wall_time_s": round(state.elapsed, 2),
        "eval_time_s": round(state.eval_time, 2),
        "eval_share": round(state.eval_time / max(state.elapsed, 1e-9), 4),
        "tokens_per_s": round(state.tokens / max(state.elapsed, 1e-9), 1),
        **peak_memory(student_device(student)),
        "examples": len(train_ds),
        "truncated_examples": train_ds.num_truncated,
        "skipped_lines": report.bad_lines,
        "template": template.to_dict(),
        **extra,
    }
    (run.root / "kdtool.json").write_text(json.dumps(summary, indent=2))
