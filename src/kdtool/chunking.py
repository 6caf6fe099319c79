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
#     size. From benchmarks/chunk_cpu.md and chunk_cpu_h32.md (``python benchmarks/bench_chunk.py``: one
#     fkl step of the output layers with a lazy teacher, glibc set as in a run (kdtool.allocator, tcache
#     off), 32–1,024-row chunks, 2 fresh processes each, the 2-core CPU, ±10–15% noise per row): at
#     H = 256 the 1,024-row chunk was the fastest at V = 16k, 32k and 152k; at H = 32 128 rows were the
#     fastest at 16k (two sweeps), 1.02× / 1.10× the fastest (256 rows) at 152k and 1.14× / 1.19× at 32k
#     (256–512 rows fastest), while the peak grows with the chunk (152k, H = 32: 267 MiB at 128 rows, 774
#     at 1,024). The wider the hidden state, the more rows a chunk needs to amortise the per-chunk [V, H]
#     traffic, hence rows ∝ H. The 1 GiB cap binds only past the measured range (152k: H > 441) and bounds
#     a wide student's blocks; an earlier 256 MiB cap made 152k, H = 256 take 432-row chunks, 1.15–1.24×
#     the fastest.
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
