"""`make contention`: a training step on an idle machine and beside a busy process, with this suite's
thread handling (bench/threads.py) and without it.

    python -m bench.contention --arch ttt_linear --size cpu-xs --ctx 2k [--busy-threads 1] [--steps 5]
                               [--no-governor] [--json]

Times `--steps` training steps (forward + backward, the compiled hot path as the cpu profile trains)
of one sequence of CTX tokens, first alone, then while another process runs a PyTorch matmul loop on
`--busy-threads` threads, and prints the medians and their ratio. With torch's defaults (run it as
`GOMP_SPINCOUNT=300000 python -m bench.contention --no-governor`) the busy steps collapse 20-35x on
2 cores; with the bounded spin and the governor they stay within about 2x of the idle ones.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

BUSY_LOOP = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(384, 384)
print("ready", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


# starts BUSY_LOOP in a new session and exits: the busy process is then not ours (no parent-child link),
# as another user's job would be; the thread governor counts our own descendants as our load
DETACH = """
import subprocess, sys
p = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                     stdout=sys.stdout)
print(p.pid, flush=True)
"""


class BusyProcess:
    """Another PyTorch process keeping cores busy, started detached; kill() ends it."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)

    def kill(self) -> None:
        import psutil

        try:
            self.proc.kill()
        except psutil.NoSuchProcess:
            pass

    def wait(self, timeout: float = 30.0) -> None:
        """Until it is gone or a zombie (not our child: its new parent reaps it)."""
        import psutil

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            try:
                if self.proc.status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)
        raise TimeoutError(f"busy process {self.proc.pid} still running {timeout:.0f} s after kill")


def start_busy_process(threads: int) -> BusyProcess:
    """Another PyTorch process, not a descendant of this one, keeping `threads` cores busy until killed."""
    launcher = subprocess.Popen([sys.executable, "-c", DETACH, BUSY_LOOP, str(threads)], stdout=subprocess.PIPE,
                                text=True)
    busy = BusyProcess(int(launcher.stdout.readline()))
    launcher.wait()  # the launcher exits at once; the busy process lives on, reparented
    launcher.stdout.readline()  # "ready" (the busy process writes to the same pipe): torch loaded, the loop starts
    time.sleep(1.0)
    return busy


def step_seconds(arch: str, size: str, ctx: int, steps: int, governed: bool, threads: int | None) -> float:
    """Median seconds of `steps` training steps after one untimed (compiling) step."""
    import torch
    import torch.nn.functional as F

    from bench.throughput import build
    from bench.timing import time_call
    from bench.threads import ThreadGovernor
    from bench.train import compile_for_training

    governor = ThreadGovernor(threads, enabled=governed, verbose=False)
    model, _ = build(arch, size, ctx, "flops", torch.device("cpu"))
    step_model = compile_for_training(model, "hot_path")
    model.train()
    idx = torch.randint(0, 257, (1, ctx + 1))

    def step():
        governor.update()
        logits = step_model(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    return time_call(step, repeats=steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="ttt_linear")
    p.add_argument("--size", default="cpu-xs")
    p.add_argument("--ctx", default="2k")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--busy-threads", type=int, default=1, help="threads of the busy process beside ours")
    p.add_argument("--threads", type=int, default=None, help="our threads at most (default: every free core)")
    p.add_argument("--no-governor", action="store_true", help="a fixed thread count, whatever the load")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = p.parse_args(argv)
    from bench.config import UsageError, group_options, parse_archs, parse_choice, parse_ctx
    from bench.threads import omp_wait

    try:  # bad input: one line, before anything is timed
        arch, ctx = parse_archs(args.arch), parse_ctx(args.ctx)
        if len(arch) != 1:
            raise UsageError(f"ARCH: one architecture at a time; got {args.arch!r}")
        parse_choice("SIZE", args.size, group_options("size"))
        if args.steps <= 0 or args.busy_threads <= 0 or (args.threads is not None and args.threads <= 0):
            raise UsageError(f"--steps, --busy-threads and --threads must be positive; got {args.steps}, "
                             f"{args.busy_threads}, {args.threads}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common = (args.arch, args.size, ctx, args.steps, not args.no_governor, args.threads)
    idle_s = step_seconds(*common)
    busy_proc = start_busy_process(args.busy_threads)
    try:
        busy_s = step_seconds(*common)
    finally:
        busy_proc.kill()
        busy_proc.wait()
    out = {"arch": args.arch, "size": args.size, "ctx": ctx, "governor": not args.no_governor,
           "omp_wait": omp_wait(),
           "busy_threads": args.busy_threads, "idle_step_s": idle_s, "busy_step_s": busy_s, "ratio": busy_s / idle_s}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"[ttt-bench] {args.arch} {args.size} ctx={ctx}, one training step (median of {args.steps}), "
              f"OpenMP {out['omp_wait']}, governor {'on' if out['governor'] else 'off'}: idle {idle_s:.3f} s, "
              f"beside a {args.busy_threads}-thread busy process {busy_s:.3f} s ({out['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
