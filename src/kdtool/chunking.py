"""How many rows of ``[rows, V]`` logits exist at once in the token-loss engine.

``default_chunk_size`` gives the rows whose student logits go through the output-layer matmuls
together; ``slice_size`` the rows the objective sees at once inside a chunk; ``row_chunks`` cuts N
rows into such pieces. The rules and the measurements behind them are in the comment below.
"""

from __future__ import annotations

from kdtool.lazy import torch

# Two sizes (bytes of one fp32 [rows, V] block):
# * The *chunk* (``default_chunk_size``): the rows whose student logits exist at once and go through
#   the output-layer matmuls together. The rule is rows = clamp(budget / (V × 4 bytes), lo, 8192), with a
#   budget and a floor per device type:
#   - CPU: 64 MiB, at least 512 rows. From benchmarks/chunk_cpu.md (``python benchmarks/bench_chunk.py``:
#     one fkl step of the output layers with a lazy teacher, H = 256 / 512, 32–1,024-row chunks, one
#     process each, on the shared 2-core CPU): the fastest chunk was 1,024 rows at V = 16k, 256 at 32k
#     and 1,024 at 152k, with 512–1,024 rows within 7% of it everywhere but one noisy 16k point, while
#     32–128-row chunks were 13–100% slower at 16k and 32k and ≥ 30% slower at 152k (CPU time
#     +30%); the peak grows with the chunk (16k: 62 MiB at 32 rows, 466 MiB at 1,024). The budget alone
#     (64 MiB) gives 1,024 rows at 16k and 512 at 32k, but only 96 at 152k, 2.5× slower than the best:
#     hence the floor. The rule is within 10% of the fastest chunk's step time and below its peak at the
#     three V measured. Smaller ``--chunk-size`` values trade step time (up to 2× at 32 rows) for memory
#     (down to 1/7 of the peak at V = 16k).
#   - CUDA: 512 MiB (~880 rows at V = 152k), at least 128 rows: matmuls must amortise re-reading the
#     [V, H] weight three times per chunk (≳ 1k rows at H ≈ 1k on an H100). Reasoned, not measured
#     here (no GPU was lent; ``bench_chunk.py --device cuda`` measures it).
# * The *slice*: the rows the objective (and the teacher's output layer) sees at once inside a
#   chunk, i.e. its ~10 temporaries of [rows, V] (log-softmaxes, products, their gradients). On CPU
#   slices are far faster than whole chunks: for fkl over 2048 × 16k logits, loss + backward took
#   0.8 s of CPU in 128–256-row slices vs 1.6 s in ≥ 512-row ones with 1 thread, and the best wall
#   time with 2 threads came at 384 rows (24 MiB). Temporaries of ≥ 32 MiB are served by fresh
#   mmaps (glibc's largest mmap threshold) whose every page faults in; smaller ones reuse the heap.
#   Hence 12 MiB per intra-op thread, capped below 32 MiB. On CUDA one slice = one chunk.
CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
CHUNK_MIN_ROWS = {"cpu": 512, "cuda": 128}
CPU_SLICE_BYTES_PER_THREAD = 12 * 2**20
CPU_SLICE_MAX_BYTES = 28 * 2**20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 8192


def _rows_for(budget: int, vocab_size: int, floor: int = MIN_CHUNK_ROWS) -> int:
    """clamp(budget / (4 V), floor, MAX_CHUNK_ROWS), rounded down to a multiple of 16 rows."""
    rows = budget // (4 * max(vocab_size, 1))
    return int(min(MAX_CHUNK_ROWS, max(floor, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)))


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: one fp32 ``[chunk, V]`` block of about ``CHUNK_BUDGET_BYTES`` of the device
    type, at least ``CHUNK_MIN_ROWS`` of it (devices other than CPU take CUDA's; see above)."""
    kind = torch.device(device).type
    kind = kind if kind in CHUNK_BUDGET_BYTES else "cuda"
    return _rows_for(CHUNK_BUDGET_BYTES[kind], vocab_size, CHUNK_MIN_ROWS[kind])


def slice_size(vocab_size: int, chunk_size: int, device: torch.device | str = "cpu") -> int:
    """Rows the objective sees at once inside a chunk (≤ ``chunk_size``); see the budgets above."""
    if torch.device(device).type != "cpu":
        return chunk_size
    budget = min(CPU_SLICE_BYTES_PER_THREAD * torch.get_num_threads(), CPU_SLICE_MAX_BYTES)
    return min(chunk_size, _rows_for(budget, vocab_size))


def row_chunks(n: int, size: int) -> list[slice]:
    """``[0, n)`` cut into consecutive slices of ``size`` rows.

    N = 0 still gives one empty slice, so the objective reports its metric names and the loss
    keeps its autograd connection to the inputs (a finite, zero gradient).
    """
    return [slice(start, min(start + size, n)) for start in range(0, n, size)] or [slice(0, 0)]
