"""MiniLLM end to end on the built-in task, on a CPU: does the student's reverse KL to the teacher go down?

1. data + the demo's teacher (2 × 96) and a student of 1 layer × 32 (the demo's before it grew to × 64); the teacher is trained with ``sft``
   (the demo's recipe) unless ``WORKDIR/teacher`` already exists;
2. optionally an SFT warm start of the student (the official recipe starts MiniLLM from SFT);
3. ``minillm`` through the ordinary trainer, checkpoints kept;
4. the sequence-level reverse KL[q_θ(y|x) ‖ p(y|x)] on held-out prompts (one seeded sample per
   prompt, ``kdtool.evaluation.sequence_kl.measure_reverse_kl``) for the starting student and every checkpoint.

Usage:
    python examples/minillm_synthetic.py --workdir runs/minillm-synthetic --steps 200 \\
        -O rollout_batch_size=64 -O max_new_tokens=32
Results go to ``WORKDIR/student-OBJECTIVE/rkl.json`` and are printed. ``--objective sft`` measures
the no-KD baseline with the same budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from kdtool.config import parse_option_pairs, resolve
from kdtool.data import TokenizedDataset, load_examples
from kdtool.demo import TEACHER, TEACHER_TRAIN
from kdtool.evaluation.sequence_kl import measure_reverse_kl
from kdtool.models import load_model, load_tokenizer
from kdtool.synthetic import build_tokenizer, save_model, write_dataset
from kdtool.trainer import train

# The student of benchmarks/minillm_synthetic.md (kept fixed so those figures reproduce).
STUDENT = dict(n_layer=1, n_embd=32, n_head=2, seed=2)


def prepare(work: Path, teacher_steps: int) -> dict[str, Path]:
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        write_dataset(data, n_train=4000, n_test=200, seed=0)
        tok = build_tokenizer()
        save_model(work / "init" / "teacher", tok, **TEACHER)
        save_model(work / "init" / "student", tok, **STUDENT)
    paths = {"train": data / "train.jsonl", "test": data / "test.jsonl", "student": work / "init" / "student"}
    if not (work / "teacher" / "model.safetensors").is_file():
        flags = dict(
            TEACHER_TRAIN,
            max_steps=teacher_steps,
            student=str(work / "init" / "teacher"),
            output=str(work / "teacher"),
            data=str(paths["train"]),
            eval_data=str(paths["test"]),
            max_length=128,
            eval_batches=4,
            log_every=50,
            progress=False,
        )
        train(resolve(None, flags), overwrite=True)
    paths["teacher"] = work / "teacher"
    return paths


def heldout_prompts(tok: Any, path: Path, n: int) -> list[list[int]]:
    ds = TokenizedDataset(load_examples(path)[:n], tok, 128, None)
    return [item.input_ids[: item.labels.count(-100)] for item in ds.items]


def rkl(
    model_dir: Path, teacher: Any, prompts: list[list[int]], tok: Any, max_new: int
) -> tuple[float, float]:
    student = load_model(str(model_dir)).eval()
    return measure_reverse_kl(
        student,
        teacher,
        prompts,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=max_new,
        seed=1234,
        vocab_size=len(tok),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/minillm-synthetic"))
    ap.add_argument("--teacher-steps", type=int, default=TEACHER_TRAIN["max_steps"])
    ap.add_argument("--sft-steps", type=int, default=0, help="SFT warm start of the student (0 = none)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of the measured run")
    ap.add_argument(
        "--objective", default="minillm", help="the measured run's objective (e.g. sft as a baseline)"
    )
    ap.add_argument("--name", default=None, help="run folder name (default: student-OBJECTIVE)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--eval-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--option", "-O", action="append", default=[], help="minillm option key=value")
    args = ap.parse_args()
    started = time.perf_counter()
    paths = prepare(args.workdir, args.teacher_steps)
    start = paths["student"]
    common = dict(
        teacher=str(paths["teacher"]),
        data=str(paths["train"]),
        eval_data=str(paths["test"]),
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=128,
        eval_batches=4,
        log_every=10,
        progress=False,
        seed=args.seed,
    )
    if args.sft_steps:
        sft = dict(common, objective="sft", student=str(start), output=str(args.workdir / "student-sft"))
        start = train(resolve(None, dict(sft, max_steps=args.sft_steps, warmup_steps=20)), overwrite=True)
    options = parse_option_pairs(args.option)
    if args.objective == "minillm":
        options = {"max_new_tokens": 32, "rollout_batch_size": 64} | options
    run = args.workdir / (args.name or f"student-{args.objective}")
    cfg = resolve(
        None,
        dict(
            common,
            objective=args.objective,
            objective_options=options,
            student=str(start),
            output=str(run),
            max_steps=args.steps,
            warmup_steps=10,
            save_every=max(1, args.steps // args.checkpoints),
            keep_checkpoints=args.checkpoints + 1,
        ),
    )
    trained_at = time.perf_counter()
    train(cfg, overwrite=True)
    train_seconds = time.perf_counter() - trained_at

    tok = load_tokenizer(str(paths["teacher"]))
    teacher = load_model(str(paths["teacher"])).eval()
    prompts = heldout_prompts(tok, paths["test"], args.eval_prompts)
    models = [("start", 0, start)]
    models += [(p.name, int(p.name.split("-")[1]), p) for p in sorted((run / "checkpoints").glob("step-*"))]
    models.append(("final", args.steps, run))
    rows = []
    with torch.no_grad():
        for name, step, where in models:
            mean, se = rkl(where, teacher, prompts, tok, args.eval_new_tokens)
            rows.append({"model": name, "step": step, "rkl": mean, "se": se})
            print(f"{name:14s} step {step:5d}   KL[q‖p] = {mean:8.3f} ± {se:.3f} nats / response", flush=True)
    result = {
        "command_args": vars(args) | {"workdir": str(args.workdir)},
        "objective_options": options,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    (run / "rkl.json").write_text(json.dumps(result, indent=2))
    print(f"{args.objective} training: {train_seconds:.0f} s; results in {run / 'rkl.json'}")


if __name__ == "__main__":
    main()
