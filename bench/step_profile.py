"""`make profile`: where one training step's time goes, op by op (torch.profiler), for each ARCH at SIZE and CTX.

    python -m bench.step_profile --arch ttt_linear,transformer --size cpu-xs --ctx 2k [--batch B] [--steps 3]
                                 [--compile none|hot_path|model] [--set KEY=VALUE] [--top 12] [--trace]
    make profile ARCH=ttt_linear,transformer SIZE=cpu-xs CTX=2k

The step is `make throughput`'s training point plus the optimizer: forward and backward of B sequences of CTX
tokens (B as `make sweep` trains at CTX unless --batch), then AdamW as the run builds it (bench/train.py), in bf16
autocast on CUDA. The model is `make throughput`'s (bench/throughput.build: the run's config at SIZE, widths
matched by parameters unless --match flops). Each architecture's step is timed without the profiler first
(bench/timing.measure: the median of a window of steps), then --steps steps are recorded and every op's time is
attributed:

  CPU    each op's self time (the time inside it minus the ops it called); they add up to the recorded steps
  CUDA   the device time of the kernels each op launched; kernels no op launched are `unattributed`

and grouped into kinds by the op's name (KINDS; an op called inside a TTT inner loop, an SSM scan, attention or
the optimizer counts as that: a TTT layer's products are its inner loop's time, not `matmul`'s). It prints, and
writes to RESULTS/profile/profile.md and profile.json, per architecture: the step's time and tokens/s, the time of
each kind per step, and the --top ops by time with their calls per step. --trace adds a Chrome trace per
architecture (RESULTS/profile/<arch>-<size>-<ctx>.trace.json: chrome://tracing or ui.perfetto.dev).

The profiler's own cost makes the recorded steps slower than the timed ones (on CPU a few % per 1000 ops a step),
so the kinds are shares of the recorded time, and the step time is the unprofiled one.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from architectures.sizing import MATCH_RULES
from bench.config import UsageError, compose, group_options, parse_archs, parse_choice, parse_ctx
from bench.results import atomic_write_json, atomic_write_text, device_name
from bench.threads import configure_compute_process
from bench.throughput import BYTE_VOCAB, LATENCY_MATCH, build, sweep_micro_batch, training_step
from bench.timing import STEADY_WINDOW_S, measure
from bench.train import COMPILE_MODES, autocast_for, compile_for_training, make_optimizer

# (kind, what the lower-case names of its ops contain), tried in order: the first match names an op's kind
KINDS = (
    ("TTT inner loop", ("linearscan", "mlpscan", "ttt_bench::linear_", "ttt_bench::mlp_")),
    ("SSM scan", ("selectivescan", "ssdscan", "chunkedscan", "ttt_bench::mamba_", "chunkscan", "chunk_scan",
                  "selective_scan", "ssd")),
    ("attention", ("attention", "flash", "fmha")),
    ("optimizer", ("optimizer.step", "adam")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "gemm")),
    ("norms and convs", ("norm", "conv")),
    ("copies and casts", ("copy", "aten::cat", "clone", "contiguous", "fill_", "zero_", "memcpy", "memset")),
)
OTHER = "elementwise and other"
# kinds whose ops' callees count as theirs (a scan's own products, attention's softmax, AdamW's foreach ops)
SCOPES = ("TTT inner loop", "SSM scan", "attention", "optimizer")


def kind_of(name: str) -> str:
    """The kind of an op or kernel by its name (KINDS), else OTHER."""
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), OTHER)


def _scoped_kind(event) -> str:
    """The kind of an op called (at any depth) inside a SCOPES op, else its own name's kind."""
    parent = event.cpu_parent
    while parent is not None:
        kind = kind_of(parent.name)
        if kind in SCOPES:
            return kind
        parent = parent.cpu_parent
    return kind_of(event.name)


