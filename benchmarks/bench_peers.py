"""Whole-run wall time and peak RSS of ``kdtool distill --objective fkl`` against its peers.

The same GPT-2-style pair (teacher 2 layers × 64, student 1 × 32, V = 16,384, random weights),
batch 8, max length 256, 20 optimizer steps, on 256 real examples (GPTeacher roleplay, alpaca
format, those whose templated prompt is ≤ 128 tokens and prompt + response + EOS ≤ 256, so no
program truncates anything), each run as a whole process under ``/usr/bin/time -v``:

* ``kdtool``: ``kdtool distill --objective fkl`` at its defaults plus the flags above;
* ``hand loop``: ``benchmarks/peer_hand_loop.py`` (full fp32 logits of both models, forward KL,
  AdamW, no eval, no checkpoints);
* ``trl``: ``benchmarks/peer_trl.py``, TRL's ``GKDTrainer`` with ``lmbda=0, beta=0`` (forward KL
  on the data, no generation), when ``trl`` is installed (``pip install -e ".[bench]"``).

With ``--on-policy`` the table is on-policy distillation instead (``benchmarks/peers_onpolicy_cpu.md``):
every step the student samples a response of up to ``--max-new-tokens`` (default 128) tokens at
temperature 1 to each prompt of its batch and the generalized JSD (β = 0.5) to the teacher is taken
at every sampled position:

* ``kdtool``: ``kdtool distill --objective jsd -O beta=0.5 --responses student --max-new-tokens N
  --temperature 1.0``, at its defaults otherwise (evaluation on 16 held-out examples given with
  ``--eval-data``, checkpoints), as in the table above;
* ``trl``: ``benchmarks/peer_trl_onpolicy.py``, TRL's ``DistillationTrainer`` (``beta=0.5``,
  ``max_completion_length=N``, ``temperature=1``, transformers ``generate``, no vLLM; its docstring
  maps every setting), when ``trl`` is installed.

The hand loop has no sampling and is not in that table. The training data is then exactly
``--max-steps`` × 8 examples (160), so each program samples every prompt exactly once (in its own
seeded order); ``--examples`` is ignored. Each program reports the tokens it sampled (kdtool's
``tokens``: its loss positions, the sampled tokens up to and including the first EOS; TRL's
counted in ``peer_trl_onpolicy.py``, same definition), checked against steps × batch × N.

The tokenizer is a byte-level BPE with 16,384 tokens trained with ``tokenizers`` on the data
itself (no network). Rounds interleave the programs so that load from other processes hits them
alike; the table gives medians and the ratios kdtool / peer.

    python benchmarks/bench_peers.py --rounds 3              # -> benchmarks/peers_cpu.md
    python benchmarks/bench_peers.py --rounds 3 --on-policy  # -> benchmarks/peers_onpolicy_cpu.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "gpteacher_roleplay_alpaca.json"
VOCAB = 16384
RUN = {"batch_size": 8, "max_length": 256, "max_steps": 20}
ONPOLICY = {"beta": 0.5, "temperature": 1.0, "max_new_tokens": 128, "held_out": 16}


def build_tokenizer(records: list[dict[str, str]], directory: Path) -> Any:
    """A byte-level BPE of ``VOCAB`` tokens trained on the records, saved to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    from kdtool.data import format_prompt

    texts = (format_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in records)
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(directory)
    return tok


def fitting(records: list[dict[str, str]], tok: Any, n: int) -> list[dict[str, str]]:
    """The first ``n`` records that no program truncates at max length 256 (prompt ≤ 128 tokens)."""
    from kdtool.data import format_prompt

    keep = []
    for r in records:
        prompt = len(tok(format_prompt(r["instruction"], r.get("input", "")))["input_ids"])
        response = len(tok(r["output"])["input_ids"]) + 1
        if prompt <= RUN["max_length"] // 2 and prompt + response <= RUN["max_length"]:
            keep.append(r)
        if len(keep) == n:
            return keep
    raise SystemExit(f"only {len(keep)} examples fit in {RUN['max_length']} tokens")


