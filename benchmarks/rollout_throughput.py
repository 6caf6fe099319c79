"""Rollout throughput of ``kdtool.sampling.sample``: sampled tokens per second.

Models are the demo's GPT-2-style pair (teacher 2 layers × 96, student 1 × 32, random weights:
speed does not depend on training) on the built-in task's prompts. EOS is disabled so every row
samples exactly ``--new-tokens`` tokens. Modes:

  student            student alone (what the teacher-free part of a rollout costs)
  student+teacher    α = 0: student samples, the teacher steps along to score every token
  teacher-mixed      α = 0.2: samples from 0.2·p + 0.8·q (MiniLLM's default)
  hf-generate        ``student.generate(do_sample=True)``, a reference for the student-only loop

Usage:
    python benchmarks/rollout_throughput.py --device cpu --output benchmarks/rollout_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kdtool.data import TokenizedDataset
from kdtool.sampling import left_pad, sample
from kdtool.synthetic import build_tokenizer, make_dataset, tiny_model


def prompts(tok, n: int) -> list[list[int]]:
    """The first ``n`` prompts of the built-in task, tokenised."""
    from kdtool.data import Example, Template

    records = make_dataset(n, seed=0)
    exs = [Example(Template().format(r["instruction"], r["input"]), r["output"]) for r in records]
    ds = TokenizedDataset(exs, tok, 256, None)
    return [item.input_ids[: item.labels.count(-100)] for item in ds.items]


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)"
    )
    ap.add_argument("--output", type=Path, default=None, help="write a Markdown table here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    teacher = tiny_model(tok, n_layer=2, n_embd=96, n_head=4, seed=1).to(device).eval()
    student = tiny_model(tok, n_layer=1, n_embd=32, n_head=2, seed=2).to(device).eval()
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids, mask = left_pad(prompts(tok, batch), tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        g = torch.Generator(device=device).manual_seed(0)
        common = dict(
            eos_token_id=None, pad_token_id=tok.pad_token_id, max_new_tokens=args.new_tokens, generator=g
        )
        modes = {
            "student": lambda ids=ids, mask=mask, common=common: sample(student, ids, mask, **common),
            "student+teacher": lambda ids=ids, mask=mask, common=common: sample(
                student, ids, mask, teacher=teacher, alpha=0.0, **common
            ),
            "teacher-mixed (α=0.2)": lambda ids=ids, mask=mask, common=common: sample(
                student, ids, mask, teacher=teacher, alpha=0.2, **common
            ),
            "hf-generate (student)": lambda ids=ids, mask=mask: student.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=tok.pad_token_id,
            ),
        }
        for name, fn in modes.items():
            with torch.no_grad():
                seconds = timed(fn, device, args.repeats)
            tps = batch * args.new_tokens / seconds
            rows.append((name, batch, ids.shape[1], seconds, tps))
            print(f"{name:24s} batch {batch:4d}  {seconds * 1000:8.1f} ms  {tps:10.0f} tokens/s", flush=True)
    if args.output:
        write_markdown(args, rows, device)


def write_markdown(args: argparse.Namespace, rows: list[tuple], device: torch.device) -> None:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        machine = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, load average {load} (shared machine)"
        )
    lines = [
        f"# Rollout throughput ({device.type})",
        "",
        "Command:",
        "",
        "```",
        "python " + " ".join(sys.argv),
        "```",
        "",
        f"Machine: {machine}; torch {torch.__version__}. Student GPT-2 1×32, teacher GPT-2 2×96 "
        f"(built-in task vocabulary), {args.new_tokens} new tokens per row (EOS disabled), median of "
        f"{args.repeats} runs after a warm-up.",
        "",
        "| mode | batch | prompt tokens | seconds | sampled tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {b} | {p} | {s:.3f} | {t:,.0f} |" for n, b, p, s, t in rows]
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
