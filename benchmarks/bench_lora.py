"""Memory and step time of LoRA against full fine-tuning of the same student (``--lora``).

One step = kdtool's own ``trainer.train_step`` (fkl against a live teacher, the chunked engine,
clipping, AdamW) on random token ids, for a GPT-2-style student and a wider teacher built from
configs (V = 16,384 by default: the vocabulary is what makes the output layer dominate). Modes:

* ``full``: every student parameter trains (AdamW keeps two moments of each);
* ``lora``: peft's default targets for GPT-2 (``c_attn``), rank 8; the output layer stays an
  ``nn.Linear``, so the engine keeps its fused path;
* ``lora-head``: ``c_attn`` and ``lm_head``: the output layer is wrapped, so the engine takes its
  checkpointed path (logits recomputed in backward).

Each mode runs in a fresh subprocess (ru_maxrss is a per-process high-water mark). Reported: peak
RSS of the child, its RSS just before the first step (models built, torch imported), their
difference (what training adds: gradients, optimizer state, activations), and the median step
time over the steps after the first.

    python benchmarks/bench_lora.py --output benchmarks/lora_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MODES = {"full": None, "lora": ["c_attn"], "lora-head": ["c_attn", "lm_head"]}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _model(vocab: int, layers: int, hidden: int, seq: int, seed: int) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=hidden, n_layer=layers, n_head=4)
    return GPT2LMHeadModel(config)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode: build both models, run ``args.steps`` optimizer steps, report memory and times."""
    import torch

    from kdtool import lora, trainer
    from kdtool.context import StepContext
    from kdtool.registry import get_objective

    torch.set_num_threads(args.threads)
    student = _model(args.vocab, args.layers, args.hidden, args.seq, seed=0)
    teacher = (
        _model(args.vocab, args.layers, args.teacher_hidden, args.seq, seed=1).eval().requires_grad_(False)
    )
    targets = MODES[args.child]
    if targets is not None:
        opts = SimpleNamespace(
            lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=targets, student="bench"
        )
        lora.apply_lora(student, opts)
    optim_cfg = SimpleNamespace(
        weight_decay=0.0,
        lr=1e-4,
        adam_betas=(0.9, 0.999),
        warmup_steps=0,
        scheduler="constant",
        min_lr_ratio=0.0,
        grad_accum=1,
        max_grad_norm=1.0,
    )
    optimizer, scheduler = trainer.setup_optimizer(optim_cfg, student, args.steps)  # type: ignore[arg-type]
    ctx = StepContext(student, teacher, None, None, args.vocab, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half has no target, as in instruction data
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batches = iter(lambda: batch, None)
    objective = get_objective("fkl")
    before = _rss_mb()
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        trainer.train_step(objective, ctx, batches, optimizer, scheduler, optim_cfg)  # type: ignore[arg-type]
        times.append(time.perf_counter() - began)
    trainable, total = lora.trainable_parameters(student)
    peak = _peak_mb()
    return {
        "mode": args.child,
        "trainable": trainable,
        "total": total,
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "training_mb": round(peak - before, 1),
        "step_s": round(statistics.median(times[1:] or times), 3),
        "steps": len(times),
    }


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, *passthrough(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def passthrough(args: argparse.Namespace) -> list[str]:
    keys = ("vocab", "layers", "hidden", "teacher_hidden", "seq", "batch", "steps", "threads")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, wall: float) -> str:
    full = next(r for r in rows if r["mode"] == "full")
    lines = [
        "# LoRA vs full fine-tuning of the same student (CPU)",
        "",
        f"Command (from the repository root; {wall:.0f} s in all):",
        "",
        f"    {command}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores **shared with other jobs** (load average "
        f"{os.getloadavg()[0]:.1f} when it finished), Python {platform.python_version()}, torch "
        f"{__import__('torch').__version__}, peft {__import__('peft').__version__}, {args.threads} torch "
        f"thread(s); {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. The figures are indicative: other jobs shared "
        "the CPU, so step times vary between runs.",
        "",
        f"Student: GPT-2-style, {args.layers} layers × {args.hidden}, V = {args.vocab:,} (tied embeddings); "
        f"teacher {args.layers} × {args.teacher_hidden}; fkl, batch {args.batch} × {args.seq} tokens (half "
        f"of them targets), AdamW, clip 1.0; kdtool's `trainer.train_step`; median of steps 2–{args.steps}.",
        "",
        "| mode | trainable params | peak RSS (MiB) | RSS before step 1 | added by training | step (s) | vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['trainable']:,} of {r['total']:,} | {r['peak_rss_mb']:,.1f} | "
            f"{r['rss_before_mb']:,.1f} | {r['training_mb']:,.1f} | {r['step_s']:.3f} | "
            f"{r['step_s'] / full['step_s']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--output", type=Path, default=None, help="Write the Markdown report here.")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(worker(args)))
        return
    began = time.perf_counter()
    rows = [run_child(mode, args) for mode in args.modes.split(",")]
    command = "python benchmarks/bench_lora.py " + shlex.join(sys.argv[1:])
    text = report(rows, args, command, time.perf_counter() - began)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
