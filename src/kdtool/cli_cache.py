"""``kdtool cache-logits``: parse flags (over an optional distill config file), build the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from kdtool.data_config import DataConfig
from kdtool.errors import UserError
from kdtool.options import ChatTemplateChoice, TrustRemoteCode

Opt = typer.Option

# Fields of a `kdtool distill` config file that decide which tokens get cached; a run trained
# from the cache must use the same values, so reading them from the same file keeps them equal.
SHARED_FIELDS = ("teacher", *DataConfig.model_fields, "device", "trust_remote_code")


def cache_logits(
    teacher: Annotated[str | None, Opt(help="Teacher model: local directory or hub id.")] = None,
    data: Annotated[
        str | None, Opt(help="Training data file (the one `kdtool distill --data` gets).")
    ] = None,
    output: Annotated[str | None, Opt(help="Cache directory.")] = None,
    top_fraction: Annotated[
        float | None, Opt(help="Keep k = ceil(top_fraction·V) logits per token (default 0.05).")
    ] = None,
    top_k: Annotated[
        int | None, Opt(help="Keep exactly K logits per token (instead of --top-fraction).")
    ] = None,
    batch_size: Annotated[int | None, Opt(help="Examples per teacher forward pass (default 8).")] = None,
    max_length: Annotated[
        int | None, Opt(help="Max tokens of prompt + response; must equal the training run's (default 512).")
    ] = None,
    max_prompt_length: Annotated[int | None, Opt(help="Max prompt tokens (default max_length // 2).")] = None,
    prompt_field: Annotated[str | None, Opt(help="Field holding the prompt/instruction.")] = None,
    response_field: Annotated[str | None, Opt(help="Field holding the response.")] = None,
    skip_bad_lines: Annotated[bool | None, Opt("--skip-bad-lines", help="Skip malformed lines.")] = None,
    template: ChatTemplateChoice = None,
    config: Annotated[
        Path | None, Opt(help="A `kdtool distill` YAML/TOML config: its data-side fields are the defaults.")
    ] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[str | None, Opt(help="Teacher compute dtype: auto, float32, bfloat16.")] = None,
    value_dtype: Annotated[
        str | None,
        Opt(help="Stored logit dtype: float16 (default), bfloat16, float32, or q8 (8-bit codes, smallest)."),
    ] = None,
    examples_per_shard: Annotated[
        int | None, Opt(help="Examples per shard file (default: about 256 MiB per shard).")
    ] = None,
    resume: Annotated[bool, Opt("--resume", help="Finish an interrupted cache (same settings).")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace whatever is in --output.")] = False,
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bar.")] = False,
    trust_remote_code: TrustRemoteCode = None,
) -> None:
    """Run the teacher once over the training data and store its top-k logits per response token."""
    # CacheConfig lives beside the torch code that builds the cache: say what the first seconds are for.
    with Console(stderr=True).status("importing torch and transformers"):
        from kdtool.cache import CacheConfig, build_cache

    flags: dict[str, Any] = dict(
        teacher=teacher,
        data=data,
        output=output,
        top_fraction=top_fraction,
        top_k=top_k,
        batch_size=batch_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        prompt_field=prompt_field,
        response_field=response_field,
        skip_bad_lines=skip_bad_lines,
        template=template,
        device=device,
        dtype=dtype,
        value_dtype=value_dtype,
        examples_per_shard=examples_per_shard,
        progress=False if no_progress else None,
        trust_remote_code=trust_remote_code,
    )
    values = _from_config_file(config) if config else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        cfg = CacheConfig.model_validate(values)
    except ValidationError as exc:
        from kdtool.config import format_validation_error

        raise UserError(f"invalid cache-logits options: {format_validation_error(exc)}") from exc
    console = Console(stderr=True)
    out = build_cache(cfg, resume=resume, overwrite=overwrite, console=console)
    from kdtool.cache import read_manifest

    manifest = read_manifest(out / "manifest.json")
    Console().print(
        f"cached {manifest['num_tokens']:,} tokens of {manifest['num_examples']:,} examples in {out}: "
        f"k = {manifest['k']:,} of V = {manifest['vocab_size']:,}, {manifest['bytes_per_token']:,} bytes/token "
        f"= {100 * manifest['fraction_of_dense_fp16']:.2f}% of dense fp16 logits"
    )


def _from_config_file(path: Path) -> dict[str, Any]:
    from kdtool.config import read_config_file

    return {k: v for k, v in read_config_file(path).items() if k in SHARED_FIELDS and v is not None}