def prepare(work: Path, n_examples: int, held_out: int = 0) -> tuple[Path, Path, Path]:
    """Tokenizer, teacher, student and data files in ``work``; returns (teacher, student, data).

    With ``held_out``, the next ``held_out`` fitting examples go to ``work / "held_out.json"``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    records = json.loads(DATA.read_text())
    tok = build_tokenizer(records, work / "tokenizer")
    data = work / "data.json"
    keep = fitting(records, tok, n_examples + held_out)
    data.write_text(json.dumps(keep[:n_examples]))
    if held_out:
        (work / "held_out.json").write_text(json.dumps(keep[n_examples:]))
    paths = []
    for name, layers, width in (("teacher", 2, 64), ("student", 1, 32)):
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=RUN["max_length"],
            n_embd=width,
            n_layer=layers,
            n_head=4,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        paths.append(work / name)
    return paths[0], paths[1], data


def sizes(steps: int) -> list[str]:
    return [
        "--batch-size",
        str(RUN["batch_size"]),
        "--max-length",
        str(RUN["max_length"]),
        "--max-steps",
        str(steps),
    ]


def commands(teacher: Path, student: Path, data: Path, out: Path, steps: int) -> dict[str, list[str]]:
    py = sys.executable
    common = ["--teacher", str(teacher), "--student", str(student), "--data", str(data)]
    sizes_ = sizes(steps)
    cmds = {
        "kdtool": [
            *(py, "-m", "kdtool", "distill", "--objective", "fkl", *common, *sizes_),
            *("--output", str(out / "kdtool"), "--overwrite", "--no-progress"),
        ],
        "hand loop": [py, str(HERE / "peer_hand_loop.py"), *common, *sizes_, "--output", str(out / "hand")],
    }
    if importlib.util.find_spec("trl") is not None:
        cmds["trl"] = [py, str(HERE / "peer_trl.py"), *common, *sizes_, "--output", str(out / "trl")]
    return cmds


def onpolicy_commands(
    teacher: Path, student: Path, data: Path, held_out: Path, out: Path, steps: int, new_tokens: int
) -> dict[str, list[str]]:
    """kdtool's on-policy jsd and TRL's ``DistillationTrainer`` at the same settings (no hand loop)."""
    py = sys.executable
    common = ["--teacher", str(teacher), "--student", str(student), "--data", str(data)]
    beta, temperature = str(ONPOLICY["beta"]), str(ONPOLICY["temperature"])
    cmds = {
        "kdtool": [
            *(py, "-m", "kdtool", "distill", "--objective", "jsd", "-O", f"beta={beta}"),
            *("--responses", "student", "--max-new-tokens", str(new_tokens), "--temperature", temperature),
            *common,
            *("--eval-data", str(held_out), *sizes(steps)),
            *("--output", str(out / "kdtool"), "--overwrite", "--no-progress"),
        ]
    }
    if importlib.util.find_spec("trl") is not None:
        cmds["trl"] = [
            *(py, str(HERE / "peer_trl_onpolicy.py"), *common, *sizes(steps)),
            *("--max-new-tokens", str(new_tokens), "--beta", beta, "--temperature", temperature),
            *("--output", str(out / "trl")),
        ]
    return cmds


def reference_tokens(work: Path, data: Path) -> int:
    """Tokens of the data's responses + EOS: what a run that did not sample would train on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    return sum(len(tok(r["output"])["input_ids"]) + 1 for r in json.loads(data.read_text()))


