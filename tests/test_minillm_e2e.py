"""End to end on the built-in task (slow): MiniLLM lowers the student's sequence-level reverse KL
to the teacher. The teacher is the tiny fixture model sharpened by a short ``sft`` run; the LM
loss is switched off so the decrease comes from the on-policy reverse-KL terms alone."""

from __future__ import annotations

import pytest
import torch

from kdtool.config import resolve
from kdtool.data import TokenizedDataset, load_examples
from kdtool.evaluation.sequence_kl import measure_reverse_kl
from kdtool.models import load_model, load_tokenizer
from kdtool.trainer import train


@pytest.mark.slow
def test_minillm_lowers_the_reverse_kl_to_the_teacher(tiny_dir, tmp_path):
    torch.set_num_threads(1)
    common = dict(
        data=str(tiny_dir / "data" / "train.jsonl"),
        batch_size=16,
        lr=1e-2,
        warmup_steps=2,
        max_length=96,
        eval_every=1000,
        save_every=1000,
        progress=False,
        seed=0,
    )
    teacher_dir = train(
        resolve(
            None,
            dict(
                common,
                objective="sft",
                student=str(tiny_dir / "teacher"),
                output=str(tmp_path / "t"),
                max_steps=30,
            ),
        ),
        overwrite=True,
    )
    tok = load_tokenizer(str(teacher_dir))
    teacher = load_model(str(teacher_dir)).eval()
    ds = TokenizedDataset(load_examples(tiny_dir / "data" / "test.jsonl"), tok, 96, None)
    prompts = [item.input_ids[: item.labels.count(-100)] for item in ds.items] * 4

    def reverse_kl(model_dir):
        return measure_reverse_kl(
            load_model(str(model_dir)).eval(),
            teacher,
            prompts,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            max_new_tokens=8,
            seed=0,
        )

    before, before_se = reverse_kl(tiny_dir / "student")
    options = dict(rollout_batch_size=32, max_new_tokens=8, lm_loss=False)
    student = train(
        resolve(
            None,
            dict(
                common,
                objective="minillm",
                teacher=str(teacher_dir),
                student=str(tiny_dir / "student"),
                output=str(tmp_path / "s"),
                max_steps=24,
                objective_options=options,
            ),
        ),
        overwrite=True,
    )
    after, after_se = reverse_kl(student)
    print(f"KL[q||p] per response: before {before:.2f} ± {before_se:.2f}, after {after:.2f} ± {after_se:.2f}")
    assert after < 0.7 * before and before - after > 4 * (before_se**2 + after_se**2) ** 0.5, (before, after)
