"""Multi-process training through the real launchers, on CPU with the gloo backend."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtool import run_dir, train_setup, trainer
from kdtool.config import resolve

BIN = Path(sys.executable).parent


def common(tiny_dir, conf):
    return [
        "--teacher",
        str(tiny_dir / "teacher"),
        "--student",
        str(tiny_dir / "student"),
        "--data",
        str(tiny_dir / "data" / "train.jsonl"),
        "--config",
        str(conf),
        "--no-progress",
    ]


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "kdtool",
        "distill",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def single(tiny_dir, out, steps):
    return trainer.train(
        resolve(
            None,
            dict(
                objective="fkl",
                teacher=str(tiny_dir / "teacher"),
                student=str(tiny_dir / "student"),
                data=str(tiny_dir / "data" / "train.jsonl"),
                output=str(out),
                max_steps=steps,
                batch_size=4,
                lr=1e-2,
                scheduler="constant",
                eval_every=100,
                seed=5,
                progress=False,
            ),
        )
    )


def assert_same_weights(a: Path, b: Path, atol=2e-5):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol)


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "dist.yaml"
    path.write_text("batch_size: 2\nlr: 0.01\nscheduler: constant\neval_every: 100\nseed: 5\nsave_every: 2\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "flags"), [("ddp", []), ("fsdp", ["--fsdp", "--fsdp-teacher"])])
def test_two_processes_equal_one_process_and_resume(tiny_dir, tmp_path, conf, strategy, flags):
    """2 ranks × batch 2 == 1 rank × batch 4 (same global batch), and a 2-rank checkpoint resumes."""
    reference = single(tiny_dir, tmp_path / "single", steps=4)
    out = tmp_path / strategy
    report = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    first = torchrun(*common(tiny_dir, conf), *flags, *report, "--output", str(out), "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    if report:  # rank 0 alone reports: one event file, not one per rank
        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert start["strategy"] == strategy and start["teacher_sharded"] == ("--fsdp-teacher" in flags)
    assert first.stdout.count("student written") == 1  # rank 0 alone writes and reports
    resumed = torchrun(*common(tiny_dir, conf), *flags, "--output", str(out), "--max-steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert_same_weights(reference, out)
    # a checkpoint written by two processes is refused by one, with a clear line
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdtool",
            "distill",
            *common(tiny_dir, conf),
            "--output",
            str(out),
            "--max-steps",
            "6",
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "written by 2 process(es)" in proc.stderr


@pytest.mark.slow
def test_accelerate_launch_starts(tiny_dir, tmp_path, conf):
    accelerate = shutil.which("accelerate", path=str(BIN))
    if accelerate is None:
        pytest.skip("accelerate is not installed (pip install 'kdtool[dist]')")
    out = tmp_path / "acc"
    cmd = [
        accelerate,
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "kdtool",
        "distill",
        *common(tiny_dir, conf),
        "--output",
        str(out),
        "--max-steps",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- minillm under sharding

MINILLM = [
    "--objective",
    "minillm",
    "-O",
    "rollout_batch_size=4",  # 2 micro-batches of 2 per buffer: 6 steps = 3 buffers
    "-O",
    "inner_epochs=1",
    "-O",
    "max_new_tokens=16",
]


@pytest.fixture
def minillm_conf(tmp_path):
    # max_length 30 caps the decoding steps by each rank's longest prompt (9–17 tokens here): the
    # ranks decode different numbers of tokens per buffer (see test_ranks_hold_prompts_of_different_lengths).
    path = tmp_path / "minillm.yaml"
    path.write_text(
        "batch_size: 2\nlr: 0.01\nscheduler: constant\neval_every: 100\nseed: 5\nsave_every: 1\n"
        "max_length: 30\nmax_prompt_length: 24\n"
    )
    return path


def test_ranks_hold_prompts_of_different_lengths(tiny_dir, minillm_conf):
    """The premise of the minillm tests below: per buffer, the two ranks' decoding limits differ."""
    from kdtool.data import BatchLoader
    from kdtool.models import load_tokenizer
    from kdtool.rollout import prompts_of

    cfg = resolve(
        minillm_conf,
        dict(
            objective="minillm",
            teacher=str(tiny_dir / "teacher"),
            student=str(tiny_dir / "student"),
            data=str(tiny_dir / "data" / "train.jsonl"),
            output="unused",
        ),
    )
    train_ds, _, _ = train_setup.setup_data(cfg, load_tokenizer(cfg.student))
    limits = []
    for rank in (0, 1):
        batches = iter(BatchLoader(train_ds, cfg.batch_size, cfg.seed, rank=rank, world=2))
        lengths = [max(len(p) for p in prompts_of(next(batches))) for _ in range(6)]
        limits.append([min(16, cfg.max_length - n) for n in lengths])
    assert limits[0] != limits[1]


