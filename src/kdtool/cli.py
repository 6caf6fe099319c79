"""The command line: parse, resolve one validated config, call the library. Nothing else."""

from __future__ import annotations

import gc
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdtool.errors import UserError
from kdtool.options import REMOTE_CODE_ENV, ChatTemplateChoice, TrustRemoteCode, parse_ints

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil a large causal language model (teacher) into a small one (student).",
)
console = Console()
err_console = Console(stderr=True)
_DEBUG = {"on": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _DEBUG["on"] = debug


@app.command()
def objectives() -> None:
    """List the registered objectives, their one-line descriptions and options."""
    from kdtool.registry import available, broken, describe_options

    table = Table(title="kdtool objectives", show_lines=True)
    for col in ("name", "description", "options (default): meaning"):
        table.add_column(col, overflow="fold")
    for name, cls in available().items():
        opts = "\n".join(f"{o} ({d}): {desc}" for o, d, desc in describe_options(cls)) or "-"
        table.add_row(name, cls.description, opts)
    console.print(table)
    for name, reason in broken().items():  # skipped, so the others stay usable; say why on stderr
        err_console.print(
            f"[yellow]skipped:[/] objective plug-in {name!r}: {escape(reason)}",
            highlight=False,
            soft_wrap=True,
        )


Opt = typer.Option


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def compare(
    ctx: typer.Context,
    objectives: Annotated[
        str,
        Opt(
            help="Comma-separated objectives, e.g. fkl,rkl,minillm,slim,atkd,sft; LABEL=OBJECTIVE runs an objective under another name (with its own --objective-args)."
        ),
    ],
    teacher: Annotated[str, Opt(help="Teacher model (also evaluated as a reference row).")],
    student: Annotated[str, Opt(help="The initial student every run starts from.")],
    data: Annotated[str, Opt(help="Training data.")],
    eval_data: Annotated[str, Opt(help="Evaluation data (held-out loss and Rouge-L).")],
    output: Annotated[str, Opt(help="Comparison directory (results.json, report.md, *.png, runs/).")],
    seeds: Annotated[str, Opt(help="Training seeds, comma-separated.")] = "1",
    config: Annotated[str | None, Opt(help="Distill config file shared by every run.")] = None,
    option: Annotated[
        list[str] | None, Opt("--option", "-O", help="OBJECTIVE.key=value (repeatable).")
    ] = None,
    eval_seeds: Annotated[str, Opt(help="Generation seeds for Rouge-L.")] = "10,20,30,40,50",
    eval_limit: Annotated[int | None, Opt(help="Evaluate on the first N examples only.")] = None,
    max_new_tokens: Annotated[int, Opt(help="Max new tokens when generating for Rouge-L.")] = 256,
    eval_batch_size: Annotated[int, Opt(help="Generation batch size.")] = 16,
    greedy: Annotated[bool, Opt("--greedy", help="Greedy decoding instead of sampling.")] = False,
    threads: Annotated[
        int | None, Opt(help="CPU threads per run (OMP_NUM_THREADS); 1 suits tiny models.")
    ] = None,
    jobs: Annotated[int, Opt(help="Runs at once, each its own process (default 1: one after another).")] = 1,
    trust_remote_code: TrustRemoteCode = None,
    init_from: Annotated[
        list[str] | None,
        Opt(help="OBJECTIVE=SOURCE: start OBJECTIVE from SOURCE's same-seed student (e.g. minillm=sft)."),
    ] = None,
    objective_args: Annotated[
        list[str] | None,
        Opt(
            help='LABEL="FLAGS": distill flags for one entry only (repeatable), e.g. rkl-gkd="--responses student".'
        ),
    ] = None,
    baseline: Annotated[str, Opt(help="Objective the report pairs every other with, seed by seed.")] = "sft",
    primary_metric: Annotated[str, Opt(help="Metric that sorts the table and the plot.")] = "rougeL",
    metrics_module: Annotated[
        str | None,
        Opt(
            help="Extra metrics: `python -m MODULE --model M --data EVAL --rougel R --output OUT` (flat JSON)."
        ),
    ] = None,
) -> None:
    """Run OBJECTIVES x SEEDS from the same student and budget, evaluate all, write a table and plots.

    Any other flag (e.g. --max-steps 600 --batch-size 64 --lr 3e-3) is passed to every `distill` run.
    """
    from kdtool.compare import CompareSpec, parse_objective_options, run_compare
    from kdtool.registry import get_class

    entries = [o.strip() for o in objectives.split(",") if o.strip()]
    aliases = dict(e.split("=", 1) for e in entries if "=" in e)  # label=objective
    names = [e.partition("=")[0] for e in entries]
    for name in names:
        get_class(aliases.get(name, name))  # unknown objective: one clear line before anything runs
    if trust_remote_code:
        # Every child `distill` and `eval rougel` reads its --trust-remote-code from the environment.
        os.environ[REMOTE_CODE_ENV] = "1"
    spec = CompareSpec(
        objectives=names,
        aliases=aliases,
        seeds=parse_ints(seeds, "--seeds"),
        teacher=teacher,
        student=student,
        data=data,
        eval_data=eval_data,
        output=output,
        config=config,
        objective_options=parse_objective_options(option, names),
        distill_args=list(ctx.args),
        eval_seeds=parse_ints(eval_seeds, "--eval-seeds"),
        eval_limit=eval_limit,
        max_new_tokens=max_new_tokens,
        eval_batch_size=eval_batch_size,
        greedy=greedy,
        threads=threads,
        jobs=jobs,
        init_from=parse_pairs(init_from, "--init-from"),
        objective_args={
            k: shlex.split(v) for k, v in parse_pairs(objective_args, "--objective-args").items()
        },
        baseline=baseline,
        primary_metric=primary_metric,
        metrics_module=metrics_module,
    )
    run_compare(spec, console=console)


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise UserError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


@app.command()
def generate(
    model: Annotated[str, Opt(help="The model that answers (the teacher): local directory or hub id.")],
    data: Annotated[str, Opt(help="Prompts: any training data format (responses, if any, are ignored).")],
    output: Annotated[str, Opt(help="JSONL to write: the prompts with the model's answers.")],
    max_new_tokens: Annotated[int, Opt(help="Max tokens per answer.")] = 256,
    temperature: Annotated[float, Opt(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, Opt(help="Nucleus sampling (1 = off).")] = 1.0,
    greedy: Annotated[bool, Opt("--greedy", help="Greedy decoding instead of sampling.")] = False,
    seed: Annotated[int, Opt(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, Opt(help="Prompts per generation batch.")] = 16,
    template: ChatTemplateChoice = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    trust_remote_code: TrustRemoteCode = None,
) -> None:
    """Answer every prompt once with MODEL and keep the answers as training data (offline
    sequence-level KD: `kdtool distill --data OUTPUT` then trains on the teacher's answers)."""
    from kdtool.evaluation.generate import Sampling

    sampling = Sampling(greedy, temperature, top_p, 0, max_new_tokens)
    with err_console.status("importing torch and transformers"):
        from kdtool.seqkd import write_teacher_responses

    n = write_teacher_responses(
        model, data, output, sampling, seed, batch_size, template, device, bool(trust_remote_code)
    )
    console.print(f"wrote {n} answers of {model} to {output}", soft_wrap=True, highlight=False)


@app.command()
def demo(
    output: Annotated[Path, Opt(help="Where the demo writes data, models, runs and the report.")] = Path(
        "demo_runs"
    ),
    quick: Annotated[bool, Opt("--quick", help="A much shorter run (smoke test).")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace an earlier demo in --output.")] = False,
    objectives: Annotated[
        str | None, Opt(help="Comma-separated subset (default: sft,fkl,rkl,slim,atkd,minillm).")
    ] = None,
    all_objectives: Annotated[
        bool, Opt("--all-objectives", help="Every registered objective (jsd, tvd, skl, srkl too).")
    ] = False,
    train_teacher: Annotated[
        bool, Opt("--train-teacher", help="Retrain the teacher (about 6 min) instead of the shipped one.")
    ] = False,
) -> None:
    """The whole pipeline on the built-in task, offline: KD objectives against sft over 3 training seeds."""
    from kdtool.demo import run_demo

    names = [o.strip() for o in objectives.split(",")] if objectives else None
    run_demo(
        output,
        quick=quick,
        overwrite=overwrite,
        console=console,
        objectives=names,
        train_teacher_too=train_teacher,
        all_objectives=all_objectives,
    )


from kdtool.cli_cache import cache_logits  # noqa: E402  (a sub-command in its own module)
from kdtool.cli_distill import distill  # noqa: E402  (a sub-command in its own module)
from kdtool.cli_eval import eval_app  # noqa: E402  (sub-app; imports only typer and rich)

app.command("distill")(distill)
app.command("cache-logits")(cache_logits)
app.add_typer(eval_app, name="eval")


def main() -> None:
    """Console entry point: user mistakes become one line and exit code 1 (``--debug`` for tracebacks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # = transformers' disable_progress_bar() + set_verbosity_error(), read when transformers is
    # first imported: importing it here would cost every command ~3 s, even `--help`.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if (
        "transformers" in sys.modules
    ):  # already imported (an embedding program, a test): too late for env vars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        app()
    except UserError as exc:
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        # escape: a path like "data[1].jsonl" or "pip install 'kdtool[wandb]'" is text, not rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def run() -> None:
    """The ``kdtool`` console script (and ``python -m kdtool``): ``main``, then a quick exit.

    At interpreter exit Python garbage-collects every object torch and transformers created: ~0.9 s
    on the 2-core CPU after a distillation. Nothing of kdtool's waits for it (files are closed and
    trackers finished before ``main`` returns), so the objects are frozen out of that collection.
    ``main`` itself, which tests and embedding programs call, leaves the collector alone.
    (The console script is ``kdtool.launch.run``: glibc's start-up settings, then this.)
    """
    try:
        main()
    finally:
        gc.freeze()
