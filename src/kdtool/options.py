"""Command-line options shared by several commands (one definition, one help text)."""

from __future__ import annotations

from typing import Annotated

import typer

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

ChatTemplateChoice = Annotated[
    str | None,
    typer.Option(
        "--template",
        help="Prompt template: chat (the tokenizer's chat template), alpaca, or a Jinja chat-template FILE "
        "(default: chat for messages/conversations records, alpaca for the others).",
    ),
]
