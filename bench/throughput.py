"""`make throughput`: wall-clock prefill and decode latency vs context, training tokens/s and peak memory,
for every architecture on its best backend on this machine.

    python -m bench.throughput --arch all --ctx 32k --size cpu-xs [--batch 1] [--match params]
    make throughput ARCH=all CTX=32k SIZE=cpu-xs

For each architecture and each context length T (doubling from 1k up to CTX):
  prefill   one forward over a prompt of T tokens that fills the decode cache
            time_per_token_s = wall / T (the latency per position at the batch; the paper's figure)
  decode    single-token steps after that prompt, through each architecture's cache (KV cache, TTT
            state, conv + SSM state): time_per_token_s = wall per step
  train     forward + backward of a micro-batch of B sequences of T tokens (next-token loss), B as `make sweep`
            trains at T (sweep_micro_batch: the size's batch_tokens per step in micro-batches of at most
            trainer.micro_batch; cpu-xs: 8 x 1k, 4 x 2k, 2 x 4k, 1 x 8k and longer; --train-batch fixes B):
            time_per_token_s = wall / (B T). At one 1k sequence a cpu-xs step is mostly its fixed cost (some
            900 ops forward and backward), which no sweep pays per 1k tokens
tokens_per_s = batch x positions / wall in every mode. `make sweep` adds the trained model's prefill and
decode tokens/s at its context (batch 1) to each run's summary (bench/latency.py). Peak memory: CUDA
max_memory_allocated during the point; CPU the peak growth of the process's resident memory, sampled every 2 ms
after freed heap pages are handed back to the OS (glibc malloc_trim), over calls of its own after the warm-up
(latency.warm_up_with_memory: a sampling thread beside timed calls slowed them).
Timing (bench/timing.py): warm-up calls until two consecutive ones agree within 10% (at most 6 calls
or 30 s; `settled` says whether they did), then repeats (fewer for long calls), the median and the
relative spread. A prefill or training point also warms up for at least 0.25 s and is timed over at least
0.5 s (at most 60 calls); a decode point too, over 48 to 1000 steps, its positions cycling through the 48
after the prompt (bench/latency._rewinding). A point whose spread is over 25% is measured again and, if
the new spread is over 50%, flagged `noisy` in the CSV and drawn hollow. An architecture's points are warmed up
length by length; on CUDA each is timed right after its warm-up, on CPU all together after the last one, in 10
interleaved rounds (--rounds; the CSV's rounds column): each round runs every point in turn for a tenth of its
repeats (a point of fewer repeats sits out some rounds), so that a machine whose speed drifts over seconds moves
every length and mode alike (bench/timing.measure_in_rounds; when a point's spread is over 25%, all are measured
again, in rounds again). The decode caches are held until then while they fit in half the free memory (by their
prefills' peak memory). CUDA events on GPU (CUDA graphs replay every architecture's decode steps where capture
works, a TTT mini-batch of them per replay; the row says so), time.perf_counter on CPU; thread count recorded.
--compile-decode runs the decode step through torch.compile
(bench/latency._compiled; the CSV's compile column says model, or why it failed). On CUDA prefill and decode run
on a bf16 copy of the model (bench/latency.py). A point whose predicted time exceeds --max-seconds, or that runs
out of memory, is a row with that reason, never a crash; so is one that would overrun its architecture's share of
--budget-s, the wall-clock limit of the whole run (Budget; `make throughput-gpu` sets 7.5 minutes).
Writes RESULTS/throughput.csv (rows keyed by arch, size, mode, ctx, batch, device; a new run replaces its
keys), RESULTS/plots/{prefill,decode}_latency.png and train_throughput.png, and a W&B run (offline).
Models are composed as a run under --profile composes them (bench/config.py); widths follow
architectures/sizing.py (`--match params` by default: the paper's latency figures compare models of
equal parameters).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

import architectures
from architectures.sizing import MATCH_RULES
from bench.config import UsageError, compose, group_options, model_config, parse_archs, parse_choice, parse_ctx
from bench.latency import (DECODE_ROOM, decoder_after, inference_model, pending_decoder, prefill_call, time_decoder,
                           warm_up_with_memory)
from bench.results import atomic_write_text, device_name
from bench.threads import ThreadGovernor, configure_compute_process, omp_wait
from bench.timing import Pending, Timing, measure_in_rounds
from bench.train import COMPILE_MODES, Plan, autocast_for, compile_for_training

COLUMNS = ["arch", "size", "mode", "ctx", "batch", "time_per_token_s", "tokens_per_s", "peak_mem_bytes", "backend",
           "device", "status", "precision", "threads", "repeats", "spread", "noisy", "warmup_calls", "settled", "graph",
           "compile", "rounds", "params", "match", "d_model", "layers"]
KEY = ["arch", "size", "mode", "ctx", "batch", "device"]
COUNT_COLUMNS = ["repeats", "warmup_calls", "rounds"]  # timed rows only
MODES = ("prefill", "decode", "train")
BYTE_VOCAB = 257
CPU_ROUNDS = 10  # on CPU an architecture's points are timed together in 10 interleaved rounds (run_arch)
LATENCY_MATCH = "params"  # the default sizing rule here (the paper's latency figures: equal parameters)


def lengths_up_to(ctx: int) -> list[int]:
    """1k, 2k, 4k, ... up to ctx (ctx itself if it is below 1k)."""
    out, t = [], 1024
    while t <= ctx:
        out.append(t)
        t *= 2
    return out if out else [ctx]


def build(arch: str, size: str, ctx: int, match: str, device, vocab: int = BYTE_VOCAB, profile: str = "cpu",
          overrides: tuple[str, ...] = ()):
    """The model a run of (arch, size, ctx) under the profile trains (bench/config.py), sized by `match`,
    with room to decode past ctx; overrides: more of the run's Hydra overrides (--set, e.g. arch.backend=dual)."""
    cfg = compose([f"arch={arch}", f"size={size}", f"ctx={ctx}", f"match={match}", f"profile={profile}", *overrides])
    sized = model_config(cfg, vocab)
    cfg = sized.cfg
    cfg.max_seq_len = ctx + DECODE_ROOM
    torch.manual_seed(0)
    model = architectures.build_model(cfg).to(device)
    return model, sized


