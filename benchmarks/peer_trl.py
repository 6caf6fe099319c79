"""TRL's ``GKDTrainer`` as ``bench_peers.py`` runs it: ``lmbda=0`` (the data's responses, no
generation) and ``beta=0`` (forward KL), no evaluation, no checkpoints, the final student saved.

The prompts are kdtool's templated prompts; a chat template that concatenates the user turn (the
prompt) and the assistant turn (the response + EOS) gives TRL's collator the same text.

    python benchmarks/peer_trl.py --teacher T --student S --data D.json --output DIR \\
        --batch-size 8 --max-length 256 --max-steps 20
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from datasets import Dataset
from peer_args import peer_parser  # benchmarks/, beside this script
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer

from kdtool.data import format_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def main() -> None:
    p = peer_parser(__doc__)
    args = p.parse_args()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    tokenizer.chat_template = CHAT_TEMPLATE
    records = json.loads(Path(args.data).read_text())
    dataset = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": format_prompt(r["instruction"], r.get("input", ""))},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
            for r in records
        ]
    )
    config = GKDConfig(
        output_dir=str(Path(args.output) / "trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        max_length=args.max_length,
        learning_rate=args.lr,
        lmbda=0.0,
        beta=0.0,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=42,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student),
        teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output)
    print(f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
