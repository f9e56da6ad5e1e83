"""Wall-clock timing shared by the benchmarks: medians of repeats after a warm-up that settles.

CPU: time.perf_counter around each call. CUDA: CUDA events around each call, synchronised.
`measure` warms up until two consecutive calls agree within 10%, times repeats, reports median and
spread, re-measures a point whose spread is over 25% and flags it `noisy` if the new spread is over
50%. Given a window (`window_s`, for calls that can be repeated without bound: a prefill, a training
step, a decode step whose positions cycle), short calls also warm up for half of it and are timed over all
of it: on a shared 2-core machine the first calls of a process ran 8.5-10 ms for a third of a second and
7 ms after (Mamba prefill at cpu-xs, 1k), and five 8 ms repeats had taken the median from that moment alone.
`warm_up` and `measure_in_rounds` time several such calls together, in interleaved rounds, so that they
share the machine's moments (`make throughput` on CPU).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
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


def time_forward_and_backward(call, leaves, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Median seconds (time_call) of call() without autograd, and of call() and the backward of the summed mean
    squares of its outputs (one tensor or a tuple of them), the leaves' gradients cleared before each."""
    import torch

    def forward():
        with torch.no_grad():
            call()

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = call()
        sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()

    return time_call(forward, repeats, warmup), time_call(forward_backward, repeats, warmup)


@dataclass(frozen=True)
class Timing:
    median: float       # seconds per call
    repeats: int
    spread: float       # relative spread of the repeats: (max - min) / median, or (p90 - p10) / median
                        #   from 10 repeats on (decode: a TTT step that updates W is a few of 48)
    warmup_calls: int = 0
    settled: bool = True  # warm-up ended with two consecutive calls within SETTLE_TOL of each other
    noisy: bool = False   # the re-measurement's spread was still over NOISY_SPREAD


SETTLE_TOL = 0.10        # warm-up: until two consecutive calls agree within 10%
MAX_WARMUP_CALLS = 6     # ... or this many calls (counted once half the window, if any, is spent)
MAX_WARMUP_S = 30.0      # ... or this much warm-up time has passed (then settled=False)
REMEASURE_SPREAD = 0.25  # a point whose spread exceeds 25% is measured again, from scratch (a slow phase of
                         # the machine: Mamba's decode at cpu-xs 8k once took 1.85 ms a step, spread 38%; 0.8 ms
                         # in three other runs)
NOISY_SPREAD = 0.5       # ... and flagged noisy if the re-measurement's spread is still over 50%
STEADY_WINDOW_S = 0.5    # the window of a prefill, decode or training point (bench/throughput.py, bench/latency.py)
MAX_REPEATS = 60         # timed calls in a window at most


def _adaptive_repeats(first: float, cuda: bool, window_s: float = 0.0, max_repeats: int = MAX_REPEATS) -> int:
    """More repeats for short calls, one for calls of seconds: a sweep must stay bounded. With a window,
    enough calls to fill it (at most max_repeats)."""
    if cuda:
        n = 10 if first < 0.5 else 3 if first < 5.0 else 1
    else:
        n = 5 if first < 0.2 else 3 if first < 1.0 else 2 if first < 5.0 else 1
    return max(n, min(max_repeats, math.ceil(window_s / max(first, 1e-9)))) if window_s else n


def relative_spread(times: list[float]) -> float:
    med = statistics.median(times)
    if med <= 0 or len(times) < 2:
        return 0.0
    if len(times) >= 10:
        deciles = statistics.quantiles(times, n=10)
        return (deciles[-1] - deciles[0]) / med
    return (max(times) - min(times)) / med


def _timer(fn, cuda: bool):
    """One call of fn(), timed: CUDA events around it (synchronised), else time.perf_counter."""
    import torch

    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def settle(fn, cuda: bool, max_calls: int = MAX_WARMUP_CALLS, min_s: float = 0.0) -> tuple[int, bool, float]:
    """Warm-up: call fn() until two consecutive calls agree within SETTLE_TOL (compilation, allocator
    growth, caches and frequency settle) and the calls have taken min_s seconds, at most MAX_WARMUP_CALLS
    calls (once min_s is spent) or MAX_WARMUP_S seconds. Returns (calls, settled, the last call's seconds)."""
    t0 = time.perf_counter()
    prev = _timer(fn, cuda)
    calls, spent, agreed = 1, prev, False
    while True:
        if spent >= min_s and (agreed or calls >= max_calls):
            return calls, agreed or max_calls == 1, prev
        if time.perf_counter() - t0 >= MAX_WARMUP_S:
            return calls, False, prev
        cur = _timer(fn, cuda)
        calls, spent = calls + 1, spent + cur
        agreed = abs(cur - prev) <= SETTLE_TOL * min(cur, prev)
        prev = cur


