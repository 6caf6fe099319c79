"""One validated config per run: defaults ∪ optional YAML/TOML file ∪ CLI flags (flags win).

The resolved config is saved as ``config.yaml`` in every run directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from kdtool.data_config import DataConfig
from kdtool.errors import UserError
from kdtool.files import read_text

# Default evaluation schedule (`DistillConfig.eval_schedule`): this many evals after step 0,
# reading at most this share of the run's training micro-batches in held-out batches in all.
EVALS_PER_RUN = 10
EVAL_SHARE = 0.05


class DistillConfig(DataConfig):
    """Everything a ``kdtool distill`` run needs (the data-side fields come from ``DataConfig``)."""

    model_config = ConfigDict(extra="forbid")

    # what
    objective: str = Field("fkl", description="Registered objective name (see `kdtool objectives`).")
    objective_options: dict[str, Any] = Field(
        default_factory=dict, description="The objective's own options."
    )
    teacher: str | None = Field(None, description="Teacher: local directory or hub id.")
    student: str = Field(..., description="Student to start from: local directory or hub id.")
    teacher_cache: str | None = Field(None, description="Sparse teacher-logit cache (no teacher loaded).")
    output: str = Field(..., description="Run directory.")
    # data (the training data's fields are DataConfig's)
    eval_data: str | None = Field(None, description="Held-out data; default: a split of --data.")
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Held-out share of --data when no --eval-data."
    )
    # where responses come from (kdtool.responses): the data's, the student's samples, the teacher's
    responses: Literal["reference", "student", "teacher"] = Field(
        "reference",
        description="reference (the data's), student (on-policy, GKD) or teacher (sequence-level KD).",
    )
    on_policy_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of micro-batches answered by the student (GKD's lmbda); the rest come from "
        "--responses (default: 1 with --responses student, else 0).",
    )
    max_new_tokens: int = Field(
        128, gt=0, description="Max tokens of a sampled response (also cut by max_length)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of sampled responses.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of sampled responses (1 = off).")
    # optimisation
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps (overrides --epochs).")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0)
    # engine
    seed: int = 42
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Autocast dtype: auto = bf16 on CUDA, fp32 on CPU."
    )
    chunk_size: int | None = Field(None, gt=0, description="Rows per chunk in the token-loss engine.")
    fsdp: bool = Field(False, description="Shard the student with FSDP2 under torchrun (default: DDP).")
    fsdp_teacher: bool = Field(False, description="Shard the teacher's blocks with FSDP2 under torchrun.")
    teacher_device_map: str | None = Field(
        None, description="Place a teacher too big for one device with transformers' device_map (e.g. auto)."
    )
    dist_timeout_minutes: float = Field(
        60.0,
        gt=0,
        description="Timeout of every collective under torchrun (NCCL's default of 10 min is shorter than "
        "rank 0 writing a large checkpoint while the others wait).",
    )
    trust_remote_code: bool = Field(
        False, description="Let models/tokenizers whose config has an auto_map run their own Python code."
    )
    # LoRA students (kdtool.lora; needs the peft extra)
    lora: bool = Field(False, description="Train LoRA adapters on the frozen student (needs kdtool[lora]).")
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    lora_target_modules: list[str] | None = Field(
        None, description="Module names to adapt (default: peft's per-architecture choice)."
    )
    merge: bool = Field(False, description="With --lora: also write the merged full model to the run.")
    # bookkeeping
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(
        None, gt=0, description="Steps between evals (default: 10 per run, fewer for short runs)."
    )
    eval_batches: int | None = Field(
        None,
        gt=0,
        description="Held-out batches per eval (default: what keeps evaluation at 5% of the run's micro-batches).",
    )
    save_every: int | None = Field(None, gt=0, description="Steps between checkpoints (default: 5 per run).")
    keep_checkpoints: int = Field(2, gt=0)
    progress: bool = True
    report_to: list[str] = Field(
        default_factory=list,
        description="Trackers that also get every metrics.jsonl record: tensorboard, wandb, trackio (or none).",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _parse_report_to(cls, value: Any) -> list[str]:
        from kdtool.trackers import parse_report_to

        return parse_report_to(value)

    def eval_schedule(self, steps: int, held_out_batches: int) -> tuple[int, int]:
        """``(eval_every, eval_batches)``: the given values, else defaults that spend at most
        ``EVAL_SHARE`` of the run's training micro-batches on held-out batches.

        An eval batch (one teacher and one student forward, no backward) costs at most about one
        training micro-batch (the same forwards plus the student's backward), so this keeps
        evaluation under ~10% of the wall time for runs of ≥ 40 micro-batches; shorter runs still
        evaluate at step 0 and at the end.
        """
        budget = max(1, int(EVAL_SHARE * steps * self.grad_accum))  # held-out batches in the run
        every = self.eval_every or max(1, steps // max(1, min(EVALS_PER_RUN, budget)))
        evals = 1 + steps // every + (steps % every != 0)  # step 0, every `every` steps, the last
        batches = self.eval_batches or max(1, min(budget // evals, held_out_batches))
        return every, batches

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _parse_targets(cls, value: Any) -> list[str] | None:
        from kdtool.lora import parse_target_modules

        return parse_target_modules(value)

    @property
    def student_share(self) -> float:
        """The share of micro-batches whose responses the student samples (on-policy)."""
        if self.on_policy_fraction is not None:
            return self.on_policy_fraction
        return 1.0 if self.responses == "student" else 0.0

    @property
    def all_responses_sampled(self) -> bool:
        """No training micro-batch uses the data's responses (so records may be prompts only)."""
        return self.student_share == 1 or self.responses == "teacher"

    def _check_responses(self, cls: Any) -> None:
        if self.responses == "reference" and self.student_share == 0:
            return
        if cls.needs_rollouts:
            raise ValueError(
                f"objective {self.objective!r} samples its own responses: set them with its options, "
                "not --responses / --on-policy-fraction"
            )
        if self.teacher_cache:
            raise ValueError(
                "a --teacher-cache scores the data's responses only: sampled responses need --teacher"
            )
        if not self.teacher:
            raise ValueError("sampled responses (--responses / --on-policy-fraction) need a live --teacher")
        if not cls.needs_teacher and self.student_share > 0:
            raise ValueError(
                f"objective {self.objective!r} does not read the teacher: training it on the student's own "
                "samples teaches nothing (use --responses teacher for sequence-level KD)"
            )

    def _accepts_sparse(self, cls: Any) -> bool:
        try:  # invalid options are reported by the objective itself, with its own message
            options = cls.Options(**self.objective_options)
        except ValidationError:
            return bool(cls.supports_sparse)
        return bool(cls.accepts_sparse(options))

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        from kdtool.registry import get_class

        cls = get_class(self.objective)
        if cls.needs_teacher and not (self.teacher or self.teacher_cache):
            raise ValueError(f"objective {self.objective!r} needs --teacher or --teacher-cache")
        if self.teacher_cache and not self._accepts_sparse(cls):
            from kdtool.registry import available

            able = ", ".join(n for n, c in available().items() if c.supports_sparse)
            detail = " with these options" if cls.supports_sparse else ""
            raise ValueError(
                f"objective {self.objective!r} cannot train from a sparse --teacher-cache{detail} "
                f"(objectives that can: {able})"
            )
        self._check_responses(cls)
        if self.merge and not self.lora:
            raise ValueError("--merge merges a LoRA adapter: it needs --lora")
        if self.lora and self.fsdp:
            raise ValueError("--lora with --fsdp is not supported yet (DDP is: drop --fsdp)")
        return self


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or ``.toml``) config file as ``{option_name: value}`` (``-`` in names read as ``_``).

    Raises:
        UserError: missing, unreadable or non-UTF-8 file, a syntax error (``path:line: reason``),
            or anything but a mapping of names to values.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = read_text(path)
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line N, column M)"
        raise UserError(f"{path}: cannot parse TOML: {exc}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}{_yaml_where(exc)}: cannot parse YAML: {_yaml_reason(exc)}") from exc
    except RecursionError as exc:
        raise UserError(f"{path}: cannot parse config: nested too deeply") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f":{mark.line + 1}"
    position = getattr(exc, "position", None)  # ReaderError (e.g. a control character): no line
    return "" if position is None else f" (character {position})"


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """PyYAML's messages span several lines (context, a caret under the text): keep the reason."""
    problem = getattr(exc, "problem", None)
    if problem:
        context = getattr(exc, "context", None)
        return f"{problem} ({context})" if context else str(problem)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def format_validation_error(exc: ValidationError, file: str | Path | None = None, from_file: Any = ()) -> str:
    """pydantic's errors on one line; an error in a field whose value came from ``file`` names it."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = " ".join(e["msg"].removeprefix("Value error, ").split())
        where = f"{file}: " if file is not None and e["loc"] and e["loc"][0] in from_file else ""
        parts.append(f"{where}{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def resolve(file: str | Path | None, flags: dict[str, Any]) -> DistillConfig:
    """Merge file values and explicitly given flags (``None`` = not given) and validate."""
    values = read_config_file(file) if file else {}
    options = dict(values.get("objective_options") or {})
    options.update(flags.pop("objective_options", None) or {})
    given = {k: v for k, v in flags.items() if v is not None}
    from_file = set(values) - set(given)
    values.update(given)
    values["objective_options"] = options
    try:
        return DistillConfig.model_validate(values)
    except ValidationError as exc:
        raise UserError(f"invalid configuration: {format_validation_error(exc, file, from_file)}") from exc


def parse_option_pairs(pairs: list[str] | None) -> dict[str, Any]:
    """``["ce_weight=0.5", "base=rkl"]`` -> ``{"ce_weight": 0.5, "base": "rkl"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option expects key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
