"""Chat data: messages / ShareGPT records, chat-template rendering, assistant-only labels."""

from __future__ import annotations

import json

import pytest

from kdtool import chat
from kdtool.data import IGNORE_INDEX, Example, TokenizedDataset, encode_example
from kdtool.errors import UserError

# ChatML as Qwen writes it; the oracle variant marks what an assistant turn generates (content and
# <|im_end|>, not the header nor the newline after it) for transformers' assistant-token mask.
CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_MARKED = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' %}"
    "{% generation %}{{- m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- m['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A Qwen2.5-style template: a default system turn when there is none, one branch for every role.
QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_STYLE_MARKED = QWEN_STYLE.replace(
    " or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    " %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}",
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse abc."},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Add 2+2."},
    {"role": "assistant", "content": "4"},
]


def chatml_tokenizer(template: str | None = CHATML):
    """The built-in character-level tokenizer with ChatML's two control tokens."""
    from kdtool.synthetic import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def bpe_tokenizer(template: str):
    """A BPE tokenizer with no pre-tokenizer, so tokens merge across the header/content boundary."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    specials = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    corpus = ["assistant", "user", "system", "\nhello", "\nhi", " there", "You are a helpful assistant."]
    core.train_from_iterator(
        corpus * 20, trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = template
    return tok


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labels_of(messages, tok, chat_template=None):
    """``(input_ids, labels)`` from the chat module's mask, untruncated."""
    ids, mask = chat.assistant_mask(messages, tok, chat_template)
    return ids, [i if target else IGNORE_INDEX for i, target in zip(ids, mask, strict=True)]


def targets(tok, ids, labels):
    """The labelled tokens as strings, in order."""
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    return [
        tok.convert_ids_to_tokens(i) for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX
    ]


def chat_example(messages, where="d.jsonl:1"):
    return Example("", chat.reference(messages), messages=messages, where=where)


# ---------------------------------------------------------------------------------------------
# rendering and labels


def test_multi_turn_ids_are_the_templates_and_only_assistant_turns_are_targets():
    tok = chatml_tokenizer()
    item = encode_example(tok, chat_example(CONVERSATION), max_length=512)
    assert item.input_ids == tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert not item.truncated
    # both assistant turns, each with its end-of-turn token; no header, no system/user token
    assert targets(tok, item.input_ids, item.labels) == ["c", "b", "a", "<|im_end|>", "4", "<|im_end|>"]
    oracle = tok.apply_chat_template(
        CONVERSATION, chat_template=CHATML_MARKED, return_assistant_tokens_mask=True
    )
    assert oracle["input_ids"] == item.input_ids
    assert [int(label != IGNORE_INDEX) for label in item.labels] == oracle["assistant_masks"]


def test_labels_follow_the_text_when_tokens_cross_the_header_boundary():
    """With BPE merges across turns the ids of a prefix are not a prefix of the whole's ids: labels
    must come from the text, and agree with transformers' mask of a {% generation %}-marked copy."""
    tok = bpe_tokenizer(QWEN_STYLE)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hi"},
    ]
    ids, labels = labels_of(messages, tok)
    assert ids == tok.apply_chat_template(messages)["input_ids"]
    prefix = tok.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
    assert ids[: len(prefix)] != prefix  # why token-id prefixes would not do
    oracle = tok.apply_chat_template(
        messages, chat_template=QWEN_STYLE_MARKED, return_assistant_tokens_mask=True
    )
    assert [int(label != IGNORE_INDEX) for label in labels] == oracle["assistant_masks"]
    assert "".join(targets(tok, ids, labels)).count("<|im_end|>") == 2


def test_default_system_turn_of_the_template_is_context():
    tok = chatml_tokenizer(QWEN_STYLE)
    messages = CONVERSATION[1:]
    ids, labels = labels_of(messages, tok)
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert targets(tok, ids, labels) == ["c", "b", "a", "<|im_end|>", "4", "<|im_end|>"]


def test_plain_text_end_of_turn_is_a_target():
    """Without a control token the turn's trailing text is how the model learns to stop."""
    template = (
        "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + '\\n\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    tok = chatml_tokenizer(template)
    ids, labels = labels_of(CONVERSATION[:3], tok)
    assert targets(tok, ids, labels) == ["c", "b", "a", "\n\n"]


def test_template_that_renders_earlier_turns_differently_is_refused():
    # keeps only the last assistant turn's "reasoning" (as Qwen3's template drops earlier ones)
    template = CHATML.replace(
        "m['content']",
        "(('<think></think>' if loop.last and m['role'] == 'assistant' else '') + m['content'])",
    )
    tok = chatml_tokenizer(template)
    with pytest.raises(UserError) as err:
        encode_example(tok, chat_example(CONVERSATION, where="d.jsonl:7"), max_length=512)
    message = str(err.value)
    assert message.startswith("d.jsonl:7: the chat template renders turn 2 differently")
    assert "--template FILE" in message and "\n" not in message


def test_template_errors_name_the_line():
    template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(UserError, match=r"^d.jsonl:1: the chat template rejected .*must alternate"):
        encode_example(chatml_tokenizer(template), chat_example(CONVERSATION), max_length=512)


def test_prompt_is_the_conversation_up_to_the_last_assistant_turn():
    tok = chatml_tokenizer()
    messages = [*CONVERSATION, {"role": "user", "content": "Thanks."}]  # a trailing user turn
    ids = chat.prompt_ids(messages, tok)
    assert ids == tok.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)["input_ids"]
    assert chat.prompt_text(messages, tok).endswith("Add 2+2.<|im_end|>\n<|im_start|>assistant\n")
    assert chat.reference(messages) == "4"
    full = encode_example(tok, chat_example(CONVERSATION), max_length=512)
    assert full.input_ids[: len(ids)] == ids and full.labels[len(ids)] != IGNORE_INDEX


def test_truncation_keeps_the_prompt_tail_then_cuts_the_rest():
    tok = chatml_tokenizer()
    ids, labels = labels_of(CONVERSATION, tok)
    first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)  # 50 context tokens
    item = encode_example(tok, chat_example(CONVERSATION), max_length=30, max_prompt_length=10)
    assert item.truncated and len(item.input_ids) == 30
    assert item.input_ids == ids[first - 10 : first + 20]
    assert item.labels == labels[first - 10 : first + 20]
    assert targets(tok, item.input_ids, item.labels) == ["c", "b", "a", "<|im_end|>"]
    whole = encode_example(tok, chat_example(CONVERSATION), max_length=len(ids), max_prompt_length=first)
    assert not whole.truncated and whole.input_ids == ids
    ds = TokenizedDataset([chat_example(CONVERSATION)], tok, 30, 10)
    assert ds.num_truncated == 1
