"""How much a teacher's soft labels say beyond the references: per sub-task, the mean probability the
teacher gives the reference token at each response position of a data file, and the share of positions
where it is ≥ 0.95 (there word-level KD and SFT push the student the same way).

    python examples/teacher_confidence.py --teacher T --data DEMO/data/student_train.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from kdtool.data import DEFAULT_TEMPLATE, Example, collate, encode_example
from kdtool.models import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    model, tok = load_model(args.teacher).eval(), load_tokenizer(args.teacher)
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    probs: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(records), 256):
            chunk = records[start : start + 256]
            items = [
                encode_example(
                    tok, Example(DEFAULT_TEMPLATE.format(r["instruction"], r["input"]), r["output"]), 128
                )
                for r in chunk
            ]
            batch = collate(items, tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            p = torch.softmax(logits[:, :-1].float(), -1)
            labels = batch["labels"][:, 1:]
            picked = p.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            for row, r in enumerate(chunk):
                probs[r["task"]] += picked[row][labels[row] != -100].tolist()
    print("| sub-task | positions | mean p_teacher(reference) | share with p ≥ 0.95 |")
    print("|---|---|---|---|")
    for task, values in probs.items():
        share = sum(v >= 0.95 for v in values) / len(values)
        print(f"| {task} | {len(values)} | {sum(values) / len(values):.3f} | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
