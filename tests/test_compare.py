"""kdtool compare end to end on tiny models: two objectives × two seeds, files and their schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_compare_two_objectives_two_seeds(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    args = [
        sys.executable,
        "-m",
        "kdtool",
        "compare",
        "--objectives",
        "fkl,sft",
        "--teacher",
        str(tiny_dir / "teacher"),
        "--student",
        str(tiny_dir / "student"),
        "--data",
        str(tiny_dir / "data" / "train.jsonl"),
        "--eval-data",
        str(tiny_dir / "data" / "test.jsonl"),
        "--output",
        str(out),
        "--seeds",
        "1,2",
        "--eval-seeds",
        "10",
        "--eval-limit",
        "4",
        "--max-new-tokens",
        "6",
        "-O",
        "fkl.ce_weight=0.5",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
    ]
    proc = subprocess.run([*args, "--jobs", "2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["objective"], r["seed"]) for r in runs) == [
        ("fkl", 1),
        ("fkl", 2),
        ("sft", 1),
        ("sft", 2),
    ]
    for r in runs:
        assert r["status"] == "ok"
        for key in (
            "rougeL",
            "rougeL_std",
            "exact_match",
            "eval_ce",
            "eval_fkl",
            "wall_time_s",
            "tokens_per_s",
            "peak_rss_mb",
        ):
            assert isinstance(r[key], float | int), key
        assert 0 <= r["rougeL"] <= 100
    assert next(r for r in runs if r["objective"] == "fkl")["options"] == {"ce_weight": 0.5}
    summary = {row["objective"]: row for row in results["summary"]}
    assert set(summary) == {"fkl", "sft"} and summary["fkl"]["seeds"] == 2
    assert [ref["objective"] for ref in results["reference"]] == ["teacher", "student (no distillation)"]
    report = (out / "report.md").read_text()
    assert "| fkl |" in report and "| ref | teacher |" in report
    for png in ("rougel.png", "curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # Resumable: a second invocation (--jobs is not part of the settings) finds every run finished.
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    log = (out / "logs" / "fkl-seed1.log").read_text()
    assert log.count("kdtool distill") == 1


@pytest.mark.slow
def test_failed_run_is_reported_not_raised(tiny_dir, tmp_path):
    from kdtool.compare import CompareSpec, train_and_eval
    from kdtool.compare_report import aggregate, report_markdown

    spec = CompareSpec(
        objectives=["fkl"],
        seeds=[1],
        teacher=str(tiny_dir / "teacher"),
        student=str(tiny_dir / "student"),
        data=str(tiny_dir / "data" / "train.jsonl"),
        eval_data=str(tiny_dir / "data" / "test.jsonl"),
        output=str(tmp_path),
        distill_args=["--lr", "-1"],
    )
    (tmp_path / "logs").mkdir()
    result = train_and_eval(spec, "fkl", 1, tmp_path)
    assert result["status"] == "failed" and "lr" in result["error"]
    rows = aggregate([result])
    assert rows[0]["failed"] == 1 and rows[0]["rougeL"] is None
    assert "## Failed runs" in report_markdown(spec, rows, [], [result], 1.0)


def test_jobs_run_concurrently_and_keep_the_order(tmp_path, monkeypatch):
    import threading
    import time

    from rich.console import Console

    import kdtool.compare as compare

    running, peak, lock = [0], [0], threading.Lock()

    def fake_run(spec, objective, seed, root):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 if objective == "a" else 0.01)  # later jobs finish first
        with lock:
            running[0] -= 1
        return {"objective": objective, "seed": seed, "status": "ok", "rougeL": float(seed)}

    monkeypatch.setattr(compare, "train_and_eval", fake_run)
    monkeypatch.setattr(
        compare, "reference", lambda spec, name, model, root: {"objective": name, "status": "ok"}
    )
    monkeypatch.setattr(compare, "plot", lambda *a, **k: None)
    spec = compare.CompareSpec(
        objectives=["a", "b"],
        seeds=[1, 2, 3],
        teacher="t",
        student="s",
        data="d",
        eval_data="e",
        output=str(tmp_path),
        jobs=3,
    )
    compare.run_compare(spec, console=Console(quiet=True))
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["objective"], r["seed"]) for r in runs] == [(o, s) for o in "ab" for s in (1, 2, 3)]
    assert peak[0] == 3
    # The same comparison with another --jobs is the same comparison; other settings are not.
    compare.run_compare(compare.CompareSpec(**{**vars(spec), "jobs": 1}), console=Console(quiet=True))
    with pytest.raises(compare.UserError, match="other settings"):
        compare.run_compare(compare.CompareSpec(**{**vars(spec), "seeds": [1]}), console=Console(quiet=True))
    with pytest.raises(compare.UserError, match="jobs"):
        compare.run_compare(compare.CompareSpec(**{**vars(spec), "jobs": 0}), console=Console(quiet=True))


def _record(objective, seed, valid, **extra):
    return {"objective": objective, "seed": seed, "status": "ok", "valid": valid, "rougeL": valid, **extra}


def test_paired_differences_on_a_fixture():
    from kdtool.compare_report import aggregate, paired

    results = [
        _record("sft", 1, 40.0),
        _record("sft", 2, 42.0),
        _record("sft", 3, 44.0),  # std 2.0
        _record("fkl", 1, 45.0),
        _record("fkl", 2, 46.0),
        _record("fkl", 3, 47.0),  # +5, +4, +3: mean +4 > 2 -> beyond the spread
        _record("rkl", 1, 41.0),
        _record("rkl", 2, 44.0),
        _record("rkl", 3, 44.5),  # +1, +2, +0.5: mean +1.17 < 2 -> inside
        {"objective": "tvd", "seed": 1, "status": "failed", "error": "x"},
    ]
    pairs = paired(results, "sft", "valid")
    assert set(pairs) == {"fkl", "rkl"}
    assert pairs["fkl"]["deltas"] == {1: 5.0, 2: 4.0, 3: 3.0}
    assert pairs["fkl"]["mean"] == pytest.approx(4.0) and pairs["fkl"]["baseline_std"] == pytest.approx(2.0)
    assert pairs["fkl"]["beyond_spread"] and not pairs["rkl"]["beyond_spread"]
    assert pairs["rkl"]["mean"] == pytest.approx(3.5 / 3)
    rows = aggregate(results, "valid")
    assert [r["objective"] for r in rows[:3]] == ["fkl", "rkl", "sft"]
    sft = next(r for r in rows if r["objective"] == "sft")
    assert sft["valid"] == pytest.approx(42.0) and sft["valid_std"] == pytest.approx(2.0)
    assert next(r for r in rows if r["objective"] == "tvd")["failed"] == 1
    # A single pair is never "beyond the spread": one seed has no spread.
    one_seed = paired([_record("sft", 1, 40.0), _record("fkl", 1, 50.0)], "sft", "valid")
    assert not one_seed["fkl"]["beyond_spread"]


def test_report_marks_differences_beyond_the_spread(tmp_path):
    from kdtool.compare import CompareSpec
    from kdtool.compare_report import aggregate, report_markdown

    results = [_record("sft", s, 40.0 + 2 * s, **{"add/greedy": 50.0}) for s in (1, 2, 3)]
    results += [_record("fkl", s, 45.0 + s, **{"add/greedy": 60.0}) for s in (1, 2, 3)]
    spec = CompareSpec(
        objectives=["sft", "fkl"], seeds=[1, 2, 3], teacher="t", student="s", data="d", eval_data="e",
        output=str(tmp_path), primary_metric="valid",
    )  # fmt: skip
    text = report_markdown(spec, aggregate(results, "valid"), [], results, 1.0)
    assert "## Paired differences to `sft`" in text
    assert "| fkl | **+3.00** (+4.00, +3.00, +2.00) | **+3.00** (+4.00, +3.00, +2.00) |" in text
    assert "## Per sub-task" in text and "add/greedy" in text


def test_init_from_waits_for_its_source_run(tmp_path, monkeypatch):
    import threading

    from rich.console import Console

    import kdtool.compare as compare

    finished, lock, students = set(), threading.Lock(), {}

    def fake_run(spec, objective, seed, root):
        if objective == "b":
            assert ("a", seed) in finished, "b started before the run it starts from finished"
        students[(objective, seed)] = compare.initial_student(spec, objective, seed, root)
        with lock:
            finished.add((objective, seed))
        return {"objective": objective, "seed": seed, "status": "ok", "rougeL": 1.0}

    monkeypatch.setattr(compare, "train_and_eval", fake_run)
    monkeypatch.setattr(
        compare, "reference", lambda spec, name, model, root: {"objective": name, "status": "ok"}
    )
    monkeypatch.setattr(compare, "plot", lambda *a, **k: None)
    spec = compare.CompareSpec(
        objectives=["b", "a", "c"], seeds=[1, 2], teacher="t", student="s", data="d", eval_data="e",
        output=str(tmp_path), jobs=2, init_from={"b": "a"},
    )  # fmt: skip
    compare.run_compare(spec, console=Console(quiet=True))
    assert students[("b", 2)] == str(tmp_path / "runs" / "a-seed2") and students[("a", 1)] == "s"
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["objective"], r["seed"]) for r in runs] == [(o, s) for o in "bac" for s in (1, 2)]
    with pytest.raises(compare.UserError, match="init-from"):
        bad = compare.CompareSpec(**{**vars(spec), "output": str(tmp_path / "x"), "init_from": {"b": "z"}})
        compare.run_compare(bad, console=Console(quiet=True))
