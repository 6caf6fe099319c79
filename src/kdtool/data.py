"""Instruction data: load common formats, apply the prompt template (kdtool.alpaca), tokenize, collate.

Formats are detected per record (override with ``prompt_field``/``response_field``):
  alpaca       {"instruction", "input"?, "output"}
  dolly        {"instruction", "context"?, "response"}
  prompt/resp  {"prompt", "response" | "completion"}
  self-instruct {"instruction", "instances": [{"input", "output"}, ...]}  (one example per instance)
  chat         {"messages": [{"role", "content"}, ...]} or ShareGPT {"conversations": [{"from", "value"}]}
               (kept as messages, rendered with a chat template when tokenized: see kdtool.chat)
Files are JSONL (one object per line) or a JSON array.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdtool import alpaca, chat
from kdtool.alpaca import DEFAULT_TEMPLATE, Template
from kdtool.errors import UserError
from kdtool.files import field_names, json_records
from kdtool.sampling import pad_token_id
from kdtool.targets import IGNORE_INDEX

# The Alpaca template's names, defined in kdtool.alpaca; importers know them from here.
PROMPT_TEMPLATE, PROMPT_TEMPLATE_WITH_INPUT = alpaca.PROMPT_TEMPLATE, alpaca.PROMPT_TEMPLATE_WITH_INPUT
format_prompt = alpaca.format_prompt


@dataclass
class Example:
    """One instruction example.

    Attributes:
        prompt: the templated prompt (what the model sees before its answer).
        response: the reference answer used for training (the first reference).
        references: every acceptable answer (evaluation takes the max over them).
        messages: a chat example's whole conversation (its ``prompt`` is then empty and its
            ``response`` the last assistant turn); ``None`` for prompt/response examples.
    """

    prompt: str
    response: str
    references: list[str] = field(default_factory=list)
    index: int = -1  # position in the loaded file's example list (teacher caches key on it)
    messages: list[chat.Message] | None = None
    where: str = ""  # file:line it came from, for errors found when it is tokenized

    def __post_init__(self) -> None:
        if not self.references:
            self.references = [self.response]


@dataclass
class LoadReport:
    bad_lines: list[str] = field(default_factory=list)


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _extra(record: dict[str, Any], *keys: str) -> str:
    """The first present optional text field (alpaca ``input``, dolly ``context``), else ``""``."""
    for key in keys:
        if record.get(key):
            return _text(record, key)
    return ""


def _parse(
    record: Any,
    template: Template,
    prompt_field: str | None,
    response_field: str | None,
    prompts_only: bool = False,
) -> list[Example]:
    if isinstance(record, Exception):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if prompt_field or response_field:
        p_key = prompt_field or ("instruction" if "instruction" in record else "prompt")
        r_key = response_field or next(
            (k for k in ("output", "response", "completion") if k in record), "output"
        )
        for key in (p_key, r_key):
            if key not in record and not (key == r_key and prompts_only):
                raise ValueError(f"missing field {key!r} (has: {field_names(record)})")
        prompt = _text(record, p_key)
        if p_key == "instruction":
            prompt = template.format(prompt, _extra(record, "input", "context"))
        return [Example(prompt, _text(record, r_key) if r_key in record else "")]
    if chat.is_chat_record(record):
        messages = chat.parse_record(record)
        return [Example("", chat.reference(messages), messages=messages)]
    if "instances" in record and "instruction" in record:  # self-instruct
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise ValueError("field 'instances' must be a non-empty list")
        out = []
        for inst in instances:
            if not isinstance(inst, dict) or "output" not in inst:
                raise ValueError("each instance needs an 'output'")
            prompt = template.format(_text(record, "instruction"), _extra(inst, "input"))
            out.append(Example(prompt, _text(inst, "output")))
        return out
    if "instruction" in record:
        extra = _extra(record, "input", "context")
        response_key = next((k for k in ("output", "response", "completion") if k in record), None)
        if response_key is None and not prompts_only:
            raise ValueError("missing field 'output' (alpaca) or 'response' (dolly)")
        refs = record.get("references")
        response = _text(record, response_key) if response_key else ""
        ex = Example(template.format(_text(record, "instruction"), extra), response)
        if isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs):
            ex.references = list(refs)
        return [ex]
    if "prompt" in record:
        response_key = next((k for k in ("response", "completion", "output") if k in record), None)
        if response_key is None and not prompts_only:
            raise ValueError("missing field 'response' or 'completion'")
        return [Example(_text(record, "prompt"), _text(record, response_key) if response_key else "")]
    raise ValueError(
        "unrecognised record: expected alpaca (instruction/output), dolly (instruction/response), "
        "prompt/response, self-instruct (instruction/instances) or chat (messages/conversations) fields; "
        f"got {field_names(record)} (use --prompt-field/--response-field)"
    )


def load_examples(
    path: str | Path,
    prompt_field: str | None = None,
    response_field: str | None = None,
    skip_bad_lines: bool = False,
    template: Template = DEFAULT_TEMPLATE,
    report: LoadReport | None = None,
    prompts_only: bool = False,
) -> list[Example]:
    """Load and template every example of a JSONL / JSON-array file (``prompts_only``: a record may
    lack its response, for runs whose responses are all sampled).

    Raises:
        UserError: missing, unreadable or non-UTF-8 file, a broken JSON array, or a malformed
            record (``file:line: reason``) unless ``skip_bad_lines``, in which case bad lines
            are counted in ``report``.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; --data expects a JSONL or JSON file")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    examples: list[Example] = []
    for where, record in json_records(path):
        try:
            parsed = _parse(record, template, prompt_field, response_field, prompts_only)
        except ValueError as exc:
            if not skip_bad_lines:
                raise UserError(f"{where}: {exc} (use --skip-bad-lines to skip such lines)") from exc
            if report is not None:
                report.bad_lines.append(f"{where}: {exc}")
            continue
        for ex in parsed:
            ex.where = where
        examples.extend(parsed)
    if not examples:
        raise UserError(f"{path}: no examples found")
    for i, ex in enumerate(examples):
        ex.index = i
    return examples


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(
    tokenizer: Any,
    ex: Example,
    max_length: int,
    max_prompt_length: int | None = None,
    chat_template: str | None = None,
) -> Encoded:
    """Tokenize prompt + response + EOS; prompt positions get label -100 (labels are NOT shifted).

    Truncation rule: the prompt keeps its *last* ``max_prompt_length`` tokens (default
    ``max_length // 2``) so the "### Response:" cue survives; then the response (+ EOS) is cut
    to fit ``max_length``. A chat example is rendered with ``chat_template`` (default: the
    tokenizer's) and trained on its assistant turns, under the same rule (:func:`_encode_chat`).
    """
    if ex.messages is not None:
        return _encode_chat(tokenizer, ex, max_length, max_prompt_length, chat_template)
    max_prompt = max_prompt_length or max_length // 2
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = False
    if len(prompt_ids) > max_prompt:
        prompt_ids, truncated = prompt_ids[-max_prompt:], True
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        response_ids, truncated = response_ids[:room], True
    return Encoded(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, truncated)