def sampled(name: str, out: Path, steps: int, new_tokens: int) -> int:
    """Tokens the on-policy run ``name`` sampled (from its summary), checked to be a real sampling run."""
    if name == "kdtool":
        summary = json.loads((out / "kdtool" / "kdtool.json").read_text())
        # kdtool counts no generate calls: it samples every micro-batch when its resolved config says so
        on_policy = "responses: student" in (out / "kdtool" / "config.yaml").read_text()
        done, tokens, calls = summary["steps"], summary["tokens"], steps if on_policy else 0
    else:
        summary = json.loads((out / "trl" / "trl_onpolicy.json").read_text())
        done, tokens, calls = summary["steps"], summary["sampled_tokens"], summary["generate_calls"]
    limit = steps * RUN["batch_size"] * new_tokens
    if done != steps or calls != steps or not 0 < tokens <= limit:
        raise SystemExit(
            f"{name}: {done} steps, {calls} generate calls, {tokens} sampled tokens (expected {steps} steps, "
            f"{steps} generate calls, 1..{limit} tokens)"
        )
    return int(tokens)


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) of one whole process, from ``/usr/bin/time -v``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{text[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))  # type: ignore[union-attr]
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    assert m is not None
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return {"wall_s": wall, "rss_mib": rss / 1024}


def versions() -> str:
    import tokenizers
    import torch
    import transformers

    text = f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"
    if importlib.util.find_spec("trl") is not None:
        import trl

        text += f", trl {trl.__version__}"
    return text


