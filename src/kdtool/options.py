"""Command-line options and option parsers shared by several commands (one definition each)."""

from __future__ import annotations

from typing import Annotated

import typer

from kdtool.errors import UserError

# `kdtool compare` sets it for the `distill` and `eval` processes it starts, which read the flag
# from it; a user may set it too (KDTOOL_TRUST_REMOTE_CODE=1) instead of passing the flag.
REMOTE_CODE_ENV = "KDTOOL_TRUST_REMOTE_CODE"

TrustRemoteCode = Annotated[
    bool | None,
    typer.Option(
        "--trust-remote-code",
        envvar=REMOTE_CODE_ENV,
        show_envvar=False,
        help="Let a model or tokenizer whose config has an auto_map run its own Python code "
        "(off by default: such models are refused).",
    ),
]


def parse_ints(text: str, flag: str) -> list[int]:
    """``"10,20,30"`` -> ``[10, 20, 30]`` for an integer-list flag such as ``--seeds``.

    Raises:
        UserError: one line naming ``flag``: a value that is not an integer, an empty list, or a
            repeated value (every list flag is a set of seeds: a repeat would be a duplicate run).
    """
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from exc
    if not values:
        raise UserError(f"{flag} is empty")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"{flag} repeats {', '.join(map(str, repeated))}: {text}")
    return values


ChatTemplateChoice = Annotated[
    str | None,
    typer.Option(
        "--template",
        help="Prompt template: chat (the tokenizer's chat template), alpaca, or a Jinja chat-template FILE "
        "(default: chat for messages/conversations records, alpaca for the others).",
    ),
]
