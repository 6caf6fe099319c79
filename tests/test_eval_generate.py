"""Generation for Rouge-L on a tiny random GPT-2 with a character-level tokenizer built offline."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import SHARED_DATA
from kdtool.errors import UserError
from kdtool.evaluation.generate import (
    Sampling,
    cut_at_eos,
    encode_prompts,
    generate,
    left_pad,
    prompt_budget,
    stop_token_ids,
)

PROMPTS = [
    "Reverse these letters.\nabc",
    "Add these numbers.\n12+34",
    "Sort these digits.\n5 2 9 1 7 3",
    "Name one letter from the list.\nb k q",
    "x",
]


def peaky_model(tokenizer, seed: int = 0, n_positions: int = 128):
    """A random GPT-2 whose large weights make its next token depend strongly on the context."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=16,
        n_layer=1,
        n_head=2,
        initializer_range=0.5,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


@pytest.fixture(scope="module")
def model(tokenizer):
    return peaky_model(tokenizer)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids, cut = encode_prompts(tokenizer, PROMPTS, None)
    assert cut == 0 and len({len(x) for x in ids}) > 2  # lengths differ, so batches really get padded
    return ids


SAMPLED = Sampling(max_new_tokens=12)
GREEDY = Sampling(greedy=True, max_new_tokens=12)


def test_protocol_defaults():
    s = Sampling()
    assert (s.greedy, s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (False, 1.0, 1.0, 0, 256)
    cfg = s.generation_config([1], 0)
    assert cfg.do_sample and cfg.top_k == 0 and cfg.top_p == 1.0 and cfg.temperature == 1.0


def test_greedy_is_deterministic_and_independent_of_batching(model, tokenizer, prompt_ids):
    batched = generate(model, tokenizer, prompt_ids, GREEDY, None, batch_size=len(PROMPTS))
    again = generate(model, tokenizer, prompt_ids, GREEDY, None, batch_size=len(PROMPTS))
    single = generate(model, tokenizer, prompt_ids, GREEDY, None, batch_size=1)
    assert batched.predictions == again.predictions
    # Left padding with the attention mask must not change any row's continuation.
    assert batched.predictions == single.predictions
    assert len(set(batched.predictions)) > 1, batched.predictions  # the check is not vacuous


def test_same_seed_reproduces_and_seeds_differ(model, tokenizer, prompt_ids):
    runs = {seed: generate(model, tokenizer, prompt_ids, SAMPLED, seed, batch_size=2) for seed in (10, 20)}
    again = generate(model, tokenizer, prompt_ids, SAMPLED, 10, batch_size=2)
    assert again.predictions == runs[10].predictions
    assert runs[10].predictions != runs[20].predictions
    assert runs[10].new_tokens > 0 and runs[10].wall_s > 0


def test_checkpoint_generation_defaults_do_not_leak(tokenizer, prompt_ids):
    # A generation_config.json with a repetition penalty and top-k would silently change the
    # protocol's plain sampling if we let transformers merge it in.
    plain = peaky_model(tokenizer)
    tuned = peaky_model(tokenizer)
    tuned.generation_config.repetition_penalty = 3.0
    tuned.generation_config.top_k = 2
    tuned.generation_config.temperature = 0.2
    tuned.generation_config.no_repeat_ngram_size = 1
    for sampling, seed in ((SAMPLED, 10), (GREEDY, None)):
        a = generate(plain, tokenizer, prompt_ids, sampling, seed, batch_size=5)
        b = generate(tuned, tokenizer, prompt_ids, sampling, seed, batch_size=5)
        assert a.predictions == b.predictions
    assert tuned.generation_config.repetition_penalty == 3.0  # restored afterwards


def test_stops_at_eos_and_decodes_without_special_tokens(tokenizer, prompt_ids):
    model = peaky_model(tokenizer)
    # Make EOS overwhelmingly likely: every response is empty and generation stops after one step.
    head = torch.nn.Linear(16, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1e4
    model.lm_head = head
    out = generate(model, tokenizer, prompt_ids, SAMPLED, 10, batch_size=2)
    assert out.predictions == [""] * len(PROMPTS)
    assert out.new_tokens == len(PROMPTS)  # one token each: the EOS


def test_cut_at_eos_and_decode(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = tokenizer(" hi!", add_special_tokens=False)["input_ids"]
    assert cut_at_eos([*ids, eos, *ids, pad], [eos]) == ids
    assert cut_at_eos(ids, [eos]) == ids
    assert cut_at_eos([eos, *ids], [eos]) == []
    assert cut_at_eos([7, 3, 9], [eos, 3]) == [7]
    assert tokenizer.decode([*ids, pad], skip_special_tokens=True).strip() == "hi!"


def test_stop_ids_include_the_models_extra_eos(model, tokenizer):
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    other = peaky_model(tokenizer)
    other.generation_config.eos_token_id = [tokenizer.eos_token_id, 5]
    assert stop_token_ids(other, tokenizer) == [tokenizer.eos_token_id, 5]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prompt_budget_and_truncation_keep_the_end(model, tokenizer):
    assert prompt_budget(model, 28) == 100  # 128 positions
    assert prompt_budget(model, 28, max_prompt_length=10) == 10
    with pytest.raises(UserError, match="leaves no room for a prompt"):
        prompt_budget(model, 128)
    ids, cut = encode_prompts(tokenizer, ["abcdef", "ab"], 3)
    assert cut == 1
    assert tokenizer.decode(ids[0]) == "def" and tokenizer.decode(ids[1]) == "ab"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), "use --greedy"),
        (dict(top_p=0.0), "--top-p must be in (0, 1]"),
        (dict(top_k=-1), "--top-k must be >= 0"),
        (dict(max_new_tokens=0), "--max-new-tokens must be at least 1"),
    ],
)
def test_sampling_validation(kwargs, message):
    with pytest.raises(UserError) as exc:
        Sampling(**kwargs)
    assert message in str(exc.value)


