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

The tokenizer is a byte-level BPE with 16,384 tokens trained with ``tokenizers`` on the data
itself (no network). Rounds interleave the programs so that load from other processes hits them
alike; the table gives medians and the ratios kdtool / peer.

    python benchmarks/bench_peers.py --rounds 3          # -> benchmarks/peers_cpu.md
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


def prepare(work: Path, n_examples: int) -> tuple[Path, Path, Path]:
    """Tokenizer, teacher, student and data files in ``work``; returns (teacher, student, data)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    records = json.loads(DATA.read_text())
    tok = build_tokenizer(records, work / "tokenizer")
    data = work / "data.json"
    data.write_text(json.dumps(fitting(records, tok, n_examples)))
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


def commands(teacher: Path, student: Path, data: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    common = ["--teacher", str(teacher), "--student", str(student), "--data", str(data)]
    sizes = ["--batch-size", "8", "--max-length", "256", "--max-steps", "20"]
    cmds = {
        "kdtool": [
            *(py, "-m", "kdtool", "distill", "--objective", "fkl", *common, *sizes),
            *("--output", str(out / "kdtool"), "--overwrite", "--no-progress"),
        ],
        "hand loop": [py, str(HERE / "peer_hand_loop.py"), *common, *sizes, "--output", str(out / "hand")],
    }
    if importlib.util.find_spec("trl") is not None:
        cmds["trl"] = [py, str(HERE / "peer_trl.py"), *common, *sizes, "--output", str(out / "trl")]
    return cmds


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--only", default="", help="Comma-separated subset of kdtool, 'hand loop', trl.")
    p.add_argument("--note", default="", help="A line about the machine's load, copied into the report.")
    p.add_argument("--output", default=str(HERE / "peers_cpu.md"))
    args = p.parse_args(argv)
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the benchmark needs that real text)")
        return
    sys.path.insert(0, str(HERE))
    from bench_memory import machine

    start, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher, student, data = prepare(work, args.examples)
        cmds = commands(teacher, student, data, work / "runs")
        if args.only:
            cmds = {k: v for k, v in cmds.items() if k in args.only.split(",")}
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in cmds}
        for round_ in range(args.rounds):
            for name, cmd in cmds.items():
                runs[name].append(timed(cmd, work / f"{name}-{round_}.log"))
                print(name, runs[name][-1], flush=True)
        kd_summary = (
            json.loads((work / "runs" / "kdtool" / "kdtool.json").read_text()) if "kdtool" in cmds else {}
        )
    med = {
        k: {m: statistics.median(r[m] for r in rs) for m in ("wall_s", "rss_mib")} for k, rs in runs.items()
    }
    rows = [
        "| program | wall s (median; all rounds) | peak RSS MiB (median) | kdtool / it: wall | kdtool / it: RSS |"
    ]
    rows.append("|---|---|---|---|---|")
    for name, m in med.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs[name])
        ratio = (
            f"{med['kdtool']['wall_s'] / m['wall_s']:.2f}× | {med['kdtool']['rss_mib'] / m['rss_mib']:.2f}×"
            if "kdtool" in med
            else "– | –"
        )
        rows.append(f"| {name} | {m['wall_s']:.1f} ({walls}) | {m['rss_mib']:.0f} | {ratio} |")
    if "trl" not in cmds:
        rows += ["", "TRL not installed (`pip install -e '.[bench]'`): no TRL row."]
    command = "python benchmarks/bench_peers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Whole-run speed against peers (CPU)",
        "",
        f"`{command.strip()}`",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s in all; {machine('cpu')}",
        f"- {versions()}",
        f"- load average (1, 5, 15 min) before {tuple(round(x, 1) for x in load_before)}, "
        f"after {tuple(round(x, 1) for x in os.getloadavg())}" + (f"; {args.note}" if args.note else ""),
        f"- GPT-2-style teacher 2 × 64, student 1 × 32, V = {VOCAB:,} (byte-level BPE trained on the data), "
        f"{args.examples} GPTeacher roleplay examples that fit in 256 tokens, batch 8, 20 steps, fp32; "
        f"{args.rounds} rounds, each program a whole process under `/usr/bin/time -v` (wall clock, "
        "maximum resident set size), model loading and saving included.",
        "",
        *rows,
        "",
    ]
    if kd_summary:
        keys = ("wall_time_s", "eval_time_s", "eval_share", "tokens")
        lines.append(
            "kdtool's own summary (last round): " + ", ".join(f"{k} {kd_summary.get(k)}" for k in keys)
        )
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