def sweep_micro_batch(arch: str, size: str, T: int, profile: str = "cpu", overrides: tuple[str, ...] = ()) -> int:
    """The sequences of one forward + backward as `make sweep` trains (arch, size) at context T under the profile
    (bench/train.py's Plan): the size's trainer.batch_tokens per step, at least one sequence, in micro-batches of at
    most trainer.micro_batch."""
    cfg = compose([f"arch={arch}", f"size={size}", f"ctx={T}", f"profile={profile}", *overrides])
    return Plan.resolve(1, int(cfg.trainer.batch_tokens), int(cfg.trainer.micro_batch), T).micro_batch


def _autocast(device):
    """The training precision: bf16 autocast on CUDA, fp32 on CPU (bench/train.py)."""
    return autocast_for(device, "auto")


def _oom(e: Exception) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _timed(t: Timing) -> dict:
    """The columns every timed point carries: how it was measured and how much to trust it."""
    return {"repeats": t.repeats, "spread": t.spread, "noisy": t.noisy, "warmup_calls": t.warmup_calls,
            "settled": t.settled}


def _row(arch, size, mode, T, B, device, model, sized, **kw) -> dict:
    return {"arch": arch, "size": size, "mode": mode, "ctx": T, "batch": B, "device": device_name(device),
            "backend": ",".join(f"{k}={v}" for k, v in sorted(model.backends().items())),
            "threads": torch.get_num_threads(), "params": model.num_params(), "match": sized.match,
            "precision": _autocast(device)[1],  # training's; prefill and decode rows give their own
            "d_model": sized.cfg.d_model, "layers": sized.cfg.n_layers, "graph": "", **kw}


def training_step(model, step_model, idx: torch.Tensor, device, optimizer=None):
    """A training step on idx (B, T + 1) as a call: forward and backward of the next-token loss (through step_model,
    the model compiled as training compiles it) under the training precision, then the optimizer's update if one
    is given, and the gradients zeroed."""
    autocast = _autocast(device)[0]

    def step():
        with autocast():
            logits = step_model(idx[:, :-1])  # (B, T, vocab)
        F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return step


def train_call(model, B: int, T: int, device, vocab: int, compile_mode: str = "none"):
    """A training step of a random (B, T) batch as a call (training_step, no optimizer) and its context: the model in
    training mode, back in eval mode after. The hot path is compiled as training compiles it, here, by one call
    (once per shape; the warm-up then runs warm)."""
    idx = torch.randint(0, vocab, (B, T + 1), device=device)
    context = lambda: _training(model)
    with context():
        step = training_step(model, compile_for_training(model, compile_mode), idx, device)
        if compile_mode != "none":
            step()
    return step, context


