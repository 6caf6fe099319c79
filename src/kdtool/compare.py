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
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from kdtool.compare_report import aggregate, plot, print_table, report_markdown
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
    # objective -> objective whose same-seed final student it starts from (MiniLLM starts from SFT)
    init_from: dict[str, str] = field(default_factory=dict)
    baseline: str | None = "sft"  # paired differences in the report are taken to this objective
    primary_metric: str = "rougeL"  # sorts the table and the bar plot
    # `python -m MODULE --model M --data EVAL --rougel R --output OUT` writes a flat JSON of extra metrics
    metrics_module: str | None = None
    # objective -> extra distill flags after distill_args (they win), e.g. a shorter minillm phase
    objective_args: dict[str, list[str]] = field(default_factory=dict)
    # label -> registered objective, for entries `label=objective` of --objectives (the same objective
    # twice with different --objective-args, e.g. rkl on references and on the student's samples)
    aliases: dict[str, str] = field(default_factory=dict)


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


def check_init_from(spec: CompareSpec) -> None:
    for objective, source in spec.init_from.items():
        if objective not in spec.objectives or source not in spec.objectives:
            raise UserError(
                f"--init-from {objective}={source}: both must be in --objectives ({', '.join(spec.objectives)})"
            )
        if source in spec.init_from:
            raise UserError(f"--init-from {objective}={source}: {source} itself starts from another run")


def run_dir(root: Path, objective: str, seed: int) -> Path:
    return root / "runs" / f"{objective}-seed{seed}"


def initial_student(spec: CompareSpec, objective: str, seed: int, root: Path) -> str:
    """The checkpoint a run starts from: the shared student, or another objective's same-seed result."""
    source = spec.init_from.get(objective)
    return spec.student if source is None else str(run_dir(root, source, seed))


def distill_cmd(spec: CompareSpec, objective: str, seed: int, run: Path, student: str) -> list[str]:
    cmd = kdtool_cmd(
        "distill",
        "--objective",
        spec.aliases.get(objective, objective),
        "--teacher",
        spec.teacher,
        "--student",
        student,
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
    return cmd + spec.distill_args + spec.objective_args.get(objective, [])


def metrics_cmd(spec: CompareSpec, model: str, rouge: Path, out: Path) -> list[str]:
    assert spec.metrics_module is not None
    cmd = [sys.executable, "-m", spec.metrics_module, "--model", model, "--data", spec.eval_data,
           "--rougel", str(rouge), "--output", str(out)]  # fmt: skip
    return cmd + (["--limit", str(spec.eval_limit)] if spec.eval_limit else [])


def extra_metrics(spec: CompareSpec, model: str, rouge: Path, out: Path, log: Path) -> dict[str, Any]:
    """The metrics module's flat JSON for one model (computed once, then read back)."""
    if spec.metrics_module is None:
        return {}
    if not out.is_file():
        code, last = run_logged(metrics_cmd(spec, model, rouge, out), log, spec.threads)
        if code != 0:
            return {"status": "failed", "error": f"{spec.metrics_module} exited {code}: {last}"}
    return dict(json.loads(out.read_text()))


def train_and_eval(spec: CompareSpec, objective: str, seed: int, root: Path) -> dict[str, Any]:
    run = run_dir(root, objective, seed)
    student = initial_student(spec, objective, seed, root)
    record: dict[str, Any] = {
        "objective": objective,
        "seed": seed,
        "run": str(run),
        "init": spec.init_from.get(objective) and f"{spec.init_from[objective]}-seed{seed}",
        "options": spec.objective_options.get(objective, {}),
    }
    log = root / "logs" / f"{objective}-seed{seed}.log"
    if objective in spec.init_from and not (Path(student) / "kdtool.json").is_file():
        return {**record, "status": "failed", "error": f"its initial student {student} did not finish"}
    if not (run / "kdtool.json").is_file():
        cmd = distill_cmd(spec, objective, seed, run, student)
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
    extra = extra_metrics(spec, str(run), rouge, run / "metrics.json", log)
    return {**record, **read_rouge(rouge), "status": "ok", **extra}


def reference(spec: CompareSpec, name: str, model: str, root: Path) -> dict[str, Any]:
    out = root / "reference" / f"{name}-{ROUGE_FILE}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file():
        code, last = run_logged(
            eval_cmd(spec, model, out), root / "logs" / f"reference-{name}.log", spec.threads
        )
        if code != 0:
            return {"objective": name, "status": "failed", "error": f"eval exited {code}: {last}"}
    log = root / "logs" / f"reference-{name}.log"
    extra = extra_metrics(spec, model, out, out.with_name(f"{name}-metrics.json"), log)
    return {"objective": name, "status": "ok", **read_rouge(out), **extra}


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
    check_init_from(spec)
    spec_file.write_text(json.dumps(asdict(spec), indent=2))
    started = time.perf_counter()
    jobs = [(o, s) for o in spec.objectives for s in spec.seeds]
    results: list[dict[str, Any]] = [{} for _ in jobs]
    finished = {job: threading.Event() for job in jobs}
    done = 0

    def one(i: int) -> tuple[int, dict[str, Any], float]:
        objective, seed = jobs[i]
        if objective in spec.init_from:  # wait for the run it starts from (submitted before it)
            finished[(spec.init_from[objective], seed)].wait()
        t0 = time.perf_counter()
        try:
            return i, train_and_eval(spec, objective, seed, root), time.perf_counter() - t0
        finally:
            finished[jobs[i]].set()

    # Runs that others start from go first, so a worker never waits on a run that no worker holds.
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0] in spec.init_from)

    label = "training and evaluating" + (f" ({spec.jobs} at a time)" if spec.jobs > 1 else "")
    with (
        console.status(f"{len(jobs)} run(s): {label}") as status,
        ThreadPoolExecutor(max_workers=spec.jobs) as pool,
    ):
        for future in as_completed([pool.submit(one, i) for i in order]):
            i, result, seconds = future.result()
            results[i] = result
            done += 1
            objective, seed = jobs[i]
            state = "[green]ok" if result["status"] == "ok" else f"[red]failed[/]: {result['error']}"
            metric = spec.primary_metric
            score = f" {metric} {result[metric]:.2f}" if isinstance(result.get(metric), float) else ""
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
    rows = aggregate(results, spec.primary_metric)
    elapsed = time.perf_counter() - started
    (root / "results.json").write_text(
        json.dumps({"runs": results, "summary": rows, "reference": refs, "spec": asdict(spec)}, indent=2)
    )
    (root / "report.md").write_text(report_markdown(spec, rows, refs, results, elapsed))
    plot(rows, results, refs, root, spec.primary_metric)
    print_table(rows, refs, console, spec.primary_metric)
    console.print(f"report: {root / 'report.md'}  results: {root / 'results.json'}  plots: {root}/*.png")
    return root
