"""benchmarks/bench_chunk.py's paired timing: one process steps every chunk size in turn."""

from __future__ import annotations

from conftest import load_benchmark

CFG = {
    "objective": "fkl",
    "mode": "chunked",
    "vocab": 512,
    "batch": 1,
    "seq": 64,
    "hidden": 8,
    "teacher_hidden": 16,
    "masked_fraction": 0.0,
    "repeats": 1,
    "threads": 1,
    "device": "cpu",
    "system_allocator": True,
}


def test_interleaved_worker_times_every_chunk_size_each_round(monkeypatch):
    """Each round steps each chunk size once, in a rotated order, with the engine really given that
    size (two untimed rounds first); the report has one time per round and size, and no peak."""
    bench_memory = load_benchmark("bench_memory")
    import kdtool.engine

    seen: list[int] = []
    original = kdtool.engine.token_loss_sum

    def spy(*args, **kwargs):
        seen.append(args[6])  # token_loss_sum(objective, hidden, head, teacher, labels, V, chunk)
        return original(*args, **kwargs)

    monkeypatch.setattr(kdtool.engine, "token_loss_sum", spy)
    chunks, rounds = [16, 32, 64], 4
    out = bench_memory.worker({**CFG, "chunk_size": 16, "interleave": chunks, "interleave_rounds": rounds})
    assert "peak_bytes" not in out
    assert set(out["times"]) == set(out["cpu_times"]) == {"16", "32", "64"}
    assert all(len(t) == rounds and all(x > 0 for x in t) for t in out["times"].values())
    expected = [c for r in range(rounds + 2) for c in chunks[r % 3 :] + chunks[: r % 3]]
    assert seen == expected
