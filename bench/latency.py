"""Prefill and decode latency of a model: the probe every training run ends with, and what `make
throughput` (bench/throughput.py) times at each context.

  prefill   one forward over a prompt of T tokens that fills the decode cache
  decode    single-token steps after that prompt, through each architecture's cache (KV cache, TTT
            state, conv + SSM state)
Timing: bench/timing.py (warm-up until two calls agree, median of repeats, spread). Peak memory: CUDA
max_memory_allocated during the block; CPU the peak growth of the process's resident memory, sampled
every 2 ms, after freed heap pages are handed back to the OS (glibc malloc_trim).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections.abc import Callable

import torch

from bench.timing import MAX_WARMUP_CALLS, STEADY_WINDOW_S, Pending, Timing, measure, warm_up
from bench.train import autocast_for

DECODE_STEPS = 48  # decode steps timed at least, and the positions they cycle through: three TTT mini-batches
DECODE_MAX_STEPS = 1000  # ... and at most, in a window of STEADY_WINDOW_S (a cpu-xs step: 0.5-2.5 ms)
DECODE_GROUP = 16  # steps per timed call (rounded up to a TTT mini-batch): a call's time includes the step that
#   commits TTT's inner weights, and a single step's jitter averages out (cpu-xs, 2 cores: single 0.6-1.2 ms
#   steps spread 25-65% from their 10th to their 90th percentile)
MAX_GRAPHED_STEPS = 32  # the most decode steps one CUDA graph replays (capturing them takes 2x that many slots)
# cache slots after the prompt: a compiled step's warm-up or a graph's capture (two periods each), then the timed
# steps: cycling through DECODE_STEPS positions (_rewinding) or, for a period too long to cycle, warm-up, steps
# and a re-measure in a row
DECODE_ROOM = 2 * DECODE_STEPS + MAX_WARMUP_CALLS + 2 + 2 * MAX_GRAPHED_STEPS


def _release_free_memory() -> None:
    """glibc's malloc_trim: hand freed heap pages back to the OS, so that the next point's resident
    memory grows from what is live (elsewhere: a no-op, and the CPU figure is a lower bound)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator peak, or sampled process RSS growth on CPU."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            _release_free_memory()
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.top, self.running = self.base, True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.top = max(self.top, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(0, self.top - self.base)
        return False


MEMORY_WINDOW_S = 0.05  # CPU: the calls whose memory is sampled (every 2 ms) take at least this long together


def measure_with_memory(fn, device, **measure_kw) -> tuple[Timing, int]:
    """measure(fn, device, **measure_kw) and the peak extra memory of a call (PeakMemory). On CUDA the allocator's
    peak over the timed calls. On CPU the sampled RSS over calls of their own after the timed ones, repeated for at
    least MEMORY_WINDOW_S: beside the timed calls the sampling thread competes with them for the GIL and a core
    (measured on 2 cores, TTT-Linear prefill at cpu-xs: 4.07 us per token without it, 4.37-4.44 beside it at 1k
    tokens; 2.71-2.80 against 2.84-2.96 at 4k), which made short points look slower than they are."""
    if device.type == "cuda":
        with PeakMemory(device) as mem:
            return measure(fn, device, **measure_kw), mem.peak
    timing = measure(fn, device, **measure_kw)
    return timing, _sampled_peak(fn, device)


def warm_up_with_memory(fn, device, context=contextlib.nullcontext, **warm_up_kw) -> tuple[Pending, int]:
    """warm_up(fn, device, **warm_up_kw) under context, for measure_in_rounds to time later, and the peak extra
    memory of a call as measure_with_memory takes it (CUDA: over the warm-up calls)."""
    if device.type == "cuda":
        with PeakMemory(device) as mem:
            return warm_up(fn, device, context=context, **warm_up_kw), mem.peak
    pending = warm_up(fn, device, context=context, **warm_up_kw)
    with context():
        return pending, _sampled_peak(fn, device)


def _sampled_peak(fn, device) -> int:
    """CPU: the sampled peak RSS growth over calls of fn of their own, for at least MEMORY_WINDOW_S."""
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn()
        while time.perf_counter() - t0 < MEMORY_WINDOW_S:
            fn()
    return mem.peak


def inference_model(model, device) -> tuple[torch.nn.Module, str]:
    """The model prefill and decode are timed with, and its precision. On CUDA a copy with bf16 weights: under
    autocast alone every linear casts its fp32 weight again on every call, which at 1.3B reads about 5 GB per decode
    step (issue 17); the caches follow the weights (the KV cache in bf16; TTT's inner state and Mamba's SSM state
    stay fp32). On CPU the model itself, in fp32."""
    if device.type != "cuda":
        return model, "fp32"
    return as_bf16(model), "bf16 weights"


def as_bf16(model) -> torch.nn.Module:
    """A copy of the model with its parameters and buffers in bf16 (the model itself is left as it is)."""
    return copy.deepcopy(model).to(torch.bfloat16)


@dataclasses.dataclass
class Decoder:
    """A decode point ready to be timed: `call` runs `per_call` single-token steps from a prompt's cache, under
    `context()` (inference mode and the model's precision). `cyclic`: the steps' positions cycle (_rewinding), so
    any number of calls fits the cache's room and the point can be timed over a window; else DECODE_STEPS steps
    in a row. graph and compile: the CSV's notes (_graphed, _compiled)."""
    call: Callable[[], object]
    per_call: int
    cyclic: bool
    graph: str
    compile: str
    context: Callable[[], contextlib.AbstractContextManager]

    def repeats(self) -> dict:
        """A window's bounds on its calls: DECODE_STEPS to DECODE_MAX_STEPS steps."""
        return {"min_repeats": -(-DECODE_STEPS // self.per_call), "max_repeats": DECODE_MAX_STEPS // self.per_call}

    def per_step(self, t: Timing) -> Timing:
        return dataclasses.replace(t, median=t.median / self.per_call)


def prefill_and_decode(model, B: int, T: int, device, vocab: int, graphs: bool, quick: bool = False,
                       compile_decode: bool = False):
    """Timed prefill of T tokens (after warm-up calls), then timed decode steps from its cache (over a window of
    steps whose positions cycle: _rewinding; a step's time is that of DECODE_GROUP in a row / DECODE_GROUP), under bf16
    autocast when the model's weights are bf16 (inference_model) or on CUDA, in inference mode (no autograd
    bookkeeping at all: on CPU a cpu-xs TTT-Linear forward of 16 tokens, mostly fixed cost per op, took 1.83 ms
    against 2.15 under no_grad, 2 cores, 2026-12-02). quick: one untimed warm-up call each (the probe `make sweep`
    runs). compile_decode: the decode step through torch.compile (_compiled). Returns (prefill timing, peak memory,
    decode timing, graph note, compile note: "model", "none" or why it failed)."""
    prefill, context, filled = prefill_call(model, B, T, device, vocab)
    with context():
        pre, peak = measure_with_memory(prefill, device, max_warmup_calls=1 if quick else MAX_WARMUP_CALLS,
                                        window_s=0.0 if quick else STEADY_WINDOW_S)
    decoder = decoder_after(model, filled(), B, device, vocab, graphs, quick, compile_decode)
    return pre, peak, time_decoder(decoder, device, quick), decoder.graph, decoder.compile


def prefill_call(model, B: int, T: int, device, vocab: int):
    """A prefill of T random tokens into a new cache as a call, the context it runs in (_inference), and a function
    that returns the cache the last call filled (once: later calls let their caches go)."""
    idx = torch.randint(0, vocab, (B, T), device=device)
    last = {"keep": True}

    def prefill():
        state = model.new_state(B, T + DECODE_ROOM)
        model(idx, state)
        if last["keep"]:
            last["state"] = state

    def filled():  # the cache of the last call so far; calls after this one keep none (points timed in rounds)
        last["keep"] = False
        return last.pop("state")

    return prefill, _inference(model, device), filled


def decoder_after(model, state, B: int, device, vocab: int, graphs: bool, quick: bool = False,
                  compile_decode: bool = False) -> Decoder:
    """The decode point from a prefilled cache: single-token steps (through torch.compile with compile_decode;
    replayed as a CUDA graph with graphs on CUDA), their positions cycling (_rewinding), DECODE_GROUP of them per
    call outside the quick probe."""
    context = _inference(model, device)
    with context():
        step_in = torch.randint(0, vocab, (B, 1), device=device)
        step = lambda: model(step_in, state)
        graph_note, per_call, compile_note = "", 1, "none"  # per_call: decode steps per timed call
        if compile_decode:
            step, compile_note = _compiled(step, model)
        p = decode_period(model)
        if graphs and device.type == "cuda":
            step, graph_note, per_call = _graphed(step, p)
        span = DECODE_STEPS // p * p  # 0: a period too long to cycle through
        step = _rewinding(step, state, span)
        if not quick and span and per_call == 1:  # a window of calls, each not a graph's replay of a TTT mini-batch
            per_call = -(-DECODE_GROUP // p) * p
            step = _in_a_row(step, per_call)
    return Decoder(step, per_call, span > 0, graph_note, compile_note, context)


def time_decoder(decoder: Decoder, device, quick: bool = False) -> Timing:
    """Seconds per decode step of one point: over a window (bench/timing.measure) where its positions cycle, else
    DECODE_STEPS steps in a row (quick: after one untimed call)."""
    with decoder.context():
        if quick or not decoder.cyclic:  # DECODE_STEPS calls in a row, within the cache's room
            t = measure(decoder.call, device, repeats=DECODE_STEPS, max_warmup_calls=1 if quick else MAX_WARMUP_CALLS)
        else:
            t = measure(decoder.call, device, window_s=STEADY_WINDOW_S, **decoder.repeats())
    return decoder.per_step(t)


def pending_decoder(decoder: Decoder, device) -> Pending:
    """A cyclic decode point warmed up for bench/timing.measure_in_rounds (its timing then per call: per_step)."""
    if not decoder.cyclic:
        raise ValueError("a decode point timed in rounds must cycle its positions")
    return warm_up(decoder.call, device, STEADY_WINDOW_S, context=decoder.context, **decoder.repeats())


def _inference(model, device) -> Callable[[], contextlib.AbstractContextManager]:
    """Prefill and decode's setting, as a context to enter: inference mode, under bf16 autocast when the model's
    weights are bf16 (inference_model) or on CUDA."""
    bf16_weights = next(model.parameters()).dtype == torch.bfloat16
    autocast = autocast_for(device, "bf16" if bf16_weights else "auto")[0]

    @contextlib.contextmanager
    def context():
        with torch.inference_mode(), autocast():
            yield

    return context


def _in_a_row(step, n: int):
    """n calls of step, as one."""
    def steps():
        for _ in range(n):
            step()

    return steps


def _rewinding(step, state, span: int):
    """The decode step, with every cache's position taken back by `span` steps whenever the steps have gone `span`
    past where they began: any number of steps then fits the cache's room, each at positions T..T+span, and a
    decode point is timed over a window like a prefill (48 steps of 1 ms in a row had left a point to one moment
    of a shared machine). A Transformer's step attends to as many keys and writes the same KV slots again. span is
    a multiple of the model's decode period: a TTT step is at the same place in its mini-batch (its RoPE is
    periodic in it), and TTT and Mamba compute just what they would if the sequence went on
    (tests/test_throughput.py). A CUDA graph's replay leaves the Python count alone: nothing to rewind."""
    start = state.seen

    def step_within_room():
        if state.seen - start >= span > 0:
            state.advance(-span)
        return step()

    return step_within_room


def decode_period(model) -> int:
    """Decode steps after which a model's step repeats its work: a TTT layer's mini-batch (its last token commits
    the inner weights), else 1 (Transformer: one KV slot and T keys; Mamba: one state update)."""
    return max([m.mini_batch for m in model.modules() if isinstance(getattr(m, "mini_batch", None), int)] or [1])


def _compiled(step, model):
    """The decode step through torch.compile: its elementwise work (norms, casts, gates, rotary angles) fused into
    fewer kernels, which a single token's step is made of (on a GPU each costs a launch even in a CUDA graph).
    The Triton TTT decode kernels are operators (torch.library) and compile in; the C++ backends' decode steps
    (TTT, Mamba-2: backend=cpp) run as PyTorch ops instead, which fuse (a C++ call would break the graph), and
    the note says so. Two periods of steps run first, so that every variant compiles before timing (the first
    call's static shapes, then positions as symbols, a TTT mini-batch's first, middle and last tokens). Returns
    (the step, note: "model" and what ran differently), or the eager step and why compiling failed (the steps
    already run stay in the cache: its room allows for them). Running out of recompiles (torch._dynamo's
    recompile_limit, after which it would run eagerly and silently) is a failure too. torch.compile keeps its
    graphs by the step's code, shared by every model's step: call torch._dynamo.reset() before another model."""
    compiled = torch.compile(step)
    try:
        with _failing_on_recompile_limit():
            for _ in range(2 * decode_period(model)):
                compiled()
    except Exception as e:
        return step, f"failed: {type(e).__name__}: {e}"[:200]
    return compiled, "model" + (" (backend=cpp decode steps as PyTorch ops)" if _cpp_decode_steps(model) else "")


def _failing_on_recompile_limit():
    """torch._dynamo raising where it would fall back to eager at its recompile limit (the option's name before
    torch 2.6: fail_on_cache_limit_hit; a GPU machine may have an older torch than ours)."""
    cfg = torch._dynamo.config
    name = next(n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(cfg, n))
    return cfg.patch(**{name: True})


def _cpp_decode_steps(model) -> bool:
    """Whether a layer's decode step is one C++ call when eager and PyTorch ops when compiled (TTT's dual.py and
    Mamba-2's _torch_core with backend=cpp; Mamba-1's step is PyTorch ops either way)."""
    from architectures.mamba.layers import Mamba2Mixer
    from architectures.ttt.layer import TTTLayer

    return any(isinstance(m, (TTTLayer, Mamba2Mixer)) and m.backend == "cpp" for m in model.modules())


def _graphed(step, period: int):
    """Replay `period` decode steps as one CUDA graph: each replay does the work of steps at the same positions
    again, so the time of a replay / period is a step's. The caches update in place, so a recurrent model's replay
    continues from the state the one before left (tests/test_ttt_triton.py checks TTT's outputs so); a
    Transformer's writes the same KV slots again. Returns (the replay, the row's note, period); eager steps, with
    the reason, when the period is too long or capture fails."""
    if period > MAX_GRAPHED_STEPS:
        return step, f"eager (a period of {period} steps is too long to capture)", 1

    steps = _in_a_row(step, period)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            steps()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            steps()
        return g.replay, "cuda_graph" if period == 1 else f"cuda_graph ({period} steps per replay)", period
    except Exception as e:  # eager then, and the row says why
        return step, f"eager (capture failed: {type(e).__name__})", 1


def latency_probe(model, ctx: int, device, vocab: int) -> dict:
    """What every training run (bench/run.py) adds to its summary: prefill and decode speed of the trained
    model at the run's context, batch 1 (never fails the run: a failure is recorded)."""
    model = getattr(model, "lm", model)  # a classifier's language model carries the decode cache
    if getattr(model, "pos_embed", None) is not None:
        return {"throughput_status": "skipped: learned positions end at ctx, no room to decode past it"}
    was_training = model.training
    model.eval()
    try:
        pre, _, dec, *_ = prefill_and_decode(inference_model(model, device)[0], 1, ctx, device, vocab, graphs=False,
                                             quick=True)
        return {"prefill_tokens_per_s": ctx / pre.median, "prefill_time_per_token_s": pre.median / ctx,
                "decode_tokens_per_s": 1 / dec.median, "decode_time_per_token_s": dec.median,
                "throughput_status": "ok"}
    except Exception as e:
        return {"throughput_status": f"failed: {type(e).__name__}: {e}"[:300]}
    finally:
        model.train(was_training)
