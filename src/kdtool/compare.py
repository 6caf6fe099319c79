"""``kdtool compare``: every objective × seed from the same initial student with the same budget,
each in its own process (memory is released between runs), then ``eval rougel`` on the same prompts
and seeds for every student, the teacher and the undistilled student.

Resumable: a run with its Rouge-L file is skipped; an interrupted run resumes from its checkpoint;
a failed run is reported and does not stop the others. Runs go one after another by default;
``jobs > 1`` runs that many child processes at once (on a CPU, with ``threads × jobs`` ≤ cores).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdtool.errors import UserError

ROUGE_FILE = "rougel.json"


@dataclass
class CompareSpec:
    objectives: list[str]
    seeds: list[int]
    teacher: str
    student: str
    data: str
    eval_data: str
    output: str
    config: str | None = None
    objective_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    distill_args: list[str] = field(default_factory=list)
    eval_seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    eval_limit: int | None = None
    max_new_tokens: int = 256
    eval_batch_size: int = 16
    greedy: bool = False
    threads: int | None = None  # torch CPU threads of every child process (1 is fastest for tiny models)
    jobs: int = 1  # child processes at once; does not change any result, so not part of the identity


def identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine the results (a resumed comparison must match them)."""
    return {k: v for k, v in settings.items() if k != "jobs"}


def parse_objective_options(pairs: list[str] | None, objectives: list[str]) -> dict[str, dict[str, Any]]:
    """``["fkl.ce_weight=0.5"]`` -> ``{"fkl": {"ce_weight": 0.5}}``."""
    from kdtool.config import parse_option_pairs

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        name, dot, rest = pair.partition(".")
        if not dot or name not in objectives:
            raise UserError(
                f"--option for compare expects OBJECTIVE.key=value with OBJECTIVE in --objectives, got {pair!r}"
            )
        out.setdefault(name, {}).update(parse_option_pairs([rest]))
    return out


def kdtool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdtool", *args]


def run_logged(cmd: list[str], log: Path, threads: int | None = None) -> tuple[int, str]:
    """Run a child process with its output in ``log``; returns (exit code, last non-empty line)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return code, (lines[-1] if lines else "")


def eval_cmd(spec: CompareSpec, model: str, out: Path) -> list[str]:
    cmd = kdtool_cmd(
        "eval",
        "rougel",
        "--model",
        model,
        "--data",
        spec.eval_data,
        "--output",
        str(out),
        "--seeds",
        ",".join(map(str, spec.eval_seeds)),
        "--max-new-tokens",
        str(spec.max_new_tokens),
        "--batch-size",
        str(spec.eval_batch_size),
    )
    if spec.eval_limit:
        cmd += ["--limit", str(spec.eval_limit)]
    if spec.greedy:
        cmd += ["--greedy"]
    return cmd


def read_rouge(path: Path) -> dict[str, float]:
    """Rouge-L and exact match (mean, std over seeds) from an ``eval rougel --output`` file."""
    summary = json.loads(path.read_text())["summary"]
    return {
        "rougeL": summary["rougeL"]["mean"],
        "rougeL_std": summary["rougeL"]["std"],
        "exact_match": summary["exact_match"]["mean"],
    }


def read_run(run: Path) -> dict[str, Any]:
    """Final held-out losses, wall time, throughput and memory of a finished distill run."""
    summary = json.loads((run / "kdtool.json").read_text())
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_ce" in r]
    final = evals[-1] if evals else {}
    return {
        "eval_ce": final.get("eval_ce"),
        "eval_fkl": final.get("eval_fkl"),
        "eval_rkl": final.get("eval_rkl"),
        "eval_loss": final.get("eval_loss"),
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "peak_cuda_mb": summary.get("peak_cuda_mb"),
        "steps": summary.get("steps"),
        "tokens": summary.get("tokens"),
    }


def distill_cmd(spec: CompareSpec, objective: str, seed: int, run: Path) -> list[str]:
    cmd = kdtool_cmd(
        "distill",
        "--objective",
        objective,
        "--teacher",
        spec.teacher,
        "--student",
        spec.student,
        "--data",
        spec.data,
        "--eval-data",
        spec.eval_data,
        "--output",
        str(run),
        "--seed",
        str(seed),
        "--no-progress",
    )
    if spec.config:
        cmd += ["--config", spec.config]
    for key, value in spec.objective_options.get(objective, {}).items():
        cmd += ["--option", f"{key}={json.dumps(value)}"]
    return cmd + spec.distill_args


def train_and_eval(spec: CompareSpec, objective: str, seed: int, root: Path) -> dict[str, Any]:
    run = root / "runs" / f"{objective}-seed{seed}"
    record: dict[str, Any] = {
        "objective": objective,
        "seed": seed,
        "run": str(run),
        "options": spec.objective_options.get(objective, {}),
    }
    log = root / "logs" / f"{objective}-seed{seed}.log"
    if not (run / "kdtool.json").is_file():
        cmd = distill_cmd(spec, objective, seed, run)
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*")):
            cmd.append("--resume")  # interrupted earlier: continue it
        elif run.exists():
            cmd.append("--overwrite")
        code, last = run_logged(cmd, log, spec.threads)
        if code != 0:
            return {**record, "status": "failed", "error": f"distill exited {code}: {last}"}
    record.update(read_run(run))
    rouge = run / ROUGE_FILE
    if not rouge.is_file():
        code, last = run_logged(eval_cmd(spec, str(run), rouge), log, spec.threads)
        if code != 0:
            return {**record, "status": "failed", "error": f"eval exited {code}: {last}"}
    return {**record, **read_rouge(rouge), "status": "ok"}


def reference(spec: CompareSpec, name: str, model: str, root: Path) -> dict[str, Any]:
    out = root / "reference" / f"{name}-{ROUGE_FILE}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file():
        code, last = run_logged(
            eval_cmd(spec, model, out), root / "logs" / f"reference-{name}.log", spec.threads
        )
        if code != 0:
            return {"objective": name, "status": "failed", "error": f"eval exited {code}: {last}"}
    return {"objective": name, "status": "ok", **read_rouge(out)}


def mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per objective: Rouge-L mean ± std over seeds (of the per-seed means), sorted best first."""
    rows = []
    for objective in dict.fromkeys(r["objective"] for r in results):
        ok = [r for r in results if r["objective"] == objective and r["status"] == "ok"]
        failed = [r for r in results if r["objective"] == objective and r["status"] != "ok"]
        scores = [r["rougeL"] for r in ok]
        rows.append(
            {
                "objective": objective,
                "seeds": len(ok),
                "failed": len(failed),
                "rougeL": statistics.fmean(scores) if scores else None,
                "rougeL_std": statistics.stdev(scores)
                if len(scores) > 1
                else (ok[0]["rougeL_std"] if ok else None),
                "exact_match": mean_of(ok, "exact_match"),
                "eval_ce": mean_of(ok, "eval_ce"),
                "eval_fkl": mean_of(ok, "eval_fkl"),
                "wall_time_s": mean_of(ok, "wall_time_s"),
                "tokens_per_s": mean_of(ok, "tokens_per_s"),
                "peak_rss_mb": mean_of(ok, "peak_rss_mb"),
            }
        )
    return sorted(rows, key=lambda r: -1.0 if r["rougeL"] is None else r["rougeL"], reverse=True)


