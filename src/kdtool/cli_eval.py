"""``kdtool eval``: score models and predictions (hooked into ``cli.py`` as the ``eval`` sub-app)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kdtool.errors import UserError
from kdtool.options import ChatTemplateChoice, TrustRemoteCode, parse_ints

eval_app = typer.Typer(
    no_args_is_help=True, help="Evaluate a model or a predictions file (Rouge-L, MiniLLM protocol)."
)
console = Console()
err_console = Console(stderr=True)
Opt = typer.Option


@eval_app.command("rougel")
def rougel(
    predictions: Annotated[
        Path | None,
        Opt(help="Score this JSONL: {'prediction' (or 'response'), 'references' (or 'reference'/'target')}."),
    ] = None,
    model: Annotated[
        str | None, Opt(help="Generate with this causal LM directory (e.g. a kdtool run).")
    ] = None,
    data: Annotated[
        Path | None, Opt(help="Evaluation data for --model (alpaca, dolly, self-instruct, prompt/response).")
    ] = None,
    output: Annotated[Path | None, Opt(help="Write per-example predictions and the summary as JSON.")] = None,
    seeds: Annotated[str, Opt(help="Sampling seeds; scores are averaged over them.")] = "10,20,30,40,50",
    greedy: Annotated[bool, Opt("--greedy", help="Greedy decoding, once (seeds are ignored).")] = False,
    temperature: Annotated[float, Opt(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, Opt(help="Nucleus sampling threshold (1 = off).")] = 1.0,
    top_k: Annotated[int, Opt(help="Top-k filtering (0 = off).")] = 0,
    max_new_tokens: Annotated[int, Opt(help="Most tokens generated per response.")] = 256,
    batch_size: Annotated[int, Opt(min=1, help="Prompts generated together.")] = 16,
    limit: Annotated[int | None, Opt(min=1, help="Only the first N examples.")] = None,
    max_prompt_length: Annotated[
        int | None, Opt(min=1, help="Keep only the last N prompt tokens (default: what fits).")
    ] = None,
    prompt_field: Annotated[str | None, Opt(help="Field holding the prompt/instruction.")] = None,
    response_field: Annotated[str | None, Opt(help="Field holding the reference response.")] = None,
    template: ChatTemplateChoice = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, Opt(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    threads: Annotated[
        int | None, Opt(min=1, help="CPU threads for torch (1 is fastest for tiny models on a busy CPU).")
    ] = None,
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bar.")] = False,
    trust_remote_code: TrustRemoteCode = None,
) -> None:
    """Rouge-L (and exact match) of a predictions file, or of a model's sampled responses on --data."""
    from kdtool.evaluation.rougel import evaluate_model, score_predictions_file, write_result

    if predictions is not None and (model is not None or data is not None):
        raise UserError("give either --predictions FILE or --model DIR --data FILE, not both")
    if predictions is not None:
        result = score_predictions_file(predictions)
    elif model is None or data is None:
        raise UserError("give --predictions FILE, or --model DIR together with --data FILE")
    else:
        from kdtool.evaluation.generate import Sampling

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        sampling = Sampling(greedy, temperature, top_p, top_k, max_new_tokens)
        seed_list = parse_ints(seeds, "--seeds")
        with _progress(enabled=not no_progress) as bar:
            result = evaluate_model(
                model,
                data,
                sampling,
                seed_list,
                batch_size=batch_size,
                limit=limit,
                device=device,
                dtype=dtype,
                prompt_field=prompt_field,
                response_field=response_field,
                max_prompt_length=max_prompt_length,
                trust_remote_code=bool(trust_remote_code),
                template=template,
                progress=_seed_tasks(bar),
                on_note=lambda note: err_console.print(f"[yellow]note:[/] {note}", highlight=False),
            )
    print_summary(result)
    if output is not None:
        console.print(f"wrote {write_result(result, output)}")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not enabled,
    )


def _seed_tasks(bar: Progress) -> Callable[[int | None, int], Callable[[int], None]]:
    """One progress task per seed; returns the per-batch callback for a seed."""

    def start(seed: int | None, total: int) -> Callable[[int], None]:
        label = "greedy" if seed is None else f"seed {seed}"
        task = bar.add_task(label, total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed  # windowed examples/s
            bar.update(task, rate=f"{speed:.2f} ex/s" if speed else "")

        return advance

    return start


def print_summary(result: dict[str, Any]) -> None:
    """A table: one row per seed, then mean ± std over seeds."""
    summary = result["summary"]
    timed = "examples_per_s" in summary["per_seed"][0]
    table = Table(
        title="Rouge-L (MiniLLM protocol)", caption=f"{summary['n_examples']} examples, scores x 100"
    )
    table.add_column("seed")
    table.add_column("Rouge-L", justify="right")
    table.add_column("exact match", justify="right")
    if timed:
        table.add_column("examples/s", justify="right")
    for row in summary["per_seed"]:
        cells = [
            "-" if row["seed"] is None else str(row["seed"]),
            f"{row['rougeL']:.2f}",
            f"{row['exact_match']:.2f}",
        ]
        table.add_row(*cells, *([f"{row['examples_per_s']:.2f}"] if timed else []))
    if len(summary["per_seed"]) > 1:
        rl, em = summary["rougeL"], summary["exact_match"]
        table.add_row(
            "mean ± std",
            f"{rl['mean']:.2f} ± {rl['std']:.2f}",
            f"{em['mean']:.2f} ± {em['std']:.2f}",
            *([""] if timed else []),
            style="bold",
        )
    console.print(table)
