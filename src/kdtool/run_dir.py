"""A run directory: deciding between a fresh run and a resume, the metrics log, checkpoints and the
final student. Only rank 0 writes; every function here is called on rank 0 unless it says so.

    config.yaml       the resolved config
    metrics.jsonl     one JSON record per log line (start, training windows, evaluations)
    checkpoints/      step-NNNNNN/ (student, trainer_state.pt, config.yaml), newest ``keep``
    model.safetensors, config.json, tokenizer files, kdtool.json   the final student
"""

from __future__ import annotations

import json
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from kdtool import checkpoint, lora
from kdtool.config import DistillConfig, read_config_file
from kdtool.data import LoadReport, Template, TokenizedDataset
from kdtool.distributed import DistInfo
from kdtool.errors import UserError
from kdtool.trackers import Trackers
from kdtool.train_state import TrainState

# Fields that make a run *this* run: resuming with any of them changed is refused.
IDENTITY_FIELDS = (
    "objective",
    "objective_options",
    "student",
    "teacher",
    "teacher_cache",
    "data",
    "seed",
    "batch_size",
    "grad_accum",
    "lr",
    "max_length",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)


@dataclass
class Run:
    """Paths of a run directory."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def log(self, record: dict[str, Any], trackers: Trackers | None = None) -> None:
        """One line of ``metrics.jsonl``, forwarded to the ``--report-to`` trackers."""
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if trackers is not None:
            trackers.log(record)


def prepare_output(
    cfg: DistillConfig, run: Run, resume: bool, overwrite: bool, console: Console | None = None
) -> bool:
    """Decide between a fresh run and a resume; refuse to clobber another run. Returns ``resuming``.

    ``--resume`` on a run that wrote its config but no checkpoint yet (killed during start-up)
    starts it afresh, with a notice on ``console``, when the config matches.
    """
    if run.root.exists() and any(run.root.iterdir()):
        if overwrite:
            shutil.rmtree(run.root)
        elif resume:
            if not run.config.is_file():
                raise UserError(f"--resume: {run.root} holds no kdtool run to resume (no config.yaml)")
            saved = read_config_file(run.config)
            now = cfg.model_dump(mode="json")
            changed = [k for k in IDENTITY_FIELDS if saved.get(k) != now.get(k)]
            if changed:
                raise UserError(f"--resume: {run.root} was started with different {', '.join(changed)}")
            if checkpoint.latest(run.checkpoints) is None:
                if console is not None:
                    console.print(
                        f"--resume: {run.root} stopped before its first checkpoint; starting it afresh"
                    )
                return False
            return True
        elif run.config.is_file():
            raise UserError(
                f"output directory {run.root} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        else:
            raise UserError(
                f"output directory {run.root} is not empty; pass --overwrite to replace its contents"
            )
    run.root.mkdir(parents=True, exist_ok=True)
    return False


def student_device(student: Any) -> torch.device:
    try:
        return next(student.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def peak_memory(device: torch.device | None = None) -> dict[str, float]:
    """This process's peak resident memory, and peak CUDA allocation on ``device`` when it is a GPU (MB)."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device is not None and device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def finish(
    run: Run,
    cfg: DistillConfig,
    student: Any,
    tokenizer: Any,
    template: Template,
    state: TrainState,
    train_ds: TokenizedDataset,
    report: LoadReport,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter: Any | None = None,
) -> None:
    """Write the final student in Hugging Face format (or its LoRA adapter, and with ``--merge``
    the merged model) plus kdtool's run summary."""
    extra: dict[str, Any] = {}
    if adapter is not None:
        extra["lora"] = lora.summary(cfg, adapter)  # before merging unwraps the model
        lora.save_final(adapter, run.root, cfg.merge)
    else:
        student.save_pretrained(run.root, state_dict=state_dict)
    tokenizer.save_pretrained(run.root)
    summary = {
        "objective": cfg.objective,
        "objective_options": cfg.objective_options,
        "steps": state.step,
        "tokens": state.tokens,
        "wall_time_s": round(state.elapsed, 2),
        "eval_time_s": round(state.eval_time, 2),
        "eval_share": round(state.eval_time / max(state.elapsed, 1e-9), 4),
        "tokens_per_s": round(state.tokens / max(state.elapsed, 1e-9), 1),
        **peak_memory(student_device(student)),
        "examples": len(train_ds),
        "truncated_examples": train_ds.num_truncated,
        "skipped_lines": report.bad_lines,
        "template": template.to_dict(),
        **extra,
    }
    (run.root / "kdtool.json").write_text(json.dumps(summary, indent=2))


def start_record(cfg: DistillConfig, train_ds: Any, eval_ds: Any, report: Any, steps: int, info: DistInfo,
                 sharded: bool, teacher_sharded: bool, student: Any) -> dict[str, Any]:  # fmt: skip
    """The first line of ``metrics.jsonl``: what the run is made of."""
    return {
        "event": "start",
        "examples": len(train_ds),
        "eval_examples": len(eval_ds or []),
        "truncated": train_ds.num_truncated,
        "bad_lines": len(report.bad_lines),
        "steps": steps,
        "world_size": info.world,
        "strategy": ("fsdp" if sharded else "ddp") if info.enabled else "single",
        "teacher_sharded": teacher_sharded,
        "trainable_parameters": lora.trainable_parameters(student)[0],
        # float results are reproducible bit for bit only with the same torch and the same CPU kernels
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def train_record(state: TrainState, scheduler: Any, window: dict[str, list[float]]) -> dict[str, Any]:
    """A training line of ``metrics.jsonl``: the window's mean of each metric (its sum of tokens)."""
    record = {k: (sum(v) if k == "tokens" else sum(v) / len(v)) for k, v in window.items()}
    speed = state.tokens / max(state.elapsed, 1e-9)
    lr = scheduler.get_last_lr()[0]
    return {"step": state.step, "lr": lr, "elapsed": state.elapsed, "tokens_per_s": speed, **record}
