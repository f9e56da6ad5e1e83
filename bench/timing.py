"""Wall-clock timing shared by the benchmarks: medians of repeats after warm-up.

CPU: time.perf_counter around each call. CUDA: CUDA events around each call, synchronised.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


def time_call(fn, repeats: int, warmup: bool = True) -> float:
    """Median seconds of `repeats` calls of fn() (after one untimed call when `warmup`)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per call
    repeats: int
    spread: float  # (max - min) / median over the repeats


def _adaptive_repeats(first: float, cuda: bool) -> int:
    """More repeats for short calls, one for calls of seconds: a sweep must stay bounded."""
    if cuda:
        return 10 if first < 0.5 else 3 if first < 5.0 else 1
    return 5 if first < 0.2 else 3 if first < 1.0 else 2 if first < 5.0 else 1


def measure(fn, device, repeats: int | None = None, warmup: bool = True) -> Timing:
    """Seconds per call of fn() on `device` (a torch.device): an untimed warm-up call (two more on CUDA
    when calls are short), then timed repeats (None: adaptive to the warm-up call's length)."""
    import torch

    cuda = device.type == "cuda"
    first = 0.0
    if warmup:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        if cuda and first < 0.1:
            fn()
            fn()
    times: list[float] = []

    def once():
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)

    once()
    n = repeats or _adaptive_repeats(max(first, times[0]), cuda)
    while len(times) < n:
        once()
    med = statistics.median(times)
    return Timing(med, len(times), (max(times) - min(times)) / med if med > 0 else 0.0)
