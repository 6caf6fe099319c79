"""The data-side settings that decide which tokens a run sees: the file, its fields, the prompt
template and the lengths.

``kdtool distill`` (``DistillConfig``) and ``kdtool cache-logits`` (``CacheConfig``) both inherit
them from ``DataConfig``, so the two commands take the same YAML keys and flags for them, and a
cache can only train a run whose values are equal. Importing this module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from kdtool.data import Template


class DataConfig(BaseModel):
    """Which examples a run trains on, and how they are templated and cut to length."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="Training data (JSONL or JSON array); a cache needs the same file.")
    prompt_field: str | None = Field(None, description="Field holding the prompt/instruction.")
    response_field: str | None = Field(None, description="Field holding the response.")
    skip_bad_lines: bool = Field(False, description="Skip and count malformed lines.")
    max_length: int = Field(512, gt=8, description="Max tokens of prompt + response.")
    max_prompt_length: int | None = Field(None, description="Max prompt tokens (default max_length // 2).")
    template_no_input: str | None = Field(None, description="Custom prompt template ({instruction}).")
    template_with_input: str | None = Field(
        None, description="Custom prompt template ({instruction}, {input})."
    )
    template: str | None = Field(
        None, description="chat, alpaca or a Jinja chat-template file (None: by record format)."
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> Self:
        # named apart from the subclasses' `_check`, which would otherwise replace it
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self

    def prompt_template(self) -> Template:
        """The prompt template: the default one, with each custom string given here in its place."""
        from kdtool.data import Template  # kdtool.data imports torch; validating a config must not

        default = Template()
        return Template(
            self.template_no_input or default.no_input, self.template_with_input or default.with_input
        )
