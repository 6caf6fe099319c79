"""``kdtool demo``: the whole pipeline on the built-in task, offline, on a CPU.

The setting is the usual real one: the teacher learned the task from many labelled examples
(20,000), the student gets few (``STUDENT_EXAMPLES``), and on one sub-task ("pick a letter of the
list") every prompt has several valid answers with a known, uniform distribution, of which each
reference shows one. The teacher knows the task (≥ 90% valid greedy, ≥ 80% sampled on every
sub-task); its distributions carry what the few references do not.

1. write the data (the teacher's 20,000 examples, the student's first ``STUDENT_EXAMPLES`` of
   them, 1,000 held-out prompts none of which is in training);
2. the teacher: the checkpoint shipped in ``kdtool/assets/demo_teacher`` (trained by
   :func:`train_teacher`, the same ``kdtool distill`` command that ``--train-teacher`` runs);
3. ``kdtool compare`` over 3 training seeds: ``sft`` (no teacher), ``fkl``, ``rkl``, ``slim``,
   ``atkd`` from the same random student, ``minillm`` from the same seed's ``sft`` student (as in
   the paper), every run with the same flags;
4. validity per sub-task (greedy, sampled, exact expectation), the answer coverage on "pick",
   Rouge-L and held-out CE for every student, the teacher and the untrained student; the table
   with paired differences to ``sft``.

Interrupted, the same command continues where it stopped (the comparison run by run).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from kdtool.errors import UserError

# torch's fused GELU: about 1.7x faster on a CPU than GPT-2's tanh approximation at these sizes
TEACHER = dict(n_layer=2, n_embd=96, n_head=4, seed=1, activation="gelu")
STUDENT = dict(n_layer=1, n_embd=64, n_head=2, seed=2, activation="gelu")
TEACHER_EXAMPLES, TEST_EXAMPLES, DATA_SEED = 20_000, 1_000, 0
STUDENT_EXAMPLES = 1_000
TEACHER_TRAIN = dict(objective="sft", max_steps=4000, batch_size=64, lr=3e-3, warmup_steps=100, seed=0)
# The shipped teacher's command ({...}: paths that `prepare` writes); its recipe.json records it.
TEACHER_ARGS = [
    "distill",
    *(f"--{k.replace('_', '-')}={v}" for k, v in TEACHER_TRAIN.items()),
    "--student={teacher_init}",
    "--data={train}",
    "--eval-data={test}",
    "--output={output}",
    "--max-length=128",
    "--eval-every=1000",
    "--eval-batches=4",
    "--save-every=1000",
    "--log-every=100",
]
STUDENT_FLAGS = [
    "--max-steps",
    "1000",
    "--batch-size",
    "64",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "50",
    "--max-length",
    "128",
    "--eval-every",
    "250",
    # The engine's CPU default is now 4 × H = 256 rows; the committed report was trained with one chunk
    # per micro-batch (the rule before: 8,192 rows at V = 92). Chunks change only float rounding, but
    # the report's figures then reproduce bit for bit.
    "--chunk-size",
    "8192",
]
OBJECTIVES = ["sft", "fkl", "rkl", "slim", "atkd", "minillm"]
SEEDS = [1, 2, 3]
INIT_FROM = {"minillm": "sft"}  # MiniLLM starts from the SFT student (paper and official code)
EVAL = dict(eval_seeds=[10, 20, 30], max_new_tokens=16, eval_batch_size=100, threads=1)
# One torch thread per run, as many runs at once as there are cores (at most 2: tiny models).
JOBS = max(1, min(2, os.cpu_count() or 1))
# Answers of the built-in task are at most 6 tokens (5 characters and EOS): short rollouts keep minillm's steps cheap.
DEMO_OPTIONS = {"minillm": {"max_new_tokens": 16, "rollout_batch_size": 64}}
QUICK = dict(teacher_steps=30, student_steps="10", seeds=[1], eval_seeds=[10], eval_limit=40)


def shipped_teacher() -> Path:
    """The demo teacher that ships with kdtool (a Hugging Face model directory, ~1 MB)."""
    return Path(str(resources.files("kdtool") / "assets" / "demo_teacher"))


def prepare(out: Path) -> dict[str, Path]:
    """Data and freshly initialised models, written as ordinary Hugging Face directories."""
    from kdtool.synthetic import build_tokenizer, save_model, write_dataset

    tok = build_tokenizer()
    train, test = write_dataset(out / "data", n_train=TEACHER_EXAMPLES, n_test=TEST_EXAMPLES, seed=DATA_SEED)
    student_train = out / "data" / "student_train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    student_train.write_text("".join(lines[:STUDENT_EXAMPLES]))
    return {
        "train": train,
        "student_train": student_train,
        "test": test,
        "teacher_init": save_model(out / "init" / "teacher", tok, **TEACHER),
        "student_init": save_model(out / "init" / "student", tok, **STUDENT),
    }


def teacher_args(paths: dict[str, Path], run: Path) -> list[str]:
    """The ``kdtool distill`` command that trained the shipped teacher, for these paths."""
    names = {k: str(v) for k, v in paths.items()}
    return [a.format(**names, output=run) for a in TEACHER_ARGS]


def train_teacher(paths: dict[str, Path], out: Path, console: Console, steps: int | None = None) -> Path:
    """Train the teacher with kdtool's own command (``steps`` shortens it: the quick demo)."""
    from kdtool.compare import kdtool_cmd, run_logged

    run = out / "teacher"
    if (run / "kdtool.json").is_file():
        console.print(f"[bold]teacher[/] (sft, 2 layers × 96): already trained in {run}")
        return run
    args = teacher_args(paths, run)
    if steps is not None:  # the same command, shortened: every step count becomes `steps`
        short = {"--max-steps", "--eval-every", "--save-every"}
        args = [f"{a.split('=')[0]}={steps}" if a.split("=")[0] in short else a for a in args]
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*"))
    args.append("--resume" if resume else "--overwrite")
    console.print(f"[bold]teacher[/]: kdtool {' '.join(args)}")
    with console.status("training the teacher (about 6 min on a 2-core CPU)"):
        code, last = run_logged(kdtool_cmd(*args, "--no-progress"), out / "teacher.log", threads=1)
    if code != 0:
        raise UserError(f"training the teacher failed ({last}); see {out / 'teacher.log'}")
    return run