def _encode_chat(
    tokenizer: Any, ex: Example, max_length: int, max_prompt_length: int | None, chat_template: str | None
) -> Encoded:
    """Every assistant turn is a target (:func:`kdtool.chat.assistant_mask`). Truncation: the rule
    above, with everything before the first target as the prompt and every later turn as the response."""
    try:
        ids, mask = chat.assistant_mask(ex.messages or [], tokenizer, chat_template)
    except ValueError as exc:
        raise UserError(f"{ex.where or f'example {ex.index}'}: {exc}") from exc
    labels = [i if target else IGNORE_INDEX for i, target in zip(ids, mask, strict=True)]
    start = mask.index(True) if True in mask else len(ids)
    cut = max(0, start - (max_prompt_length or max_length // 2))
    kept = slice(cut, cut + max_length)
    return Encoded(ids[kept], labels[kept], cut > 0 or len(ids) > cut + max_length)


class TokenizedDataset:
    """Examples tokenized once, kept as lists of ids (small; collated per batch).

    ``template`` is the ``--template`` choice for chat examples (:func:`kdtool.chat.resolve_template`;
    ``None`` = automatic); prompt/response examples were templated when loaded.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        max_length: int,
        max_prompt_length: int | None,
        template: str | None = None,
    ):
        self.examples = list(examples)
        self.chat_template = chat.resolve_template(template, tokenizer, self.examples)
        self.items = [
            encode_example(tokenizer, ex, max_length, max_prompt_length, self.chat_template)
            for ex in self.examples
        ]
        self.num_truncated = sum(item.truncated for item in self.items)
        self.pad_id = pad_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """Collate the items at these positions; ``index`` holds their file-level example indices."""
        return collate(
            [self.items[i] for i in indices], self.pad_id, [self.examples[i].index for i in indices]
        )

    def num_target_tokens(self) -> int:
        return sum(sum(1 for label in item.labels[1:] if label != IGNORE_INDEX) for item in self.items)


def collate(items: Sequence[Encoded], pad_id: int, indices: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Right-pad a batch: ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` and ``index`` ``[B]``."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        mask[row, :n] = 1
    index = torch.tensor(list(indices) if indices is not None else range(len(items)), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index}


class BatchLoader:
    """Deterministic shuffled batches with a resumable position (epoch, batch within epoch).

    With ``world`` ranks, every rank draws the same global order and takes its own slice of
    each global batch of ``batch_size × world`` examples, so a 2-process run with batch 2 sees
    exactly the examples of a 1-process run with batch 4.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
    ):
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.position = 0, 0

    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.dataset) // (self.batch_size * self.world)))

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while True:
            order = self._order(self.epoch)
            while self.position < self.batches_per_epoch():
                global_batch = order[self.position * self.batch_size * self.world :][
                    : self.batch_size * self.world
                ]
                mine = global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                self.position += 1
                if mine:
                    yield self.dataset.batch(mine)
                else:  # a short last batch left this rank nothing: a masked stand-in keeps ranks in step
                    stand_in = self.dataset.batch(global_batch[-1:])
                    stand_in["labels"].fill_(IGNORE_INDEX)
                    yield stand_in
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def split_examples(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split (at least one example each when there are two or more)."""
    if eval_fraction <= 0 or len(examples) < 2:
        return examples, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
