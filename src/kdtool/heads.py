"""Output heads: what turns a model's final hidden states into logits, and what the fused engine
needs to know about it.

``hidden_states`` runs a causal LM up to its final norm (no logits); ``output_head`` returns its
output layer with any logit post-processing the config declares (``LogitHead``), or a wrapper for a
model spread over devices (``DeviceAlignedHead``). ``linear_parts`` tells the chunked engine the
weight and bias inside a head, when it has a plain linear map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LinearParts:
    """What the fused path needs from an output layer: ``logits = post(h @ weight.T + bias)``.

    Attributes:
        weight: ``[V', H]`` (V' ≥ the shared vocabulary; rows past it are padding). For tied
            embeddings this is the embedding parameter itself, so its gradient adds to the
            embedding's.
        bias: ``[V']`` or ``None``.
        post: element-wise logit post-processing (logit scaling, final soft-capping), or ``None``.
    """

    weight: Tensor
    bias: Tensor | None = None
    post: Callable[[Tensor], Tensor] | None = None


@runtime_checkable
class HasLinearParts(Protocol):
    """An output head that declares its linear map (see ``LogitHead``)."""

    def linear_parts(self) -> LinearParts | None: ...


def linear_parts(head: Any) -> LinearParts | None:
    """The linear map inside ``head``, or ``None`` when it is an opaque callable.

    A plain ``nn.Linear`` (not a subclass with its own ``forward``, e.g. a LoRA wrapper) and any
    object with ``linear_parts()`` qualify; everything else takes the checkpoint path.
    """
    if isinstance(head, HasLinearParts):
        return head.linear_parts()
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return LinearParts(head.weight, head.bias)
    return None


def hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the final norm), without computing logits, on
    ``input_ids``' device.

    ``base_model`` skips the output hook that accelerate puts on the whole model under a
    ``device_map``, so a teacher spread over GPUs returns them on its last GPU: they are moved
    back to where the mask and the student's logits live (a no-op on one device).
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden.to(input_ids.device)


def output_head(model: Any) -> Callable[[Tensor], Tensor]:
    """``[n, H] -> [n, V]``: the output layer plus any logit post-processing the config declares.

    A plain ``nn.Linear`` is returned as is; with logit scaling or soft-capping it is wrapped in a
    ``LogitHead``, which still tells the chunked engine its weight (``linear_parts``).
    """
    head: nn.Module = model.get_output_embeddings()
    config = model.config
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale or softcap:
        head = LogitHead(head, scale=scale, softcap=softcap)
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        return DeviceAlignedHead(head)
    return head


class DeviceAlignedHead(nn.Module):
    """The output layer of a model spread over devices (``device_map``): rows of hidden states go
    to the layer's device and their logits come back to the rows' device (the student's), chunk by
    chunk, so that neither the ``[V, H]`` weight nor a whole batch of logits is copied."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: Tensor) -> Tensor:
        weight = next(self.head.parameters())
        return self.head(hidden.to(weight.device)).to(hidden.device)


class LogitHead(nn.Module):
    """An output ``nn.Linear`` followed by element-wise logit scaling and/or soft-capping."""

    def __init__(self, linear: nn.Module, scale: float | None = None, softcap: float | None = None):
        super().__init__()
        self.linear = linear
        self.scale = scale
        self.softcap = softcap

    def postprocess(self, logits: Tensor) -> Tensor:
        if self.scale:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, hidden: Tensor) -> Tensor:
        return self.postprocess(self.linear(hidden))

    def linear_parts(self) -> LinearParts | None:
        """The weight/bias the fused engine path contracts with."""
        if type(self.linear) is not nn.Linear:  # LoRA & co.: the engine checkpoints instead
            return None
        return LinearParts(self.linear.weight, self.linear.bias, self.postprocess)
