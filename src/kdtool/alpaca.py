"""The MiniLLM / Alpaca prompt template (kdtool's default for instruction data).

``kdtool.data`` re-exports everything here, so ``from kdtool.data import Template`` keeps working.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# The MiniLLM / Alpaca template; the response follows the final newline and ends with EOS.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Template:
    """A prompt template: one string for examples without input, one for examples with input.

    Both use ``{instruction}`` and ``{input}`` placeholders (``str.format`` syntax).
    """

    no_input: str = PROMPT_TEMPLATE
    with_input: str = PROMPT_TEMPLATE_WITH_INPUT

    def format(self, instruction: str, input: str = "") -> str:
        if input and input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction, input="")

    def fingerprint(self) -> str:
        return hashlib.sha256((self.no_input + "\x00" + self.with_input).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, str]:
        return {"no_input": self.no_input, "with_input": self.with_input}


DEFAULT_TEMPLATE = Template()


def format_prompt(instruction: str, input: str = "", template: Template = DEFAULT_TEMPLATE) -> str:
    """The prompt for one instruction (and optional input) under ``template``."""
    return template.format(instruction, input)
