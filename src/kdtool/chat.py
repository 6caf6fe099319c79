"""Chat data: ``messages`` and ShareGPT ``conversations`` records, rendered with a chat template.

Records (one per line of a JSONL file, or items of a JSON array)::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}

Both become a list of ``{"role", "content"}`` messages. Training renders the whole conversation
with ``tokenizer.apply_chat_template`` and puts the loss on every assistant turn (its content and
its end-of-turn token); system and user turns and the template's role headers get label -100.
A prompt for generation is the conversation up to its last assistant turn with the template's
generation prompt; the reference answer is that turn's content.

Which template renders the data is :func:`resolve_template`'s choice (``--template``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdtool.errors import UserError
from kdtool.files import read_text

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
KINDS = ("chat", "alpaca")  # --template values that are not a file name

Message = dict[str, str]


# ---------------------------------------------------------------------------------------------
# records


def is_chat_record(record: dict[str, Any]) -> bool:
    return "messages" in record or "conversations" in record


def parse_record(record: dict[str, Any]) -> list[Message]:
    """The conversation of a ``messages`` or ``conversations`` record.

    Raises:
        ValueError: a short reason (the caller adds ``file:line``): not a non-empty list, a turn
            without a role or with an unknown one, non-string content, no assistant turn, or an
            assistant turn before any user turn.
    """
    key, role_key, text_key = (
        ("messages", "role", "content") if "messages" in record else ("conversations", "from", "value")
    )
    roles = {r: r for r in ROLES} if key == "messages" else SHAREGPT_ROLES
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {key!r} must be a non-empty list of {{{role_key!r}, {text_key!r}}} objects")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: expected an object with {role_key!r} and {text_key!r}")
        for field in (role_key, text_key):
            if field not in turn:
                raise ValueError(f"{where}: missing field {field!r}")
        role, text = turn[role_key], turn[text_key]
        if not isinstance(role, str) or role not in roles:
            raise ValueError(f"{where}: {role_key!r} must be one of {', '.join(roles)}; got {role!r}")
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {text_key!r} must be a string, got {type(text).__name__}")
        messages.append({"role": roles[role], "content": text})
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise ValueError(f"{key}: no assistant turn to train on")
    if all(m["role"] != "user" for m in messages[:first]):
        raise ValueError(f"{key}[{first}]: an assistant turn before any user turn")
    return messages


def last_assistant(messages: Sequence[Message]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def reference(messages: Sequence[Message]) -> str:
    """The reference answer: the last assistant turn's content."""
    return messages[last_assistant(messages)]["content"]


# ---------------------------------------------------------------------------------------------
# which template


def resolve_template(kind: str | None, tokenizer: Any, examples: Sequence[Any]) -> str | None:
    """The chat template (Jinja source) that renders the chat examples, or ``None`` when there are none.

    Args:
        kind: ``None`` (automatic): chat examples use the tokenizer's chat template, the others the
            Alpaca template applied when loading; ``"chat"``: the same, and every example must be a
            chat one; ``"alpaca"``: no chat examples allowed; anything else is a FILE holding a Jinja
            chat template, which becomes ``tokenizer.chat_template`` (so a run's saved tokenizer
            carries it and evaluation renders the same way).
        examples: the loaded examples (a chat example has ``messages``).

    Raises:
        UserError: chat data and no chat template; a kind that does not fit the data; an
            unreadable template file.
    """
    chat = next((ex for ex in examples if ex.messages is not None), None)
    plain = next((ex for ex in examples if ex.messages is None), None)
    if kind == "alpaca":
        if chat is not None:
            raise UserError(
                f"{_where(chat)}: --template alpaca formats instruction/prompt-response records, not "
                "messages/conversations ones; use --template chat or --template FILE"
            )
        return None
    if kind not in (None, "chat"):
        return _template_file(kind, tokenizer, chat, plain)
    if kind == "chat" and plain is not None:
        raise UserError(
            f"{_where(plain)}: --template chat renders messages/conversations records; this one is an "
            "instruction/prompt-response record (use --template alpaca, or write it as messages)"
        )
    if chat is None:
        return None
    try:
        return str(tokenizer.get_chat_template())
    except ValueError as exc:  # transformers: "Cannot use chat template functions ... not set"
        raise UserError(
            f"{_where(chat)}: chat data (messages/conversations) needs a chat template and the tokenizer "
            "has none (or no default one); give one with --template FILE (a Jinja chat template)"
        ) from exc


def _template_file(path: str, tokenizer: Any, chat: Any, plain: Any) -> str | None:
    from pathlib import Path

    if not Path(path).is_file():
        raise UserError(
            f"--template: expected {' or '.join(KINDS)} or a Jinja chat-template file; {path} is not a file"
        )
    if chat is None and plain is None:  # no examples: nothing to render
        return None
    if plain is not None:
        raise UserError(
            f"{_where(plain)}: --template {path} is a chat template; it renders messages/conversations "
            "records only (use --template alpaca for instruction/prompt-response data)"
        )
    template = read_text(path)
    try:
        tokenizer.apply_chat_template(chat.messages, chat_template=template, tokenize=False)
    except Exception as exc:  # a Jinja syntax or runtime error, with the template's own message
        raise UserError(f"{path}: cannot render a conversation with this chat template: {exc}") from exc
    tokenizer.chat_template = template
    return template


