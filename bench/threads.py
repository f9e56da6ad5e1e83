"""CPU threads on a shared machine: OpenMP waiting that cannot collapse, and a thread count fitted
to the cores other processes leave free.

PyTorch runs its CPU ops in OpenMP parallel regions, and libgomp's threads spin-wait for the next
region (hundreds of thousands of iterations by default). With more runnable threads than cores (any
other busy process beside ours) a spinning thread holds the core its partner needs, and the thousands
of small ops of TTT's and Mamba's loops slow down 6-35x. Passive waiting (OMP_WAIT_POLICY=PASSIVE)
cures that but puts every region through a sleep and a wake-up, slower on an idle machine (measured:
docs/cpu.md "A shared CPU: threads"; `make contention` measures it again).

Hence two things, both on by default:
1. `configure_openmp()` bounds the spin (GOMP_SPINCOUNT=20000: the idle speed of the default) before
   torch is imported; `import bench` calls it. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
2. `ThreadGovernor` measures, between training steps, how many cores other processes keep busy and
   sets torch's thread count to the free cores (at least 1, at most what was asked): with one thread
   there are no parallel regions, so nothing spins. It records what it saw for the run's summary
   and warns once when the machine is oversubscribed.
"""
from __future__ import annotations

import math
import os
import sys
import time

from bench.denormals import denormal_policy, flush_denormals
from bench.heap import configure_heap, heap_policy

SPIN_COUNT = "20000"  # libgomp spin iterations before a waiting thread sleeps (default ~300,000)
MIN_INTERVAL_S = 2.0  # the governor looks again at most this often: shorter windows are noise


def configure_openmp() -> None:
    """Bound OpenMP's spin-waiting before torch (and its libgomp) is loaded."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return  # the user's choice
    if "torch" in sys.modules:
        print("[ttt-bench] warning: torch was imported before bench; OpenMP spin-waiting is unbounded "
              f"(export GOMP_SPINCOUNT={SPIN_COUNT} to bound it)", file=sys.stderr)
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def configure_compute_process() -> None:
    """What a process that trains or times sets first, before PyTorch starts its worker threads (which
    inherit it): subnormals flushed to zero (bench/denormals.py) and large tensors recycled by the heap
    (bench/heap.py). Run summaries record both (ThreadGovernor.summary)."""
    flush_denormals()
    configure_heap()


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fit_threads(cores: int, others_busy: float, requested: int | None = None) -> int:
    """Threads for this process: the cores other processes leave free (others_busy cores, rounded to
    the nearest whole core), at least 1, at most `requested` (None: all cores)."""
    free = cores - int(math.floor(others_busy + 0.5))
    return max(1, min(free, requested or cores))


def _own_cpu_seconds() -> float:
    """CPU seconds used by this process and every process it started: the live ones (torch.compile's
    compile workers and their compilers, data workers) and the finished ones it has reaped. Work done
    on our behalf is not another process's load."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # exited since it was listed
            continue
        total += c.user + c.system
    return total


def _sample() -> tuple[float, float, float]:
    """(wall seconds, CPU seconds the whole machine has been busy, CPU seconds this process and its
    descendants have used)."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return time.perf_counter(), busy, _own_cpu_seconds()


def _others_busy(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Cores other processes kept busy between two samples: the machine's busy time less ours (this
    process and its descendants), per second."""
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / max(b[0] - a[0], 1e-9))


def omp_wait() -> str:
    """How OpenMP threads wait in this process: the policy, or the spin count."""
    return os.environ.get("OMP_WAIT_POLICY") or f"spin {os.environ.get('GOMP_SPINCOUNT', 'default')}"


class ThreadGovernor:
    """Keeps torch's CPU thread count at the free cores while a run trains and evaluates.

    requested: trainer.threads (None: every core). enabled=False pins the thread count to
    `requested` (or torch's default) and only records the load."""

    def __init__(self, requested: int | None = None, enabled: bool = True, verbose: bool = True):
        import torch

        self.torch = torch
        self.cores = cpu_cores()
        self.requested = int(requested) if requested else None
        self.enabled, self.verbose = enabled, verbose
        if self.requested:
            torch.set_num_threads(self.requested)
        self.others_max = 0.0
        self.threads_min = torch.get_num_threads()
        self.warned = False
        # a short idle sample before work starts: this process is (nearly) idle, so what is busy is others'
        self._last = _sample()
        time.sleep(0.5)
        self.update(force=True)
        self.threads_start = torch.get_num_threads()
        self.loadavg_start = _loadavg()

    def others_busy(self) -> float:
        """Cores other processes kept busy since the last look."""
        last, self._last = self._last, _sample()
        return _others_busy(last, self._last)

    def update(self, force: bool = False) -> int:
        """Look at the machine (at most every MIN_INTERVAL_S unless forced); set and return the threads."""
        torch = self.torch
        if not force and time.perf_counter() - self._last[0] < MIN_INTERVAL_S:
            return torch.get_num_threads()
        others = self.others_busy()
        self.others_max = max(self.others_max, others)
        if self.enabled:
            threads = fit_threads(self.cores, others, self.requested)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        threads = torch.get_num_threads()
        self.threads_min = min(self.threads_min, threads)
        if others + (self.requested or self.cores) > self.cores + 0.5 and not self.warned:
            self._warn(others, threads)
        return threads

    def _warn(self, others: float, threads: int) -> None:
        self.warned = True
        if self.verbose:
            what = (f"running on {threads} thread(s); timings are slower than on an idle machine" if self.enabled
                    else f"the thread governor is off: {threads} threads contend with them")
            print(f"\n[ttt-bench] warning: the machine is oversubscribed: other processes keep {others:.1f} of "
                  f"{self.cores} cores busy; {what}", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        """What the run's summary records about threads and load."""
        return {"threads": self.threads_start, "threads_min": self.threads_min, "cpu_cores": self.cores,
                "cpu_busy_others_max": round(self.others_max, 2), "loadavg_1m_start": self.loadavg_start,
                "loadavg_1m_end": _loadavg(), "oversubscribed": self.warned,
                "omp_wait": omp_wait(), "heap": heap_policy(), "denormals": denormal_policy()}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
