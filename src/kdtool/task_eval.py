"""Task metrics for the built-in task: validity per sub-task, and the answer distribution.

Three views of "does the model answer correctly", each per sub-task (``kdtool.synthetic.TASKS``):

- ``greedy``: share of prompts whose greedy answer is valid (one pass, no sampling noise);
- ``sampled``: share of valid answers when sampling at temperature 1 (the protocol's setting),
  read from the predictions that ``kdtool eval rougel`` wrote, mean over its generation seeds;
- ``expected``: the exact probability that a temperature-1 sample is valid, Σ_a q(a, EOS | x)
  over the valid answers a, by teacher forcing: the expectation of ``sampled`` without its noise.

On sub-tasks with several valid answers ("pick": any listed letter, uniformly), ``answers`` is the
effective number of valid answers the model spreads its valid mass over, exp(H(q̂)) with
q̂(a) = q(a) / Σ_a' q(a') (1 = always the same letter; 3 = the known uniform distribution), and
``kl_uniform`` = KL(uniform ‖ q̂): coverage, which mode-seeking objectives trade for validity.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdtool.synthetic import is_correct, valid_answers
from kdtool.targets import shifted_targets

MAX_NEW_TOKENS = 16  # the longest answer is 5 characters; anything longer is wrong anyway


def read_records(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@torch.inference_mode()
def answer_log_probs(
    model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 256
) -> list[float]:
    """log q(answer + EOS | prompt) for each (prompt, answer) pair, tokenized as in training."""
    from kdtool.data import Example, collate, encode_example
    from kdtool.sampling import pad_token_id

    items = [
        encode_example(tokenizer, Example(p, a), max_length=10_000)
        for p, a in zip(prompts, answers, strict=True)
    ]
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()  # [B, T, V]
        labels, mask = shifted_targets(batch["labels"].to(device))  # the token each position predicts
        log_q = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.extend((picked * mask).sum(-1).tolist())
    return out


def _prompts(records: Sequence[dict[str, Any]], template: Any) -> list[str]:
    return [template.format(r["instruction"], r.get("input", "")) for r in records]


def answer_distribution(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], template: Any
) -> list[list[float]]:
    """Per record, the exact probability of each of its valid answers (in ``valid_answers`` order)."""
    prompts = _prompts(records, template)
    pairs = [
        (p, a) for p, r in zip(prompts, records, strict=True) for a in valid_answers(r["task"], r["input"])
    ]
    log_probs = iter(answer_log_probs(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs]))
    return [[math.exp(next(log_probs)) for _ in valid_answers(r["task"], r["input"])] for r in records]


def greedy_predictions(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], template: Any
) -> list[str]:
    from kdtool.evaluation.generate import Sampling, encode_prompts, generate

    ids, _ = encode_prompts(tokenizer, _prompts(records, template), None)
    return generate(
        model, tokenizer, ids, Sampling(greedy=True, max_new_tokens=MAX_NEW_TOKENS), None, 250
    ).predictions


def sampled_predictions(rougel_json: str | Path) -> dict[int, list[str]]:
    """Example index -> its predictions, one per generation seed, from an ``eval rougel`` output."""
    result = json.loads(Path(rougel_json).read_text())
    return {ex["index"]: [o["prediction"] for o in ex["outputs"]] for ex in result["examples"]}


def score(
    records: Sequence[dict[str, Any]],
    greedy: Sequence[str],
    probabilities: Sequence[Sequence[float]],
    sampled: dict[int, list[str]] | None = None,
) -> dict[str, Any]:
    """Per-sub-task and overall metrics (percentages) from predictions and answer probabilities."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["task"], []).append(i)
    out: dict[str, Any] = {}
    for name, idx in [*groups.items(), ("all", list(range(len(records))))]:
        row: dict[str, Any] = {
            "n": len(idx),
            "greedy": 100 * statistics.fmean(is_correct(records[i], greedy[i]) for i in idx),
            "expected": 100 * statistics.fmean(min(1.0, sum(probabilities[i])) for i in idx),
        }
        if sampled is not None:
            per_seed = list(zip(*(sampled[i] for i in idx), strict=True))
            seeds = [
                100 * statistics.fmean(is_correct(records[i], p) for i, p in zip(idx, s, strict=True))
                for s in per_seed
            ]
            row["sampled"] = statistics.fmean(seeds)
            row["sampled_std"] = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
        multi = [i for i in idx if len(probabilities[i]) > 1]
        if multi and name != "all":
            effective, kl = [], []
            for i in multi:
                mass = sum(probabilities[i])
                q = (
                    [max(p / mass, 1e-12) for p in probabilities[i]]
                    if mass > 0
                    else [1 / len(probabilities[i])] * len(probabilities[i])
                )
                n = len(q)
                effective.append(math.exp(-sum(x * math.log(x) for x in q)))
                kl.append(sum((1 / n) * math.log((1 / n) / x) for x in q))
            row["answers"] = statistics.fmean(effective)
            row["kl_uniform"] = statistics.fmean(kl)
        out[name] = row
    return out


def evaluate_task(
    model_dir: str | Path, test: str | Path, rougel_json: str | Path | None = None, limit: int | None = None
) -> dict[str, Any]:
    """All task metrics of one model directory on the built-in task's held-out records (the first ``limit``)."""
    from kdtool.evaluation.rougel import load_for_eval, run_template

    records = read_records(test)[:limit]
    model, tokenizer = load_for_eval(str(model_dir), device="cpu", dtype="float32")
    model.eval()
    template = run_template(model_dir)
    greedy = greedy_predictions(model, tokenizer, records, template)
    probabilities = answer_distribution(model, tokenizer, records, template)
    sampled = None
    if rougel_json is not None and Path(rougel_json).is_file():
        by_index = sampled_predictions(rougel_json)
        sampled = {i: by_index[i] for i in range(len(records))}
    return score(records, greedy, probabilities, sampled)


def flatten(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat record ``kdtool compare --metrics-module`` merges into each run (percentages)."""
    overall = metrics["all"]
    flat = {
        "valid": overall.get("sampled", overall["expected"]),
        "valid_greedy": overall["greedy"],
        "valid_expected": overall["expected"],
    }
    if "sampled_std" in overall:
        flat["valid_gen_std"] = overall["sampled_std"]
    multi = [t for t, row in metrics.items() if "answers" in row]
    for task in multi:
        flat[f"{task}_answers"] = metrics[task]["answers"]
    for task, row in metrics.items():
        if task == "all":
            continue
        for key in ("sampled", "greedy", "expected", "answers", "kl_uniform"):
            if key in row:
                flat[f"{task}/{key}"] = row[key]
    return flat


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m kdtool.task_eval", description="Task metrics of a model on the built-in task."
    )
    parser.add_argument("--model", required=True, help="Model directory (a kdtool run or any HF causal LM).")
    parser.add_argument("--data", required=True, help="Held-out records written by kdtool.synthetic.")
    parser.add_argument("--rougel", help="Its `kdtool eval rougel --output` file (for sampled validity).")
    parser.add_argument("--output", required=True, help="Where to write the flat JSON of metrics.")
    parser.add_argument("--limit", type=int, help="The first N records only (as eval rougel --limit).")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    flat = flatten(evaluate_task(args.model, args.data, args.rougel, args.limit))
    Path(args.output).write_text(json.dumps(flat, indent=2))
    print(f"validity {flat['valid']:.2f} (greedy {flat['valid_greedy']:.2f}); written to {args.output}")


if __name__ == "__main__":
    main()
