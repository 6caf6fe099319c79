"""The demo pipeline, end to end, in its quick setting (teacher, then compare)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def demo(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdtool", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_quick_demo_runs_offline_and_reports(tmp_path):
    out = tmp_path / "d"
    quick = ("--quick", "--objectives", "fkl,sft", "--output", str(out))
    proc = demo(*quick, timeout=1200, env=OFFLINE)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "compare" / "results.json").read_text())
    assert {r["objective"] for r in results["runs"]} == {"fkl", "sft"}
    assert all(r["status"] == "ok" for r in results["runs"])
    fkl = next(r for r in results["runs"] if r["objective"] == "fkl")
    first = json.loads((out / "compare" / "runs" / "fkl-seed1" / "metrics.jsonl").read_text().splitlines()[1])
    assert (
        fkl["eval_fkl"] < first["eval_fkl"]
    )  # even 10 steps of distillation move the student towards the teacher
    assert "report:" in proc.stdout and (out / "compare" / "report.md").is_file()
    # The same command again continues the finished demo: nothing is trained a second time.
    resumed = demo(*quick, timeout=600, env=OFFLINE)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "already trained" in resumed.stdout
    assert (out / "compare" / "logs" / "fkl-seed1.log").read_text().count("kdtool distill") == 1
    other = demo("--output", str(out))
    assert other.returncode == 1 and "other settings" in other.stderr
    again = demo("--quick", "--output", str(tmp_path))
    assert again.returncode == 1 and "not empty" in again.stderr


def test_demo_objectives_and_protocol():
    from kdtool.demo import INIT_FROM, OBJECTIVES, demo_objectives
    from kdtool.registry import available

    assert demo_objectives() == OBJECTIVES and OBJECTIVES[0] == "sft"
    assert {"fkl", "rkl", "slim", "atkd", "minillm"} <= set(OBJECTIVES)
    every = demo_objectives(all_objectives=True)
    assert every[: len(OBJECTIVES)] == OBJECTIVES and sorted(every) == sorted(available())
    assert INIT_FROM == {"minillm": "sft"}  # MiniLLM starts from the SFT student, the rest do not


def test_demo_passes_its_settings_to_compare(tmp_path, monkeypatch):
    """The demo's per-objective options and parallelism reach the comparison it runs."""
    import kdtool.compare
    import kdtool.demo as demo

    specs = []

    def fake_compare(spec, console):
        specs.append(spec)
        return tmp_path

    keys = ("train", "student_train", "test", "student_init")
    monkeypatch.setattr(demo, "prepare", lambda out: {k: out / k for k in keys})
    monkeypatch.setattr(kdtool.compare, "run_compare", fake_compare)
    demo.run_demo(tmp_path / "d", objectives=["minillm", "sft"])
    demo.run_demo(tmp_path / "e", objectives=["fkl", "sft"])
    assert specs[0].objective_options == {"minillm": demo.DEMO_OPTIONS["minillm"]}
    assert specs[0].jobs == demo.JOBS and specs[0].threads == 1
    assert specs[0].objectives == ["minillm", "sft"] and specs[0].init_from == {"minillm": "sft"}
    assert specs[0].teacher == str(demo.shipped_teacher()) and specs[0].seeds == demo.SEEDS
    assert specs[0].data.endswith("student_train") and specs[0].metrics_module == "kdtool.task_eval"
    assert specs[1].objective_options == {} and specs[1].init_from == {}