ON_POLICY = ["--objective", "fkl", "--on-policy-fraction", "0.5", "--max-new-tokens", "16"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "flags"),
    [
        (MINILLM, ["--fsdp"]),
        (MINILLM, ["--fsdp-teacher"]),
        (MINILLM, ["--fsdp", "--fsdp-teacher"]),
        (ON_POLICY, ["--fsdp", "--fsdp-teacher"]),
    ],
    ids=["minillm-fsdp", "minillm-fsdp-teacher", "minillm-both", "on-policy-mix-both"],
)
def test_minillm_sharded_equals_ddp_and_resumes(tiny_dir, tmp_path, minillm_conf, objective, flags):
    """minillm with a sharded student and/or teacher over 3 rollout buffers, stopped after 3 steps
    (mid-buffer) and resumed to 6, ends with the weights of an uninterrupted 6-step DDP run.

    Each rank samples from its own generator (seed + rank), so a 2-rank minillm run is not a
    1-rank run with twice the batch; but DDP and FSDP sample the same tokens (idle passes draw no
    random numbers) and an interrupted run replays its buffer exactly. The same holds for fkl on a
    λ = 0.5 mix of sampled and reference responses (the coin is shared by the ranks).
    """
    reference = tmp_path / "ddp"
    args = [*common(tiny_dir, minillm_conf), *objective]
    done = torchrun(*args, "--output", str(reference), "--max-steps", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "sharded"
    first = torchrun(*args, *flags, "--output", str(out), "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(*args, *flags, "--output", str(out), "--max-steps", "6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["strategy"] == ("fsdp" if "--fsdp" in flags else "ddp")
    assert start["teacher_sharded"] == ("--fsdp-teacher" in flags)
    # FSDP's reduce-scatter and DDP's all-reduce sum the ranks' gradients in different orders; after
    # 6 AdamW steps at lr 0.01 that rounding reaches ~1e-4 on near-zero-gradient entries (seen: 1.03e-4
    # on 1 of 48). A replay that went wrong differs by far more (0.037 before every rank's sampler
    # state was saved).
    assert_same_weights(reference, out, atol=3e-4)


# --------------------------------------------------------------------------- --fsdp-teacher loading


def tiny_qwen2(path: Path) -> Path:
    """A random Qwen2 with tied embeddings and rotary tables (buffers that are not in the state dict)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "qwen2"])
def test_sharded_teacher_loaded_from_rank0_equals_unsharded(tiny_dir, tmp_path, model):
    path = tiny_dir / "teacher" if model == "gpt2" else tiny_qwen2(tmp_path / "qwen2")
    script = Path(__file__).with_name("sharded_teacher_check.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(script), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sharded teacher matches") == 2


# --------------------------------------------------------------------------- single-process units


def test_teacher_device_map_is_refused_under_torchrun(tiny_dir, tmp_path, monkeypatch):
    from kdtool.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group is joined
    cfg = resolve(
        None,
        dict(
            objective="fkl",
            teacher=str(tiny_dir / "teacher"),
            student=str(tiny_dir / "student"),
            data=str(tiny_dir / "data" / "train.jsonl"),
            output=str(tmp_path / "out"),
            teacher_device_map="auto",
        ),
    )
    with pytest.raises(UserError, match="--teacher-device-map is for one process"):
        trainer.train(cfg)
    assert not (tmp_path / "out").exists()


def fake_process_group(monkeypatch, calls: list[str], rank: int = 0) -> dict:
    """Rank ``rank`` of 2 and ``torch.distributed`` as far as ``setup``/``teardown`` use it:
    barrier/destroy are recorded in ``calls``; returns the keywords ``init_process_group`` got."""
    from kdtool import distributed

    seen: dict = {}
    joined = {"on": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: joined["on"])

    def init(**kw):
        seen.update(kw)
        joined["on"] = True

    def destroy(*a, **kw):
        calls.append("destroy")
        joined["on"] = False

    monkeypatch.setattr(distributed.dist, "init_process_group", init)
    monkeypatch.setattr(distributed.dist, "barrier", lambda *a, **kw: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", destroy)
    return seen


def test_process_group_timeout_and_device_index(monkeypatch):
    from datetime import timedelta

    from kdtool import distributed

    seen = fake_process_group(monkeypatch, [], rank=1)
    info, device = distributed.setup("cpu", timeout_minutes=90)
    assert (info.rank, info.world, device.type) == (1, 2, "cpu")
    assert seen["backend"] == "gloo" and seen["timeout"] == timedelta(minutes=90)
    assert resolve(None, dict(student="s", data="d", output="o", objective="sft")).dist_timeout_minutes == 60
    # one GPU visible per rank (CUDA_VISIBLE_DEVICES set by the launcher): LOCAL_RANK 3 is device 0
    assert distributed.local_device_index(3, 1) == 0
    assert distributed.local_device_index(3, 8) == 3


def test_ranks_meet_before_leaving_the_process_group_only_when_all_finished(monkeypatch, tmp_path):
    from kdtool import distributed

    calls: list[str] = []
    fake_process_group(monkeypatch, calls)
    info, _ = distributed.setup("cpu")
    distributed.teardown(info, finished=True)
    assert calls == ["barrier", "destroy"]
    distributed.teardown(info, finished=True)  # already left: nothing
    assert calls == ["barrier", "destroy"]

    # a run that fails leaves at once: a barrier would wait for ranks stuck in another collective
    calls.clear()
    cfg = resolve(None, dict(objective="sft", student="s", data="d", output=str(tmp_path / "o")))
    monkeypatch.setattr(trainer, "_train", lambda *a: (_ for _ in ()).throw(RuntimeError("rank 0 failed")))
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        trainer.train(cfg)
    assert calls == ["destroy"]

    calls.clear()
    monkeypatch.setattr(trainer, "_train", lambda *a: tmp_path / "o")
    assert trainer.train(cfg) == tmp_path / "o"
    assert calls == ["barrier", "destroy"]


def test_output_layer_of_a_spread_model_returns_logits_to_the_rows_device(tiny_dir):
    from kdtool.heads import DeviceAlignedHead, output_head
    from kdtool.models import load_model

    model = load_model(str(tiny_dir / "teacher"))
    plain = output_head(model)
    assert not isinstance(plain, DeviceAlignedHead)
    model.hf_device_map = {"transformer": 0, "lm_head": 1}  # what accelerate records for 2 GPUs
    spread = output_head(model)
    assert isinstance(spread, DeviceAlignedHead)
    rows = torch.randn(5, model.config.n_embd)
    torch.testing.assert_close(spread(rows), plain(rows), rtol=0, atol=0)


def test_peak_memory_reads_the_given_device():
    assert "peak_cuda_mb" not in run_dir.peak_memory(torch.device("cpu"))


def test_cache_indices_are_widened_exactly():
    from kdtool.cache import indices_to

    ids = torch.tensor([[0, 1, 40_000, 65_535]], dtype=torch.uint16)
    assert indices_to(ids, torch.device("cpu")).tolist() == [[0, 1, 40_000, 65_535]]
    wide = torch.tensor([[3, 151_935]], dtype=torch.int32)
    assert indices_to(wide, torch.device("cpu")).dtype == torch.int64


def test_teacher_dtype_and_device_map_budget_on_cuda(tiny_dir, tmp_path, monkeypatch):
    """CUDA paths of setup_models without a GPU: the loader is stubbed, torch.cuda's queries faked."""
    from kdtool.models import load_model, load_tokenizer

    loaded = []

    def fake_load(path, device="cpu", dtype=None, device_map=None, trust_remote_code=False, max_memory=None):
        loaded.append((Path(path).name, dtype, device_map, max_memory))
        return load_model(path)

    monkeypatch.setattr(train_setup, "load_model", fake_load)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (70 * 2**30, 80 * 2**30))
    tok = load_tokenizer(str(tiny_dir / "student"))
    cuda = torch.device("cuda", 0)
    for dtype, device_map in (("auto", None), ("float32", None), ("auto", "auto")):
        cfg = resolve(
            None,
            dict(
                objective="fkl",
                teacher=str(tiny_dir / "teacher"),
                student=str(tiny_dir / "student"),
                data="d",
                output="o",
                dtype=dtype,
                teacher_device_map=device_map,
            ),
        )
        train_setup.setup_models(cfg, tok, cuda)
    teachers = [entry for entry in loaded if entry[0] == "teacher"]
    assert [t[1] for t in teachers] == [torch.bfloat16, torch.float32, torch.bfloat16]
    budget = teachers[2][3]
    student_bytes = sum(p.numel() * 4 for p in load_model(str(tiny_dir / "student")).parameters())
    # the student's GPU keeps room for its gradients, AdamW moments and activations; the other gives 95%
    assert budget[0] == 70 * 2**30 - 3 * student_bytes - 20 * 2**30
    assert budget[1] == int(70 * 2**30 * 0.95) and budget["cpu"] > 0
