"""Atomic, self-describing checkpoints: ``checkpoints/step-000200/`` holds the student
(``model.safetensors`` + ``config.json``; for a ``--lora`` run only the adapter,
``adapter_model.safetensors`` + ``adapter_config.json``), the resolved config and the trainer state
(optimizer, scheduler, RNG states, data position). A checkpoint is written to a temporary
directory and renamed into place, so a crash never leaves a half-written ``step-*``.

Loading a checkpoint runs no code from it: the trainer state holds only tensors and plain
values (dicts, lists, tuples, numbers, strings), and is read with ``torch.load(weights_only=True)``,
whose unpickler refuses every other type instead of constructing it."""

from __future__ import annotations

import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtool.errors import UserError

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """Every global RNG's state in types ``weights_only`` loading accepts (numpy's key array as ints)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: Path,
    step: int,
    student: Any,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/step-{step:06d}`` atomically and prune to the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=directory))
    try:
        student.save_pretrained(tmp, state_dict=state_dict)  # a full state dict under FSDP
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if (p / STATE_FILE).is_file())


def latest(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


# Checkpoints written before the RNG state became plain lists hold numpy's keys as an array; these
# four globals rebuild a plain numeric array and nothing else, so allowing them keeps those runs resumable.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core (numpy>=1.26 allowed)
_LEGACY_NUMPY = [
    _NUMPY_CORE.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of ``checkpoint``, every tensor on the CPU.

    ``map_location="cpu"``: tensors saved from ``cuda:0`` would otherwise land on ``cuda:0`` in
    every rank (or fail without CUDA); ``optimizer.load_state_dict`` then casts each state to its
    parameter's device.

    Raises:
        UserError: the file holds anything but tensors and plain values (refused before any of
            it is constructed), or is not a readable state file (one line, with the path).
    """
    path = checkpoint / STATE_FILE
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: {_unpickling_reason(exc)}") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise UserError(
            f"{path}: not a readable trainer state (damaged or truncated: {_first_line(exc)})"
        ) from exc
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
        raise UserError(f"{path}: not a kdtool trainer state (expected a dict with step, optimizer, rng)")
    return state


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """One line out of torch's multi-line ``weights_only`` refusal: which type was refused, or why
    the bytes are not a pickle at all."""
    # "... WeightsUnpickler error: Unsupported global: GLOBAL os.system was not an allowed global ..."
    # or "... WeightsUnpickler error: \n\nUnsupported operand 205\n\nCheck the documentation ..."
    flat = " ".join(str(exc).split())
    detail = flat.split("WeightsUnpickler error:", 1)[-1]
    detail = detail.split(" was not an allowed", 1)[0].split(" Check the documentation", 1)[0].strip()
    if detail.startswith("Unsupported global"):
        what = detail.split("GLOBAL ", 1)[-1]  # e.g. "os.system"
        return (
            f"refused to load: it holds {what}, not only tensors and plain values "
            "(a pickle can run code; nothing from it was run)"
        )
    return f"not a readable trainer state (damaged, or not a torch.save file: {detail[:120]})"


def load_student_state(checkpoint: Path) -> dict[str, Any]:
    """The student's weights as saved (tied output embeddings appear once; loading with
    ``strict=False`` keeps the tie), or a LoRA run's adapter tensors (peft's key names).

    Raises:
        UserError: a damaged or truncated ``model.safetensors`` (one line, with the path).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = checkpoint / "model.safetensors"
    if not path.is_file() and (checkpoint / "adapter_model.safetensors").is_file():
        path = checkpoint / "adapter_model.safetensors"  # a --lora run: the adapter only
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