def measure(fn, device, repeats: int | None = None, warmup: bool = True,
            max_warmup_calls: int = MAX_WARMUP_CALLS, window_s: float = 0.0,
            min_repeats: int = 1, max_repeats: int = MAX_REPEATS) -> Timing:
    """Seconds per call of fn() on `device` (a torch.device): warm-up until settled (see `settle`), then
    timed repeats (None: adaptive to the warm-up's last call), median and spread; a spread over
    REMEASURE_SPREAD is measured once more, and if that is over NOISY_SPREAD the Timing says noisy.
    max_warmup_calls=1: one untimed call (a cheap probe, e.g. the prefill/decode speed `make sweep` adds to
    each summary). window_s: for calls that can be repeated without bound (a prefill, a training step, a decode
    step whose positions cycle: bench/latency._rewinding), at least window_s / 2 of warm-up and
    window_s of timed calls (module docstring), between min_repeats and max_repeats of them (a decode point:
    bench/latency.py)."""
    cuda = device.type == "cuda"
    calls, settled, last = settle(fn, cuda, max_warmup_calls, window_s / 2) if warmup else (0, True, 0.0)
    times = [_timer(fn, cuda)]
    n = repeats or max(min_repeats, _adaptive_repeats(max(last, times[0]), cuda, window_s, max_repeats))

    def take(times):
        while len(times) < n:
            times.append(_timer(fn, cuda))
        return times

    times = take(times)
    noisy = False
    if relative_spread(times) > REMEASURE_SPREAD and len(times) > 1:
        times = take([])  # once more, from scratch
        noisy = relative_spread(times) > NOISY_SPREAD
    return Timing(statistics.median(times), len(times), relative_spread(times), calls, settled, noisy)


@dataclass(frozen=True)
class Pending:
    """A call warmed up (warm_up) and waiting to be timed together with others (measure_in_rounds)."""
    fn: Callable[[], object]
    repeats: int          # timed calls in all, as measure would take them after this warm-up
    warmup_calls: int
    settled: bool
    last_s: float         # the warm-up's last call: the seconds a call is expected to take
    context: Callable[[], AbstractContextManager] = nullcontext  # entered around its calls, outside their timing


def warm_up(fn, device, window_s: float = STEADY_WINDOW_S, max_warmup_calls: int = MAX_WARMUP_CALLS,
            min_repeats: int = 1, max_repeats: int = MAX_REPEATS, context=nullcontext) -> Pending:
    """measure's warm-up (settle) and its count of repeats (adaptive to the last warm-up call, filling window_s),
    for measure_in_rounds to time later."""
    cuda = device.type == "cuda"
    with context():
        calls, settled, last = settle(fn, cuda, max_warmup_calls, window_s / 2)
    n = max(min_repeats, _adaptive_repeats(last, cuda, window_s, max_repeats))
    return Pending(fn, n, calls, settled, last, context)


def measure_in_rounds(pending: list[Pending], device, rounds: int) -> list[Timing]:
    """Seconds per call of each warmed-up call, timed together in `rounds` interleaved rounds: each round runs every
    call in turn for its share of its repeats (a call of fewer repeats than rounds sits out some, evenly spread), so
    that every call is timed across the same stretch of the machine's time. On a shared 2-core machine whose speed
    swings up to 2x over seconds, a point timed in its own 0.5 s took the speed of its moment: the same decode step
    measured 1.43-1.93 ms back to back, and one length of a recurrent model's curve stood 1.9x above its others
    (README, issue 17). As in measure, a spread over REMEASURE_SPREAD is measured again, from scratch: here every
    call, in rounds again, so that all still share their moments (re-measuring only the spread ones had them take
    a slower minute than the rest: Mamba's prefill at 1k-8k 1.7x its 16k-32k on an unsteady machine), and a call
    whose new spread is over NOISY_SPREAD is flagged noisy. The calls must leave each other's state intact (a
    decode step's own cache)."""
    cuda = device.type == "cuda"

    def take() -> list[list[float]]:  # every call's times, in `rounds` rounds
        times = [[] for _ in pending]
        for r in range(rounds):
            for p, ts in zip(pending, times):
                share = (r + 1) * p.repeats // rounds - r * p.repeats // rounds
                if share:
                    with p.context():
                        ts.extend(_timer(p.fn, cuda) for _ in range(share))
        return times

    times, noisy = take(), [False] * len(pending)
    if any(len(ts) > 1 and relative_spread(ts) > REMEASURE_SPREAD for ts in times):
        times = take()
        noisy = [relative_spread(ts) > NOISY_SPREAD for ts in times]
    return [Timing(statistics.median(ts), len(ts), relative_spread(ts), p.warmup_calls, p.settled, flagged)
            for p, ts, flagged in zip(pending, times, noisy)]
