"""Step time and peak memory of one fkl training step against the engine's chunk size.

One step is what sits between the student's trunk and the optimizer in ``kdtool distill``: the
student's output layer on its final hidden states, a lazy teacher (hidden states + output layer,
logits built per chunk, as the trainer hands it over), the fkl loss, and the backward into the
hidden states and the head's weight. The trunks do not depend on the chunk size, so they are left
out. Each (V, chunk) pair runs in a fresh subprocess (``bench_memory.worker``: the same warm-up,
``malloc_trim`` and RSS high-water reset); the chunk sizes of one V are interleaved over rounds so
that load from other processes hits them alike. The default row of each V is what
``kdtool.chunking.default_chunk_size`` gives.

    python benchmarks/bench_chunk.py                     # CPU: V = 16k, 32k, 152k -> benchmarks/chunk_cpu.md
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
    args: argparse.Namespace, vocab: int, rows: int, chunks: list[int]
) -> dict[int, dict[str, float]]:
    """Median peak (MiB), step wall time and step CPU time (s) per chunk size, over the rounds."""
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
    }
    raw: dict[int, list[dict[str, Any]]] = {c: [] for c in chunks}
    for _ in range(args.rounds):
        for chunk in chunks:
            raw[chunk].append(run_child({**base, "chunk_size": chunk}))
    return {
        c: {
            "peak_mib": statistics.median(r["peak_bytes"] for r in rs) / 2**20,
            "wall_s": statistics.median(t for r in rs for t in r["times"]),
            "cpu_s": statistics.median(t for r in rs for t in r["cpu_times"]),
        }
        for c, rs in raw.items()
    }


def table(vocab: int, rows: int, default: int, res: dict[int, dict[str, float]]) -> list[str]:
    best_time = min(r["wall_s"] for r in res.values())
    least_mem = min(r["peak_mib"] for r in res.values())
    out = [
        f"### V = {vocab:,}, {rows:,} rows",
        "",
        "| chunk rows | fp32 block MiB | peak MiB | × least | step wall s | × best | step CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for chunk in sorted(res):
        r = res[chunk]
        name = f"**{chunk} (default)**" if chunk == default else str(chunk)
        out.append(
            f"| {name} | {chunk * vocab * 4 / 2**20:.1f} | {r['peak_mib']:.1f} | {r['peak_mib'] / least_mem:.2f} "
            f"| {r['wall_s']:.3f} | {r['wall_s'] / best_time:.2f} | {r['cpu_s']:.3f} |"
        )
    if default not in res:
        out.append(f"| {default} (default; not measured) | {default * vocab * 4 / 2**20:.1f} | | | | | |")
    return [*out, ""]


def render(saved: dict[str, Any], device: str) -> str:
    """The report: the header, then one table per V with the engine's current default marked."""
    from kdtool.chunking import default_chunk_size

    lines = [f"# Chunk size of the token-loss engine: fkl step on {device.upper()}", "", *saved["header"], ""]
    for sec in saved["sections"]:
        res = {int(c): r for c, r in sec["results"].items()}
        lines += table(sec["vocab"], sec["rows"], default_chunk_size(sec["vocab"], device), res)
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

    from kdtool.chunking import default_chunk_size

    vocabs = [int(v) for v in args.vocabs.split(",")]
    rows_arg = [int(r) for r in args.rows.split(",")]
    rows_per_v = rows_arg * len(vocabs) if len(rows_arg) == 1 else rows_arg
    start, load_before = time.perf_counter(), os.getloadavg()
    results = []
    for vocab, rows in zip(vocabs, rows_per_v, strict=True):
        default = default_chunk_size(vocab, args.device)
        chunks = sorted({int(c) for c in args.chunk_sizes.split(",") if int(c) <= rows} | {default})
        res = measure(args, vocab, rows, chunks)
        results.append({"vocab": vocab, "rows": rows, "results": {str(c): r for c, r in res.items()}})
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
    saved = {"header": header, "sections": results}
    out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    out.write_text(render(saved, args.device))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