# --- the command, in-process through the real entry point ------------------------------------------


def run_cli(monkeypatch, capsys, *args):
    from kdtool.cli import main

    monkeypatch.setattr(sys, "argv", ["kdtool", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("evalmodel")
    peaky_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "test.jsonl"
    records = [
        {"instruction": "Reverse these letters.", "input": "abc", "output": "cba"},
        {
            "instruction": "Name one letter from the list.",
            "input": "b k q",
            "output": "b",
            "references": ["b", "k", "q"],
        },
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Sort these digits.", "input": "3 1 2", "output": "123"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def eval_args(model_dir, out, *extra):
    return (
        "eval",
        "rougel",
        "--model",
        str(model_dir / "model"),
        "--data",
        str(model_dir / "test.jsonl"),
        "--output",
        str(out),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "3",
        "--no-progress",
        "--threads",
        "1",
        *extra,
    )


def test_cli_generation_output_schema(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rougel.json"
    code, stdout, stderr = run_cli(monkeypatch, capsys, *eval_args(model_dir, out, "--seeds", "1,2"))
    assert code == 0, stderr
    assert "mean ± std" in stdout
    result = json.loads(out.read_text())
    assert set(result) == {"metric", "summary", "settings", "examples"}
    summary = result["summary"]
    assert summary["n_examples"] == 4 and summary["seeds"] == [1, 2]
    assert set(summary["rougeL"]) == set(summary["exact_match"]) == {"mean", "std"}
    assert [row["seed"] for row in summary["per_seed"]] == [1, 2]
    for row in summary["per_seed"]:
        assert set(row) == {"seed", "rougeL", "exact_match", "wall_s", "examples_per_s", "new_tokens_per_s"}
    settings = result["settings"]
    assert settings["mode"] == "model" and settings["seeds"] == [1, 2]
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (1.0, 1.0, 0)
    assert settings["max_new_tokens"] == 8 and settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert settings["cpu_threads"] == 1
    assert settings["template"]["no_input"].endswith("### Response:\n")
    ex = result["examples"][1]
    assert ex["index"] == 1 and ex["references"] == ["b", "k", "q"]
    assert ex["prompt"].endswith("### Input:\nb k q\n\n### Response:\n")
    assert [o["seed"] for o in ex["outputs"]] == [1, 2]
    assert set(ex["outputs"][0]) == {"seed", "prediction", "rougeL", "exact_match"}
    # The summary is the mean of the per-example scores it reports.
    for k, seed_row in enumerate(summary["per_seed"]):
        mean = sum(e["outputs"][k]["rougeL"] for e in result["examples"]) / 4
        assert seed_row["rougeL"] == pytest.approx(mean)

    # Re-running a seed reproduces its predictions; --greedy decodes once and ignores seeds.
    again = tmp_path / "again.json"
    assert run_cli(monkeypatch, capsys, *eval_args(model_dir, again, "--seeds", "2"))[0] == 0
    preds = lambda r, k: [e["outputs"][k]["prediction"] for e in r["examples"]]  # noqa: E731
    assert preds(json.loads(again.read_text()), 0) == preds(result, 1)
    greedy = tmp_path / "greedy.json"
    assert run_cli(monkeypatch, capsys, *eval_args(model_dir, greedy, "--greedy", "--limit", "2"))[0] == 0
    g = json.loads(greedy.read_text())
    assert g["summary"]["seeds"] == [None] and g["summary"]["n_examples"] == 2
    assert g["settings"]["greedy"] is True and g["settings"]["seeds"] is None


def test_cli_uses_the_template_a_kdtool_run_trained_with(model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir / "model", run)
    template = {"no_input": "Q: {instruction}\nA: ", "with_input": "Q: {instruction}\n{input}\nA: "}
    (run / "kdtool.json").write_text(json.dumps({"template": template}))
    out = tmp_path / "r.json"
    args = list(eval_args(model_dir, out, "--greedy"))
    args[args.index("--model") + 1] = str(run)
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    result = json.loads(out.read_text())
    assert result["settings"]["template"] == template
    assert result["examples"][2]["prompt"] == "Q: Say hi.\nA: "


def test_cli_truncates_long_real_prompts(model_dir, tmp_path, monkeypatch, capsys):
    data = SHARED_DATA / "selfinst_user_oriented.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} is absent (the shared data folder sits beside the repository)")
    out = tmp_path / "r.json"
    args = list(eval_args(model_dir, out, "--seeds", "10", "--limit", "3"))
    args[args.index("--data") + 1] = str(data)
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    # Self-Instruct format: one example per instance, the instance output as the reference.
    first = json.loads(data.read_text().splitlines()[0])
    assert result["examples"][0]["references"] == [first["instances"][0]["output"]]
    assert result["settings"]["max_prompt_tokens"] == 120  # 128 positions - 8 new tokens
    assert result["settings"]["truncated_prompts"] >= 1
    assert "prompts were longer than 120 tokens" in stderr


def write_t5_config(path):
    from transformers import T5Config

    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8, vocab_size=10).save_pretrained(path)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("t5", "cannot load a causal LM from"),
        ("empty", "is not a Hugging Face model directory (no config.json)"),
        ("missing", "model directory not found"),
        ("nodata", "data file not found"),
        ("emptydata", "no examples found"),
        ("badseeds", "--seeds expects comma-separated integers"),
        ("temperature", "use --greedy"),
    ],
)
def test_cli_model_errors_are_one_line(which, message, model_dir, tmp_path, monkeypatch, capsys):
    args = list(eval_args(model_dir, tmp_path / "o.json"))
    model_at, data_at = args.index("--model") + 1, args.index("--data") + 1
    if which == "t5":
        write_t5_config(tmp_path / "t5")
        args[model_at] = str(tmp_path / "t5")
    elif which == "empty":
        (tmp_path / "emptydir").mkdir()
        args[model_at] = str(tmp_path / "emptydir")
    elif which == "missing":
        args[model_at] = str(tmp_path / "nope")
    elif which == "nodata":
        args[data_at] = str(tmp_path / "nope.jsonl")
    elif which == "emptydata":
        (tmp_path / "e.jsonl").write_text("")
        args[data_at] = str(tmp_path / "e.jsonl")
    elif which == "badseeds":
        args += ["--seeds", "1,x"]
    elif which == "temperature":
        args += ["--temperature", "0"]
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], stderr
    assert not (tmp_path / "o.json").exists()
