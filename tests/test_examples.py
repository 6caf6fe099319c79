"""Every config shipped in examples/ validates against DistillConfig (litgpt's config_hub habit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdtool.config import resolve

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(path):
    cfg = resolve(path, {"output": "runs/x"})
    assert cfg.student and cfg.data


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize(
    "script", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.sh")), ids=lambda p: p.name
)
def test_example_scripts_parse(script):
    import subprocess

    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