def table(runs: dict[str, list[dict[str, float]]], tokens: dict[str, int] | None = None) -> list[str]:
    """Markdown rows: medians over rounds and the ratios kdtool / program (+ sampled tokens)."""
    med = {
        k: {m: statistics.median(r[m] for r in rs) for m in ("wall_s", "rss_mib")} for k, rs in runs.items()
    }
    head = "| program | wall s (median; all rounds) | peak RSS MiB (median) | kdtool / it: wall | kdtool / it: RSS |"
    rows = [
        head + (" sampled tokens (last round) |" if tokens else ""),
        "|---|---|---|---|---|" + ("---|" if tokens else ""),
    ]
    for name, m in med.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs[name])
        ratio = (
            f"{med['kdtool']['wall_s'] / m['wall_s']:.2f}× | {med['kdtool']['rss_mib'] / m['rss_mib']:.2f}×"
            if "kdtool" in med
            else "– | –"
        )
        extra = f" {tokens[name]:,} |" if tokens else ""
        rows.append(f"| {name} | {m['wall_s']:.1f} ({walls}) | {m['rss_mib']:.0f} | {ratio} |{extra}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=256, help="Training examples (ignored with --on-policy).")
    p.add_argument("--only", default="", help="Comma-separated subset of kdtool, 'hand loop', trl.")
    p.add_argument("--note", default="", help="A line about the machine's load, copied into the report.")
    p.add_argument(
        "--on-policy",
        action="store_true",
        help="kdtool's on-policy jsd against TRL's DistillationTrainer (student samples every batch).",
    )
    p.add_argument("--max-steps", type=int, default=RUN["max_steps"], help="Optimizer steps of every run.")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=ONPOLICY["max_new_tokens"],
        help="With --on-policy: max tokens of a sampled response (prompts are <= 128 tokens).",
    )
    p.add_argument("--output", default=None, help="Report (default peers_cpu.md, peers_onpolicy_cpu.md).")
    args = p.parse_args(argv)
    output = args.output or str(HERE / ("peers_onpolicy_cpu.md" if args.on_policy else "peers_cpu.md"))
    if args.on_policy and not 0 < args.max_new_tokens <= RUN["max_length"] // 2:
        raise SystemExit(f"--max-new-tokens must be in 1..{RUN['max_length'] // 2} (prompts take up to 128)")
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the benchmark needs that real text)")
        return
    sys.path.insert(0, str(HERE))
    from bench_memory import machine

    steps, new_tokens = args.max_steps, args.max_new_tokens
    n_examples = steps * RUN["batch_size"] if args.on_policy else args.examples
    start, load_before = time.perf_counter(), os.getloadavg()
    tokens: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = work / "runs"
        held = ONPOLICY["held_out"] if args.on_policy else 0
        teacher, student, data = prepare(work, n_examples, held_out=held)
        references = reference_tokens(work, data) if args.on_policy else 0
        if args.on_policy:
            cmds = onpolicy_commands(teacher, student, data, work / "held_out.json", out, steps, new_tokens)
        else:
            cmds = commands(teacher, student, data, out, steps)
        if args.only:
            cmds = {k: v for k, v in cmds.items() if k in args.only.split(",")}
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in cmds}
        for round_ in range(args.rounds):
            for name, cmd in cmds.items():
                runs[name].append(timed(cmd, work / f"{name}-{round_}.log"))
                if args.on_policy:
                    tokens[name] = sampled(name, out, steps, new_tokens)
                print(
                    name, runs[name][-1], *([f"sampled {tokens[name]}"] if name in tokens else []), flush=True
                )
        kd_summary = json.loads((out / "kdtool" / "kdtool.json").read_text()) if "kdtool" in cmds else {}
    rows = table(runs, tokens if args.on_policy else None)
    if "trl" not in cmds:
        rows += ["", "TRL not installed (`pip install -e '.[bench]'`): no TRL row."]
    command = "python benchmarks/bench_peers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    pair = f"GPT-2-style teacher 2 × 64, student 1 × 32, V = {VOCAB:,} (byte-level BPE trained on the data), "
    timing = (
        f"{args.rounds} rounds, each program a whole process under `/usr/bin/time -v` (wall clock, "
        "maximum resident set size), model loading and saving included."
    )
    if args.on_policy:
        title = "# Whole-run speed against peers, on-policy distillation (CPU)"
        setup = [
            f"- {pair}{n_examples} GPTeacher roleplay prompts of ≤ 128 tokens ({steps} steps × batch "
            f"{RUN['batch_size']}: each program samples every prompt once, in its own seeded order), "
            f"max length 256, fp32; {timing}",
            f"- every step the student samples ≤ {new_tokens} new tokens per prompt at temperature "
            f"{ONPOLICY['temperature']} (no top-p/top-k) and trains on the generalized JSD β = "
            f"{ONPOLICY['beta']} at every sampled position (EOS included):",
            f"  - kdtool: `kdtool distill --objective jsd -O beta={ONPOLICY['beta']} --responses student "
            f"--max-new-tokens {new_tokens} --temperature {ONPOLICY['temperature']}`, defaults otherwise "
            f"(lr 5e-5 cosine, grad clip 1; held-out evaluation on {ONPOLICY['held_out']} more examples "
            "given with `--eval-data`, checkpoints);",
            f"  - trl: `benchmarks/peer_trl_onpolicy.py`, `DistillationTrainer` with `beta={ONPOLICY['beta']}, "
            f"max_completion_length={new_tokens}, temperature={ONPOLICY['temperature']}, top_p=1, top_k=0`, "
            "transformers `generate` (no vLLM), `bf16=False, gradient_checkpointing=False`, lr 5e-5 cosine, "
            "no evaluation, no checkpoints (the settings mapping is in its docstring).",
            "- the hand loop (`peers_cpu.md`) has no sampling: not in this table.",
            "- sampled tokens: tokens the student generated in the last round, up to and including the first "
            f"EOS (at most {steps * RUN['batch_size'] * new_tokens:,}; randomly initialised models seldom "
            "emit EOS); kdtool's is its `tokens` (its loss positions), TRL's is counted by "
            f"`peer_trl_onpolicy.py` around `_generate_single_turn`; the data's own responses are "
            f"{references:,} tokens (what a run that did not sample would train on).",
        ]
    else:
        title = "# Whole-run speed against peers (CPU)"
        setup = [
            f"- {pair}{args.examples} GPTeacher roleplay examples that fit in 256 tokens, batch 8, "
            f"{steps} steps, fp32; {timing}"
        ]
    lines = [
        title,
        "",
        f"`{command.strip()}`",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s in all; {machine('cpu')}",
        f"- {versions()}",
        f"- load average (1, 5, 15 min) before {tuple(round(x, 1) for x in load_before)}, "
        f"after {tuple(round(x, 1) for x in os.getloadavg())}" + (f"; {args.note}" if args.note else ""),
        *setup,
        "",
        *rows,
        "",
    ]
    if kd_summary:
        keys = ("wall_time_s", "eval_time_s", "eval_share", "tokens")
        lines.append(
            "kdtool's own summary (last round): " + ", ".join(f"{k} {kd_summary.get(k)}" for k in keys)
        )
    Path(output).write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
