"""Offline sequence-level KD: the teacher answers every prompt once, and the answers are kept on disk
as training data (``kdtool generate``); ``kdtool distill --data THAT`` then trains on them with any
objective. (``--responses teacher`` samples fresh teacher answers every micro-batch instead.)

Prompts are rendered as for evaluation (the run's Alpaca template, or a chat record's conversation up
to its last assistant turn with the template's generation prompt); answers end at EOS or the chat
template's end of turn. Prompt/response records are written as ``{"prompt", "response"}`` (the prompt
already templated, which ``kdtool.data`` reads as is); chat records keep their turns with the last
assistant turn's content replaced by the teacher's answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdtool import chat
from kdtool.data import load_examples
from kdtool.errors import UserError
from kdtool.evaluation.generate import Sampling, generate, prompt_budget
from kdtool.evaluation.rougel import encode_eval_prompts, load_for_eval, run_template
from kdtool.files import replace_text


def write_teacher_responses(
    model_dir: str,
    data: str,
    output: str,
    sampling: Sampling,
    seed: int = 0,
    batch_size: int = 16,
    template: str | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
) -> int:
    """Generate one answer per example of ``data`` with ``model_dir`` and write them to ``output``
    (JSONL, in the data's order); returns how many were written. Records may be prompts only."""
    out = Path(output)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --output (nothing is overwritten)")
    examples = load_examples(data, template=run_template(model_dir), prompts_only=True)
    model, tokenizer = load_for_eval(model_dir, device, "auto", trust_remote_code)
    chat_template = chat.resolve_template(template, tokenizer, examples)
    budget = prompt_budget(model, sampling.max_new_tokens)
    prompts, prompt_ids, _ = encode_eval_prompts(examples, tokenizer, chat_template, budget)
    answers = generate(model, tokenizer, prompt_ids, sampling, seed, batch_size).predictions
    records: list[dict[str, Any]] = []
    for ex, prompt, answer in zip(examples, prompts, answers, strict=True):
        if ex.messages is None:
            records.append({"prompt": prompt, "response": answer})
            continue
        turns = [dict(m) for m in ex.messages[: chat.last_assistant(ex.messages)]]
        records.append({"messages": [*turns, {"role": "assistant", "content": answer}]})
    out.parent.mkdir(parents=True, exist_ok=True)
    # a file that exists is complete
    replace_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)
