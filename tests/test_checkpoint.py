"""Loading a checkpoint runs nothing from it, puts every tensor on the CPU, and the optimizer's
state then follows its parameters; the RNG state survives the safe format exactly."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdtool import checkpoint, distributed, trainer
from kdtool.config import resolve
from kdtool.errors import UserError


class WritesAFile:
    """A pickle payload: unpickling it calls ``open(path, "w")``, i.e. creates ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def relabel_storages(path: Path, location: str) -> None:
    """Rewrite a ``torch.save`` file as if its tensors had been saved on ``location`` (e.g. a GPU)."""
    with zipfile.ZipFile(path) as src:
        entries = [(name, src.read(name)) for name in src.namelist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in entries:
            if name.endswith("data.pkl"):  # BINUNICODE strings: 'X', 4-byte length, bytes
                new = b"X" + len(location).to_bytes(4, "little") + location.encode()
                data = data.replace(b"X\x03\x00\x00\x00cpu", new)
            dst.writestr(name, data)


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from tensors_in(v)


def small_state(tmp_path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    state = {"step": 1, "optimizer": optimizer.state_dict(), "rng": [checkpoint.rng_state()]}
    torch.save(state, ckpt / checkpoint.STATE_FILE)
    return ckpt, model, optimizer


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()  # move numpy off a fresh seed so its position and cache matter
    saved = checkpoint.rng_state()
    expected = draws()
    torch.save({"rng": saved}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["rng"]
    checkpoint.set_rng_state(loaded)
    assert draws() == expected


def test_state_written_before_the_change_still_loads(tmp_path):
    """Earlier checkpoints hold numpy's RNG state as an array: still resumable, exactly."""
    ckpt, _, _ = small_state(tmp_path)
    state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)
    np.random.seed(5)
    state["rng"][0]["numpy"] = np.random.get_state()  # ('MT19937', ndarray, ...), as before
    expected = draws()[1]
    torch.save(state, ckpt / checkpoint.STATE_FILE)
    checkpoint.set_rng_state(checkpoint.load_state(ckpt)["rng"][0])
    assert draws()[1] == expected


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    ckpt, _, optimizer = small_state(tmp_path)
    marker = tmp_path / "pwned"
    evil = {"step": 1, "optimizer": optimizer.state_dict(), "rng": [], "x": WritesAFile(marker)}
    torch.save(evil, ckpt / checkpoint.STATE_FILE)
    with pytest.raises(UserError) as caught:
        checkpoint.load_state(ckpt)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{ckpt / checkpoint.STATE_FILE}: refused to load")
    assert "holds io.open" in message  # the callable the payload names
    assert not marker.exists()
    # The payload is real: the old way of loading (weights_only=False) runs it.
    torch.load(ckpt / checkpoint.STATE_FILE, weights_only=False)
    assert marker.exists()


def test_resume_from_a_hostile_checkpoint_is_one_line_through_the_cli(tiny_dir, tmp_path, cli):
    flags = dict(
        objective="sft",
        student=str(tiny_dir / "student"),
        data=str(tiny_dir / "data" / "train.jsonl"),
        output=str(tmp_path / "run"),
        max_steps=2,
        batch_size=4,
        eval_batches=1,
        progress=False,
    )
    trainer.train(resolve(None, dict(flags)))
    last = checkpoint.latest(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": WritesAFile(marker)}, last / checkpoint.STATE_FILE)
    code, output = cli(
        "distill", "--objective", "sft", "--student", flags["student"], "--data", flags["data"],
        "--output", flags["output"], "--max-steps", "4", "--batch-size", "4", "--no-progress", "--resume",
    )  # fmt: skip
    assert code == 1
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused to load" in lines[0] and str(last) in lines[0], output
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # load_state_dict into meta: a no-op, on purpose
def test_loaded_state_is_on_cpu_and_optimizer_state_follows_its_parameters(tmp_path):
    ckpt, model, _ = small_state(tmp_path)
    # Saved on a GPU by rank 0: without map_location="cpu" this fails on a CPU-only machine and
    # lands on cuda:0 in every rank of a GPU job.
    relabel_storages(ckpt / checkpoint.STATE_FILE, "cuda:0")
    loaded = checkpoint.load_state(ckpt)
    found = list(tensors_in(loaded))
    assert found and all(t.device.type == "cpu" for t in found)
    # A student whose parameters live elsewhere (meta stands in for a GPU on this CPU machine).
    elsewhere = nn.Linear(3, 2, device="meta")
    optimizer = torch.optim.AdamW(elsewhere.parameters())
    distributed.load_full_state(elsewhere, optimizer, model.state_dict(), loaded["optimizer"], sharded=False)
    for p in elsewhere.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert optimizer.state[p][key].device == p.device, key


@pytest.mark.gpu
def test_gpu_state_loads_to_cpu_then_optimizer_moves_it_to_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = nn.Linear(3, 2).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3, device="cuda")).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    torch.save({"step": 1, "optimizer": optimizer.state_dict(), "rng": []}, ckpt / checkpoint.STATE_FILE)
    loaded = checkpoint.load_state(ckpt)
    assert all(t.device.type == "cpu" for t in tensors_in(loaded))
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(loaded["optimizer"])
    for p in model.parameters():
        assert fresh.state[p]["exp_avg"].device == p.device


@pytest.mark.parametrize(
    "content", [b"", b"\x00\xff" * 100, b"PK\x03\x04 truncated zip"], ids=["empty", "binary", "truncated"]
)
def test_damaged_state_file_is_one_line(tmp_path, content):
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    (ckpt / checkpoint.STATE_FILE).write_bytes(content)
    with pytest.raises(UserError) as caught:
        checkpoint.load_state(ckpt)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{ckpt / checkpoint.STATE_FILE}: ")


def test_state_of_another_shape_is_refused(tmp_path):
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    torch.save([1, 2, 3], ckpt / checkpoint.STATE_FILE)
    with pytest.raises(UserError, match="not a kdtool trainer state"):
        checkpoint.load_state(ckpt)
