"""Every file kdtool reads, fuzzed: a bad file ends in one line that names it, never a traceback.

Each case writes a damaged file, runs the command that reads it through the console entry point
(in this process: see the ``cli`` fixture), and checks: exit code 1, no "Traceback", exactly one
line of output, and that line names the file.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

GOOD = '{"instruction": "say hi", "output": "hi"}\n'
BIG = 50 * 2**20  # the single-line case: 50 MB without a newline


def random_bytes(n: int = 4096) -> bytes:
    return random.Random(0).randbytes(n)


def huge_line() -> bytes:
    # An unterminated string: the parser must give up without echoing 50 MB into the message.
    return b'{"instruction": "' + b"a" * BIG


# Damaged contents shared by every line-oriented JSON reader (data, predictions).
JSON_CASES: dict[str, bytes | Callable[[], bytes]] = {
    "random-bytes": random_bytes,
    "latin-1": GOOD.replace("hi", "café").encode("latin-1"),
    "utf-16": GOOD.encode("utf-16"),
    "truncated-array": b'[{"instruction": "a", "output": "b"}, {"instr',
    "truncated-line": (GOOD + '{"instruction": "a", "out').encode(),
    "wrong-types": b'{"instruction": 5, "output": ["b"]}\n',
    "not-an-object": b"5\n",
    "array-one-bad-element": ("[" + GOOD.strip() + ", " + GOOD.strip() + ", 7]").encode(),
    "array-not-a-list-of-objects": b'[["a", "b"]]',
    "empty": b"",
    "blank-lines": b"\n \n\t\n",
    "nested-too-deep": b"[" * 100_000,
    "single-50MB-line": huge_line,
}
DATA_CASES: dict[str, bytes | Callable[[], bytes]] = {
    **JSON_CASES,
    "input-not-a-string": b'{"instruction": "a", "input": 3, "output": "b"}\n',
    "self-instruct-output-not-a-string": b'{"instruction": "a", "instances": [{"input": "", "output": 1}]}\n',
}


def write(path: Path, content: bytes | Callable[[], bytes]) -> Path:
    path.write_bytes(content() if callable(content) else content)
    return path


def assert_one_line_naming(result: tuple[int, str], path: Path) -> str:
    code, output = result
    assert code == 1, output[-2000:]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output[-2000:]
    assert str(path) in lines[0], lines[0]
    assert len(lines[0]) < 1000, "the message must not echo the file"
    return lines[0]


# ------------------------------------------------------------------------------ data files


@pytest.mark.parametrize("case", DATA_CASES)
def test_training_data(tiny_dir, tmp_path, cli, case):
    data = write(tmp_path / "data.jsonl", DATA_CASES[case])
    result = cli("distill", "--objective", "sft", "--student", tiny_dir / "student", "--data", data,
                 "--output", tmp_path / "run", "--no-progress")  # fmt: skip
    line = assert_one_line_naming(result, data)
    if case in ("latin-1", "random-bytes", "utf-16"):
        assert "not UTF-8" in line


def test_through_a_real_subprocess(tiny_dir, tmp_path):
    """The same contract outside this process: what a user sees in a terminal."""
    import subprocess
    import sys

    data = write(tmp_path / "data.jsonl", GOOD.replace("hi", "café").encode("latin-1"))
    proc = subprocess.run(
        [sys.executable, "-m", "kdtool", "eval", "rougel", "--model", str(tiny_dir / "student"), "--data", str(data)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = assert_one_line_naming((proc.returncode, proc.stderr + proc.stdout), data)
    assert f"{data}:1: not UTF-8 text" in line


def test_data_locations_give_the_line(tiny_dir, tmp_path, cli):
    data = write(tmp_path / "data.jsonl", (GOOD * 3 + "café\n").encode("latin-1"))
    result = cli("eval", "rougel", "--model", tiny_dir / "student", "--data", data)
    assert f"{data}:4: not UTF-8" in assert_one_line_naming(result, data)
    data = write(tmp_path / "data.json", ("[" + GOOD.strip() + ",\n" + GOOD.strip() + ",\n7]").encode())
    result = cli("eval", "rougel", "--model", tiny_dir / "student", "--data", data)
    assert f"{data}:item 2: expected a JSON object" in assert_one_line_naming(result, data)


def test_a_path_that_looks_like_markup_is_printed_as_it_is(tiny_dir, tmp_path, cli):
    data = write(tmp_path / "data[bold].jsonl", b"\xff\n")
    assert_one_line_naming(cli("eval", "rougel", "--model", tiny_dir / "student", "--data", data), data)


def test_a_directory_given_as_data(tiny_dir, tmp_path, cli):
    result = cli("eval", "rougel", "--model", tiny_dir / "student", "--data", tmp_path)
    assert_one_line_naming(result, tmp_path)


def test_minillm_lm_data(tiny_dir, tmp_path, cli):
    for name, content in (("lm.txt", b"caf\xe9\n"), ("lm.jsonl", b'{"text": "a"}\n{"text": 5}\n')):
        lm = write(tmp_path / name, content)
        result = cli("distill", "--objective", "minillm", "--teacher", tiny_dir / "teacher",
                     "--student", tiny_dir / "student", "--data", tiny_dir / "data" / "train.jsonl",
                     "--output", tmp_path / f"run-{name}", "--max-steps", "1", "--batch-size", "2",
                     "--max-length", "32", "-O", f"lm_data={lm}", "-O", "rollout_batch_size=2",
                     "-O", "max_new_tokens=2", "--no-progress")  # fmt: skip
        assert_one_line_naming(result, lm)


# ------------------------------------------------------------------------------ predictions


@pytest.mark.parametrize("case", JSON_CASES)
def test_predictions(tmp_path, cli, case):
    preds = write(tmp_path / "preds.jsonl", JSON_CASES[case])
    assert_one_line_naming(cli("eval", "rougel", "--predictions", preds), preds)


# ------------------------------------------------------------------------------ config files

CONFIG_CASES: dict[str, tuple[str, bytes | Callable[[], bytes]]] = {
    "random-bytes": ("yaml", random_bytes),
    "latin-1": ("yaml", "lr: 0.001  # café\n".encode("latin-1")),
    "nul-bytes": ("yaml", b"lr: 1\x00\x00\n"),
    "truncated-yaml": ("yaml", b"adam_betas: [0.9, 0.95\n"),
    "bad-indentation": ("yaml", b"objective_options:\n  a: 1\n b: 2\n"),
    "not-a-mapping": ("yaml", b"- lr\n- 0.1\n"),
    "wrong-types": ("yaml", b"batch_size: lots\n"),
    "python-object-tag": ("yaml", b"lr: !!python/object/apply:os.system ['true']\n"),
    "truncated-toml": ("toml", b'objective = "fkl\n'),
    "latin-1-toml": ("toml", 'objective = "café"\n'.encode("latin-1")),
    "single-50MB-line": ("yaml", huge_line),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_file(tiny_dir, tmp_path, cli, case):
    suffix, content = CONFIG_CASES[case]
    config = write(tmp_path / f"run.{suffix}", content)
    result = cli("distill", "--config", config, "--objective", "sft", "--student", tiny_dir / "student",
                 "--data", tiny_dir / "data" / "train.jsonl", "--output", tmp_path / "run")  # fmt: skip
    line = assert_one_line_naming(result, config)
    if case == "truncated-yaml":
        assert f"{config}:2: cannot parse YAML" in line


def test_model_config_json(tiny_dir, tmp_path, cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir / "student", model)
    write(model / "config.json", b'{"model_type": "gpt2", "n_embd": "caf\xe9"}')
    result = cli("eval", "rougel", "--model", model, "--data", tiny_dir / "data" / "test.jsonl")
    assert_one_line_naming(result, model / "config.json")


# ------------------------------------------------------------------------------ teacher cache


@pytest.fixture(scope="module")
def cache(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(a small finished cache, the data it was built from)."""
    from kdtool.cache import CacheConfig, build_cache

    root = tmp_path_factory.mktemp("cache")
    data = root / "train.jsonl"
    data.write_text("".join((tiny_dir / "data" / "train.jsonl").read_text().splitlines(True)[:8]))
    out = root / "cache"
    cfg = CacheConfig(teacher=str(tiny_dir / "teacher"), data=str(data), output=str(out), max_length=64)
    build_cache(cfg.model_copy(update={"progress": False}))
    return out, data


