"""``kdtool eval rougel``: score a predictions file, or generate with a model and score.

Both paths return the same result dictionary (written as JSON by ``--output``):

- ``summary``: ``n_examples``, ``rougeL`` / ``exact_match`` as ``{"mean", "std"}`` over seeds
  (sample std, 0 with one seed), and ``per_seed`` rows;
- ``settings``: where the predictions came from and how they were decoded;
- ``examples``: per example its ``index``, ``prompt``, ``references`` and one ``outputs`` entry per
  seed (``seed``, ``prediction``, ``rougeL``, ``exact_match``).

All scores in the result are × 100.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtool.errors import UserError
from kdtool.evaluation.scoring import CorpusScore, score_corpus
from kdtool.files import field_names, json_records, load_json

PREDICTION_KEYS = ("prediction", "response")
REFERENCE_KEYS = ("reference", "target")
METRIC = "Rouge-L F (rouge_score, use_stemmer=True), max over references, mean x 100; SQuAD exact match x 100"


@dataclass
class Scored:
    """Everything to score one example: its references and one prediction per seed."""

    index: int
    prompt: str | None
    references: list[str]


# ---------------------------------------------------------------------------------------------
# predictions files


def _prediction_row(where: str, record: Any) -> tuple[str, list[str], str | None]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    key = next((k for k in PREDICTION_KEYS if k in record), None)
    if key is None:
        raise UserError(f"{where}: missing field 'prediction' (or 'response'); has: {field_names(record)}")
    prediction = record[key]
    if not isinstance(prediction, str):
        raise UserError(f"{where}: field {key!r} must be a string, got {type(prediction).__name__}")
    if "references" in record:
        refs = record["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"{where}: field 'references' must be a non-empty list of strings")
    else:
        ref_key = next((k for k in REFERENCE_KEYS if k in record), None)
        if ref_key is None:
            raise UserError(
                f"{where}: missing field 'references' (a list) or 'reference'/'target' (a string); "
                f"has: {field_names(record)}"
            )
        if not isinstance(record[ref_key], str):
            raise UserError(f"{where}: field {ref_key!r} must be a string")
        refs = [record[ref_key]]
    prompt = record.get("prompt")
    return prediction, list(refs), prompt if isinstance(prompt, str) else None


def read_predictions(path: str | Path) -> tuple[list[Scored], list[str]]:
    """Examples and predictions from a JSONL (or JSON array) predictions file.

    Each record: ``prediction`` (or ``response``) and ``references`` (list of strings) or
    ``reference`` / ``target`` (one string); ``prompt`` is kept when present.

    Raises:
        UserError: missing or empty file, invalid JSON (``file:line``), missing or mistyped fields.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file not found: {path}")
    located = list(json_records(path))
    for where, record in located:
        if isinstance(record, ValueError):  # a line that is not JSON: nothing to skip to here
            raise UserError(f"{where}: {record}")
    if not located and not path.read_bytes().strip():
        raise UserError(f"{path}: empty file, no predictions to score")
    if not located:
        raise UserError(f"{path}: no predictions to score")
    examples, predictions = [], []
    for i, (where, record) in enumerate(located):
        prediction, refs, prompt = _prediction_row(where, record)
        examples.append(Scored(i, prompt, refs))
        predictions.append(prediction)
    return examples, predictions


