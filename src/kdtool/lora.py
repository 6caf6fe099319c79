"""LoRA students (``--lora``): the student's base weights stay frozen; only low-rank adapters train.

peft is an optional extra (``pip install 'kdtool[lora]'``) imported only here, and only when a run
uses ``--lora`` or a model directory holds an adapter. peft injects its ``lora.Linear`` layers *in
place* into the transformers model, so the trainer keeps working on that model (``hidden_states``,
``output_head``, rollouts, DDP); the ``PeftModel`` around it is used only to save and load the
adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``).

A run directory without ``--merge`` holds the adapter, the tokenizer and ``kdtool.json`` (whose
``lora.base_model`` names the student it was trained on); ``load_adapter_model`` rebuilds the full
model from them, which is how ``kdtool eval rougel --model RUN`` and ``kdtool compare`` read it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdtool.errors import UserError

if TYPE_CHECKING:  # config validation imports this module; torch and peft load only when used
    import torch
    from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_ADAPTER_DIR = "adapter"  # with --merge: the adapter beside the merged model, not over it
INSTALL_HINT = "pip install 'kdtool[lora]'"


def require_peft(why: str = "--lora needs") -> Any:
    """The ``peft`` module, or one line saying how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise UserError(f"{why} the peft package, which is not installed ({INSTALL_HINT})") from exc
    return peft


def require_peft_installed() -> None:
    """Refuse ``--lora`` in one line when peft is absent, without importing it (nor torch)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise UserError(f"--lora needs the peft package, which is not installed ({INSTALL_HINT})")


def parse_target_modules(value: Any) -> list[str] | None:
    """``"c_attn,c_proj"`` (the flag) or a YAML list -> module names; empty -> ``None`` (peft's default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(x).strip() for x in items if str(x).strip()]
    return names or None


def base_model_id(name_or_path: str) -> str:
    """A local student as an absolute path (eval may run from another directory), a hub id as given."""
    local = Path(name_or_path)
    return str(local.resolve()) if local.is_dir() else name_or_path


def apply_lora(student: nn.Module, cfg: Any) -> Any:
    """Wrap ``student`` in a ``PeftModel`` with the run's LoRA settings; ``student`` is modified in place.

    Adapter initialisation draws from torch's global RNG (already seeded by the trainer), so a
    resumed run builds the same adapter before the checkpoint overwrites it.

    Raises:
        UserError: peft missing, or target modules that peft cannot find in this architecture.
    """
    peft = require_peft()
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        base_model_name_or_path=base_model_id(cfg.student),
    )
    try:
        with warnings.catch_warnings():
            # GPT-2's Conv1D layers: peft warns, then sets fan_in_fan_out itself (nothing to fix).
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to", category=UserWarning)
            model = peft.get_peft_model(student, config)
    except ValueError as exc:  # unknown architecture without --lora-target-modules, or no such module
        raise UserError(f"--lora: {str(exc).splitlines()[0]} (set --lora-target-modules)") from exc
    model.peft_config["default"].base_model_name_or_path = base_model_id(cfg.student)
    return model


def wraps_output_layer(student: nn.Module) -> bool:
    """Whether LoRA wrapped the output layer (then the engine takes its checkpointed path)."""
    head = student.get_output_embeddings()  # type: ignore[operator]
    return hasattr(head, "lora_A")


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft saves them (adapter name stripped from the keys)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def load_adapter_state(peft_model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's adapter tensors into ``peft_model`` (exact copies: resume is bit-exact).

    Raises:
        UserError: the checkpoint's adapter does not match this run's (rank, target modules).
    """
    from peft import set_peft_model_state_dict

    expected = adapter_state(peft_model)
    if set(expected) != set(state) or any(expected[k].shape != state[k].shape for k in state):
        raise UserError("--resume: the checkpoint's adapter does not match this run's LoRA settings")
    set_peft_model_state_dict(peft_model, state)


def is_adapter_dir(name_or_path: str | Path) -> bool:
    """A local directory holding a peft adapter but no full model (a kdtool ``--lora`` run)."""
    local = Path(name_or_path)
    return (local / ADAPTER_CONFIG).is_file() and not (local / "config.json").is_file()


def adapter_base(directory: Path) -> str:
    """The base model of an adapter directory: kdtool's record first, else peft's."""
    from kdtool.files import load_json

    summary = directory / "kdtool.json"
    if summary.is_file():
        record = load_json(summary)
        base = record.get("lora", {}).get("base_model") if isinstance(record, dict) else None
        if base:
            return str(base)
    config = load_json(directory / ADAPTER_CONFIG)
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise UserError(f"{directory / ADAPTER_CONFIG}: names no base model (base_model_name_or_path)")
    return str(base)


def load_adapter_model(directory: str | Path, load_base: Any) -> Any:
    """Base model + adapter, merged into a plain transformers model (generation runs at full speed).

    ``load_base(name_or_path)`` loads the base (``kdtool.models.load_model`` with the caller's
    device and dtype), so the base gets the same checks as any other model.
    """
    directory = Path(directory)
    peft = require_peft(f"{directory} holds a LoRA adapter: loading it needs")
    base = load_base(adapter_base(directory))
    try:
        model = peft.PeftModel.from_pretrained(base, str(directory))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load the adapter in {directory}: {str(exc).splitlines()[0]}") from exc
    # peft froze the base for inference; a plain from_pretrained model trains, and so must this one
    # (it may be the next run's student).
    return model.merge_and_unload().requires_grad_(True)


def save_final(peft_model: Any, root: Path, merge: bool) -> Path:
    """Write the adapter into ``root`` (or ``root/adapter`` beside a merged model with ``merge``).

    Returns the directory holding the adapter. With ``merge`` the merged full model goes into
    ``root`` itself, loadable by plain ``AutoModelForCausalLM.from_pretrained(root)``; the adapter
    must then not sit at the top level, or transformers would load base + adapter instead.
    """
    where = root / MERGED_ADAPTER_DIR if merge else root
    peft_model.save_pretrained(str(where))
    if merge:
        peft_model.merge_and_unload().save_pretrained(root)
    return where


def summary(cfg: Any, peft_model: Any) -> dict[str, Any]:
    """The ``lora`` record of ``kdtool.json`` (target modules as peft resolved them)."""
    targets = peft_model.peft_config["default"].target_modules
    return {
        "base_model": base_model_id(cfg.student),
        "r": cfg.lora_r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
        "merged": cfg.merge,
        "adapter": MERGED_ADAPTER_DIR if cfg.merge else ".",  # relative to the run directory
    }


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
