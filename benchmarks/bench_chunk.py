"""Step time and peak memory of one fkl training step against the engine's chunk size.

One step is what sits between the student's trunk and the optimizer in ``kdtool distill``: the
student's output layer on its final hidden states, a lazy teacher (hidden states + output layer,
logits built per chunk, as the trainer hands it over), the fkl loss, and the backward into the
hidden states and the head's weight. The trunks do not depend on the chunk size, so they are left
out. Each (V, chunk) pair runs in a fresh subprocess (``bench_memory.worker``: the same warm-up,
``malloc_trim`` and RSS high-water reset) for its peak; the chunk sizes of one V are interleaved over
rounds so that load from other processes hits them alike. The step times come from one more process
per V that steps every chunk size in turn (``--paired-rounds``): on the 2-core CPU the same step took
0.113–0.174 s in different processes (chunk_cpu_h32_rechecks.md), more than the chunk sizes differ,
while ratios within a process hold to ±5–10%. The default row of each V is what
``kdtool.chunking.default_chunk_size`` gives.

    python benchmarks/bench_chunk.py --rounds 2 --repeats 0   # CPU: V = 16k, 32k, 152k -> benchmarks/chunk_cpu.md
    python benchmarks/bench_chunk.py --device cuda --rows 8192 --hidden 896 --teacher-hidden 1536 \\
        --chunk-sizes 256,512,1024,2048,4096 --output benchmarks/chunk_cuda.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import machine, run_child  # noqa: E402


def measure(
    args: argparse.Namespace, vocab: int, rows: int, variants: list[dict[str, Any]]
) -> list[dict[str, float]]:
    """Median peak (MiB), step wall time and step CPU time (s) per variant (its ``chunk_size`` and,
    in a slice sweep, ``slice_mib``), over the rounds."""
    base = {
        "objective": "fkl",
        "mode": "chunked",
        "vocab": vocab,
        "batch": 1,
        "seq": rows,
        "hidden": args.hidden,
        "teacher_hidden": args.teacher_hidden,
        "masked_fraction": 0.0,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": args.device,
        "system_allocator": args.system_allocator,
    }
    raw: list[list[dict[str, Any]]] = [[] for _ in variants]
    for _ in range(args.rounds):
        for i, variant in enumerate(variants):
            raw[i].append(run_child({**base, **variant}))
    res = [
        {
            **variant,
            "peak_mib": statistics.median(r["peak_bytes"] for r in rs) / 2**20,
            "wall_s": _median([t for r in rs for t in r["times"]]),
            "cpu_s": _median([t for r in rs for t in r["cpu_times"]]),
        }
        for variant, rs in zip(variants, raw, strict=True)
    ]
    if args.paired_rounds and "slice_mib" not in variants[0]:
        # The time columns from one process that steps every chunk size in turn (see bench_memory).
        chunks = [int(v["chunk_size"]) for v in variants]
        paired = run_child(
            {**base, "chunk_size": chunks[0], "interleave": chunks, "interleave_rounds": args.paired_rounds}
        )
        for r, c in zip(res, chunks, strict=True):
            if args.repeats:  # the fresh processes timed steps too: keep their figures beside
                r["fresh_wall_s"], r["fresh_cpu_s"] = r["wall_s"], r["cpu_s"]
            r["wall_s"] = statistics.median(paired["times"][str(c)])
            r["cpu_s"] = statistics.median(paired["cpu_times"][str(c)])
    return res


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(
    vocab: int, rows: int, default: int, res: list[dict[str, float]], default_slice: int = 0
) -> list[str]:
    """One V's rows: chunk sizes (the default marked), or in a slice sweep slice sizes at one chunk."""
    best_time = min(r["wall_s"] for r in res)
    least_mem = min(r["peak_mib"] for r in res)
    sweep = "slice_mib" in res[0]
    title = f"### V = {vocab:,}, {rows:,} rows" + (
        f", {int(res[0]['chunk_size'])}-row chunk" if sweep else ""
    )
    first = "| slice rows | slice MiB |" if sweep else "| chunk rows | fp32 block MiB |"
    out = [
        title,
        "",
        first + " peak MiB | × least | step wall s | × best | step CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(res, key=lambda r: (r.get("slice_mib", 0), r["chunk_size"])):
        n = _slice_rows(r, vocab) if sweep else int(r["chunk_size"])
        marked = n == (default_slice if sweep else default)
        name = f"**{n} (default)**" if marked else str(n)
        out.append(
            f"| {name} | {n * vocab * 4 / 2**20:.1f} | {r['peak_mib']:.1f} | {r['peak_mib'] / least_mem:.2f} "
            f"| {r['wall_s']:.3f} | {r['wall_s'] / best_time:.2f} | {r['cpu_s']:.3f} |"
        )
    if not sweep and default not in {int(r["chunk_size"]) for r in res}:
        out.append(f"| {default} (default; not measured) | {default * vocab * 4 / 2**20:.1f} | | | | | |")
    return [*out, ""]


def _slice_rows(r: dict[str, float], vocab: int) -> int:
    """The rows of a swept slice: its budget's rows at V, at least the floor the run had (16 before the
    32-row floor of ``CPU_SLICE_MIN_ROWS``), at most the chunk."""
    from kdtool.chunking import rows_for

    floor = int(r.get("slice_min_rows", 16))
    return min(int(r["chunk_size"]), rows_for(int(r["slice_mib"] * 2**20), vocab, floor))


def render(saved: dict[str, Any], device: str) -> str:
    """The report: the header, then one table per V (and per sweep) with the engine's defaults marked."""
    from kdtool.chunking import default_chunk_size, slice_size

    sweep = any(
        isinstance(sec["results"], list) and "slice_mib" in sec["results"][0] for sec in saved["sections"]
    )
    what = "Slice size inside a chunk" if sweep else "Chunk size"
    lines = [f"# {what} of the token-loss engine: fkl step on {device.upper()}", "", *saved["header"], ""]
    for sec in saved["sections"]:
        res = sec["results"]
        if isinstance(res, dict):  # the format before slice sweeps: {chunk: figures}
            res = [{"chunk_size": int(c), **r} for c, r in res.items()]
        default = default_chunk_size(sec["vocab"], device, sec.get("hidden", 256))  # 256: the first runs'
        teacher_hidden = sec.get("teacher_hidden", 512)  # 512: the first runs'
        default_slice = slice_size(sec["vocab"], int(res[0]["chunk_size"]), device, teacher_hidden)
        lines += table(sec["vocab"], sec["rows"], default, res, default_slice)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="16384,32768,151936", help="Comma-separated vocabulary sizes.")
    p.add_argument(
        "--rows", default="2048,2048,1024", help="Target rows (B·T) per V, comma-separated (one value = all)."
    )
    p.add_argument("--hidden", type=int, default=256, help="Student hidden size H.")
    p.add_argument("--teacher-hidden", type=int, default=512, help="Teacher hidden size.")
    p.add_argument("--chunk-sizes", default="32,64,96,128,192,256,512,1024", help="Rows per chunk to try.")
    p.add_argument("--rounds", type=int, default=1, help="Fresh subprocesses per configuration.")
    p.add_argument("--repeats", type=int, default=1, help="Timed steps per subprocess (after 2 untimed).")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default).")
    p.add_argument(
        "--paired-rounds",
        type=int,
        default=12,
        help="Time the chunk sizes of each V in one more process, one step of each in turn for this many "
        "rounds; the time columns then come from it (the fresh processes still give the peaks). 0: time "
        "in the fresh processes (--repeats steps each).",
    )
    p.add_argument(
        "--slice-mib",
        default="",
        help="Comma-separated CPU slice sizes (MiB of one fp32 [rows, V] block) to sweep at one chunk size "
        "(--chunk-sizes, a single value) instead of the chunk sweep.",
    )
    p.add_argument(
        "--system-allocator",
        action="store_true",
        help="Leave glibc malloc at its defaults (kdtool distill tunes it on CPU; kdtool.allocator).",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--note", default="", help="A line about the machine's load, copied into the report.")
    p.add_argument("--output", default=None, help="Markdown file (default benchmarks/chunk_<device>.md).")
    p.add_argument(
        "--render", default=None, help="Rewrite the Markdown from a saved .json (the default rows re-marked)."
    )
    args = p.parse_args(argv)
    out = Path(args.output or HERE / f"chunk_{args.device}.md")
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        out.write_text(render(saved, args.device))
        print(f"wrote {out}")
        return

    import kdtool.chunking
    from kdtool.chunking import default_chunk_size

    vocabs = [int(v) for v in args.vocabs.split(",")]
    rows_arg = [int(r) for r in args.rows.split(",")]
    rows_per_v = rows_arg * len(vocabs) if len(rows_arg) == 1 else rows_arg
    start, load_before = time.perf_counter(), os.getloadavg()
    results = []
    for vocab, rows in zip(vocabs, rows_per_v, strict=True):
        default = default_chunk_size(vocab, args.device, args.hidden)
        if args.slice_mib:
            (chunk,) = (int(c) for c in args.chunk_sizes.split(","))
            floor = kdtool.chunking.CPU_SLICE_MIN_ROWS
            variants = [
                {"chunk_size": chunk, "slice_mib": float(m), "slice_min_rows": floor}
                for m in args.slice_mib.split(",")
            ]
        else:
            chunks = sorted({int(c) for c in args.chunk_sizes.split(",") if int(c) <= rows} | {default})
            variants = [{"chunk_size": c} for c in chunks]
        res = measure(args, vocab, rows, variants)
        section = {"vocab": vocab, "rows": rows, "hidden": args.hidden, "teacher_hidden": args.teacher_hidden}
        results.append({**section, "results": res})
        print("\n".join(table(vocab, rows, default, res)), flush=True)
    command = "python benchmarks/bench_chunk.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    header = [
        f"`{command.strip()}`",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s in all; {machine(args.device)}",
        f"- load average (1, 5, 15 min) before {tuple(round(x, 1) for x in load_before)}, "
        f"after {tuple(round(x, 1) for x in os.getloadavg())}" + (f"; {args.note}" if args.note else ""),
        f"- student H = {args.hidden}, teacher H = {args.teacher_hidden} (lazy: hidden states + head), fp32, "
        f"{args.rounds} fresh process(es) per row, {args.repeats} timed step(s) each after a warm-up and a "
        "memory step; peak = RSS high-water mark of one step above the RSS before it (CPU) or "
        "max_memory_allocated above the allocation before it (CUDA); × least / × best: against the "
        "row with the least peak / the shortest wall time at that V.",
    ]
    if args.paired_rounds:
        header[-1] += (
            f" Step times: one more process per V that steps every chunk size in turn, {args.paired_rounds} "
            "rounds after 2 untimed (medians; the machine's drift hits every size alike)."
        )
    saved = {"header": header, "sections": results}
    out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    out.write_text(render(saved, args.device))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