# ---------------------------------------------------------------------------------------------
# results


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def build_result(
    examples: Sequence[Scored],
    runs: Sequence[tuple[int | None, list[str], CorpusScore]],
    settings: dict[str, Any],
    timings: Sequence[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The result dictionary (schema in the module docstring) from per-seed predictions and scores."""
    per_seed = []
    for k, (seed, _, score) in enumerate(runs):
        row: dict[str, Any] = {"seed": seed, "rougeL": score.rougeL, "exact_match": score.exact_match}
        if timings is not None:
            row.update(timings[k])
        per_seed.append(row)
    rl = [s.rougeL for _, _, s in runs]
    em = [s.exact_match for _, _, s in runs]
    summary = {
        "n_examples": len(examples),
        "seeds": [seed for seed, _, _ in runs],
        "rougeL": {"mean": statistics.fmean(rl), "std": _std(rl)},
        "exact_match": {"mean": statistics.fmean(em), "std": _std(em)},
        "per_seed": per_seed,
    }
    records = []
    for j, ex in enumerate(examples):
        outputs = [
            {
                "seed": seed,
                "prediction": preds[j],
                "rougeL": 100.0 * score.per_example_rougeL[j],
                "exact_match": 100.0 * score.per_example_exact_match[j],
            }
            for seed, preds, score in runs
        ]
        records.append(
            {"index": ex.index, "prompt": ex.prompt, "references": ex.references, "outputs": outputs}
        )
    return {"metric": METRIC, "summary": summary, "settings": settings, "examples": records}


def score_predictions_file(path: str | Path) -> dict[str, Any]:
    """Score an existing predictions file (no model, no seeds)."""
    examples, predictions = read_predictions(path)
    score = score_corpus(predictions, [ex.references for ex in examples])
    settings = {"mode": "predictions", "predictions": str(path)}
    return build_result(examples, [(None, predictions, score)], settings)


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # a half-written file must never look like a finished evaluation
    return path


# ---------------------------------------------------------------------------------------------
# generation


def run_template(model_dir: str | Path) -> Any:
    """The prompt template a kdtool run trained with (its ``kdtool.json``), else the default."""
    from kdtool.data import DEFAULT_TEMPLATE, Template

    summary = Path(model_dir) / "kdtool.json"
    if summary.is_file():
        summary_json = load_json(summary)
        saved = summary_json.get("template") if isinstance(summary_json, dict) else None
        if isinstance(saved, dict) and {"no_input", "with_input"} <= saved.keys():
            return Template(saved["no_input"], saved["with_input"])
    return DEFAULT_TEMPLATE


def encode_eval_prompts(
    examples: Sequence[Any], tokenizer: Any, chat_template: str | None, budget: int | None
) -> tuple[list[str], list[list[int]], int]:
    """The prompt text and ids of each example, kept to their last ``budget`` tokens.

    A chat example's prompt is its conversation up to the last assistant turn, rendered with
    ``chat_template`` and the template's generation prompt (ids as ``apply_chat_template`` gives
    them, no extra special tokens); other prompts are tokenized as in training. Returns the texts,
    the ids and how many prompts were cut.
    """
    from kdtool import chat

    texts, ids = [], []
    for ex in examples:
        if ex.messages is None:
            texts.append(ex.prompt)
            ids.append(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
            continue
        try:
            texts.append(chat.prompt_text(ex.messages, tokenizer, chat_template))
        except ValueError as exc:
            raise UserError(f"{ex.where or f'example {ex.index}'}: {exc}") from exc
        ids.append(tokenizer(texts[-1], add_special_tokens=False)["input_ids"])
    if budget is None:
        return texts, ids, 0
    return texts, [row[-budget:] for row in ids], sum(len(row) > budget for row in ids)


def load_for_eval(
    model_dir: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory (or hub id), with one-line errors."""
    import torch

    from kdtool.models import compute_dtype, load_model, load_tokenizer, resolve_device

    local = Path(model_dir)
    if (local.exists() or model_dir.startswith((".", "/"))) and not local.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    from kdtool.lora import is_adapter_dir

    if local.is_dir() and not (local / "config.json").is_file() and not is_adapter_dir(local):
        raise UserError(
            f"{model_dir} is not a Hugging Face model directory (no config.json) nor a LoRA run (no adapter_config.json)"
        )
    dev = resolve_device(device)
    if dtype == "auto":  # the training rule: bf16 on CUDA, fp32 elsewhere
        dtype = compute_dtype("auto", dev) or torch.float32
    # raises UserError when not a causal LM, or when it needs its own code and is not trusted
    model = load_model(model_dir, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(model_dir, trust_remote_code)


def evaluate_model(
    model_dir: str,
    data: str | Path,
    sampling: Any,
    seeds: Sequence[int],
    batch_size: int = 16,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    prompt_field: str | None = None,
    response_field: str | None = None,
    max_prompt_length: int | None = None,
    trust_remote_code: bool = False,
    template: str | None = None,
    progress: Callable[[int | None, int], Callable[[int], None]] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate a response per example and seed with ``model_dir``, then score them.

    Args:
        sampling: a :class:`kdtool.evaluation.generate.Sampling`; with ``greedy`` the data is decoded
            once and ``seeds`` are ignored.
        progress: given a seed and the number of examples, returns the callback advanced by the
            number of finished examples after each batch.
        on_note: receives one-line notes (e.g. how many prompts were truncated).
        trust_remote_code: let a model whose config has an ``auto_map`` run its own code.
        template: the ``--template`` choice (:func:`kdtool.chat.resolve_template`; ``None`` =
            automatic): chat examples are prompted with the conversation up to their last assistant
            turn and scored against that turn's content.
    """
    import torch

    from kdtool.chat import resolve_template
    from kdtool.data import load_examples
    from kdtool.evaluation.generate import generate, prompt_budget

    alpaca = run_template(model_dir)
    loaded = load_examples(data, prompt_field, response_field, template=alpaca)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        loaded = loaded[:limit]
    model, tokenizer = load_for_eval(model_dir, device, dtype, trust_remote_code)
    budget = prompt_budget(model, sampling.max_new_tokens, max_prompt_length)
    chat_template = resolve_template(template, tokenizer, loaded)
    prompts, prompt_ids, n_cut = encode_eval_prompts(loaded, tokenizer, chat_template, budget)
    if empty := [ex.index for ex, ids in zip(loaded, prompt_ids, strict=True) if not ids]:
        raise UserError(f"{data}: example {empty[0]} has an empty prompt; nothing to generate from")
    if n_cut and on_note is not None:
        on_note(
            f"{n_cut} of {len(loaded)} prompts were longer than {budget} tokens; kept their last {budget}"
        )
    examples = [Scored(ex.index, p, list(ex.references)) for ex, p in zip(loaded, prompts, strict=True)]
    references = [ex.references for ex in examples]
    runs, timings = [], []
    for seed in [None] if sampling.greedy else list(seeds):
        gen = generate(
            model,
            tokenizer,
            prompt_ids,
            sampling,
            seed,
            batch_size,
            progress(seed, len(prompt_ids)) if progress else None,
        )
        runs.append((seed, gen.predictions, score_corpus(gen.predictions, references)))
        timings.append(
            {
                "wall_s": round(gen.wall_s, 3),
                "examples_per_s": round(gen.examples_per_s, 3),
                "new_tokens_per_s": round(gen.new_tokens_per_s, 1),
            }
        )
    settings = {
        "mode": "model",
        "model": str(model_dir),
        "data": str(data),
        **sampling.to_dict(),
        "seeds": None if sampling.greedy else list(seeds),
        "batch_size": batch_size,
        "limit": limit,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "max_prompt_tokens": budget,
        "truncated_prompts": n_cut,
        "template": alpaca.to_dict(),
        "chat_template": chat_template,
    }
    return build_result(examples, runs, settings, timings)