@contextlib.contextmanager
def _training(model):
    model.train()
    try:
        yield
    finally:
        model.eval()


def _predicted(history: list[tuple[int, float]], T: int) -> float:
    """Seconds a call at T is expected to take, from the last two measured points' scaling exponent
    (1..2, 2 when there is only one point)."""
    if not history:
        return 0.0
    (t1, s1), = history[-1:]
    p = 2.0
    if len(history) >= 2:
        t0, s0 = history[-2]
        if s0 > 0 and s1 > 0 and t1 != t0:
            p = min(2.0, max(1.0, math.log(s1 / s0) / math.log(t1 / t0)))
    return s1 * (T / t1) ** p


class Budget:
    """--budget-s: the wall-clock seconds a whole run may take. Each architecture, as it starts, gets an equal share
    of what is left (one that finishes early leaves the rest to those after it). A point whose predicted time to
    measure (warm-up and repeats: the mode's last two points' wall-clock, scaled as _predicted scales a call) would
    run past its architecture's share is skipped, and its row says so. The first point of each mode has nothing to
    predict from and always runs, so that every architecture gets a number."""

    def __init__(self, seconds: float | None, archs: int, clock=time.perf_counter):
        self.clock, self.archs_left = clock, archs
        self.end = None if seconds is None else clock() + seconds
        self.deadline = None  # this architecture's

    def start_arch(self) -> None:
        if self.end is not None:
            now = self.clock()
            self.deadline = now + max(0.0, self.end - now) / max(self.archs_left, 1)
        self.archs_left -= 1

    def refuses(self, walls: list[tuple[int, float]], T: int) -> str | None:
        """Why the point at T is skipped (walls: the mode's (T, seconds spent measuring) so far), or None."""
        if self.deadline is None or not walls:
            return None
        need, left = _predicted(walls, T), self.deadline - self.clock()
        if need <= left:
            return None
        return f"skipped: predicted {need:.1f} s to measure > {max(left, 0.0):.1f} s left of its share of --budget-s"


def _skipped(calls: list[tuple[int, float]], walls: list[tuple[int, float]], T: int, max_s: float,
             budget: Budget) -> str | None:
    """Why a mode's point at T is skipped (calls, walls: its (T, seconds per call) and (T, seconds spent measuring)
    so far), or None: a call predicted past --max-seconds, or a point past the architecture's share of the budget."""
    guess = _predicted(calls, T)
    if guess > max_s:
        return f"skipped: predicted {guess:.0f} s per call > --max-seconds {max_s:.0f}"
    return budget.refuses(walls, T)


