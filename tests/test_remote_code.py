"""A model that needs its own Python code (``auto_map``) loads only with --trust-remote-code.

The "remote" code here is a local module that writes a marker file when it is imported, so the
tests see whether it ran; no network is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kdtool.errors import UserError
from kdtool.models import load_model, load_tokenizer
from kdtool.options import REMOTE_CODE_ENV

MODULE = """
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

Path({marker!r}).write_text("the model's own code ran")


class CustomConfig(GPT2Config):
    model_type = "kdtool-custom"


class CustomLM(GPT2LMHeadModel):
    config_class = CustomConfig
"""


@pytest.fixture
def custom(tiny_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(model directory whose config declares custom classes, marker its code writes on import)."""
    import transformers.dynamic_module_utils as dynamic

    # transformers copies the model's code into its modules cache: keep that inside tmp_path
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.delenv(REMOTE_CODE_ENV, raising=False)
    model = tmp_path / "custom"
    shutil.copytree(tiny_dir / "student", model)
    marker = tmp_path / "code-ran"
    (model / "custom_gpt2.py").write_text(MODULE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="kdtool-custom",
        architectures=["CustomLM"],
        auto_map={"AutoConfig": "custom_gpt2.CustomConfig", "AutoModelForCausalLM": "custom_gpt2.CustomLM"},
    )
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def one_line(output: str) -> str:
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize("load", [load_model, load_tokenizer], ids=["model", "tokenizer"])
def test_auto_map_is_refused_without_the_flag_and_its_code_never_runs(custom, load):
    model, marker = custom
    with pytest.raises(UserError) as caught:
        load(str(model))
    message = str(caught.value)
    assert "\n" not in message and "--trust-remote-code" in message and "auto_map" in message
    assert not marker.exists()


@pytest.mark.parametrize("command", ["distill", "eval", "cache-logits"])
def test_every_command_refuses_in_one_line_naming_the_flag(custom, tiny_dir, tmp_path, cli, command):
    model, marker = custom
    data = str(tiny_dir / "data" / "train.jsonl")
    args = {
        "distill": ("distill", "--objective", "sft", "--student", model, "--data", data),
        "eval": ("eval", "rougel", "--model", model, "--data", data, "--limit", "1"),
        "cache-logits": ("cache-logits", "--teacher", model, "--data", data),
    }[command]
    output_flag = () if command == "eval" else ("--output", tmp_path / "out")
    code, output = cli(*args, *output_flag)
    assert code == 1
    assert "needs its own Python code" in one_line(output) and "--trust-remote-code" in output
    assert not marker.exists()


def test_with_the_flag_distill_runs_the_models_code(custom, tiny_dir, tmp_path, cli):
    model, marker = custom
    code, output = cli(
        "distill", "--objective", "sft", "--student", model, "--data", tiny_dir / "data" / "train.jsonl",
        "--output", tmp_path / "run", "--max-steps", "1", "--batch-size", "4", "--no-progress",
        "--trust-remote-code",
    )  # fmt: skip
    assert code == 0, output
    assert marker.exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["architectures"] == ["CustomLM"]


def test_eval_reads_the_flag_from_the_environment_compare_sets(custom, tiny_dir, tmp_path, cli, monkeypatch):
    model, marker = custom
    monkeypatch.setenv(REMOTE_CODE_ENV, "1")
    code, output = cli(
        "eval", "rougel", "--model", model, "--data", tiny_dir / "data" / "test.jsonl", "--limit", "1",
        "--seeds", "1", "--max-new-tokens", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, output
    assert marker.exists()


def test_compare_passes_the_flag_to_its_child_commands(tmp_path, cli, monkeypatch):
    import kdtool.compare

    monkeypatch.setenv(REMOTE_CODE_ENV, "0")  # restored (to unset) after the test
    seen = {}
    monkeypatch.setattr(
        kdtool.compare, "run_compare", lambda spec, console: seen.update(env=dict(os.environ))
    )
    common = ("compare", "--objectives", "sft", "--teacher", "t", "--student", "s", "--data", "d",
              "--eval-data", "e", "--output", tmp_path / "cmp")  # fmt: skip
    assert cli(*common)[0] == 0
    assert seen["env"][REMOTE_CODE_ENV] == "0"
    assert cli(*common, "--trust-remote-code")[0] == 0
    assert seen["env"][REMOTE_CODE_ENV] == "1"  # what the child processes inherit


def test_the_flag_is_in_every_commands_help(cli):
    for command in (("distill",), ("eval", "rougel"), ("cache-logits",), ("compare",)):
        code, output = cli(*command, "--help")
        assert code == 0 and "--trust-remote-code" in output, command