def attribute(events, cuda: bool) -> tuple[dict[str, float], dict[str, dict], float]:
    """Microseconds per kind and per op name (with its calls) over the recorded events: each CPU op's self time,
    or on CUDA the kernels it launched; and the total (on CUDA every kernel's time, attributed or not)."""
    kinds, ops = defaultdict(float), {}
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async:
            continue
        us = sum(k.duration for k in e.kernels) if cuda else e.self_cpu_time_total
        if us <= 0:
            continue
        kind = _scoped_kind(e)
        kinds[kind] += us
        op = ops.setdefault(e.name, {"op": e.name, "kind": kind, "us": 0.0, "calls": 0})
        op["us"] += us
        op["calls"] += 1
    total = (sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA) if cuda
             else sum(kinds.values()))
    if cuda and total > sum(kinds.values()):
        kinds["unattributed"] = total - sum(kinds.values())
    return dict(kinds), ops, total


def profile_arch(arch: str, size: str, ctx: int, batch: int | None, device, steps: int, compile_mode: str,
                 match: str, profile_name: str, overrides: tuple[str, ...], top: int, trace: Path | None) -> dict:
    """The timed and the profiled step of one architecture (module docstring) as a row of profile.json."""
    model, sized = build(arch, size, ctx, match, device, BYTE_VOCAB, profile_name, overrides)
    tcfg = compose([f"arch={arch}", f"size={size}", f"ctx={ctx}", f"profile={profile_name}", *overrides]).trainer
    B = batch or sweep_micro_batch(arch, size, ctx, profile_name, overrides)
    idx = torch.randint(0, BYTE_VOCAB, (B, ctx + 1), device=device)  # (B, T + 1)
    model.train()
    step = training_step(model, compile_for_training(model, compile_mode), idx, device, make_optimizer(model, tcfg))
    timing = measure(step, device, window_s=STEADY_WINDOW_S)  # warms up (and compiles) first
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # one cycle, so acc_events changes nothing but torch 2.11's warning that events are cleared between cycles
    with profile(activities=activities, acc_events=True) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    kinds, ops, total = attribute(prof.events(), cuda)
    per_step = lambda us: us / steps / 1e3  # noqa: E731  ms per step
    ranked = sorted(ops.values(), key=lambda o: -o["us"])[:top]
    return {
        "arch": arch, "size": size, "ctx": ctx, "batch": B, "device": device_name(device),
        "backend": ",".join(f"{k}={v}" for k, v in sorted(model.backends().items())), "compile": compile_mode,
        "precision": autocast_for(device, "auto")[1], "threads": torch.get_num_threads(), "params": model.num_params(),
        "match": sized.match, "d_model": sized.cfg.d_model, "layers": sized.cfg.n_layers,
        "step_ms": timing.median * 1e3, "spread": timing.spread, "tokens_per_s": B * ctx / timing.median,
        "recorded_steps": steps, "recorded_ms_per_step": per_step(total),
        "time": "kernel (device) time" if cuda else "CPU self time",
        "ops_per_step": sum(o["calls"] for o in ops.values()) / steps,
        "kinds_ms": {k: per_step(us) for k, us in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": o["op"], "kind": o["kind"], "ms": per_step(o["us"]), "share": o["us"] / total,
                     "calls": o["calls"] / steps} for o in ranked],
    }


