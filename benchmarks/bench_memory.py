"""Peak memory and tokens/s of one training step of the token loss, chunked vs unchunked.

One step = the output layers of both models on the final hidden states, the objective, and the
backward pass into the student's hidden states and output-layer weight (what sits between the
transformer trunk and the optimizer, and what runs users out of memory at large V):

* ``plain``: full ``[B·T, V]`` logits of both models at once, plain autograd
  (``kdtool.engine.plain_token_loss_sum``), the way a naive trainer does it;
* ``chunked``: ``kdtool.engine.token_loss_sum`` (fused path: per-chunk gradients in forward);
* ``checkpoint``: the same engine given an opaque callable head, so it takes its per-chunk
  activation-checkpointing path (logits recomputed in backward).

Every configuration runs in a fresh subprocess, so one measurement cannot inherit another's
memory high-water mark. Peak memory is ``ru_maxrss`` of the child after one step minus its RSS
just before, with freed heap returned (``malloc_trim``) and the high-water mark reset after a
warm-up step (CPU), or ``torch.cuda.max_memory_allocated`` minus the memory allocated before
the step (CUDA). Time is the median over all timed steps of all rounds; rounds of the different
paths are interleaved so that load from other processes hits them alike.

    python benchmarks/bench_memory.py                       # CPU defaults (V=16384, B=8, T=256)
    python benchmarks/bench_memory.py --device cuda --vocab 151936 --hidden 896 --teacher-hidden 1536 \\
        --seq 1024 --output benchmarks/results_cuda.md       # Qwen2.5 0.5B / 1.5B head shapes
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), for the MFU column on CUDA.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


# --------------------------------------------------------------------------- child process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _release_and_reset_hwm() -> None:
    """Hand freed heap memory back to the OS, then reset the RSS high-water mark to the current RSS.

    Without ``malloc_trim`` the warm-up step's freed blocks stay in glibc's heap, and the measured
    step would reuse them without raising the RSS (an underestimate that favours small chunks).
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration: build inputs, run ``repeats + 2`` steps, report peak memory and times."""
    import torch

    import kdtool
    from kdtool.engine import plain_token_loss_sum, token_loss_sum
    from kdtool.teacher import TeacherSignal

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if not cfg.get("system_allocator"):
        from kdtool.allocator import tune_for_training

        tune_for_training(device.type)  # as `kdtool distill` does
    if cfg.get("slice_mib"):  # a slice sweep (bench_chunk.py --slice-mib): the CPU slice budget, fixed
        import kdtool.chunking

        kdtool.chunking.CPU_SLICE_BYTES = int(cfg["slice_mib"] * 2**20)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    n, h, ht, v = cfg["batch"] * cfg["seq"], cfg["hidden"], cfg["teacher_hidden"], cfg["vocab"]
    objective = kdtool.get_objective(cfg["objective"])

    # As in the trainer: the student's parameters live in fp32 (the optimizer's copy) and on CUDA
    # the step runs under bf16 autocast; the frozen teacher is loaded in bf16 on CUDA (fp32 on
    # CPU), so its [V, H_t] weight is not re-cast every chunk, and its hidden states are bf16.
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    student_head = torch.nn.Linear(h, v, bias=False, device=device)
    teacher_head = torch.nn.Linear(ht, v, bias=False, device=device, dtype=teacher_dtype)
    teacher_head.requires_grad_(False)
    hidden = torch.randn(n, h, device=device).requires_grad_(True)  # [N, H] student trunk output
    teacher_hidden = torch.randn(n, ht, device=device, dtype=teacher_dtype)  # [N, H_t], no grad
    labels = torch.randint(0, v, (n,), device=device)
    if cfg["masked_fraction"] > 0:  # the prompt part of each sequence carries no target
        keep = torch.rand(n, device=device) >= cfg["masked_fraction"]
        hidden_rows, labels = keep.nonzero().squeeze(-1), labels[keep]
    else:
        hidden_rows = None
    teacher = TeacherSignal.none()
    if objective.needs_teacher:
        rows = teacher_hidden if hidden_rows is None else teacher_hidden[hidden_rows]
        teacher = TeacherSignal.lazy(rows, teacher_head, v)

    mode, chunk = cfg["mode"], cfg["chunk_size"]
    head = student_head if mode != "checkpoint" else (lambda x: student_head(x))  # opaque → checkpoint
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step(chunk: int | None = chunk) -> None:
        student_head.weight.grad = None
        hidden.grad = None
        with autocast:
            rows = hidden if hidden_rows is None else hidden[hidden_rows]
            if mode == "plain":
                loss, _ = plain_token_loss_sum(objective, rows, head, teacher, labels, v)
            else:
                loss, _ = token_loss_sum(objective, rows, head, teacher, labels, v, chunk)
        (loss / max(labels.numel(), 1)).backward()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cfg.get("interleave"):
        return _interleaved(step, sync, cfg["interleave"], cfg["interleave_rounds"])
    # Warm-up step first: it pages in the kernels' code, which would otherwise count as the step's
    # memory. Then freed heap is returned and the RSS high-water mark reset to the current RSS
    # (Linux), so ru_maxrss after the next step is that step's own peak.
    step()
    sync()
    # The warm-up's gradients are freed at the start of the next step: counted in "before", they
    # would hide the measured step's own gradients ([V, H] fp32 for the head) from its peak.
    student_head.weight.grad = None
    hidden.grad = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _release_and_reset_hwm()
        before = _rss_bytes()
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if cuda else _maxrss_bytes()) - before
    times, cpu_times = [], []
    for _ in range(cfg["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"peak_bytes": peak, "times": times, "cpu_times": cpu_times, "tokens": int(labels.numel())}


def _interleaved(
    step: Callable[[int], None], sync: Callable[[], None], chunks: list[int], rounds: int
) -> dict[str, Any]:
    """Step times of several chunk sizes in one process, one step of each in turn (the order rotated
    every round), so that the machine's drift hits them alike: the time column's paired form. Two
    untimed rounds first. No memory figure: one process's high-water mark covers every size."""
    times: dict[int, list[float]] = {c: [] for c in chunks}
    cpu_times: dict[int, list[float]] = {c: [] for c in chunks}
    for r in range(rounds + 2):
        k = r % len(chunks)
        for chunk in chunks[k:] + chunks[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            step(chunk)
            sync()
            if r >= 2:
                times[chunk].append(time.perf_counter() - t0)
                cpu_times[chunk].append(time.process_time() - c0)
    return {
        "times": {str(c): t for c, t in times.items()},
        "cpu_times": {str(c): t for c, t in cpu_times.items()},
    }


# --------------------------------------------------------------------------- parent process


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    from kdtool.allocator import environ_without_tcache

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    # glibc's tcache off from the start, as the `kdtool` console script runs (kdtool.allocator)
    env = dict(os.environ) if cfg.get("system_allocator") else environ_without_tcache(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed for {cfg}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_flops(cfg: dict[str, Any], tokens: int) -> float:
    """Output-layer FLOPs of one step: student forward + 2 backward matmuls, teacher forward."""
    student = 3 * 2 * tokens * cfg["hidden"] * cfg["vocab"]
    teacher = 2 * tokens * cfg["teacher_hidden"] * cfg["vocab"]
    return float(student + teacher)


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = (
        f"{cpu}, {os.cpu_count()} logical cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}"
    )
    if device == "cuda":
        text += f", GPU: {torch.cuda.get_device_name(0)}"
    return text


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return float(args.peak_tflops)
    if args.device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def token_level_objectives() -> list[str]:
    from kdtool.registry import available

    return [name for name, cls in available().items() if cls.scores_references]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--objectives", default="all", help="Comma-separated names, or 'all' token-level ones.")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="Student hidden size H.")
    p.add_argument("--teacher-hidden", type=int, default=1024, help="Teacher hidden size.")
    p.add_argument("--masked-fraction", type=float, default=0.0, help="Share of positions without target.")
    p.add_argument("--modes", default="plain,chunked", help="Any of plain, chunked, checkpoint.")
    p.add_argument(
        "--chunk-sizes", default="default", help="Comma-separated rows per chunk, or 'default' (engine's)."
    )
    p.add_argument("--rounds", type=int, default=1, help="Fresh subprocesses per configuration.")
    p.add_argument("--repeats", type=int, default=3, help="Timed steps per subprocess (after 1 warm-up).")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default).")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=None, help="Device peak for MFU (CUDA).")
    p.add_argument("--output", default=None, help="Markdown file (default benchmarks/results_<device>.md).")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from kdtool.chunking import default_chunk_size

    names = token_level_objectives() if args.objectives == "all" else args.objectives.split(",")
    modes = args.modes.split(",")
    chunks: list[int | None] = (
        [None] if args.chunk_sizes == "default" else [int(c) for c in args.chunk_sizes.split(",")]
    )
    keys = ("vocab", "batch", "seq", "hidden", "teacher_hidden", "masked_fraction", "repeats", "threads")
    base = {k: getattr(args, k) for k in (*keys, "device")}
    variants = [(m, None) for m in modes if m == "plain"] + [
        (m, c) for m in modes if m != "plain" for c in chunks
    ]
    results: dict[tuple[str, str, int | None], list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    for name in names:
        for round_ in range(args.rounds):
            for mode, chunk in variants:
                cfg = {**base, "objective": name, "mode": mode, "chunk_size": chunk}
                res = run_child(cfg)
                results.setdefault((name, mode, chunk), []).append(res)
                t = statistics.median(res["times"])
                print(
                    f"{name:6s} {mode:10s} chunk={chunk!s:7s} round {round_ + 1}/{args.rounds}: "
                    f"peak {res['peak_bytes'] / 2**20:8.1f} MiB, step {t:.3f} s",
                    flush=True,
                )

    load_after = os.getloadavg()
    tflops = peak_tflops(args)
    default_rows = default_chunk_size(args.vocab, args.device, args.hidden)
    lines = [
        f"# Token-loss engine: peak memory and throughput ({args.device.upper()})",
        "",
        f"- Command: `python benchmarks/bench_memory.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine(args.device)}; load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after the run",
        f"- Shapes: V = {args.vocab:,}, B = {args.batch}, T = {args.seq} (N = {args.batch * args.seq:,} "
        f"positions, {args.masked_fraction:.0%} without target), student H = {args.hidden}, "
        f"teacher H = {args.teacher_hidden}; default chunk = {default_rows} rows.",
        f"- Step = both output layers + objective + backward into the student's hidden states and "
        f"output weight; fp32 on CPU, bf16 autocast on CUDA. {args.rounds} fresh subprocess(es) per row, "
        f"{args.repeats} timed steps each after a warm-up; peak = median over subprocesses of one "
        f"step's {'RSS high-water mark above the RSS before it (after a warm-up step, malloc_trim and a high-water-mark reset)' if args.device == 'cpu' else 'max_memory_allocated above the memory allocated before it'}; "
        "time = median over all timed steps (CPU s = process CPU time per step, all threads: less "
        "sensitive to other processes on a shared machine than wall time).",
    ]
    if args.device == "cpu":
        lines.append("- GPU figures were not measured in this run (no GPU was available).")
    header = (
        "| objective | path | chunk rows | peak MiB | peak vs plain | step s | tokens/s | time vs plain |"
    )
    if args.device == "cpu":
        header += " CPU s | CPU vs plain |"
    if tflops:
        header += " MFU |"
    lines += ["", header, "|" + "---|" * header.count(" |")]
    for name in names:
        plain = results.get((name, "plain", None))
        plain_peak = statistics.median(r["peak_bytes"] for r in plain) if plain else None
        plain_time = statistics.median(t for r in plain for t in r["times"]) if plain else None
        plain_cpu = statistics.median(t for r in plain for t in r["cpu_times"]) if plain else None
        for mode, chunk in variants:
            runs = results[(name, mode, chunk)]
            peak = statistics.median(r["peak_bytes"] for r in runs)
            step = statistics.median(t for r in runs for t in r["times"])
            cpu = statistics.median(t for r in runs for t in r["cpu_times"])
            tokens = runs[0]["tokens"]
            rows = "all" if mode == "plain" else str(chunk or default_rows)
            peak_ratio = f"{peak / plain_peak:.2f}×" if plain_peak else "–"
            time_ratio = f"{step / plain_time:.2f}×" if plain_time else "–"
            row = (
                f"| {name} | {mode} | {rows} | {peak / 2**20:.1f} | {peak_ratio} | {step:.3f} | "
                f"{tokens / step:,.0f} | {time_ratio} |"
            )
            if args.device == "cpu":
                row += f" {cpu:.3f} | {cpu / plain_cpu:.2f}× |" if plain_cpu else f" {cpu:.3f} | – |"
            if tflops:
                row += f" {matmul_flops(base, tokens) / step / (tflops * 1e12):.1%} |"
            lines.append(row)
    if tflops:
        lines += ["", f"MFU = output-layer matmul FLOPs / step time / {tflops:g} TFLOP/s (bf16 dense peak)."]
    out = Path(args.output) if args.output else HERE / f"results_{args.device}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
