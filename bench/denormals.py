"""Subnormal floats on the CPU: flushed to zero, as GPUs' fast paths do, so no step slows down 10x.

x86 CPUs compute with subnormal operands (|x| < 1.2e-38 in fp32) in microcode, 10-100x slower than
with normal ones. Training makes them: attention probabilities over a 32k context once attention
sharpens, their gradients, Adam's second moments of tiny gradients (a 32k Transformer run whose steps
went from 6 s to 18-80 s: docs/cpu.md "Subnormal floats").

`flush_denormals()` sets the CPU's flush-to-zero and denormals-are-zero modes (torch.set_flush_denormal)
in the calling thread. Threads inherit the mode when they are created, so it must run before PyTorch
starts its OpenMP workers (the first parallel op): the entry points that train or time
(`bench.run`, `make throughput`) call it first thing. The change to the numbers is below 1.2e-38 per
value. `denormal_policy()` checks every worker (a parallel product of subnormals must come out all zero;
PyTorch's own threads for elementwise ops and the BLAS library's for a matmul, two pools) and is what
a run's summary records: flush, partial (some workers were started before), keep
(TTT_BENCH_DENORMALS=keep, or a CPU without the modes).
"""
from __future__ import annotations

import os

SUBNORMAL = 1e-39  # fp32 subnormal (the smallest normal fp32 is 1.18e-38)
PROBE_NUMEL = 1 << 22  # large enough that PyTorch splits the product over every OpenMP thread
PROBE_N = 512  # a matmul this size is split over the BLAS library's threads (a pool of their own)

_requested = False


def flush_denormals() -> bool:
    """Flush subnormals to zero from now on in this thread and the threads it starts (module docstring);
    False where the CPU lacks the modes or TTT_BENCH_DENORMALS=keep."""
    global _requested
    import torch

    if os.environ.get("TTT_BENCH_DENORMALS") == "keep":
        return False
    _requested = bool(torch.set_flush_denormal(True))
    return _requested


def denormal_policy() -> str:
    """flush (every OpenMP worker flushes), partial (some do not), or keep (none asked)."""
    if not _requested:
        return "keep"
    import torch

    product = torch.full((PROBE_NUMEL,), SUBNORMAL) * 0.5  # (PROBE_NUMEL,): PyTorch's own threads
    entry = (SUBNORMAL / PROBE_N) ** 0.5  # normal; every product and partial sum of the matmul is subnormal
    a = torch.full((PROBE_N, PROBE_N), entry)
    matmul = a @ a  # (PROBE_N, PROBE_N): the BLAS threads; each entry 1e-39 unless flushed
    flushed = int(product.count_nonzero()) == 0 and int(matmul.count_nonzero()) == 0
    return "flush" if flushed else "partial"