def _where(example: Any) -> str:
    return getattr(example, "where", "") or f"example {example.index}"


# ---------------------------------------------------------------------------------------------
# rendering


def render(
    messages: Sequence[Message], tokenizer: Any, chat_template: str | None, generation_prompt: bool = False
) -> str:
    """The template's text for ``messages`` (a template that refuses them raises ``ValueError``)."""
    try:
        return str(
            tokenizer.apply_chat_template(
                list(messages),
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        )
    except Exception as exc:  # jinja2's TemplateError (e.g. raise_exception("roles must alternate"))
        raise ValueError(f"the chat template rejected this conversation: {exc}") from exc


def prompt_text(messages: Sequence[Message], tokenizer: Any, chat_template: str | None = None) -> str:
    """Every turn before the last assistant turn, then the template's generation prompt."""
    return render(messages[: last_assistant(messages)], tokenizer, chat_template, generation_prompt=True)


def prompt_ids(messages: Sequence[Message], tokenizer: Any, chat_template: str | None = None) -> list[int]:
    """Token ids of :func:`prompt_text`, as ``apply_chat_template(..., tokenize=True)`` gives them."""
    return list(
        tokenizer(prompt_text(messages, tokenizer, chat_template), add_special_tokens=False)["input_ids"]
    )


def end_of_turn_ids(tokenizer: Any, chat_template: str | None = None) -> list[int]:
    """The special token(s) the chat template closes an assistant turn with (``<|im_end|>``,
    ``<end_of_turn>``, …): where a sampled answer stops. ``[]`` without a chat template."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        return []
    turn = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    try:
        text = render(turn, tokenizer, chat_template)
    except ValueError:
        return []
    after = text[text.rfind("A") + 1 :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    return [ids[0]] if ids and ids[0] in special else []


def assistant_spans(
    messages: Sequence[Message], tokenizer: Any, chat_template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    Turn ``i``'s span runs from the end of ``render(messages[:i], generation_prompt=True)`` (so
    the assistant header the template writes for generation is context, not target) to the end
    of ``render(messages[:i + 1])`` (so the turn's end-of-turn token(s) are targets). Spans are
    found on the *text*, not on token ids: the ids of a prefix need not be a prefix of the ids of
    the whole (a BPE merge across the boundary), but a prefix's text is a prefix of the whole's
    text whenever the template renders earlier turns the same way whatever follows them. Nor do
    they rely on ``{% generation %}`` markers (what transformers' ``return_assistant_tokens_mask``
    needs): few shipped templates have them, and the prefixes need nothing from the template.

    Raises:
        ValueError: a template that does not (e.g. one that drops earlier turns' reasoning).
    """
    text = render(messages, tokenizer, chat_template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenizer, chat_template, generation_prompt=True)
        through = render(messages[: i + 1], tokenizer, chat_template)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"the chat template renders turn {i} differently depending on the turns after it, so "
                "its tokens cannot be told apart; give a template that does not (--template FILE)"
            )
        spans.append((len(before), len(through)))
    return text, spans


def assistant_mask(
    messages: Sequence[Message], tokenizer: Any, chat_template: str | None
) -> tuple[list[int], list[bool]]:
    """``input_ids`` (exactly ``apply_chat_template(messages)``'s) and which of them are targets.

    A token is a target when its characters overlap an assistant span (:func:`assistant_spans`),
    except whitespace-only tokens right after a span's last special token: a ChatML ``\\n`` after
    ``<|im_end|>`` is never generated (generation stops at the end-of-turn token), so it is
    context. A template whose turns end in plain text keeps that text as target.

    Raises:
        ValueError: a template that refuses the conversation or renders it inconsistently.
        UserError: a slow tokenizer (the mask needs character offsets).
    """
    text, spans = assistant_spans(messages, tokenizer, chat_template)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise UserError("chat data needs a fast tokenizer (one with character offsets)") from exc
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special
    }
    mask = [False] * len(ids)
    for span in spans:
        inside = [t for t, tok in enumerate(offsets) if _overlaps(tok, span)]
        kept = len(inside)
        while kept and text[slice(*offsets[inside[kept - 1]])].isspace():
            kept -= 1
        if kept and ids[inside[kept - 1]] in special:
            inside = inside[:kept]
        for t in inside:
            mask[t] = True
    return ids, mask


def _overlaps(token: tuple[int, int], span: tuple[int, int]) -> bool:
    (s, e), (a, b) = token, span
    return a <= s < b if s == e else s < b and e > a
