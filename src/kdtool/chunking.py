"""How many rows of ``[rows, V]`` logits exist at once in the token-loss engine.

``default_chunk_size`` gives the rows whose student logits go through the output-layer matmuls
together; ``slice_size`` the rows the objective sees at once inside a chunk; ``row_chunks`` cuts N
rows into such pieces. The rules and the measurements behind them are in the comment below.
"""

from __future__ import annotations

from kdtool.lazy import torch

# Two sizes (bytes of one fp32 [rows, V] block):
# * The *chunk* (``default_chunk_size``): the rows whose student logits exist at once and go through
#   the output-layer matmuls together (forward, and the contractions into d hidden and d weight, which
#   re-read the [V, H] weight and gradient once per chunk).
#   - CPU: rows = clamp(4 · H, 64, 8192), at most a 1 GiB block (but ≥ 64 rows), H the student's hidden
#     size. From benchmarks/chunk_cpu.md, chunk_cpu_h32.md and chunk_cpu_h32_rechecks.md
#     (``python benchmarks/bench_chunk.py``: one fkl step of the output layers with a lazy teacher, glibc
#     set as in a run (kdtool.allocator, tcache off); peaks from 2 fresh processes per chunk size, step
#     times from one process stepping every size in turn, since the same step took 0.113–0.174 s in
#     different processes on the 2-core CPU): at H = 256 the 1,024-row default was the fastest chunk
#     at V = 32k and 152k and 1.01× at 16k (128–2,048 rows). At H = 32 its 128 rows were 1.07×, 1.05×
#     and 1.09× the fastest at 16k, 32k and 152k (medians of the sweep and four re-checks, each paired;
#     256 rows: 1.00–1.03×), at 0.3–0.8× the fastest's peak. 256 rows at H = 32 would be ~5% faster but
#     raised a whole 20-step run's peak at V = 16k by 41 MiB (576 vs 535 MiB, medians of 10; the same
#     wall time), which the whole-run memory target (benchmarks/peers_cpu.md) cannot spare: 4 · H it
#     stays. The wider the hidden state, the more rows a chunk needs to amortise the per-chunk [V, H]
#     traffic, hence rows ∝ H. The 1 GiB cap binds only past the measured range (152k: H > 441) and
#     bounds a wide student's blocks; an earlier 256 MiB cap made 152k, H = 256 take 432-row chunks,
#     1.15–1.24× the fastest.
#   - CUDA: 512 MiB (~880 rows at V = 152k), at least 128 rows: matmuls must amortise re-reading the
#     [V, H] weight three times per chunk (≳ 1k rows at H ≈ 1k on an H100). Reasoned, not measured
#     here (no GPU was lent; ``bench_chunk.py --device cuda`` measures it).
# * The *slice*: the rows the objective (and a lazy teacher's output layer) sees at once inside a chunk,
#   i.e. its few temporaries of [rows, V] (log-softmaxes, products, the logit gradient). On CPU: 8 MiB
#   (at least 32 rows), and at least H_teacher / 4 rows, since each slice re-reads the teacher's
#   [V, H_t] weight. From the slice sweeps (benchmarks/slice_cpu*.md, ``bench_chunk.py --slice-mib``):
#   H_t = 512: 8 MiB fastest or within 1% at V = 16k and 32k; H_t = 64: 4–8 MiB equal, 2 MiB 1.28×
#   slower; H_t = 1,024 at 16k: 256 rows (16 MiB) fastest, 128 rows 1.07×; H_t = 512 at 152k: 128 rows
#   (74 MiB) 1.28× faster than 32 rows, at 1.9× the peak. On CUDA one slice = one chunk.
CHUNK_BUDGET_BYTES = {"cpu": 2**30, "cuda": 512 * 2**20}
CHUNK_MIN_ROWS = {"cpu": 64, "cuda": 128}
CPU_ROWS_PER_HIDDEN = 4
CPU_SLICE_BYTES = 8 * 2**20
CPU_SLICE_MIN_ROWS = 32
CPU_SLICE_TEACHER_HIDDEN_PER_ROW = 4
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 8192


def rows_for(budget: int, vocab_size: int, floor: int = MIN_CHUNK_ROWS) -> int:
    """clamp(budget / (4 V), floor, MAX_CHUNK_ROWS), rounded down to a multiple of 16 rows."""
    rows = budget // (4 * max(vocab_size, 1))
    return int(min(MAX_CHUNK_ROWS, max(floor, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)))


def default_chunk_size(
    vocab_size: int, device: torch.device | str = "cpu", hidden_size: int | None = None
) -> int:
    """Rows per chunk (see above). CPU: ``CPU_ROWS_PER_HIDDEN`` × the student's hidden size (the
    budget's rows when it is unknown), within one ``CHUNK_BUDGET_BYTES`` fp32 block and at least
    ``CHUNK_MIN_ROWS``; CUDA (and other accelerators): the budget's rows, at least its floor."""
    kind = torch.device(device).type
    kind = kind if kind in CHUNK_BUDGET_BYTES else "cuda"
    floor = CHUNK_MIN_ROWS[kind]
    budget_rows = rows_for(CHUNK_BUDGET_BYTES[kind], vocab_size, floor)
    if kind != "cpu" or not hidden_size:
        return budget_rows
    rows = min(
        CPU_ROWS_PER_HIDDEN * hidden_size, budget_rows
    )  # budget_rows: ≤ MAX_CHUNK_ROWS, a multiple of 16
    return max(floor, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)


def slice_size(
    vocab_size: int, chunk_size: int, device: torch.device | str = "cpu", teacher_hidden: int = 0
) -> int:
    """Rows the objective sees at once inside a chunk (≤ ``chunk_size``); see the budgets above.

    ``teacher_hidden``: the hidden size of a lazy teacher, whose output layer runs once per slice
    (0 for a dense, sparse or absent one): on CPU a slice has at least a quarter of it in rows.
    """
    if torch.device(device).type != "cpu":
        return chunk_size
    by_bytes = rows_for(CPU_SLICE_BYTES, vocab_size, CPU_SLICE_MIN_ROWS)
    return min(chunk_size, max(by_bytes, teacher_hidden // CPU_SLICE_TEACHER_HIDDEN_PER_ROW))


def row_chunks(n: int, size: int) -> list[slice]:
    """``[0, n)`` cut into consecutive slices of ``size`` rows.

    N = 0 still gives one empty slice, so the objective reports its metric names and the loss
    keeps its autograd connection to the inputs (a finite, zero gradient).
    """
    return [slice(start, min(start + size, n)) for start in range(0, n, size)] or [slice(0, 0)]
