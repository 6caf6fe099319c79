"""Load teacher and student (local directory or hub id) and check they share a vocabulary.

Nothing runs that the user did not ask to run: a model or tokenizer whose config declares its own
Python classes (``auto_map``) is loaded only with ``trust_remote_code=True`` (``--trust-remote-code``);
without it kdtool refuses in one line before transformers is asked, so transformers never prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdtool.errors import UserError
from kdtool.files import load_json

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The low-precision dtype of a ``--dtype`` flag on ``device``: bf16 when asked for, or by
    default (``auto``) on CUDA; ``None`` = full precision (fp32)."""
    if dtype in ("bfloat16", "bf16") or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {device} requested but CUDA is not available on this machine (use --device cpu)"
        )
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc


REMOTE_CODE_FLAG = "--trust-remote-code"
CONFIG_FILES = ("config.json", "tokenizer_config.json")


def _config_file(name_or_path: str, filename: str) -> Path | None:
    """``filename`` of a local model directory, or of a hub model (from the cache, or fetched)."""
    local = Path(name_or_path)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(
            name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):  # no such model: from_pretrained reports it
        return None
    return Path(found) if found else None


def remote_code_declared(name_or_path: str) -> Path | None:
    """The config file that declares custom classes (``auto_map``) for this model, if any.

    Raises:
        UserError: a config file that is not UTF-8 JSON (``path: reason``).
    """
    for filename in CONFIG_FILES:
        path = _config_file(name_or_path, filename)
        if path is None:
            continue
        config = load_json(path)
        if isinstance(config, dict) and config.get("auto_map"):
            return path
    return None


def check_remote_code(name_or_path: str, trust_remote_code: bool) -> None:
    """Refuse, in one line naming the flag, a model that needs its own code when it is not trusted."""
    if trust_remote_code:
        return
    declared = remote_code_declared(name_or_path)
    if declared is not None:
        raise UserError(
            f"{name_or_path!r} needs its own Python code to load ({declared} has an auto_map); "
            f"kdtool does not run it unless you pass {REMOTE_CODE_FLAG}"
        )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` with one-line errors; pad = EOS when there is no pad token.

    Raises:
        UserError: no tokenizer there, no EOS token, or custom code without ``trust_remote_code``.
    """
    from transformers import AutoTokenizer

    check_remote_code(name_or_path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer of {name_or_path!r} has no EOS token; responses must end with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    max_memory: dict[int | str, int] | None = None,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with a clear error for anything that is not a causal LM.

    ``device_map`` (e.g. ``"auto"``) spreads a model too large for one device over all visible
    devices (and CPU memory) through transformers/accelerate, within ``max_memory`` per device
    when given; ``device`` is then ignored.
    ``trust_remote_code`` lets a model whose config has an ``auto_map`` run its own code.
    A directory holding only a LoRA adapter (a ``--lora`` run) loads as its base model with the
    adapter merged in (``kdtool.lora.load_adapter_model``).
    """
    from transformers import AutoModelForCausalLM

    from kdtool import lora

    if lora.is_adapter_dir(name_or_path):
        base = lambda path: load_model(path, device, dtype, device_map, trust_remote_code)  # noqa: E731
        return lora.load_adapter_model(name_or_path, base)
    check_remote_code(name_or_path, trust_remote_code)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype) if dtype != "auto" else None
    extra: dict[str, Any] = {"device_map": device_map} if device_map else {}
    if device_map and max_memory:
        extra["max_memory"] = max_memory
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load a causal LM from {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    return model if device_map else model.to(device)


def shared_vocab_size(
    teacher_tok: Any, student_tok: Any, teacher_model: Any | None, student_model: Any
) -> int:
    """Vocabulary both models are compared on: ``len(tokenizer)`` when the tokenizers agree.

    Embedding matrices are often padded past the tokenizer (Qwen2.5 0.5B: 151,936 rows vs
    7B: 152,064), so only the first ``len(tokenizer)`` logits are compared.
    """
    n_student = len(student_tok)
    if teacher_tok is not None:
        same = len(teacher_tok) == n_student and teacher_tok.get_vocab() == student_tok.get_vocab()
        if not same:
            raise UserError(
                f"teacher and student tokenizers differ (teacher vocabulary {len(teacher_tok):,} tokens, "
                f"student {n_student:,}); distillation needs a shared tokenizer"
            )
    for role, model in (("student", student_model), ("teacher", teacher_model)):
        if model is not None and model.get_output_embeddings().weight.shape[0] < n_student:
            rows = model.get_output_embeddings().weight.shape[0]
            raise UserError(
                f"{role} output layer has {rows:,} rows but the tokenizer has {n_student:,} tokens"
            )
    return n_student