def run_arch(arch, size, lengths, B, device, match, max_s, vocab, graphs, modes, train_batch=None,
             compile_mode: str = "none", governor=None, profile: str = "cpu",
             compile_decode: bool = False, budget: Budget | None = None,
             overrides: tuple[str, ...] = (), rounds: int = 1) -> list[dict]:
    """Every point of one architecture, as rows, each warmed up in length order (compiled, its memory sampled).
    rounds 1: each point timed right after its warm-up. rounds > 1: all timed together after the last length, in
    that many interleaved rounds (bench/timing.measure_in_rounds); the decode points' caches are held until then
    while they fit in half the free memory (by their prefills' peak memory; one that would not is timed at once,
    its row says rounds 1)."""
    budget = budget or Budget(None, 1)
    budget.start_arch()  # building the model counts against the architecture's share
    rows = []
    try:
        model, sized = build(arch, size, max(lengths), match, device, vocab, profile, overrides)
    except Exception as e:  # e.g. a SizingError: every point of the architecture says why
        return [{"arch": arch, "size": size, "mode": m, "ctx": T, "batch": B, "device": device_name(device),
                 "status": f"failed: {type(e).__name__}: {e}"[:300]} for m in modes for T in lengths]
    model.eval()
    infer, infer_precision = inference_model(model, device) if {"prefill", "decode"} & set(modes) else (model, "")
    if compile_decode:
        torch._dynamo.reset()  # the compiled decode step of the architecture before is of no use to this one
    row = lambda mode, T, batch=B, **kw: _row(arch, size, mode, T, batch, device, model, sized, **kw)
    failed = lambda e: "out of memory" if _oom(e) else f"failed: {type(e).__name__}: {e}"[:300]

    def prefill_row(T, mem, n_rounds, t: Timing) -> dict:
        return row("prefill", T, status="ok", time_per_token_s=t.median / T, tokens_per_s=B * T / t.median,
                   peak_mem_bytes=mem, precision=infer_precision, rounds=n_rounds, **_timed(t))

    def decode_row(T, decoder, n_rounds, t: Timing) -> dict:  # t: per step
        return row("decode", T, status="ok", time_per_token_s=t.median, tokens_per_s=B / t.median,
                   graph=decoder.graph, compile=decoder.compile, precision=infer_precision, rounds=n_rounds,
                   **_timed(t))

    def held_decode_row(T, decoder, t: Timing) -> dict:  # t: per call of the decoder
        return decode_row(T, decoder, rounds, decoder.per_step(t))

    def train_row(T, Bt, mem, n_rounds, t: Timing) -> dict:
        return row("train", T, Bt, status="ok", compile=compile_mode, time_per_token_s=t.median / (Bt * T),
                   tokens_per_s=Bt * T / t.median, peak_mem_bytes=mem, rounds=n_rounds, **_timed(t))

    def alone(pending: Pending) -> Timing:  # a point timed right after its warm-up
        return measure_in_rounds([pending], device, 1)[0]

    history = {m: [] for m in MODES}  # (T, seconds per call)
    walls = {m: [] for m in MODES}  # (T, seconds spent measuring the point, or to be spent in the rounds): the budget
    later = []  # (Pending, mode, T, batch, its row from its Timing): the points timed in rounds after the last length
    waiting_s = lambda points: sum(p.repeats * p.last_s for p, *_ in points)  # their time in the rounds, predicted
    held_bytes = 0  # the prefills' peak memory of the decode points held for the rounds
    for T in lengths:
        if governor is not None:
            governor.update(force=True)
        if "prefill" in modes or "decode" in modes:
            why = _skipped(history["prefill"], walls["prefill"], T, max_s, budget)
            if why:
                rows += [row(m, T, status=why) for m in ("prefill", "decode") if m in modes]
            else:
                t_point, timed, waiting = time.perf_counter(), [], []  # this length's rows, and its points for later
                try:
                    prefill, context, filled = prefill_call(infer, B, T, device, vocab)
                    pending, mem = warm_up_with_memory(prefill, device, context)
                    if "prefill" in modes and rounds > 1:
                        waiting.append((pending, "prefill", T, B, partial(prefill_row, T, mem, rounds)))
                    elif "prefill" in modes:
                        timed.append(prefill_row(T, mem, 1, alone(pending)))
                    decoder = decoder_after(infer, filled(), B, device, vocab, graphs, compile_decode=compile_decode)
                    if "decode" in modes and rounds > 1 and decoder.cyclic \
                            and held_bytes + mem < free_memory(device) / 2:
                        waiting.append((pending_decoder(decoder, device), "decode", T, B,
                                        partial(held_decode_row, T, decoder)))
                        held_bytes += mem
                    elif "decode" in modes:
                        timed.append(decode_row(T, decoder, 1, time_decoder(decoder, device)))
                    rows += timed  # all or none: a failure is one row for each mode
                    later += waiting
                    history["prefill"].append((T, pending.last_s))
                    walls["prefill"].append((T, time.perf_counter() - t_point + waiting_s(waiting)))
                except Exception as e:
                    rows += [row(m, T, status=failed(e)) for m in ("prefill", "decode") if m in modes]
                    history["prefill"].append((T, float("inf")))
                finally:
                    decoder = None  # a decode point not held lets its cache go
        if "train" in modes:
            Bt = train_batch or sweep_micro_batch(arch, size, T, profile, overrides)
            why = _skipped(history["train"], walls["train"], Bt * T, max_s, budget)  # train: predicted by tokens
            if why:
                rows.append(row("train", T, Bt, status=why))
                continue
            t_point, waiting = time.perf_counter(), []
            try:
                step, context = train_call(model, Bt, T, device, vocab, compile_mode)
                pending, mem = warm_up_with_memory(step, device, context)
                if rounds > 1:
                    waiting.append((pending, "train", T, Bt, partial(train_row, T, Bt, mem, rounds)))
                else:
                    rows.append(train_row(T, Bt, mem, 1, alone(pending)))
                later += waiting
                history["train"].append((Bt * T, pending.last_s))
                walls["train"].append((Bt * T, time.perf_counter() - t_point + waiting_s(waiting)))
            except Exception as e:
                rows.append(row("train", T, Bt, status=failed(e)))
                history["train"].append((Bt * T, float("inf")))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if later:
        try:
            timings = measure_in_rounds([pending for pending, *_ in later], device, rounds)
            rows += [to_row(t) for (*_, to_row), t in zip(later, timings)]
        except Exception as e:
            rows += [row(mode, T, batch, status=failed(e)) for _, mode, T, batch, _ in later]
    return rows