def demo_objectives(all_objectives: bool = False) -> list[str]:
    """The demo's objectives (with ``all_objectives``, every registered one), sft first."""
    from kdtool.registry import available

    if not all_objectives:
        return list(OBJECTIVES)
    return [*OBJECTIVES, *(n for n in available() if n not in OBJECTIVES)]


def check_marker(out: Path, settings: dict[str, Any], overwrite: bool, console: Console) -> None:
    marker = out / "demo.json"
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


def run_demo(
    out: Path,
    quick: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    objectives: list[str] | None = None,
    train_teacher_too: bool = False,
    all_objectives: bool = False,
) -> Path:
    from kdtool.compare import CompareSpec, run_compare

    console = console or Console()
    names = objectives or demo_objectives(all_objectives)
    settings = {"quick": quick, "train_teacher": train_teacher_too, "objectives": names}
    check_marker(out, settings, overwrite, console)
    started = time.perf_counter()
    paths = prepare(out)
    if train_teacher_too or quick:  # quick: a few steps of the same command (a smoke test of it)
        teacher = train_teacher(paths, out, console, QUICK["teacher_steps"] if quick else None)
    else:
        teacher = shipped_teacher()
        console.print(f"[bold]teacher[/]: the shipped checkpoint {teacher} (`--train-teacher` retrains it)")
    flags = list(STUDENT_FLAGS)
    evaluation: dict[str, Any] = dict(EVAL, seeds=SEEDS)
    if quick:
        flags[flags.index("--max-steps") + 1] = QUICK["student_steps"]
        evaluation.update(
            seeds=QUICK["seeds"], eval_seeds=QUICK["eval_seeds"], eval_limit=QUICK["eval_limit"]
        )
    spec = CompareSpec(
        objectives=names,
        objective_options={k: v for k, v in DEMO_OPTIONS.items() if k in names},
        teacher=str(teacher),
        student=str(paths["student_init"]),
        data=str(paths["student_train"]),
        eval_data=str(paths["test"]),
        output=str(out / "compare"),
        distill_args=flags,
        jobs=JOBS,
        init_from={k: v for k, v in INIT_FROM.items() if k in names and v in names},
        baseline="sft" if "sft" in names else None,
        primary_metric="valid",
        metrics_module="kdtool.task_eval",
        **evaluation,
    )
    console.print(
        f"[bold]compare[/] {', '.join(spec.objectives)} × seeds {spec.seeds} "
        f"(student 1 layer × 64, {STUDENT_EXAMPLES} labelled examples, same budget each)"
    )
    report = run_compare(spec, console=console)
    console.print(
        f"demo finished in {(time.perf_counter() - started) / 60:.1f} min; report: {report / 'report.md'}"
    )
    return out
