"""The C heap on Linux: large tensors recycled instead of mapped afresh for every op.

glibc's malloc serves every block over its mmap threshold (at most 32 MB) with a fresh mmap and hands
it back with munmap when freed. At long contexts most tensors are that large (one 32k x 388 fp32
activation is 50 MB; TTT-Linear's weight stack is 600 MB per layer), so each op of a training step
gets new pages from the kernel and faults them in, zero-filled, one 4 KB page at a time (what it costs:
docs/cpu.md "Long contexts on a CPU: the heap").

`configure_heap()` (called by the entry points that train or time: `bench.run`, the Hydra app every sweep
runs, and `make throughput`) turns glibc's mmap off (M_MMAP_MAX 0), so large blocks
come from the heap and are reused, and keeps up to 2 GB of freed memory at the heap's top instead of
returning it (M_TRIM_THRESHOLD, M_TOP_PAD 256 MB). The process then holds its peak memory, as PyTorch's
CUDA caching allocator does; `malloc_trim(0)` still returns what is free (bench/latency.py does so
before it measures memory). A user's own MALLOC_* environment variables (or glibc.malloc tunables) win;
other C libraries and other systems are left as they are. TTT_BENCH_HEAP=default turns it off. It is not
set on `import bench`: a process that forks often (the test suite) pays for the memory it keeps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc malloc.h
TRIM_THRESHOLD = 2**31 - 1  # bytes of free memory kept at the heap's top (mallopt takes an int)
TOP_PAD = 256 * 2**20  # bytes the heap grows by beyond each request

_policy = "default"


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def configure_heap() -> str:
    """Recycle large blocks (module docstring); returns the policy now in force."""
    global _policy
    user = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if os.environ.get("TTT_BENCH_HEAP") == "default":
        return _policy
    if user:
        _policy = "user " + ",".join(user)
        return _policy
    libc = _glibc()
    if libc is None:
        return _policy
    ok = all(libc.mallopt(opt, val) == 1 for opt, val in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    _policy = "recycle" if ok else "default"
    return _policy


def heap_policy() -> str:
    """What a run's summary records: recycle (configure_heap), default, or the user's MALLOC_* settings."""
    return _policy