def distill_from(cli, tiny_dir, cache_dir, data, out):
    return cli("distill", "--objective", "fkl", "--student", tiny_dir / "student", "--teacher-cache",
               cache_dir, "--data", data, "--max-length", "64", "--max-steps", "1", "--batch-size", "4",
               "--output", out, "--no-progress")  # fmt: skip


def damaged_copy(cache: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(cache[0], copy)
    return copy


MANIFEST_CASES: dict[str, bytes | Callable[[], bytes]] = {
    "random-bytes": random_bytes,
    "latin-1": '{"format": "café"}'.encode("latin-1"),
    "truncated": b'{"format": "kdtool-teacher-cache/1", "vocab',
    "empty": b"",
    "not-an-object": b"[1, 2]",
    "wrong-types": b'{"format": "kdtool-teacher-cache/1", "vocab_size": "many", "k": 4, "value_dtype": "float16"}',
    "shard-outside-the-cache": None,  # filled in from the real manifest below
    "single-50MB-line": huge_line,
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_cache_manifest(tiny_dir, tmp_path, cli, cache, case):
    copy = damaged_copy(cache, tmp_path)
    manifest = copy / "manifest.json"
    if case == "shard-outside-the-cache":
        real = json.loads(manifest.read_text())
        real["shards"][0]["file"] = "../elsewhere.safetensors"
        manifest.write_text(json.dumps(real))
    else:
        write(manifest, MANIFEST_CASES[case])
    assert_one_line_naming(distill_from(cli, tiny_dir, copy, cache[1], tmp_path / "run"), manifest)


@pytest.mark.parametrize("case", ["random-bytes", "truncated", "empty", "missing"])
def test_cache_shard(tiny_dir, tmp_path, cli, cache, case):
    copy = damaged_copy(cache, tmp_path)
    shard = copy / "shard-00000.safetensors"
    if case == "random-bytes":
        write(shard, random_bytes())
    elif case == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif case == "empty":
        write(shard, b"")
    else:
        shard.unlink()
    assert_one_line_naming(distill_from(cli, tiny_dir, copy, cache[1], tmp_path / "run"), shard)


def test_cache_from_another_tokenizer(tiny_dir, tmp_path, cli, cache):
    copy = damaged_copy(cache, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer_fingerprint"] = "0" * 16  # as if built with another tokenizer
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = assert_one_line_naming(distill_from(cli, tiny_dir, copy, cache[1], tmp_path / "run"), copy)
    assert "tokenizer" in line


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory) -> Path:
    from kdtool import trainer
    from kdtool.config import resolve

    out = tmp_path_factory.mktemp("ckpt") / "run"
    flags = dict(objective="sft", student=str(tiny_dir / "student"), data=str(tiny_dir / "data" / "train.jsonl"),
                 output=str(out), max_steps=2, batch_size=4, eval_batches=1, progress=False)  # fmt: skip
    trainer.train(resolve(None, flags))
    return out


def resume(cli, tiny_dir, run):
    return cli("distill", "--objective", "sft", "--student", tiny_dir / "student", "--data",
               tiny_dir / "data" / "train.jsonl", "--output", run, "--max-steps", "3", "--batch-size", "4",
               "--no-progress", "--resume")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("trainer_state.pt", "random-bytes"),
        ("trainer_state.pt", "truncated"),
        ("trainer_state.pt", "empty"),
        ("model.safetensors", "random-bytes"),
        ("model.safetensors", "truncated"),
        ("model.safetensors", "empty"),
    ],
)
def test_checkpoint_files(tiny_dir, tmp_path, cli, finished_run, name, case):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    target = sorted((run / "checkpoints").glob("step-*"))[-1] / name
    if case == "random-bytes":
        write(target, random_bytes())
    elif case == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        write(target, b"")
    assert_one_line_naming(resume(cli, tiny_dir, run), target)


@pytest.mark.parametrize("case", ["latin-1", "truncated-yaml", "not-a-mapping"])
def test_run_config_yaml(tiny_dir, tmp_path, cli, finished_run, case):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    content = {
        "latin-1": "lr: 1  # \xe9\n".encode("latin-1"),
        "truncated-yaml": b"lr: [1,",
        "not-a-mapping": b"- 1",
    }
    write(run / "config.yaml", content[case])
    assert_one_line_naming(resume(cli, tiny_dir, run), run / "config.yaml")
