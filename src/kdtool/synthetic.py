"""The built-in instruction task: offline, deterministic, small enough for a CPU.

Character-level tasks a 2-layer model can learn but a much smaller one cannot fully learn:
  reverse  "Reverse these letters."  abcd      -> dcba
  add      "Add these numbers."      23+45     -> 68
  sort     "Sort these digits."      5 2 9 1   -> 1259
  pick     "Name one letter from the list."  b k q  -> b | k | q   (several valid answers)
"pick" has several correct answers, so mode-covering (fkl) and mode-seeking (rkl, minillm)
objectives behave differently on it. The tokenizer is character-level, with the prompt
template's fixed phrases as single added tokens so the standard template stays cheap.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

from kdtool.data import PROMPT_TEMPLATE, PROMPT_TEMPLATE_WITH_INPUT

SPECIAL = ["<pad>", "<eos>", "<unk>"]
CHARS = list(string.ascii_lowercase + string.digits + " +-=.,:;!?'\"()#\n" + string.ascii_uppercase)
INSTRUCTIONS = {
    "reverse": "Reverse these letters.",
    "add": "Add these numbers.",
    "sort": "Sort these digits.",
    "pick": "Name one letter from the list.",
    "above": "Name a digit larger than this one.",
}
# Fixed phrases become one token each (added tokens are matched before characters): the template's,
# the four instructions and the blank line, so a prompt is ~15 tokens and the answer's characters
# are what the models spend their compute on.
TEMPLATE_PHRASES = sorted(
    {
        PROMPT_TEMPLATE.split("\n\n")[0],
        PROMPT_TEMPLATE_WITH_INPUT.split("\n\n")[0],
        "### Instruction:\n",
        "### Input:\n",
        "### Response:\n",
        "\n\n",
        *INSTRUCTIONS.values(),
    },
    # longest first (so a phrase is matched before its prefixes), ties alphabetically: a set's order
    # changes with PYTHONHASHSEED, and the token ids must not (the shipped teacher's are these)
    key=lambda phrase: (-len(phrase), phrase),
)
TASKS = ("reverse", "add", "sort", "above")  # the demo's mix ("pick" is kept for experiments)
PICK_SIZE = 3  # letters listed in a "pick" prompt (each a valid answer)


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` (pad, eos, unk + template phrases)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tok.add_tokens(TEMPLATE_PHRASES)
    return tok


def make_example(rng: random.Random, task: str) -> dict[str, Any]:
    """One alpaca-format record with its ``task`` and ``references`` (every valid answer)."""
    if task == "reverse":
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        record = {"instruction": INSTRUCTIONS["reverse"], "input": word, "output": word[::-1]}
    elif task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        record = {"instruction": INSTRUCTIONS["add"], "input": f"{a}+{b}", "output": str(a + b)}
    elif task == "sort":
        digits = [rng.choice(string.digits) for _ in range(rng.randint(3, 5))]
        record = {
            "instruction": INSTRUCTIONS["sort"],
            "input": " ".join(digits),
            "output": "".join(sorted(digits)),
        }
    elif task == "pick":
        letters = rng.sample(string.ascii_lowercase, PICK_SIZE)
        record = {
            "instruction": INSTRUCTIONS["pick"],
            "input": " ".join(letters),
            "output": rng.choice(letters),
        }
    elif task == "above":
        record = {"instruction": INSTRUCTIONS["above"], "input": str(rng.randint(0, 7)), "output": ""}
        record["output"] = rng.choice(valid_answers(task, record["input"]))
    else:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(INSTRUCTIONS)})")
    return {"task": task, **record, "references": valid_answers(task, record["input"])}


def valid_answers(task: str, input: str) -> list[str]:
    """Every correct answer to a prompt of ``task`` with this ``input`` (the task's answer checker)."""
    if task == "reverse":
        return [input[::-1]]
    if task == "add":
        a, b = input.split("+")
        return [str(int(a) + int(b))]
    if task == "sort":
        return ["".join(sorted(input.split()))]
    if task == "pick":
        return input.split()  # uniform over the listed letters: the known answer distribution
    if task == "above":
        return [str(d) for d in range(int(input) + 1, 10)]  # uniform over the larger digits
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def is_correct(record: dict[str, Any], prediction: str) -> bool:
    """Exact validity: the stripped prediction is one of the record's valid answers."""
    return prediction.strip() in valid_answers(record["task"], record["input"])


def task_key(record: dict[str, Any]) -> str:
    return f"{record['task']}:{record['input']}"


def make_dataset(
    n: int, seed: int, exclude: set[str] | None = None, tasks: tuple[str, ...] = TASKS
) -> list[dict[str, Any]]:
    """``n`` records cycling through ``tasks``; prompts in ``exclude`` (task:input) are redrawn."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        record = make_example(rng, tasks[len(out) % len(tasks)])
        # "above" has 8 prompts in all: held-out ones are in training by construction (its point is
        # the answer distribution, not generalisation to new prompts)
        if exclude is None or task_key(record) not in exclude or record["task"] == "above":
            out.append(record)
    return out


def write_dataset(
    directory: str | Path, n_train: int = 4000, n_test: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (no test prompt in train) and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    test = make_dataset(n_test, seed + 10_000)
    train = make_dataset(n_train, seed, exclude={task_key(r) for r in test})
    paths = []
    for name, records in (("train", train), ("test", test)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


def tiny_model(
    tokenizer: Any,
    n_layer: int = 2,
    n_embd: int = 96,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
    activation: str = "gelu_new",
) -> Any:
    """A GPT-2-style model sized for the built-in task, randomly initialised with ``seed``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function=activation,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def save_model(directory: str | Path, tokenizer: Any, **model_kwargs: Any) -> Path:
    """Build a tiny model and save it with the tokenizer as a Hugging Face directory."""
    directory = Path(directory)
    tiny_model(tokenizer, **model_kwargs).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
