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

**The per-thread cache (tcache).** With the heap reused, its high-water mark was still far above the
live set: the same run's RSS grew by ~230 MiB in its first step while ~50 MiB of temporaries were alive
(``mallinfo2``: 180 MiB free inside the heap). PyTorch allocates with ``posix_memalign(64)``: glibc
carves the aligned block out of a slightly larger chunk and frees the small pieces before and after it.
Those pieces go to the thread's tcache, which never coalesces; the small allocations that take them
back (a loss part, a metric) then sit between the large free blocks, which can no longer merge into a
block the next ``[rows, V]`` request fits, so the heap grows instead. Without a tcache the pieces go to
the fastbins, which glibc consolidates before any large request. The tcache can only be switched off
before the process starts (``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``; ``mallopt`` has no
parameter for it), so the ``kdtool`` console script re-executes itself once with it set before
anything heavy is imported (``exec_args``, for the commands that load models): the benchmark run's
peak RSS 632 → 505 MiB, wall 0.99× (medians of 5 alternated pairs). Embedding programs can set the
variable themselves; ``KDTOOL_CPU_ALLOCATOR=system`` turns this off too.

**The fastbins (``mxfast`` 0).** Without the tcache, the same run's peak was still bimodal across
processes of one command: ≈ 505 or ≈ 565-620 MiB, in about a third of them the high one. A log of every
``posix_memalign`` of 256 KiB or more and its ``free`` showed the same sequence of sizes in a low and a
high process; in the high one the held-out evaluation's 8 MiB ``[128, V]`` blocks moved up the heap slice
after slice, 8 MiB + 64 bytes at a time (a small chunk left in front of each freed block), while in the
low one they cycled among six addresses. Freed chunks of up to 128 bytes wait in glibc's fastbins,
unmerged, until a large request consolidates them; which process ends up creeping was not pinned down.
With the fastbins off (``mallopt(M_MXFAST, 0)``) a freed small chunk merges with its neighbours at once:
14 runs of the benchmark's command peaked at 505-522 MiB (12 runs before: 496-580, four of them high),
wall time unchanged (6 alternated pairs), and at a 256-wide student 888-895 against 906-942 MiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Mapping

ENV = "KDTOOL_CPU_ALLOCATOR"
# mallopt(3) parameter numbers (malloc.h)
M_MXFAST, M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = 1, -1, -3, -8
THRESHOLD_BYTES = 2**30
SETTINGS = {"mmap_threshold": (M_MMAP_THRESHOLD, THRESHOLD_BYTES), "trim_threshold": (M_TRIM_THRESHOLD, THRESHOLD_BYTES),
            "arena_max": (M_ARENA_MAX, 1), "mxfast": (M_MXFAST, 0)}  # fmt: skip

_applied: dict[str, int] | None = None

TUNABLES = "GLIBC_TUNABLES"
TCACHE_OFF = "glibc.malloc.tcache_count=0"
# The commands that load models (the others only print: no need to pay a second start-up).
MODEL_COMMANDS = frozenset({"distill", "eval", "compare", "generate", "demo", "cache-logits"})


def is_glibc() -> bool:
    """Whether this process runs on glibc (Linux; not musl): the settings here are glibc's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # musl and others do not know the name
        return False


def tcache_off(env: Mapping[str, str]) -> bool:
    """Whether ``env`` switches glibc's tcache off (the last ``tcache_count`` setting wins)."""
    settings = [t for t in env.get(TUNABLES, "").split(":") if "tcache_count=" in t]
    return bool(settings) and settings[-1] == TCACHE_OFF


def exec_args(
    orig_argv: list[str], executable: str, env: Mapping[str, str]
) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment to re-execute this process with glibc's tcache off, or
    ``None`` when it should run as it is: not glibc, ``KDTOOL_CPU_ALLOCATOR=system``, a tcache
    setting already in ``GLIBC_TUNABLES`` (the user's, or ours after the re-execution), no command
    that loads models, or a ``--help``. Other tunables the user set are kept."""
    if not executable or env.get(ENV, "").lower() == "system" or not is_glibc():
        return None
    if "tcache_count=" in env.get(TUNABLES, ""):
        return None
    words = [a for a in orig_argv[1:] if not a.startswith("-")]
    if "--help" in orig_argv or "-h" in orig_argv or not MODEL_COMMANDS.intersection(words):
        return None
    return [executable, *orig_argv[1:]], environ_without_tcache(env)


def environ_without_tcache(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``GLIBC_TUNABLES`` switching the tcache off (after the user's own tunables):
    for a process started from here that should allocate as ``kdtool distill`` does."""
    current = env.get(TUNABLES, "")
    return {**env, TUNABLES: f"{current}:{TCACHE_OFF}" if current else TCACHE_OFF}


def reexec_without_tcache() -> None:
    """Replace this process by itself with glibc's tcache off when ``exec_args`` says so (same pid,
    arguments, environment otherwise): the ``kdtool`` console script's first act. If the interpreter
    cannot be executed again, this process goes on as it is (glibc's defaults for the tcache)."""
    args = exec_args(sys.orig_argv, sys.executable, os.environ)
    if args is not None:
        argv, env = args
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.execve(argv[0], argv, env)


def _glibc() -> ctypes.CDLL | None:
    """The process's own symbols (``mallopt`` among them) on glibc, else ``None``."""
    if not is_glibc():
        return None
    try:
        return ctypes.CDLL(None)  # the libc this process already runs on: nothing to search for
    except OSError:
        return None


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
    if libc is not None and tcache_off(os.environ):
        applied["tcache_count"] = 0  # set at start-up (the console script, or the user)
    _applied = applied
    return dict(applied)