def markdown(rows: list[dict]) -> str:
    """profile.md: one section per architecture (its kinds, then its top ops)."""
    out = ["# Where a training step's time goes (`make profile`, bench/step_profile.py)", ""]
    for r in rows:
        out += [f"## {r['arch']} at {r['size']}, {r['batch']} x {r['ctx']:,} tokens",
                "", f"d_model {r['d_model']}, {r['layers']} layers, {r['params']:,} parameters "
                f"(matched by {r['match']}); "
                f"{r['device']}, {r['backend']}, compile={r['compile']}, {r['precision']}, {r['threads']} threads: "
                f"**{r['step_ms']:.1f} ms per step** (median, spread {r['spread']:.0%}), {r['tokens_per_s']:,.0f} "
                f"tokens/s; recorded {r['recorded_ms_per_step']:.1f} ms of {r['time']} per step over "
                f"{r['recorded_steps']} steps, {r['ops_per_step']:.0f} ops with time of their own per step.", "",
                "| kind | ms per step | share |", "|---|---|---|"]
        out += [f"| {k} | {ms:.2f} | {ms / r['recorded_ms_per_step']:.0%} |" for k, ms in r["kinds_ms"].items()]
        out += ["", "| op | kind | ms per step | share | calls per step |", "|---|---|---|---|---|"]
        out += [f"| `{o['op']}` | {o['kind']} | {o['ms']:.2f} | {o['share']:.0%} | {o['calls']:g} |"
                for o in r["top_ops"]]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    configure_compute_process()  # subnormals flushed, heap recycling, before any compute (bench/threads.py)
    p = argparse.ArgumentParser(prog="make profile", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="transformer,ttt_linear,mamba", help="a name, a comma list, or 'all'")
    p.add_argument("--size", default="cpu-xs", help="a conf/size name")
    p.add_argument("--ctx", default="2k", help="the context length of the step")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: as `make sweep` trains)")
    p.add_argument("--steps", type=int, default=3, help="steps recorded by the profiler")
    p.add_argument("--compile", default=None, help="none | hot_path | model (default: hot_path on CPU, as the cpu "
                                                   "profile trains; none on CUDA)")
    p.add_argument("--match", default="", help=f"params | flops (architectures/sizing.py; default {LATENCY_MATCH}, as "
                                               "`make throughput`)")
    p.add_argument("--profile", default="cpu", help="the conf/profile the models are composed under")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for every architecture's model (e.g. arch.backend=dual); repeatable")
    p.add_argument("--top", type=int, default=12, help="ops listed per architecture")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per architecture")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        archs, ctx = parse_archs(args.arch), parse_ctx(args.ctx)
        size = parse_choice("SIZE", args.size, group_options("size"))
        match = parse_choice("MATCH", args.match or LATENCY_MATCH, list(MATCH_RULES))
        profile_name = parse_choice("PROFILE", args.profile, group_options("profile"))
        compile_mode = parse_choice("compile mode", args.compile or ("none" if device.type == "cuda" else "hot_path"),
                                    list(COMPILE_MODES))
        if (args.batch is not None and args.batch <= 0) or args.steps <= 0 or args.top <= 0:
            raise UsageError(f"--batch, --steps and --top must be positive; got {args.batch}, {args.steps}, {args.top}")
        overrides = tuple(args.set)
        for arch in archs:  # a bad override is refused before anything runs
            compose([f"arch={arch}", f"size={size}", f"profile={profile_name}", *overrides])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.results).expanduser().resolve() / "profile"
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for arch in archs:
        trace = out / f"{arch}-{size}-{ctx}.trace.json" if args.trace else None
        r = profile_arch(arch, size, ctx, args.batch, device, args.steps, compile_mode, match, profile_name,
                         overrides, args.top, trace)
        rows.append(r)
        kinds = ", ".join(f"{k} {ms / r['recorded_ms_per_step']:.0%}" for k, ms in r["kinds_ms"].items())
        print(f"[ttt-bench] {arch:16s} {r['batch']} x {ctx}: {r['step_ms']:8.1f} ms per step, "
              f"{r['tokens_per_s']:10,.0f} tok/s, {r['ops_per_step']:.0f} ops; {kinds}", flush=True)
        atomic_write_json(out / "profile.json", rows)  # after each architecture: a run cut short keeps its rows
        atomic_write_text(out / "profile.md", markdown(rows))
    print(f"[ttt-bench] {len(rows)} profiles in {time.perf_counter() - t0:.0f}s; wrote {out / 'profile.md'}, "
          f"{out / 'profile.json'}" + (", traces" if args.trace else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
