"""``kdtool eval rougel`` on chat data: prompts rendered with the chat template, last turn as reference."""

from __future__ import annotations

import json

import pytest

from kdtool import chat
from kdtool.evaluation.generate import Sampling
from kdtool.evaluation.rougel import evaluate_model
from test_chat import CHATML, CONVERSATION, QWEN_STYLE, chatml_tokenizer

SECOND = [
    {"role": "user", "content": "Sort 3 1 2."},
    {"role": "assistant", "content": "123"},
    {"role": "user", "content": "Thanks."},  # after the last assistant turn: not in the prompt
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest, and exact


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from kdtool.synthetic import save_model

    root = tmp_path_factory.mktemp("chat_eval")
    tok = chatml_tokenizer()
    save_model(root / "model", tok, n_layer=1, n_embd=16, n_head=2, n_positions=128, seed=0)
    conversations = [{"messages": CONVERSATION}, {"conversations": [_sharegpt(m) for m in SECOND]}]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations))
    return root / "model", data, tok


def _sharegpt(message):
    return {"from": {"user": "human", "assistant": "gpt"}[message["role"]], "value": message["content"]}


def evaluate(model, data, monkeypatch, **kw):
    """Greedy evaluation; returns the result and the prompt ids that reached ``generate``."""
    import kdtool.evaluation.generate as gen

    seen = []
    real = gen.generate

    def spy(model, tokenizer, prompt_ids, *args, **kwargs):
        seen.extend(list(ids) for ids in prompt_ids)
        return real(model, tokenizer, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    result = evaluate_model(
        str(model), data, Sampling(greedy=True, max_new_tokens=3), [1], device="cpu", **kw
    )
    return result, seen


def test_chat_prompts_are_rendered_up_to_the_last_assistant_turn(chat_model, monkeypatch):
    model, data, tok = chat_model
    result, seen = evaluate(model, data, monkeypatch)
    rows = result["examples"]
    assert [r["references"] for r in rows] == [["4"], ["123"]]
    assert rows[0]["prompt"] == tok.apply_chat_template(
        CONVERSATION[:4], tokenize=False, add_generation_prompt=True
    )
    assert rows[1]["prompt"] == "<|im_start|>user\nSort 3 1 2.<|im_end|>\n<|im_start|>assistant\n"
    assert seen == [chat.prompt_ids(CONVERSATION, tok), chat.prompt_ids(SECOND, tok)]
    assert seen[0] == tok.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)["input_ids"]
    assert result["settings"]["chat_template"] == CHATML
    assert result["settings"]["truncated_prompts"] == 0


def test_chat_prompts_keep_their_last_tokens(chat_model, monkeypatch):
    model, data, tok = chat_model
    result, seen = evaluate(model, data, monkeypatch, max_prompt_length=12)
    assert seen[0] == chat.prompt_ids(CONVERSATION, tok)[-12:]
    assert result["settings"]["truncated_prompts"] == 2


def test_template_file_renders_eval_prompts(chat_model, tmp_path, monkeypatch):
    model, data, _ = chat_model
    path = tmp_path / "qwen.jinja"
    path.write_text(QWEN_STYLE)
    result, _ = evaluate(model, data, monkeypatch, template=str(path))
    assert result["examples"][1]["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert result["settings"]["chat_template"] == QWEN_STYLE


def test_chat_eval_without_a_chat_template_is_one_line(chat_model, tmp_path):
    from kdtool.errors import UserError
    from kdtool.synthetic import save_model

    _, data, _ = chat_model
    bare = save_model(
        tmp_path / "bare", chatml_tokenizer(None), n_layer=1, n_embd=16, n_head=2, n_positions=64
    )
    with pytest.raises(UserError, match=r"chat.jsonl:1: chat data .* give one with --template FILE"):
        evaluate_model(str(bare), data, Sampling(greedy=True, max_new_tokens=2), [1], device="cpu")
