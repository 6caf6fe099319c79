"""glibc ``malloc`` settings for a training process on CPU.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves every block above its mmap threshold
(128 KiB at start, raised on each free up to 32 MiB) with a fresh ``mmap`` whose pages fault in, zeroed,
at first touch, and returns it to the system when the tensor is freed; it also trims the heap's free
top. The engine's ``[rows, V]`` temporaries are exactly such blocks, allocated and freed several
times per slice, so a CPU run spends much of its time in the kernel: a 20-step ``kdtool distill`` of
``benchmarks/bench_peers.py`` took 2.0 million minor page faults and 4.6 s of system time out of 20 s
of CPU. With a fixed 1 GiB mmap threshold and trim threshold, and one arena (the intra-op threads'
temporaries are reused from the same free lists), freed blocks are reused from the heap: 0.2 million
faults, 0.8 s of system time, and the whole run 8% faster (median of 5 alternated pairs with and
without, 0.71–0.98×; CPU time 0.91×). Its peak RSS moved within the noise (846 vs 812 MiB medians,
787–920 both); the memory a run frees is kept for its next step rather than returned to the system.

``tune_for_training`` does this for CPU runs only, through ``mallopt``, and says what it did;
``KDTOOL_CPU_ALLOCATOR=system`` leaves glibc's defaults alone. Elsewhere (macOS, musl, CUDA runs) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "KDTOOL_CPU_ALLOCATOR"
# mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
THRESHOLD_BYTES = 2**30
SETTINGS = {"mmap_threshold": (M_MMAP_THRESHOLD, THRESHOLD_BYTES), "trim_threshold": (M_TRIM_THRESHOLD, THRESHOLD_BYTES),
            "arena_max": (M_ARENA_MAX, 1)}  # fmt: skip

_applied: dict[str, int] | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # musl and others have no gnu_get_libc_version and no glibc mallopt parameters
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def tune_for_training(device_type: str) -> dict[str, int]:
    """Set glibc's malloc for a CPU training run (see the module docstring); once per process.

    Returns the settings applied (``{}`` when none: not CPU, not glibc, or ``KDTOOL_CPU_ALLOCATOR=system``).
    """
    global _applied
    if device_type != "cpu" or os.environ.get(ENV, "").lower() == "system":
        return {}
    if _applied is not None:
        return dict(_applied)
    libc = _glibc()
    applied: dict[str, int] = {}
    if libc is not None:
        for name, (param, value) in SETTINGS.items():
            if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:  # 1 = accepted
                applied[name] = value
    _applied = applied
    return dict(applied)