def fmt(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def report_markdown(
    spec: CompareSpec,
    rows: list[dict[str, Any]],
    refs: list[dict[str, Any]],
    results: list[dict[str, Any]],
    elapsed: float,
) -> str:
    seeds_note = "std over training seeds" if len(spec.seeds) > 1 else "std over generation seeds"
    lines = [
        "# kdtool compare",
        "",
        f"- teacher `{spec.teacher}`, student `{spec.student}`, data `{spec.data}`, eval `{spec.eval_data}`",
        f"- objectives {', '.join(spec.objectives)}; training seeds {spec.seeds}; distill flags "
        f"`{' '.join(spec.distill_args) or '(defaults)'}`"
        + (f", config `{spec.config}`" if spec.config else ""),
        f"- Rouge-L (MiniLLM protocol): generation seeds {spec.eval_seeds}, "
        f"{'greedy' if spec.greedy else 'sampling at temperature 1'}, max {spec.max_new_tokens} new tokens"
        + (f", first {spec.eval_limit} examples" if spec.eval_limit else ""),
        f"- total wall time {elapsed / 60:.1f} min",
        "",
        f"| # | objective | Rouge-L (mean ± {seeds_note}) | exact match | eval CE | KL(teacher‖student) | wall s | tok/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['objective']} | {fmt(r['rougeL'])} ± {fmt(r['rougeL_std'])} | {fmt(r['exact_match'])} | "
            f"{fmt(r['eval_ce'], '.3f')} | {fmt(r['eval_fkl'], '.4f')} | {fmt(r['wall_time_s'], '.0f')} | "
            f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_rss_mb'], ',.0f')} |"
        )
    for ref in refs:
        lines.append(
            f"| ref | {ref['objective']} | {fmt(ref.get('rougeL'))} ± {fmt(ref.get('rougeL_std'))} | "
            f"{fmt(ref.get('exact_match'))} | | | | | |"
        )
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""] + [
            f"- {r['objective']} seed {r['seed']}: {r['error']}" for r in failed
        ]
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict[str, Any]], results: list[dict[str, Any]], refs: list[dict[str, Any]], root: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["rougeL"] is not None]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(done) + 2), 4))
    ax.bar(
        [r["objective"] for r in done],
        [r["rougeL"] for r in done],
        yerr=[r["rougeL_std"] or 0 for r in done],
        capsize=4,
        color="tab:blue",
    )
    for ref, style in zip(refs, ("--", ":"), strict=False):
        if ref.get("rougeL") is not None:
            ax.axhline(ref["rougeL"], linestyle=style, color="gray", label=ref["objective"])
    ax.set_ylabel("Rouge-L")
    ax.set_title("Rouge-L per objective (mean ± std)")
    ax.legend()
    fig.tight_layout()
    bars = root / "rougel.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        metrics = Path(r["run"]) / "metrics.jsonl"
        if r["status"] != "ok" or not metrics.is_file():
            continue
        evals = [m for m in map(json.loads, metrics.read_text().splitlines()) if "eval_ce" in m]
        ax.plot(
            [m["step"] for m in evals], [m["eval_ce"] for m in evals], label=f"{r['objective']} s{r['seed']}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy / token")
    ax.set_title("Training curves")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves = root / "curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)
    return [bars, curves]


