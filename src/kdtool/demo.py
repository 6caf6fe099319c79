"""``kdtool demo``: the whole pipeline on the built-in task, offline, on a CPU.

1. write the synthetic data set; 2. build a teacher (2 layers × 96) and a student (1 × 64) from
configs; 3. train the teacher with ``sft``; 4. ``kdtool compare`` every registered objective
(``sft`` is the no-KD baseline) from the same initial student with the same budget, evaluated with
held-out loss and Rouge-L, two runs at a time on a machine with two cores or more; 5. print the
table and where the report is. Interrupted, the same command continues where it stopped (the
teacher from its checkpoint, the comparison run by run).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from kdtool.config import resolve
from kdtool.errors import UserError

TEACHER = dict(n_layer=2, n_embd=96, n_head=4, seed=1)
STUDENT = dict(n_layer=1, n_embd=64, n_head=2, seed=2)
TEACHER_TRAIN = dict(objective="sft", max_steps=800, batch_size=64, lr=3e-3, warmup_steps=50)
STUDENT_FLAGS = [
    "--max-steps",
    "400",
    "--batch-size",
    "64",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "30",
    "--max-length",
    "128",
    "--eval-every",
    "100",
]
EVAL = dict(eval_seeds=[10, 20, 30], eval_limit=100, max_new_tokens=16, eval_batch_size=50, threads=1)
# One torch thread per run, as many runs at once as there are cores (at most 2: tiny models).
JOBS = max(1, min(2, os.cpu_count() or 1))
# Answers of the built-in task are at most 7 tokens: short rollouts keep minillm's steps cheap.
DEMO_OPTIONS = {"minillm": {"max_new_tokens": 16, "rollout_batch_size": 64}}
QUICK = dict(teacher_steps=30, student_steps="10", eval_seeds=[10], eval_limit=8)


def prepare(out: Path) -> dict[str, Path]:
    """Data and freshly initialised models, written as ordinary Hugging Face directories."""
    from kdtool.synthetic import build_tokenizer, save_model, write_dataset

    tok = build_tokenizer()
    train, test = write_dataset(out / "data", n_train=4000, n_test=200, seed=0)
    return {
        "train": train,
        "test": test,
        "teacher_init": save_model(out / "init" / "teacher", tok, **TEACHER),
        "student_init": save_model(out / "init" / "student", tok, **STUDENT),
    }


def train_teacher(paths: dict[str, Path], out: Path, steps: int, console: Console) -> Path:
    from kdtool.trainer import train

    run = out / "teacher"
    if (run / "kdtool.json").is_file():
        console.print(f"[bold]teacher[/] (sft, 2 layers × 96): already trained in {run}")
        return run
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*"))
    console.print(f"[bold]teacher[/] (sft, 2 layers × 96){': resuming' if resume else ''}")
    flags: dict[str, Any] = dict(
        TEACHER_TRAIN,
        max_steps=steps,
        student=str(paths["teacher_init"]),
        output=str(run),
        data=str(paths["train"]),
        eval_data=str(paths["test"]),
        max_length=128,
        eval_batches=4,
        log_every=50,
    )
    return train(resolve(None, flags), resume=resume, overwrite=not resume, console=console)


def demo_objectives() -> list[str]:
    """Every registered objective that trains from a live teacher, sft (the baseline) last."""
    from kdtool.registry import available

    names = [n for n in available() if n != "sft"]
    return [*names, "sft"]


def run_demo(
    out: Path,
    quick: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    objectives: list[str] | None = None,
) -> Path:
    from kdtool.compare import CompareSpec, run_compare

    console = console or Console()
    marker, settings = out / "demo.json", {"quick": quick}
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not marker.is_file():
            raise UserError(
                f"{out} is not empty and holds no earlier demo; choose another --output or pass --overwrite"
            )
        elif json.loads(marker.read_text()) != settings:
            raise UserError(f"{out} holds a demo with other settings; pass --overwrite to start afresh")
        else:
            console.print(f"continuing the demo in {out} (finished runs are kept; --overwrite starts afresh)")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))
    started = time.perf_counter()
    paths = prepare(out)
    teacher = train_teacher(
        paths, out, QUICK["teacher_steps"] if quick else TEACHER_TRAIN["max_steps"], console
    )
    flags = list(STUDENT_FLAGS)
    evaluation: dict[str, Any] = dict(EVAL)
    if quick:
        flags[flags.index("--max-steps") + 1] = QUICK["student_steps"]
        evaluation.update(eval_seeds=QUICK["eval_seeds"], eval_limit=QUICK["eval_limit"])
    names = objectives or demo_objectives()
    spec = CompareSpec(
        objectives=names,
        objective_options={k: v for k, v in DEMO_OPTIONS.items() if k in names},
        seeds=[1],
        teacher=str(teacher),
        student=str(paths["student_init"]),
        data=str(paths["train"]),
        eval_data=str(paths["test"]),
        output=str(out / "compare"),
        distill_args=flags,
        jobs=JOBS,
        **evaluation,
    )
    console.print(f"[bold]compare[/] {', '.join(spec.objectives)} (student 1 layer × 64, same budget each)")
    report = run_compare(spec, console=console)
    console.print(
        f"demo finished in {(time.perf_counter() - started) / 60:.1f} min; report: {report / 'report.md'}"
    )
    return out
