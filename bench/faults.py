"""Crash points for the kill -9 tests: `TTT_BENCH_CRASH_AT=<point>:<n>` kills this process with
SIGKILL the n-th time it reaches <point> (n defaults to 1). Unset, `crash_point` does nothing.

Points: `step` (after an optimizer step), `checkpoint` (half-way through writing a checkpoint's
bytes), `summary` (after a run's summary.json), `report` (half-way through writing summary.csv).
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "TTT_BENCH_CRASH_AT"
POINTS = ("step", "checkpoint", "summary", "report")
_reached: Counter = Counter()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    point, _, n = spec.partition(":")
    if point not in POINTS or (n and not n.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected <point>[:<n>] with point one of {', '.join(POINTS)}")
    return point, int(n or 1)


def crash_point(point: str) -> None:
    """SIGKILL this process when `point` is reached for the n-th time named by TTT_BENCH_CRASH_AT."""
    target = _target()
    if target is None or target[0] != point:
        return
    _reached[point] += 1
    if _reached[point] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
