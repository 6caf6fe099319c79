"""Process-group plumbing for ``torchrun`` / ``accelerate launch``: both export RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, so one code path serves both launchers.

Single-process runs never touch ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdtool.errors import UserError
from kdtool.heads import hidden_states
from kdtool.models import load_model, resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str, timeout_minutes: float = 60.0) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun/accelerate; pick this rank's device.

    ``timeout_minutes`` bounds every collective: NCCL's default (10 min) is shorter than rank 0
    alone evaluating or writing a large checkpoint while the others wait at a barrier.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend,
                timeout=timedelta(minutes=timeout_minutes),
                device_id=target if target.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the process group ({backend}): {exc}") from exc
    return DistInfo(rank=rank, world=world, local_rank=local_rank), target


def local_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank: LOCAL_RANK indexes the visible devices only when each rank sees
    them all; a launcher that gives each rank its own GPU (CUDA_VISIBLE_DEVICES) leaves one."""
    return local_rank % max(visible, 1)


def world_size_from_env() -> int:
    """The launcher's world size, readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def teardown(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group. ``finished``: every rank got here without an error, so they meet
    at a barrier first; no rank then shuts its connections while a peer's last collective is still
    in flight. After an error there is no barrier: the failed rank leaves at once and the launcher
    stops the others, instead of that rank waiting for peers stuck in another collective.
    """
    if not (info.enabled and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a list of floats over ranks (fp64, so token counts stay exact)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankSync:
    """Agreement between ranks on loop bounds, for loops that run sharded models: each rank must
    make the same number of forward passes, or FSDP's all-gathers stop lining up (a hang on NCCL)."""

    def __init__(self, info: DistInfo, device: torch.device):
        self.info, self.device = info, device

    def _reduce(self, value: int, op: Any) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank."""
        return bool(self._reduce(int(flag), dist.ReduceOp.MAX))

    def min(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MIN)


def shard(step_module: nn.Module, student: nn.Module) -> nn.Module:
    """FSDP2: one unit per decoder block (``_no_split_modules``), the step module as the root unit.

    The root holds what sits outside the blocks (embeddings, final norm, output layer, tied or not)
    and is unsharded for the whole ``forward`` of a micro-batch, which computes the loss, so the
    chunked output layer of the engine sees full weights.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = decoder_blocks(student, "--fsdp")
    for block in blocks:
        fully_shard(block)
    fully_shard(step_module)
    return step_module


class TeacherForward(nn.Module):
    """The teacher as a module whose ``forward`` every teacher call goes through, so that FSDP2's
    root unit (this module) gathers its parameters for each one.

    By default the final hidden states ``[B, T, H]``; with ``hidden_only=False`` the model's own
    output (rollouts: logits and KV cache).
    """

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, hidden_only: bool = True, **model_kwargs: Any
    ) -> Any:
        if hidden_only:
            return hidden_states(self.teacher, input_ids, attention_mask)
        return self.teacher(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)

    def model_call(self, **kwargs: Any) -> Any:
        """``teacher(**kwargs)`` through this module's forward (what the rollout sampler calls)."""
        return self(hidden_only=False, **kwargs)


def decoder_blocks(model: nn.Module, flag: str) -> list[nn.Module]:
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise UserError(
            f"{flag}: cannot find the decoder blocks of {type(model).__name__} (no _no_split_modules)"
        )
    return blocks


def shard_teacher(teacher: nn.Module) -> TeacherForward:
    """FSDP2 for the frozen teacher: blocks are gathered one at a time during its forward.

    The root unit (embeddings, final norm, output layer) is not resharded after the forward, so the
    lazily applied output layer of the engine can read it; it is small next to the blocks.
    """
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(teacher, "--fsdp-teacher"):
        fully_shard(block)
    wrapper = TeacherForward(teacher)
    fully_shard(wrapper, reshard_after_forward=False)
    return wrapper


def load_sharded_teacher(
    name_or_path: str,
    dtype: torch.dtype,
    info: DistInfo,
    device: torch.device,
    trust_remote_code: bool = False,
) -> TeacherForward:
    """``--fsdp-teacher`` without a whole teacher on any GPU: every rank builds it on the meta
    device and shards it (no memory), then rank 0, which alone reads the weights (into CPU
    memory), sends each rank its shards; buffers (rotary tables, which are not in the state dict)
    are broadcast from rank 0 as well.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    full = (
        load_model(name_or_path, "cpu", dtype, trust_remote_code=trust_remote_code) if info.is_main else None
    )
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a causal LM from {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    teacher = teacher.eval().requires_grad_(False)
    wrapper = shard_teacher(teacher)
    wrapper.to_empty(device=device)
    state = full.state_dict() if full is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(teacher, state, options=options)
    source = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in teacher.named_buffers():
        if full is not None:
            buffer.copy_(source[name])
        dist.broadcast(buffer, src=0)
    del full, state, source
    return wrapper


def full_model_state(student: nn.Module, info: DistInfo, sharded: bool) -> dict[str, Tensor] | None:
    """The student's full state dict on rank 0 (a collective under FSDP); ``None`` = use the module."""
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(student: nn.Module, optimizer: Any, sharded: bool) -> dict[str, Any]:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_state(
    student: nn.Module,
    optimizer: Any,
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any],
    sharded: bool,
) -> None:
    """Load full (unsharded) states into a possibly sharded student and its optimizer."""
    if not sharded:
        missing, unexpected = student.load_state_dict(model_state, strict=False)
        # Tied output embeddings are stored once; anything else missing is a foreign checkpoint.
        tied = {k for k in missing if k.endswith("lm_head.weight") or "embed_out" in k}
        if set(missing) - tied or unexpected:
            raise UserError(
                f"--resume: the checkpoint does not match the student (missing {missing}, unexpected {unexpected})"
            )
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(student, model_state, options=opts)
    set_optimizer_state_dict(student, optimizer, optim_state_dict=optim_state, options=opts)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit (it then has ``set_requires_gradient_sync``)."""
    return hasattr(module, "set_requires_gradient_sync")


def set_gradient_sync(module: nn.Module, sync: bool) -> Any:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel) and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


def as_float(value: Any) -> float:
    """A scalar that may be a DTensor (FSDP2 gradient norms) as a Python float."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
