"""The hand-written distillation loop that ``bench_peers.py`` measures kdtool against.

What one writes first: both models' full fp32 logits ``[B, T, V]``, forward KL on the response
tokens, AdamW, no evaluation and no checkpoints; the final student is saved like kdtool's. The
prompt template and the data are kdtool's (same tokens), batches in file order.

    python benchmarks/peer_hand_loop.py --teacher T --student S --data D.json --output DIR \\
        --batch-size 8 --max-length 256 --max-steps 20
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peer_args import peer_parser  # benchmarks/, beside this script
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdtool.data import format_prompt


def encode(tokenizer, records: list[dict[str, str]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: prompt tokens get label -100, the response ends with EOS."""
    out = []
    for r in records:
        prompt = tokenizer(format_prompt(r["instruction"], r.get("input", "")))["input_ids"]
        response = tokenizer(r["output"])["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        out.append((ids, ([-100] * len(prompt) + response)[:max_length]))
    return out


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    p = peer_parser(__doc__)
    args = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(args.student).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    data = encode(tokenizer, json.loads(Path(args.data).read_text()), args.max_length)
    vocab = len(tokenizer)
    for step in range(args.max_steps):
        start_row = step * args.batch_size % len(data)
        batch = collate(data[start_row : start_row + args.batch_size], tokenizer.pad_token_id)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Position t predicts token t + 1: shift, keep the response positions.
        keep = batch["labels"][:, 1:] != -100  # [B, T-1]
        s = F.log_softmax(s_logits[:, :-1][keep][:, :vocab].float(), -1)  # [N, V]
        t = F.log_softmax(t_logits[:, :-1][keep][:, :vocab].float(), -1)  # [N, V]
        loss = (t.exp() * (t - s)).sum(-1).mean()  # forward KL(teacher || student)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1} loss {loss.item():.4f}", flush=True)
    student.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
