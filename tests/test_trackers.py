"""``--report-to``: metrics.jsonl records reach TensorBoard, W&B (offline) and trackio, step as x-axis."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import struct
import subprocess
import sys
import types

import pytest

from conftest import tiny_run_flags
from kdtool import trackers, trainer
from kdtool.config import resolve
from kdtool.errors import UserError


def flags_for(tiny_dir, out, **overrides):
    flags = tiny_run_flags(
        tiny_dir,
        out,
        max_steps=3,
        eval_every=3,
        eval_batches=1,
    )
    return flags | overrides


def records_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(records, key):
    """{step: value} of one metrics.jsonl key."""
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (None, []),
        ("none", []),
        ("", []),
        ("tensorboard", ["tensorboard"]),
        ("wandb, TensorBoard,wandb", ["wandb", "tensorboard"]),
        (["trackio"], ["trackio"]),
    ],
)
def test_report_to_parses_like_hf_report_to(tmp_path, value, names):
    cfg = resolve(None, dict(student="s", data="d", output=str(tmp_path), objective="sft", report_to=value))
    assert cfg.report_to == names


def test_unknown_tracker_is_one_clear_line(tmp_path):
    with pytest.raises(
        UserError, match=r"report_to: unknown tracker 'mlflow' \(choose from tensorboard, wandb"
    ):
        resolve(None, dict(student="s", data="d", output=str(tmp_path), objective="sft", report_to="mlflow"))


def test_only_numeric_fields_with_a_step_are_forwarded():
    seen = []

    class Fake:
        def log(self, scalars, step):
            seen.append((step, scalars))

        def close(self):
            pass

    group = trackers.Trackers([Fake()])
    group.log({"event": "start", "examples": 10})  # no step: the start event stays in metrics.jsonl
    group.log({"step": 4, "loss": 1.5, "tokens": 7, "flag": True, "note": "x"})
    assert seen == [(4, {"loss": 1.5, "tokens": 7.0})]


def test_missing_tracker_package_is_one_line_before_any_import(tiny_dir, tmp_path):
    """trackio is not a dependency (it pulls gradio); asking for it without it installed is one line."""
    if importlib.util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed here; the refusal only applies without it")
    args = ["--teacher", str(tiny_dir / "teacher"), "--student", str(tiny_dir / "student")]
    args += ["--data", str(tiny_dir / "data" / "train.jsonl"), "--output", str(tmp_path / "r")]
    proc = subprocess.run(
        [sys.executable, "-m", "kdtool", "distill", *args, "--report-to", "tensorboard,trackio"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: --report-to trackio needs the trackio package: pip install 'kdtool[trackio]'"]
    assert not (tmp_path / "r").exists()


def test_missing_package_is_refused_by_the_library_too(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "wandb", "kdtool_test_no_such_module")
    with pytest.raises(UserError, match=r"^--report-to wandb needs the kdtool_test_no_such_module package"):
        trainer.train(resolve(None, flags_for(tiny_dir, tmp_path / "r", report_to="wandb")))


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_no_run(tiny_dir, tmp_path, monkeypatch):
    def no_login(*args):
        raise RuntimeError("No API key configured.\n(details)")

    monkeypatch.setitem(trackers.FACTORIES, "wandb", no_login)
    monkeypatch.setattr(trackers, "require_installed", lambda names: None)
    monkeypatch.setattr(trainer, "require_installed", lambda names: None)
    with pytest.raises(
        UserError, match=r"^--report-to wandb: the tracker did not start: No API key configured\.$"
    ):
        trainer.train(resolve(None, flags_for(tiny_dir, tmp_path / "r", report_to="wandb")))
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_tensorboard_event_file_holds_every_scalar_at_its_step(tiny_dir, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed (pip install 'kdtool[tensorboard]')"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = trainer.train(resolve(None, flags_for(tiny_dir, tmp_path / "run", report_to="tensorboard")))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = records_of(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_ce", "eval_fkl", "eval_rkl", "eval_loss"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        want = series(records, key)
        assert logged.keys() == want.keys(), key
        assert logged == pytest.approx(want, rel=1e-6), key  # stored as float32
    assert sorted(series(records, "loss")) == [1, 2, 3] and sorted(series(records, "eval_ce")) == [0, 3]
    assert "config/text_summary" in events.Tags()["tensors"]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "objective: fkl" in config and "report_to:\n- tensorboard" in config


def wandb_records(run_dir):
    """The protobuf records of an offline W&B run file (a LevelDB-style log after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, part, out = 7, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # too little room left for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if length == 0 and kind == 0:
            break
        part += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST fragment: a whole record
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def key_of(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb fills one or the other


def test_wandb_offline_run_gets_every_record_and_the_config(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'kdtool[wandb]')")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(var, value)
    out = trainer.train(resolve(None, flags_for(tiny_dir, tmp_path / "run", report_to="wandb")))
    records = wandb_records(out)
    history: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {key_of(i): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {key_of(i): json.loads(i.value_json) for i in run.config.update}
    assert run.display_name == "run" and config["objective"] == "fkl" and config["max_steps"] == 3
    metrics = records_of(out)
    for key in ("loss", "lr", "eval_ce", "eval_fkl"):
        want = series(metrics, key)
        assert {s: h[key] for s, h in history.items() if key in h} == pytest.approx(want), key
    assert sorted(history) == [0, 1, 2, 3]


def test_trackio_gets_init_log_finish(tiny_dir, tmp_path, monkeypatch):
    """trackio's API (init / log(step=) / finish), through a stand-in module: the real package
    pulls in gradio, too large for the test environment."""
    calls = []
    fake = types.ModuleType("trackio")
    fake.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda metrics, step=None: calls.append(("log", step, dict(metrics)))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setenv("TRACKIO_PROJECT", "kd-tests")
    out = trainer.train(resolve(None, flags_for(tiny_dir, tmp_path / "run", report_to="trackio")))
    kind, init = calls[0]
    assert kind == "init" and init["project"] == "kd-tests" and init["name"] == "run"
    assert init["config"]["objective"] == "fkl" and init["config"]["report_to"] == ["trackio"]
    assert calls[-1] == ("finish",)
    logged = [c for c in calls if c[0] == "log"]
    with_step = [r for r in records_of(out) if "step" in r]
    assert [c[1] for c in logged] == [r["step"] for r in with_step]
    assert logged[1][2]["loss"] == with_step[1]["loss"]