def print_table(rows: list[dict[str, Any]], refs: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="kdtool compare (sorted by Rouge-L)")
    for col in ("objective", "Rouge-L", "± std", "exact match", "eval CE", "KL(t‖s)", "wall s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["objective"],
            fmt(r["rougeL"]),
            fmt(r["rougeL_std"]),
            fmt(r["exact_match"]),
            fmt(r["eval_ce"], ".3f"),
            fmt(r["eval_fkl"], ".4f"),
            fmt(r["wall_time_s"], ".0f"),
        )
    for ref in refs:
        table.add_row(
            f"[dim]{ref['objective']} (reference)",
            fmt(ref.get("rougeL")),
            fmt(ref.get("rougeL_std")),
            fmt(ref.get("exact_match")),
            "",
            "",
            "",
        )
    console.print(table)


def run_compare(spec: CompareSpec, console: Console | None = None) -> Path:
    console = console or Console()
    root = Path(spec.output)
    spec_file = root / "compare.json"
    if spec.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {spec.jobs}")
    if spec_file.is_file() and identity(json.loads(spec_file.read_text())) != identity(asdict(spec)):
        raise UserError(f"{root} holds a comparison with other settings; choose another --output")
    for sub in ("runs", "logs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(asdict(spec), indent=2))
    started = time.perf_counter()
    jobs = [(o, s) for o in spec.objectives for s in spec.seeds]
    results: list[dict[str, Any]] = [{} for _ in jobs]
    done = 0

    def one(i: int) -> tuple[int, dict[str, Any], float]:
        t0 = time.perf_counter()
        return i, train_and_eval(spec, *jobs[i], root), time.perf_counter() - t0

    label = "training and evaluating" + (f" ({spec.jobs} at a time)" if spec.jobs > 1 else "")
    with (
        console.status(f"{len(jobs)} run(s): {label}") as status,
        ThreadPoolExecutor(max_workers=spec.jobs) as pool,
    ):
        for future in as_completed([pool.submit(one, i) for i in range(len(jobs))]):
            i, result, seconds = future.result()
            results[i] = result
            done += 1
            objective, seed = jobs[i]
            state = "[green]ok" if result["status"] == "ok" else f"[red]failed[/]: {result['error']}"
            score = f" Rouge-L {result['rougeL']:.2f}" if result["status"] == "ok" else ""
            console.print(f"[{done}/{len(jobs)}] {objective} seed {seed}: {state}{score} ({seconds:.0f} s)")
            status.update(f"{len(jobs) - done} run(s) left: {label}")
    with (
        console.status("evaluating the teacher and the undistilled student"),
        ThreadPoolExecutor(max_workers=min(spec.jobs, 2)) as pool,
    ):
        refs = list(
            pool.map(
                lambda nm: reference(spec, nm[0], nm[1], root),
                [("teacher", spec.teacher), ("student (no distillation)", spec.student)],
            )
        )
    rows = aggregate(results)
    elapsed = time.perf_counter() - started
    (root / "results.json").write_text(
        json.dumps({"runs": results, "summary": rows, "reference": refs, "spec": asdict(spec)}, indent=2)
    )
    (root / "report.md").write_text(report_markdown(spec, rows, refs, results, elapsed))
    plot(rows, results, refs, root)
    print_table(rows, refs, console)
    console.print(f"report: {root / 'report.md'}  results: {root / 'results.json'}  plots: {root}/*.png")
    return root
