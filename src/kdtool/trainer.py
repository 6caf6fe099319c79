"""The one training loop, for every objective.

micro-batches from the step's stream (references, or rollouts) → teacher signal → student forward →
objective loss sum → backward (gradient accumulation) → divide by the step's token count → clip →
AdamW → warmup + cosine → periodic eval → atomic checkpoint.
"""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import nn

from kdtool import allocator, distributed, lora
from kdtool.config import DistillConfig
from kdtool.context import StepContext
from kdtool.data import BatchLoader
from kdtool.distributed import DistInfo
from kdtool.errors import UserError
from kdtool.held_out import HeldOut, held_out_batches
from kdtool.models import load_tokenizer
from kdtool.progress import TrainProgress
from kdtool.registry import get_objective
from kdtool.run_dir import Run, finish, prepare_output, start_record, train_record
from kdtool.steps import Step
from kdtool.trackers import Trackers, require_installed
from kdtool.train_setup import (
    attach_sharding,
    make_step,
    setup_context,
    setup_data,
    setup_models,
    setup_optimizer,
    total_steps,
)
from kdtool.train_state import Checkpointer, Snapshot, TrainState


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepModule(nn.Module):
    """The student plus one micro-batch's loss as a module, so that DistributedDataParallel
    sees a real ``forward`` (its reducer prepares there) whatever the step computes."""

    def __init__(self, student: nn.Module, step: Step, ctx: StepContext):
        super().__init__()
        self.student = student  # the only registered submodule: the teacher is never synced
        self.step, self.ctx = step, ctx

    def forward(
        self,
        batch: dict[str, torch.Tensor] | None = None,
        fn: Callable[[StepContext, dict[str, torch.Tensor]], Any] | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """The step's ``(loss_sum, count, metrics)``; or ``fn(ctx, batch)`` when given, so that
        evaluation runs through the (possibly sharded) module too; without a batch,
        ``student(**model_kwargs)`` (a rollout step), so that under FSDP2 every student call goes
        through this root unit."""
        if batch is None:
            return self.student(**model_kwargs)
        if fn is None:
            return self.step.loss(self.ctx, batch)
        return fn(self.ctx, batch)


def wrap_for_ranks(module: StepModule, info: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP by default, FSDP2 with ``--fsdp``; a single process runs the module as it is."""
    if not info.enabled:
        return module
    if fsdp:
        return distributed.shard(module, module.student)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until its end, so that the optimizer
    step and the bookkeeping that records it happen together or not at all."""
    pending: list[Any] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *args: pending.append(args))
    except ValueError:  # not the main thread: signals cannot arrive here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def train_step(
    step_module: nn.Module,
    micro_batches: Iterator[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: DistillConfig,
    ctx: StepContext,
    info: DistInfo = DistInfo(),
) -> tuple[float, int, dict[str, float]]:
    """Forward and backward of ``grad_accum`` micro-batches (on every rank), gradients divided by
    the step's token count over all ranks, then clipped. Returns (loss, tokens, metrics); the
    optimizer step is the caller's."""
    ctx.student.train()
    optimizer.zero_grad(set_to_none=True)
    loss_total, tokens = 0.0, 0
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i in range(cfg.grad_accum):
        # Under DDP/FSDP, gradients are reduced once, on the last micro-batch.
        with distributed.set_gradient_sync(step_module, i == cfg.grad_accum - 1):
            loss_sum, n_tokens, metrics = step_module(next(micro_batches))
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
    return loss_total / max(tokens, 1), tokens, out


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
        run_dir = _train(cfg, resume, overwrite, console, info, device)
    except BaseException:
        distributed.teardown(info)
        raise
    distributed.teardown(info, finished=True)
    return run_dir


def decide_resume(
    cfg: DistillConfig, run: Run, resume: bool, overwrite: bool, console: Console, info: DistInfo
) -> bool:
    """``prepare_output`` on rank 0, its decision (or refusal) on every rank."""
    decision: bool | UserError = False
    if info.is_main:
        try:
            decision = prepare_output(cfg, run, resume, overwrite, console)
        except UserError as exc:
            decision = exc
    decision = distributed.broadcast_object(decision, info)
    if isinstance(decision, UserError):
        raise decision
    return decision


def _train(
    cfg: DistillConfig, resume: bool, overwrite: bool, console: Console, info: DistInfo, device: torch.device
) -> Path:
    run = Run(Path(cfg.output))
    resuming = decide_resume(cfg, run, resume, overwrite, console, info)
    main = info.is_main
    cpu_allocator = allocator.tune_for_training(device.type)  # before the models and the first step allocate
    seed_everything(cfg.seed)
    objective = get_objective(cfg.objective, **cfg.objective_options)
    step = make_step(objective)
    tokenizer = load_tokenizer(cfg.student, cfg.trust_remote_code)
    # Data first: a malformed line should stop the run before a large model is loaded.
    train_ds, eval_ds, report = setup_data(cfg, tokenizer)
    models = setup_models(cfg, tokenizer, device, info)
    student = models.student
    # LoRA layers go into `student` in place: everything below trains the same module; the
    # PeftModel around it only saves and loads the adapter.
    adapter = lora.apply_lora(student, cfg) if cfg.lora else None
    loader = BatchLoader(train_ds, cfg.batch_size, cfg.seed, rank=info.rank, world=info.world)
    steps = total_steps(cfg, loader)
    ctx = setup_context(cfg, models, tokenizer, device, info, train_ds)
    # Shard/wrap before the optimizer exists: FSDP2 replaces the parameters with DTensors.
    step_module = wrap_for_ranks(StepModule(student, step, ctx), info, device, cfg.fsdp)
    sharded = distributed.is_sharded(step_module)
    attach_sharding(ctx, step_module, models, info, device)
    # With anything sharded, evaluation is a collective: every rank runs it through the (inner, for DDP:
    # no sync in eval) step module, rank 0 logs; otherwise rank 0 alone evaluates the plain student.
    eval_forward = getattr(step_module, "module", step_module) if sharded or ctx.teacher_sharded else None
    optimizer, scheduler = setup_optimizer(cfg, student, steps)
    micro_batches = step.stream(loader, ctx)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    checkpoints = Checkpointer(
        run.checkpoints, cfg, student, optimizer, scheduler, adapter, info, sharded, config_yaml
    )
    state = TrainState()
    # Only rank 0 reports; a resumed run opens a new tracker run that continues at its step.
    # Opened before config.yaml is written, so a tracker that cannot start leaves no run behind.
    trackers = (
        Trackers.open(cfg.report_to, run.root, cfg.model_dump(mode="json"), config_yaml)
        if main
        else Trackers()
    )
    if resuming:
        last = checkpoints.load(state, micro_batches, ctx.generator)
        if main:
            console.print(f"resuming {run.root} from {last.name}")
    elif main:
        run.config.write_text(config_yaml)
        run.metrics.write_text("")
        record = start_record(
            cfg, train_ds, eval_ds, report, steps, info, sharded, ctx.teacher_sharded, student
        )
        run.log({**record, "cpu_allocator": cpu_allocator})
    eval_every, eval_batches = cfg.eval_schedule(steps, held_out_batches(cfg, eval_ds))
    save_every = cfg.save_every or max(1, steps // 5)
    started = time.perf_counter() - state.elapsed  # `elapsed` (and `eval_time`) carry over a resume
    evaluator = HeldOut(ctx, objective, eval_ds, cfg, eval_forward, eval_batches, info)

    # Taken at each step's start: an interrupted step is replayed exactly on resume.
    snapshot = Snapshot.take(micro_batches, ctx.generator)
    window: dict[str, list[float]] = defaultdict(list)
    progress = TrainProgress(total=steps, enabled=cfg.progress and main, console=console, done=state.step)
    try:
        if not resuming:
            evaluator.log(run, trackers, state, started)
        with progress:
            while state.step < steps:
                loss, tokens, metrics = train_step(step_module, micro_batches, optimizer, cfg, ctx, info)
                with interrupts_deferred():  # the update and its record: both or neither
                    optimizer.step()
                    scheduler.step()
                    state.step += 1
                    state.tokens += tokens
                    state.elapsed = time.perf_counter() - started
                    snapshot = Snapshot.take(micro_batches, ctx.generator)
                window["loss"].append(loss)
                window["tokens"].append(tokens)
                for k, v in metrics.items():
                    window[k].append(v)
                progress.update(state.step, loss, state.tokens / max(state.elapsed, 1e-9))
                if main and (state.step % cfg.log_every == 0 or state.step == steps):
                    run.log(train_record(state, scheduler, window), trackers)
                    window.clear()
                if state.step % eval_every == 0 or state.step == steps:
                    evaluator.log(run, trackers, state, started)
                if state.step % save_every == 0 and state.step < steps:
                    checkpoints.save(state, snapshot)
    except KeyboardInterrupt:
        where = checkpoints.save(state, snapshot)
        if main:
            console.print(f"interrupted: saved {where} (continue with --resume)")
        raise
    finally:
        trackers.close()  # every record went out inside the loop (the last eval included)
    checkpoints.save(state, snapshot)
    final_state = distributed.full_model_state(student, info, sharded)
    if main:
        finish(
            run, cfg, student, tokenizer, cfg.prompt_template(), state, train_ds, report, final_state, adapter
        )
    distributed.barrier(info)
    return run.root