def free_memory(device) -> int:
    """Bytes free on the device: CUDA's free memory, or the memory the OS can give the process."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


# -- outputs ----------------------------------------------------------------------------------------

def merge_csv(path: Path, rows: list[dict]) -> pd.DataFrame:
    """RESULTS/throughput.csv: earlier rows whose key this run measured again are replaced."""
    new = pd.DataFrame(rows).reindex(columns=COLUMNS)
    if path.exists():
        old = pd.read_csv(path)
        keys = set(map(tuple, new[KEY].astype(str).values))
        old = old[[tuple(k) not in keys for k in old[KEY].astype(str).values]]
        new = pd.concat([old.reindex(columns=COLUMNS), new], ignore_index=True)
    for counts in COUNT_COLUMNS:  # whole numbers, left empty where a row has none (not 10.0 beside NaN)
        new[counts] = new[counts].astype("Int64")
    atomic_write_text(path, new.to_csv(index=False))
    return new


def log_wandb(df: pd.DataFrame, results: Path, plots: list[Path]) -> str:
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return mode
    import wandb

    run = wandb.init(project="ttt-bench", name=f"throughput-{time.strftime('%Y%m%d-%H%M%S')}", dir=str(results),
                     mode=mode, job_type="throughput")
    run.log({"throughput": wandb.Table(dataframe=df.astype(str)),
             **{p.stem: wandb.Image(str(p)) for p in plots if p.exists()}})
    run.finish()
    return mode


def main(argv: list[str] | None = None) -> int:
    configure_compute_process()  # subnormals flushed, heap recycling, before any compute (bench/threads.py)

    p = argparse.ArgumentParser(prog="make throughput", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="all", help="a name, a comma list, or 'all'")
    p.add_argument("--ctx", default="32k", help="the longest context; lengths double from 1k up to it")
    p.add_argument("--size", default="cpu-xs", help="a conf/size name")
    p.add_argument("--batch", type=int, default=1, help="prefill and decode batch")
    p.add_argument("--train-batch", type=int, default=None,
                   help="training batch (default: the sequences of one forward + backward as `make sweep` trains at "
                        "each length, sweep_micro_batch)")
    p.add_argument("--match", default="", help=f"params | flops (architectures/sizing.py; default {LATENCY_MATCH}: "
                                               "the paper's latency figures compare models of equal parameters)")
    p.add_argument("--profile", default="cpu", help="the conf/profile the models are composed under (bench/config.py)")
    p.add_argument("--modes", default="prefill,decode,train")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip a point whose predicted single call exceeds this (default: 20 on CPU, 60 on CUDA)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock seconds for the whole run: each architecture gets an equal share of what is "
                        "left, and a point predicted to overrun it is skipped, saying so (default: no limit)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for every architecture's model, as `make sweep ARGS=...` takes one "
                        "(e.g. arch.backend=dual to time one backend); repeatable")
    p.add_argument("--rounds", type=int, default=None,
                   help="time an architecture's points together, in this many interleaved rounds after its last "
                        f"length (default: {CPU_ROUNDS} on CPU; 1 on CUDA: each point on its own, as at 1.3B the "
                        "decode caches of every length would not fit together)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: decode eagerly (no CUDA graphs)")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode points: the step through torch.compile (fewer, fused kernels per token; compiling "
                        "takes seconds to a minute per architecture); the CSV's compile column says model, or why not")
    p.add_argument("--compile", default=None, help="train points: none | hot_path | model (default: hot_path on CPU, "
                                                   "as the cpu profile trains; none on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads at most (default: every free core)")
    p.add_argument("--no-governor", action="store_true",
                   help="CPU: keep a fixed thread count instead of fitting it to the free cores (bench/threads.py)")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        archs = parse_archs(args.arch)
        ctx = parse_ctx(args.ctx)
        size = parse_choice("SIZE", args.size, group_options("size"))
        match = parse_choice("MATCH", args.match or LATENCY_MATCH, list(MATCH_RULES))
        profile = parse_choice("PROFILE", args.profile, group_options("profile"))
        modes = [parse_choice("mode", m.strip(), list(MODES)) for m in args.modes.split(",") if m.strip()]
        compile_mode = parse_choice("compile mode", args.compile or ("none" if device.type == "cuda" else "hot_path"),
                                    list(COMPILE_MODES))
        if args.batch <= 0 or (args.train_batch is not None and args.train_batch <= 0):
            raise UsageError(f"batch must be positive; got {args.batch} / {args.train_batch}")
        if args.rounds is not None and args.rounds < 1:
            raise UsageError(f"--rounds must be at least 1; got {args.rounds}")
        if args.budget_s is not None and not args.budget_s > 0:
            raise UsageError(f"--budget-s must be a positive number of seconds; got {args.budget_s}")
        overrides = tuple(args.set)
        for arch in archs:  # a bad override is the user's input: refused before anything runs
            compose([f"arch={arch}", f"size={size}", f"profile={profile}", *overrides])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_s = args.max_seconds or (60.0 if device.type == "cuda" else 20.0)
    rounds = args.rounds or (1 if device.type == "cuda" else CPU_ROUNDS)
    lengths = lengths_up_to(ctx)
    results = Path(args.results).expanduser().resolve()
    t0 = time.perf_counter()
    governor = ThreadGovernor(args.threads, enabled=device.type == "cpu" and not args.no_governor)
    print(f"[ttt-bench] throughput on {device_name(device)} ({torch.get_num_threads()} threads, "
          f"{omp_wait()}): {', '.join(archs)} at {size} (match={match}), lengths {lengths}, "
          f"batch {args.batch}, train batch {args.train_batch or 'as make sweep trains'}, "
          f"train compile={compile_mode}, decode compile="
          f"{'model' if args.compile_decode else 'none'}, rounds {rounds}"
          + (f", budget {args.budget_s:.0f} s" if args.budget_s else "")
          + (f", overrides {' '.join(overrides)}" if overrides else ""), flush=True)
    rows = []
    budget = Budget(args.budget_s, len(archs))
    for arch in archs:
        for r in run_arch(arch, size, lengths, args.batch, device, match, max_s, BYTE_VOCAB, not args.no_graphs,
                          modes, args.train_batch, compile_mode, governor, profile, args.compile_decode, budget,
                          overrides, rounds):
            rows.append(r)
            mem = f"mem {r['peak_mem_bytes'] / 2**20:8.1f} MiB" if r.get("peak_mem_bytes") is not None else ""
            trust = (f" spread {r['spread']:.0%}" + (" NOISY" if r.get("noisy") else "")
                     + ("" if r.get("settled", True) else " (warm-up unsettled)")) if r["status"] == "ok" else ""
            shown = (f"{r['time_per_token_s'] * 1e3:9.4f} ms/token {r['tokens_per_s']:12,.0f} tok/s {mem}{trust}"
                     if r["status"] == "ok" else r["status"])
            print(f"[ttt-bench] {arch:16s} {r['mode']:7s} T={r['ctx']:6d}  {shown}", flush=True)
        df = merge_csv(results / "throughput.csv", rows)  # after each architecture: a run cut short (a time
        #   limit, `make gpu-check`'s stages) keeps what it measured
    plots = results / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = [plots / "prefill_latency.png", plots / "decode_latency.png", plots / "train_throughput.png"]
    from bench.plots import plot_speed_vs_context  # matplotlib only once there is something to draw

    for mode, path in zip(MODES, paths):
        plot_speed_vs_context(df, mode, path)
    wandb_mode = log_wandb(pd.DataFrame(rows).reindex(columns=COLUMNS), results, paths)
    print(f"[ttt-bench] {len(rows)} points in {time.perf_counter() - t0:.0f}s; wrote {results / 'throughput.csv'}, "
          f"{', '.join(str(p.relative_to(results)) for p in paths)} (W&B {wandb_mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
