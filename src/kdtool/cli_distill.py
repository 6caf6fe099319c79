"""``kdtool distill``: flags (over an optional config file) → one validated config → the trainer.

Each flag is named as the config field it sets (``--batch-size`` → ``batch_size``); ``None`` means
"not given", so the config file's value (or the default) stands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kdtool.options import ChatTemplateChoice, TrustRemoteCode

Opt = typer.Option
console = Console()
err_console = Console(stderr=True)
# parameters of `distill` that are not config fields of the same name
NOT_CONFIG = {"config", "option", "no_progress", "resume", "overwrite"}


def distill(
    objective: Annotated[str | None, Opt(help="Objective name (see `kdtool objectives`).")] = None,
    teacher: Annotated[str | None, Opt(help="Teacher model: local directory or hub id.")] = None,
    student: Annotated[
        str | None, Opt(help="Student model to start from: local directory or hub id.")
    ] = None,
    data: Annotated[
        str | None, Opt(help="Training data: JSONL or JSON array (alpaca, dolly, prompt/response).")
    ] = None,
    output: Annotated[str | None, Opt(help="Run directory.")] = None,
    config: Annotated[Path | None, Opt(help="YAML or TOML config file; flags override it.")] = None,
    option: Annotated[
        list[str] | None, Opt("--option", "-O", help="Objective option key=value (repeatable).")
    ] = None,
    teacher_cache: Annotated[
        str | None, Opt(help="Sparse teacher-logit cache from `kdtool cache-logits`.")
    ] = None,
    eval_data: Annotated[str | None, Opt(help="Held-out data (default: a split of --data).")] = None,
    prompt_field: Annotated[str | None, Opt(help="Field holding the prompt/instruction.")] = None,
    response_field: Annotated[str | None, Opt(help="Field holding the response.")] = None,
    skip_bad_lines: Annotated[
        bool | None, Opt("--skip-bad-lines", help="Skip and count malformed lines.")
    ] = None,
    template: ChatTemplateChoice = None,
    max_steps: Annotated[int | None, Opt(help="Optimizer steps (overrides --epochs).")] = None,
    epochs: Annotated[float | None, Opt(help="Epochs over the training data.")] = None,
    batch_size: Annotated[int | None, Opt(help="Examples per micro-batch.")] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate (AdamW).")] = None,
    warmup_steps: Annotated[int | None, Opt(help="Linear warm-up steps.")] = None,
    max_length: Annotated[int | None, Opt(help="Max tokens of prompt + response.")] = None,
    chunk_size: Annotated[int | None, Opt(help="Rows per chunk in the token-loss engine.")] = None,
    seed: Annotated[int | None, Opt(help="Random seed.")] = None,
    fsdp: Annotated[bool | None, Opt("--fsdp", help="Shard the student with FSDP2 (under torchrun).")] = None,
    fsdp_teacher: Annotated[bool | None, Opt("--fsdp-teacher", help="Shard the teacher with FSDP2.")] = None,
    teacher_device_map: Annotated[
        str | None, Opt(help="Spread the teacher over devices (e.g. auto).")
    ] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[
        str | None, Opt(help="auto (bf16 autocast and bf16 teacher on CUDA), float32 or bfloat16.")
    ] = None,
    dist_timeout_minutes: Annotated[
        float | None, Opt(help="Timeout of collectives under torchrun (default 60).")
    ] = None,
    log_every: Annotated[int | None, Opt(help="Steps between metrics.jsonl lines.")] = None,
    eval_every: Annotated[int | None, Opt(help="Steps between held-out evals.")] = None,
    eval_batches: Annotated[int | None, Opt(help="Held-out batches per eval.")] = None,
    save_every: Annotated[int | None, Opt(help="Steps between checkpoints.")] = None,
    lora: Annotated[
        bool | None, Opt("--lora", help="Train LoRA adapters on the frozen student (needs kdtool[lora]).")
    ] = None,
    lora_r: Annotated[int | None, Opt(help="LoRA rank (default 8).")] = None,
    lora_alpha: Annotated[float | None, Opt(help="LoRA alpha (default 16; scale = alpha / r).")] = None,
    lora_dropout: Annotated[float | None, Opt(help="Dropout on the LoRA branch (default 0).")] = None,
    lora_target_modules: Annotated[
        str | None, Opt(help="Comma-separated module names to adapt (default: peft's for the architecture).")
    ] = None,
    merge: Annotated[
        bool | None, Opt("--merge", help="With --lora: also write the merged model to the run directory.")
    ] = None,
    report_to: Annotated[
        str | None,
        Opt(help="Also log metrics to tensorboard, wandb and/or trackio (comma-separated), or none."),
    ] = None,
    responses: Annotated[
        str | None,
        Opt(
            help="Where responses come from: reference (the data's), student (on-policy, GKD) or teacher "
            "(sequence-level KD)."
        ),
    ] = None,
    on_policy_fraction: Annotated[
        float | None,
        Opt(help="Share of micro-batches answered by the student instead (GKD's lmbda; rest: --responses)."),
    ] = None,
    max_new_tokens: Annotated[int | None, Opt(help="Max tokens of a sampled response (default 128).")] = None,
    temperature: Annotated[float | None, Opt(help="Sampling temperature of responses (default 1).")] = None,
    top_p: Annotated[float | None, Opt(help="Nucleus sampling of responses (default 1 = off).")] = None,
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bar.")] = False,
    trust_remote_code: TrustRemoteCode = None,
    resume: Annotated[
        bool, Opt("--resume", help="Continue the run in --output from its last checkpoint.")
    ] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace whatever is in --output.")] = False,
) -> None:
    """Distil TEACHER into STUDENT with an objective; writes a Hugging Face model to OUTPUT."""
    given = {k: v for k, v in locals().items() if k not in NOT_CONFIG}  # first: only the parameters
    from kdtool.config import parse_option_pairs, resolve

    flags: dict[str, Any] = dict(
        given, progress=False if no_progress else None, objective_options=parse_option_pairs(option)
    )
    cfg = resolve(config, flags)  # no torch yet: a bad flag or config is reported at once
    from kdtool.trackers import require_installed

    require_installed(cfg.report_to)
    if cfg.lora:
        from kdtool.lora import require_peft_installed

        require_peft_installed()
    # The next ~3 s are imports; on a terminal say so at once (transient: nothing is left in logs).
    with err_console.status("importing torch and transformers"):
        from kdtool.trainer import train

    root = train(cfg, resume=resume, overwrite=overwrite, console=err_console)
    if os.environ.get("RANK", "0") == "0":
        console.print(f"student written to {root} ({timing_of(root)})", soft_wrap=True, highlight=False)


def timing_of(root: Path) -> str:
    """``wall 61.2 s, of which evaluation 3.1 s (5.1%)``, from the run's ``kdtool.json``."""
    summary = json.loads((root / "kdtool.json").read_text())
    wall, spent = summary["wall_time_s"], summary["eval_time_s"]
    return f"wall {wall:.1f} s, of which evaluation {spent:.1f} s ({100 * summary['eval_share']:.1f}%)"
