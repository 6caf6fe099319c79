"""``--template`` on ``kdtool distill`` and ``kdtool eval rougel``, and a distillation run on chat data."""

from __future__ import annotations

import json

import pytest
import yaml

from test_chat import CONVERSATION, QWEN_STYLE, chatml_tokenizer


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """A tiny teacher/student pair whose tokenizer has a ChatML template, and chat data."""
    from kdtool.synthetic import save_model

    root = tmp_path_factory.mktemp("chat_cli")
    tok = chatml_tokenizer()
    save_model(root / "teacher", tok, n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=1)
    save_model(root / "student", tok, n_layer=1, n_embd=16, n_head=2, n_positions=128, seed=2)
    rows = [
        {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}
        for i in range(11)
    ]
    rows.append({"messages": CONVERSATION})
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "qwen.jinja").write_text(QWEN_STYLE)
    return root


def test_distill_trains_on_chat_data_and_records_the_template(chat_pair, tmp_path, cli):
    from conftest import tiny_run_flags

    out = tmp_path / "run"
    flags = tiny_run_flags(chat_pair, out, max_steps=2)
    flags["data"] = str(chat_pair / "chat.jsonl")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if k != "progress"]
    code, text = cli("distill", *args, "--no-progress", "--template", str(chat_pair / "qwen.jinja"))
    assert code == 0, text
    assert yaml.safe_load((out / "config.yaml").read_text())["template"] == str(chat_pair / "qwen.jinja")
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    summary = json.loads((out / "kdtool.json").read_text())
    assert summary["steps"] == 2 and summary["truncated_examples"] == 0


def test_eval_rougel_template_flag(chat_pair, tmp_path, cli):
    out = tmp_path / "r.json"
    base = ["eval", "rougel", "--model", str(chat_pair / "student"), "--data", str(chat_pair / "chat.jsonl")]
    base += ["--greedy", "--max-new-tokens", "2", "--limit", "2", "--no-progress", "--threads", "1"]
    code, text = cli(*base, "--template", str(chat_pair / "qwen.jinja"), "--output", str(out))
    assert code == 0, text
    result = json.loads(out.read_text())
    assert result["settings"]["chat_template"] == QWEN_STYLE
    assert result["examples"][0]["prompt"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nSay 0.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert result["examples"][0]["references"] == ["0"]
    code, text = cli(*base, "--template", "alpaca")
    assert code != 0
    assert "--template alpaca formats instruction/prompt-response records" in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
