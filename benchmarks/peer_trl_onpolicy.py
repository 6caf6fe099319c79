"""TRL's on-policy ``DistillationTrainer`` as ``bench_peers.py --on-policy`` runs it, against
``kdtool distill --objective jsd -O beta=B --responses student --max-new-tokens N --temperature 1``.

Every optimizer step the student samples one completion per prompt of its batch with plain
``transformers`` ``generate`` (no vLLM), and the generalized JSD to the teacher is taken at every
sampled position, as kdtool does. The settings are the documented equivalents of kdtool's (trl
1.16.0, ``trl/trainer/distillation_config.py`` and ``distillation_trainer.py``):

=============================  ==================================  =====================================
kdtool                         DistillationConfig                  meaning in TRL's source
=============================  ==================================  =====================================
``--responses student``        (always; there is no lmbda)         ``_generate_single_turn`` samples
                                                                   every batch from the student
``-O beta=B`` (jsd)            ``beta=B``                          M = (1 − β)·p_s + β·p_t, loss
                                                                   β·KL(p_t‖M) + (1 − β)·KL(p_s‖M):
                                                                   kdtool's ``objectives/jsd.py``
``--max-new-tokens N``         ``max_completion_length=N``         ``max_new_tokens`` of generate
``--temperature 1``            ``temperature=1.0``                 sampling temperature *and* the
                                                                   loss softmax temperature (kdtool's
                                                                   jsd has its own τ, default 1, and
                                                                   ×τ²; at 1 the two agree)
``--top-p 1`` (default)        ``top_p=1.0, top_k=0``              no truncation (``do_sample=True``)
``--batch-size 8``             ``per_device_train_batch_size=8``   one generation batch per step
``--grad-accum 1`` (default)   ``gradient_accumulation_steps=1``
``--max-steps S``              ``max_steps=S``
``--lr 5e-5`` (default)        ``learning_rate=5e-5``              TRL's default is 1e-6
cosine, no warm-up (default)   ``lr_scheduler_type="cosine"``      TRL's default is linear
grad-norm clip 1 (default)     ``max_grad_norm=1.0`` (default)
fp32 on CPU (``--dtype auto``) ``bf16=False``                      TRL defaults to bf16 autocast
no activation checkpointing    ``gradient_checkpointing=False``    TRL defaults to True
seeded shuffled batches        ``shuffle_dataset=True``, ``seed``  (different orders: the same prompts
                                                                   over a run only when the data is
                                                                   exactly steps × batch examples)
stop at EOS, kept in loss      EOS ends a completion, kept         ``completion_mask`` is ``<= eos``
=============================  ==================================  =====================================

What differs and cannot be set:

* TRL samples in the student's train mode (dropout on, if the model has any); kdtool samples in
  eval mode.
* TRL projects every padded completion position through the LM heads on CPU (its compact path is
  Triton-only) and masks the padding out of the loss.
* TRL's training forward on the left-padded prompt + completion passes no ``position_ids`` (a
  GPT-2 then numbers positions from the first column, padding included); kdtool re-packs prompt +
  response right-padded, so each row starts at position 0. That changes the numbers, not the work.
* kdtool cuts ``max_new_tokens`` to ``max_length`` minus the batch's longest prompt, TRL does not:
  this program refuses data whose longest prompt + ``--max-new-tokens`` exceeds ``--max-length``
  (where the two would sample different lengths).
* No evaluation and no checkpoints here (kdtool at its defaults does both); the final student is
  saved.

``DistillationTrainer`` rather than ``GKDTrainer(lmbda=1)``: it runs on CPU without vLLM, with
transformers' ``generate``, and its ``max_completion_length``/``temperature``/``beta`` mean what
kdtool's flags mean; TRL's own ``GKDTrainer`` warns that ``lmbda=1.0, temperature=1.0`` "is fully
covered by ``DistillationTrainer``" (``trl/experimental/gkd/gkd_trainer.py``; ``beta`` means the
same in both). The program counts what it really sampled (generate calls, completions, tokens up
to and including EOS) and writes it with the wall time to ``OUTPUT/trl_onpolicy.json``.

    python benchmarks/peer_trl_onpolicy.py --teacher T --student S --data D.json --output DIR \\
        --batch-size 8 --max-length 256 --max-steps 20 --max-new-tokens 128 --beta 0.5
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from peer_args import peer_parser  # benchmarks/, beside this script
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig, DistillationTrainer

from kdtool.data import format_prompt


class CountingDistillationTrainer(DistillationTrainer):
    """``DistillationTrainer`` that counts its generate calls and the tokens they sampled."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.generate_calls = self.completions = self.sampled_tokens = 0

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        self.generate_calls += 1
        self.completions += len(completion_ids)
        self.sampled_tokens += sum(len(c) for c in completion_ids)  # up to and including the first EOS
        return completion_ids


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON array or JSONL of alpaca records (``instruction``, optional ``input``)."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    p = peer_parser(__doc__)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    tokenizer.padding_side = "left"  # what the trainer asks for (it left-pads prompts itself)
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in read_records(Path(args.data))]
    longest = max(len(tokenizer(text)["input_ids"]) for text in prompts)
    if longest + args.max_new_tokens > args.max_length:
        raise SystemExit(
            f"longest prompt {longest} + --max-new-tokens {args.max_new_tokens} > --max-length "
            f"{args.max_length}: kdtool would sample fewer tokens than TRL there; use shorter prompts"
        )
    config = DistillationConfig(
        output_dir=str(Path(args.output) / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        use_vllm=False,
        bf16=False,
        gradient_checkpointing=False,
        shuffle_dataset=True,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = CountingDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student),
        teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher),
        args=config,
        train_dataset=Dataset.from_list([{"prompt": text} for text in prompts]),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output)
    wall = time.perf_counter() - start
    summary = {
        "steps": trainer.state.global_step,
        "generate_calls": trainer.generate_calls,
        "completions": trainer.completions,
        "sampled_tokens": trainer.sampled_tokens,
        "max_new_tokens": args.max_new_tokens,
        "wall_s": round(wall, 2),
    }
    (Path(args.output) / "trl_onpolicy.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{summary['steps']} steps, {summary['generate_calls']} generate calls, {summary['completions']} "
        f"completions, {summary['sampled_tokens']} sampled tokens; wall {wall:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
