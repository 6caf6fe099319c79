"""Chat records (messages / ShareGPT) as loaded, and the choice of template (``--template``)."""

from __future__ import annotations

import json

import pytest

from kdtool import chat
from kdtool.data import Example, TokenizedDataset, encode_example, load_examples
from kdtool.errors import UserError
from test_chat import CHATML, CONVERSATION, QWEN_STYLE, chat_example, chatml_tokenizer, write_jsonl

# ---------------------------------------------------------------------------------------------
# loading


def test_messages_and_sharegpt_load_to_the_same_ids(tmp_path):
    sharegpt = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in CONVERSATION
    ]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": CONVERSATION}, {"conversations": sharegpt}, {"instruction": "a", "output": "A"}],
    )
    exs = load_examples(path)
    assert exs[0].messages == exs[1].messages == CONVERSATION and exs[2].messages is None
    assert [e.response for e in exs] == ["4", "4", "A"] and exs[0].prompt == ""
    assert [e.where for e in exs] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    tok = chatml_tokenizer()
    ds = TokenizedDataset(exs, tok, 512, None)
    assert ds.items[0] == ds.items[1]
    assert ds.items[2] == encode_example(tok, exs[2], 512)  # prompt/response examples as before
    batch = ds.batch([0, 1, 2])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"conversations": sharegpt}]))
    assert load_examples(arr)[0].messages == CONVERSATION


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": []}, "field 'messages' must be a non-empty list of {'role', 'content'} objects"),
        ({"messages": "hi"}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"content": "x"}]}, "messages[0]: missing field 'role'"),
        ({"messages": [{"role": "user"}]}, "messages[0]: missing field 'content'"),
        ({"messages": ["hi"]}, "messages[0]: expected an object with 'role' and 'content'"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages[0]: 'role' must be one of system, user, assistant; got 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["y"]}]},
            "messages[1]: field 'content' must be a string, got list",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages: no assistant turn to train on"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]},
            "messages[1]: an assistant turn before any user turn",
        ),
        ({"conversations": [{"value": "x"}]}, "conversations[0]: missing field 'from'"),
        (
            {"conversations": [{"from": "bot", "value": "x"}]},
            "conversations[0]: 'from' must be one of system, human, user, gpt, assistant; got 'bot'",
        ),
        (
            {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}]},
            "conversations[1]: field 'value' must be a string, got int",
        ),
    ],
)
def test_malformed_chat_records_name_file_and_line(tmp_path, record, reason):
    good = {"messages": CONVERSATION}
    path = write_jsonl(tmp_path / "d.jsonl", [good, record])
    with pytest.raises(UserError) as err:
        load_examples(path)
    assert str(err.value).startswith(f"{path}:2: {reason}")
    assert "\n" not in str(err.value)
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([good, record]))
    with pytest.raises(UserError, match=rf"^{arr}:item 1: "):
        load_examples(arr)


def test_bad_chat_lines_can_be_skipped(tmp_path):
    from kdtool.data import LoadReport

    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": []}, {"messages": CONVERSATION}])
    report = LoadReport()
    exs = load_examples(path, skip_bad_lines=True, report=report)
    assert len(exs) == 1 and exs[0].index == 0 and exs[0].where == f"{path}:2"
    assert report.bad_lines == [
        f"{path}:1: field 'messages' must be a non-empty list of {{'role', 'content'}} objects"
    ]


# ---------------------------------------------------------------------------------------------
# which template


def test_no_chat_template_is_one_line_naming_the_fix():
    exs = [Example("p", "r"), chat_example(CONVERSATION, where="d.jsonl:2")]
    with pytest.raises(UserError) as err:
        TokenizedDataset(exs, chatml_tokenizer(None), 512, None)
    assert str(err.value) == (
        "d.jsonl:2: chat data (messages/conversations) needs a chat template and the tokenizer has none "
        "(or no default one); give one with --template FILE (a Jinja chat template)"
    )


def test_automatic_choice():
    tok = chatml_tokenizer()
    assert chat.resolve_template(None, tok, [Example("p", "r")]) is None
    assert chat.resolve_template(None, chatml_tokenizer(None), [Example("p", "r")]) is None
    assert chat.resolve_template(None, tok, [chat_example(CONVERSATION)]) == CHATML
    assert chat.resolve_template("chat", tok, [chat_example(CONVERSATION)]) == CHATML


def test_template_file_becomes_the_tokenizers_chat_template(tmp_path):
    path = tmp_path / "tpl.jinja"
    path.write_text(QWEN_STYLE)
    tok = chatml_tokenizer(None)
    ds = TokenizedDataset([chat_example(CONVERSATION[1:])], tok, 512, None, str(path))
    assert ds.chat_template == QWEN_STYLE and tok.chat_template == QWEN_STYLE  # saved with a run's tokenizer
    assert ds.items[0].input_ids == tok.apply_chat_template(CONVERSATION[1:])["input_ids"]
    assert tok.decode(ds.items[0].input_ids).startswith("<|im_start|>system\nYou are a helpful")
    # a file overrides a template the tokenizer has
    other = chatml_tokenizer()
    assert chat.resolve_template(str(path), other, [chat_example(CONVERSATION)]) == QWEN_STYLE


@pytest.mark.parametrize(
    ("kind", "examples", "message"),
    [
        (
            "alpaca",
            [chat_example(CONVERSATION)],
            "d.jsonl:1: --template alpaca formats instruction/prompt-response records, not "
            "messages/conversations ones; use --template chat or --template FILE",
        ),
        (
            "chat",
            [chat_example(CONVERSATION), Example("p", "r", where="d.jsonl:2")],
            "d.jsonl:2: --template chat renders messages/conversations records; this one is an "
            "instruction/prompt-response record (use --template alpaca, or write it as messages)",
        ),
        (
            "missing.jinja",
            [chat_example(CONVERSATION)],
            "--template: expected chat or alpaca or a Jinja chat-template file; missing.jinja is not a file",
        ),
    ],
)
def test_template_choices_that_do_not_fit_the_data(kind, examples, message):
    with pytest.raises(UserError) as err:
        chat.resolve_template(kind, chatml_tokenizer(), examples)
    assert str(err.value) == message


def test_template_file_errors(tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(
        UserError, match=rf"^{broken}: cannot render a conversation with this chat template: "
    ):
        chat.resolve_template(str(broken), chatml_tokenizer(), [chat_example(CONVERSATION)])
    good = tmp_path / "tpl.jinja"
    good.write_text(CHATML)
    with pytest.raises(UserError, match=r"^d.jsonl:3: --template .*tpl.jinja is a chat template"):
        chat.resolve_template(str(good), chatml_tokenizer(), [Example("p", "r", where="d.jsonl:3")])
    assert chat.resolve_template("alpaca", chatml_tokenizer(), [Example("p", "r")]) is None
    assert chat.resolve_template(str(good), chatml_tokenizer(), []) is None  # an empty held-out split
    with pytest.raises(UserError, match=r"is not a file$"):
        chat.resolve_template(str(tmp_path), chatml_tokenizer(), [chat_example(CONVERSATION)])
