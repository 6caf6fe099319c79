"""Run under torchrun by tests/test_distributed.py: a teacher loaded with ``--fsdp-teacher``'s
loader (meta device, rank 0 reads the weights) gives the outputs of the same teacher unsharded."""

from __future__ import annotations

import faulthandler
import gc
import sys

import torch

from kdtool import distributed
from kdtool.heads import hidden_states, output_head
from kdtool.models import load_model


def main(path: str) -> None:
    info, device = distributed.setup("cpu")
    wrapper = distributed.load_sharded_teacher(path, torch.float32, info, device)
    # loaded, every parameter is a shard (DTensor): no rank ever held the whole teacher on its device
    assert all(hasattr(p, "full_tensor") for p in wrapper.teacher.parameters())
    reference = load_model(path, "cpu", torch.float32).eval()
    g = torch.Generator().manual_seed(info.rank)  # each rank its own inputs: nothing is shared by luck
    vocab = reference.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = wrapper(ids, mask)
        torch.testing.assert_close(hidden, hidden_states(reference, ids, mask), rtol=0, atol=1e-5)
        # the lazily applied output layer reads the root unit's parameters after the forward
        torch.testing.assert_close(
            output_head(wrapper.teacher)(hidden), output_head(reference)(hidden), rtol=0, atol=1e-5
        )
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        out, ref = wrapper.model_call(**kw), reference(**kw)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
        step = dict(input_ids=ids[:, -1:], position_ids=positions[:, -1:] + 1, use_cache=True)
        step["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        nxt = wrapper.model_call(past_key_values=out.past_key_values, **step)
        ref_nxt = reference(past_key_values=ref.past_key_values, **step)
        torch.testing.assert_close(nxt.logits, ref_nxt.logits, rtol=0, atol=1e-5)
    print(f"rank {info.rank}: sharded teacher matches")
    distributed.teardown(info, finished=True)


if __name__ == "__main__":
    # Leave as a `kdtool` command under torchrun does (kdtool.cli.run): nothing is garbage-collected
    # while the interpreter shuts down, so the sharded modules and their c10d objects are not torn
    # down after Python has started to finalize (gloo's threads can no longer take the GIL then).
    # One CI run of the previous version aborted late, after both ranks' cached forward: "terminate
    # called without an active exception"; ~100 local runs did not repeat it.
    faulthandler.enable()  # should it abort again: every thread's Python stack on stderr, in the test's message
    try:
        main(sys.argv[1])
    finally:
        gc.freeze()
