"""TTT kernels vs context length on one GPU: our Triton kernels against our PyTorch dual form, causal
attention (SDPA; flash-attn when installed), mamba-ssm's selective scan and fla's chunk_ttt_linear
(when installed), forward and forward+backward, at the 1.3B layer shape; and the layers' causal conv, our Triton
kernels against the PyTorch multiply-adds.

    python -m bench.ttt_kernel_speed                 # CUDA: T = 2k..32k, under 8 minutes on one H200
    python -m bench.ttt_kernel_speed --smoke         # CPU: tiny shapes under TRITON_INTERPRET=1 (checks the script)
    make bench-kernels

Shape (paper Table 3, 1.3B): d = 2048, 32 heads of 64; batch 16 for the forward (the paper's latency
figure), --bwd-batch (default 4) for forward+backward (memory). Inputs of the TTT kernels are the layer's
q, k, v (B, H, T, 64) in bf16 with fp32 state; attention takes the same q, k, v (bf16); the Mamba scan
runs at the same width (d_inner 4096 = 2 x 2048, d_state 16; mamba-ssm's CUDA kernel and our Triton one), and
Mamba-2's SSD (mamba-ssm's Triton kernels) at its 1.3B layer (64 heads of 64, d_state 128). Times:
bench/timing.py, the suite's one timer (CUDA events; warm-up until two calls agree, median and spread of
repeats; on CPU one warm-up call and one timed call, as a check of the script). A point that fails (out of
memory, missing package, a GPU-only contender on CPU, over --max-seconds for the previous length) is recorded
with its reason.

fla's chunk_ttt_linear has different semantics (a learning rate per query token, o + LN(o) residual,
no TTT-MLP): its times are labelled so and are not a like-for-like comparison.
Writes RESULTS/bench/ttt_kernel_speed.json and RESULTS/plots/ttt_kernel_speed.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from bench.results import atomic_write_json, device_name, package_versions
from bench.timing import measure

LENGTHS = [2048, 4096, 8192, 16384, 32768]
MODES = {False: "fwd", True: "fwd+bwd"}  # backward? -> the mode's name


# -- the contenders: each returns fn() running one forward (and backward when asked) -----------------

class NeedsCuda(Exception):
    """A contender that cannot run on this device (a row "needs CUDA" under --smoke, not a failure)."""


def _ttt_inputs(B, H, T, f, inner, device, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(device)
    x = {"q": r(B, H, T, f).bfloat16(), "k": r(B, H, T, f).bfloat16(), "v": r(B, H, T, f).bfloat16(),
         "a": (torch.rand(B, H, T, generator=g) * 0.3 / f).to(device),
         "tok": (1 / torch.arange(1, 17)).to(device), "ln_w": torch.ones(H, f, device=device),
         "ln_b": torch.zeros(H, f, device=device)}
    if inner == "linear":
        x.update(W=r(1, H, f, f, scale=0.02), b=torch.zeros(1, H, f, device=device))
    else:
        x.update(W1=r(1, H, f, 4 * f, scale=0.02), b1=torch.zeros(1, H, 4 * f, device=device),
                 W2=r(1, H, 4 * f, f, scale=0.02), b2=torch.zeros(1, H, f, device=device))
    for t in x.values():
        t.requires_grad_(requires_grad and t.is_floating_point())
    return x


def ttt_triton(inner, B, H, T, f, device, backward):
    from architectures.ttt import triton_linear, triton_mlp

    kernels = {"linear": triton_linear, "mlp": triton_mlp}[inner]
    x = _ttt_inputs(B, H, T, f, inner, device, backward)
    names = ["W", "b"] if inner == "linear" else ["W1", "b1", "W2", "b2"]
    io = [x[n] for n in ("q", "k", "v", "a", "tok", "ln_w", "ln_b")]

    def fn():
        out = kernels.prefill(*io, {n: x[n] for n in names})[0]
        if backward:
            out.float().sum().backward()
    return fn


def ttt_torch_dual(inner, B, H, T, f, device, backward):
    from architectures.ttt.dual import InnerState, row_biases, ttt_dual

    x = _ttt_inputs(B, H, T, f, inner, device, backward)
    names = ["W", "b"] if inner == "linear" else ["W1", "b1", "W2", "b2"]

    def fn():
        c = {n: t.float() for n, t in x.items()}
        state = InnerState(row_biases({n: c[n] for n in names}))
        out = ttt_dual(inner, state, c["q"], c["k"], c["v"], c["a"], c["tok"], c["ln_w"][:, None], c["ln_b"][:, None],
                       16)[0]
        if backward:
            out.sum().backward()
    return fn


def attention_sdpa(B, H, T, f, device, backward):
    import torch.nn.functional as F

    q, k, v = (torch.randn(B, H, T, f, device=device, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))

    def fn():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.float().sum().backward()
    return fn


def attention_flash(B, H, T, f, device, backward):
    from flash_attn import flash_attn_func  # raises ImportError where it is not installed

    q, k, v = (torch.randn(B, T, H, f, device=device, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))

    def fn():
        out = flash_attn_func(q, k, v, causal=True)
        if backward:
            out.float().sum().backward()
    return fn


def mamba_scan(B, H, T, f, device, backward):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # CUDA kernels

    D, N = 2 * H * f, 16
    u, delta, z = (torch.randn(B, D, T, device=device, dtype=torch.bfloat16, requires_grad=backward)
                   for _ in range(3))
    A = (-torch.rand(D, N, device=device)).requires_grad_(backward)
    Bm, Cm = (torch.randn(B, N, T, device=device, dtype=torch.bfloat16, requires_grad=backward) for _ in range(2))
    Dv = torch.ones(D, device=device, requires_grad=backward)

    def fn():
        out = selective_scan_fn(u, delta, A, Bm, Cm, Dv, z, delta_softplus=True)
        if backward:
            out.float().sum().backward()
    return fn


def _mamba_inputs(B, H, T, f, device, requires_grad) -> dict:
    """The selective scan's inputs at mamba_scan's width (D = 2 H f, N = 16), (B, T, .) as the layer has them, fp32
    (as the layer gives them to our kernel under autocast), the same for every call."""
    g = torch.Generator(device="cpu").manual_seed(0)
    D, N = 2 * H * f, 16
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {"u": r(B, T, D), "delta": r(B, T, D), "A": -torch.rand(D, N, generator=g), "B": r(B, T, N), "C": r(B, T, N),
         "D": torch.ones(D), "z": r(B, T, D)}
    return {n: t.to(device).requires_grad_(requires_grad) for n, t in x.items()}


def _mamba_scan(x: dict):
    from architectures.mamba.scan import selective_scan

    return selective_scan(*x.values(), None, True, kernel="triton")  # softplus(delta), no delta bias


def mamba_scan_ours(B, H, T, f, device, backward):
    """Our sequential Triton selective scan (architectures/mamba/triton_scan.py, Mamba-1's backend=triton) through
    the layer's wrapper (selective_scan), at mamba_scan's width."""
    x = _mamba_inputs(B, H, T, f, device, backward)

    def fn():
        out = _mamba_scan(x)
        if backward:
            out.sum().backward()
    return fn


def mamba2_ssd(B, H, T, f, device, backward):
    """mamba-ssm's Triton SSD (Mamba-2's backend=triton) at the 1.3B Mamba-2 layer: d_inner 4096 = 2 x 2048 in
    heads of 64, d_state 128, one group, chunks of 256 (conf/arch mamba2), bf16 inputs."""
    from architectures.mamba.layers import triton_ssd

    if device.type != "cuda":
        raise NeedsCuda("mamba-ssm's Triton SSD sets the CUDA device at each call")
    ssd = triton_ssd()
    if ssd is None:
        raise ImportError("mamba-ssm is not installed (`make gpu-wheels` brings it to a machine without network)")
    heads, P, N = 2 * H * f // 64, 64, 128
    x = torch.randn(B, T, heads, P, device=device, dtype=torch.bfloat16, requires_grad=backward)
    dt = torch.randn(B, T, heads, device=device, dtype=torch.bfloat16, requires_grad=backward)
    A = (-torch.rand(heads, device=device) * 15 - 1).requires_grad_(backward)
    Bm, Cm = (torch.randn(B, T, 1, N, device=device, dtype=torch.bfloat16, requires_grad=backward) for _ in range(2))
    Dv, dt_bias = torch.ones(heads, device=device), torch.zeros(heads, device=device)

    def fn():
        out = ssd(x, dt, A, Bm, Cm, 256, D=Dv, dt_bias=dt_bias, dt_softplus=True)
        if backward:
            out.float().sum().backward()
    return fn


def fla_ttt_linear(B, H, T, f, device, backward):
    from fla.ops.ttt import chunk_ttt_linear  # different semantics; raises ImportError where not installed

    q, k, v = (torch.randn(B, T, H, f, device=device, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    w, b = torch.ones(H, f, device=device), torch.zeros(H, f, device=device)
    eta = torch.full((B, T, H, 1), 0.01, device=device, dtype=torch.bfloat16)

    def fn():
        out = chunk_ttt_linear(q, k, v, w, b, eta=eta, chunk_size=16)[0]
        if backward:
            out.float().sum().backward()
    return fn


def causal_conv(B, H, T, f, device, backward, triton: bool):
    """The layer's causal depthwise conv (layers.CausalConv, width 4) over H * f channels (a TTT layer's, 2048 at
    1.3B), bf16 activations: the Triton kernels, or the PyTorch multiply-adds the other backends run."""
    from architectures.layers import CausalConv

    conv = CausalConv(H * f, 4).to(device)
    conv.triton = triton
    x = torch.randn(B, T, H * f, device=device, dtype=torch.bfloat16, requires_grad=backward)

    def fn():
        y = conv(x)[0]
        if backward:
            y.float().sum().backward()
    return fn


CONTENDERS = {
    "ttt_linear [triton]": lambda *a: ttt_triton("linear", *a),
    "ttt_mlp [triton]": lambda *a: ttt_triton("mlp", *a),
    "ttt_linear [torch dual form]": lambda *a: ttt_torch_dual("linear", *a),
    "ttt_mlp [torch dual form]": lambda *a: ttt_torch_dual("mlp", *a),
    "attention [sdpa]": attention_sdpa,
    "attention [flash_attn]": attention_flash,
    "mamba scan [mamba-ssm cuda]": mamba_scan,
    "mamba scan [triton]": mamba_scan_ours,
    "mamba2 ssd [mamba-ssm triton]": mamba2_ssd,
    "fla chunk_ttt_linear (different semantics)": fla_ttt_linear,
    "causal conv [triton]": lambda *a: causal_conv(*a, triton=True),
    "causal conv [torch multiply-adds]": lambda *a: causal_conv(*a, triton=False),
}


# -- launch variants of our kernels (precision x warps, and 1 pipelining stage), with their error against the
# exact default -------------------------------------------------------------------------------------------

# VARIANTS[0]: exact. The last: TF32 at 4 warps without software pipelining (num_stages 1), the setting at which
# ptxas spills nothing in the TTT-Linear forward at f = 64 (triton_linear.DEFAULT_STAGES); last, so a stage cut
# by its time limit loses it first.
VARIANTS = ([{"precision": p, "num_warps": w, "num_stages": 3} for p in ("ieee", "tf32") for w in (4, 8)]
            + [{"precision": "tf32", "num_warps": 4, "num_stages": 1}])  # 3: Triton's default, DEFAULT_STAGES


# Mamba-1's Triton scan (architectures/mamba/triton_scan.py), the default first: 32 channels over 4 warps, which
# split a channel's 16 states; then BLOCK_D = 32 x warps, where each thread holds all 16 states of its channel and
# the forward needs no shared memory (ptxas for sm_90: 127 registers forward, about 168 backward, no spills)
MAMBA_VARIANTS = [{"BLOCK_D": 32, "NUM_WARPS": 4}, {"BLOCK_D": 32, "NUM_WARPS": 1}, {"BLOCK_D": 64, "NUM_WARPS": 2},
                  {"BLOCK_D": 128, "NUM_WARPS": 4}]
# Past f = 64 (a block of 128: the 760M layer's 96) TTT-Linear's forward and backward read W from memory in tiles
# of rows (triton_linear.WIDE_W_ROWS), the backward without software pipelining (WIDE_STAGES); these time that
# backward (here with a forward at 1 stage too: 0 B of spills either way), then W whole in registers, and tiles of
# 32, at 8 warps (WIDE_WARPS) and 3 stages
WIDE_ROW_VARIANTS = ([{"precision": "tf32", "num_warps": 8, "num_stages": 1, "w_rows": None}]
                     + [{"precision": "tf32", "num_warps": 8, "num_stages": 3, "w_rows": r} for r in (128, 32)])
VARIANT_KERNELS = ("linear", "mlp", "mamba")  # --variants


def variants_for(inner: str, f: int = 64) -> list[dict]:
    """The launch variants of one of VARIANT_KERNELS at head dim f. TTT-MLP is timed in tf32 only: with exact
    products its kernels take ptxas minutes and spill over 100 KB per thread at f = 64 (`make check-kernels
    --precision ieee`)."""
    from architectures.ttt.triton_linear import _block

    if inner == "mamba":
        return MAMBA_VARIANTS
    if inner == "mlp":
        return [v for v in VARIANTS if v["precision"] == "tf32"]
    return VARIANTS + (WIDE_ROW_VARIANTS if _block(f) > 64 else [])


def variant_name(inner: str, v: dict, f: int = 64) -> str:
    """The variant's row name; past f = 64, TTT-Linear's names say how many rows of W its kernels hold at once."""
    if inner == "mamba":
        return f"mamba scan [triton, BLOCK_D {v['BLOCK_D']}, {v['NUM_WARPS']} warps]"
    from architectures.ttt.triton_linear import Launch, _block

    held = ""  # how TTT-Linear's kernels hold W, where it is not simply whole
    if inner == "linear":
        rows, bf = Launch(**v).rows(f), _block(f)
        held = f", W in {rows}-row tiles" if rows < bf else ", W whole" if bf > 64 else ""
    return f"ttt_{inner} [triton {v['precision']}, {v['num_warps']} warps, {v['num_stages']} stages{held}]"


def _variant_runner(inner: str):
    """(the context that applies a variant, the contender, its outputs) for one of VARIANT_KERNELS."""
    if inner == "mamba":
        from architectures.mamba.triton_scan import launch_settings as mamba_settings

        return lambda v: mamba_settings(**v), mamba_scan_ours, _mamba_outputs
    from architectures.ttt.triton_linear import launch_settings

    return (lambda v: launch_settings(**v), lambda *a: ttt_triton(inner, *a),
            lambda *a: _triton_outputs(inner, *a))


def _mamba_outputs(B, H, T, f, device, backward):
    """The scan's output (and the gradient of u when backward) on _mamba_inputs' fixed inputs, under the current
    launch settings."""
    x = _mamba_inputs(B, H, T, f, device, backward)
    out = _mamba_scan(x)
    if not backward:
        return out.detach().float(), None
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * proj).sum().backward()
    return out.detach().float(), x["u"].grad.float()


def _triton_outputs(inner, B, H, T, f, device, backward):
    """Our kernels' output (and dq when backward) on _ttt_inputs' fixed inputs, under the current LAUNCH."""
    from architectures.ttt import triton_linear, triton_mlp

    x = _ttt_inputs(B, H, T, f, inner, device, backward)
    names = ["W", "b"] if inner == "linear" else ["W1", "b1", "W2", "b2"]
    out = {"linear": triton_linear, "mlp": triton_mlp}[inner].prefill(
        *[x[n] for n in ("q", "k", "v", "a", "tok", "ln_w", "ln_b")], {n: x[n] for n in names})[0]
    if not backward:
        return out.detach().float(), None
    # a random projection: with the sum of the outputs and the inner LN's weight at 1, the LN's backward
    # gives zero and dq would be the identity whatever the kernel computes
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out.float() * proj).sum().backward()
    return out.detach().float(), x["q"].grad.float()


def variant_rows(add, inners, lengths, B, bwd_B, H, f, device, max_seconds, modes=("fwd", "fwd+bwd"),
                 precisions=("ieee", "tf32")) -> list[dict]:
    """Each launch variant of our kernels: ms per call (forward at B, forward+backward at bwd_B) and the
    relative RMSE of its output and of the first input's gradient (dq; Mamba: du) against the first variant that
    ran (`error_against`; exact fp32 products at 4 warps for TTT-Linear unless --precisions leaves them out; the
    default launch for Mamba)."""
    rows = []
    for inner in inners:
        variants = [v for v in variants_for(inner, f) if "precision" not in v or v["precision"] in precisions]
        settings, contender, outputs = _variant_runner(inner)
        for backward, batch in [(bw, b) for bw, b in ((False, B), (True, bwd_B)) if MODES[bw] in modes]:
            for T in lengths:
                ref = None
                for v in variants:
                    with settings(v):
                        row = kernel_row(variant_name(inner, v, f), contender, batch, H, T, f, device, backward)
                        row.update(variant=v)
                        if row["status"] == "ok":
                            out, dq = outputs(batch, H, T, f, device, backward)
                            ref = ref or (out, dq, v)
                            row["error_against"] = ref[2]
                            row["out_rel_rmse"] = _rel_rmse(out, ref[0])
                            if dq is not None:
                                row["dq_rel_rmse"] = _rel_rmse(dq, ref[1])
                    rows.append(row)
                    add(row)
                if all(r.get("ms", 0) > 1e3 * max_seconds for r in rows[-len(variants):]):
                    break  # every variant too slow at this T: no longer ones
    return rows


def _rel_rmse(x, y) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


class Record:
    """The benchmark's rows, written to its JSON after each one (a stage stopped by its time limit keeps
    what it measured; `complete` says whether the run got to its end) and printed."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.rows, self.t0 = path, header, [], time.perf_counter()

    def _write(self, complete: bool) -> None:
        atomic_write_json(self.path, {**self.header, "complete": complete,
                                      "wall_s": time.perf_counter() - self.t0, "rows": self.rows})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write(False)
        errs = " ".join(f"{k}={row[k]:.1e}" for k in ("out_rel_rmse", "dq_rel_rmse") if k in row)
        shown = f"{row['ms']:.3f} ms {errs}".rstrip() if row["status"] == "ok" else row["status"]
        print(f"[ttt-bench] {row['mode']:8s} {row['impl']:44s} T={row['T']:6d} B={row['batch']:3d}: {shown}",
              flush=True)

    def close(self) -> float:
        self._write(True)
        return time.perf_counter() - self.t0


def kernel_row(name, build, B, H, T, f, device, backward) -> dict:
    """One contender at one shape: median milliseconds per call (bench/timing.py) and its spread."""
    row = {"impl": name, "T": T, "batch": B, "heads": H, "head_dim": f, "mode": "fwd+bwd" if backward else "fwd"}
    try:
        fn = build(B, H, T, f, device, backward)
        t = measure(fn, device, **({} if device.type == "cuda" else {"repeats": 1, "max_warmup_calls": 1}))
        ms = 1e3 * t.median
        row.update(status="ok", ms=ms, spread=t.spread, tokens_per_s=B * T / (ms / 1e3))
    except ImportError as e:
        row.update(status="not installed", error=str(e))
    except NeedsCuda as e:
        row.update(status="needs CUDA", error=str(e))
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="out of memory", error=str(e).splitlines()[0])
    except Exception as e:  # a contender that cannot run here is recorded, the others go on
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.ttt_kernel_speed", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default=None, help=f"comma list of T (default {','.join(map(str, LENGTHS))}; "
                                                   "--smoke: 32,64)")
    p.add_argument("--batch", type=int, default=16, help="forward batch (the paper's latency figure: 16)")
    p.add_argument("--bwd-batch", type=int, default=4, help="forward+backward batch (memory)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=None, help="default 64 (the 1.3B layer); --smoke: 16")
    p.add_argument("--only", default="", help="comma list of contender names (substrings) to run")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="skip a contender's longer lengths once one call takes longer than this")
    p.add_argument("--variants", default="",
                   help="instead of the contenders: our kernels' launch variants for these kernels (linear, mlp:\n"
                        "TTT's, precision x warps; mamba: Mamba-1's scan, BLOCK_D x warps), timed and compared\n"
                        "with the first (the exact or default one)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--precisions", default="ieee,tf32", help="--variants: the products' precisions to time")
    p.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny shapes, interpreter")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.lengths = args.lengths or "32,64"
        args.batch, args.bwd_batch, args.heads = 1, 1, 2
    elif device.type != "cuda":
        print("error: this benchmark needs a CUDA GPU (use --smoke to check it on CPU)", file=sys.stderr)
        return 2
    args.head_dim = args.head_dim or (16 if args.smoke else 64)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("error: on CPU the Triton kernels need TRITON_INTERPRET=1 set before start", file=sys.stderr)
        return 2
    lengths = [int(t) for t in (args.lengths or ",".join(map(str, LENGTHS))).split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES.values()):
        print(f"error: --modes takes fwd and/or fwd+bwd, got {args.modes!r}", file=sys.stderr)
        return 2
    names = [n for n in CONTENDERS if not args.only or any(s.strip() and s.strip() in n for s in args.only.split(","))]
    inners = [i.strip() for i in args.variants.split(",") if i.strip()]
    if set(inners) - set(VARIANT_KERNELS):
        print(f"error: --variants takes {', '.join(VARIANT_KERNELS)}, got {args.variants!r}", file=sys.stderr)
        return 2
    out = Path(args.results)
    stem = "ttt_kernel_variants" if inners else "ttt_kernel_speed"
    record = Record(out / "bench" / f"{stem}.json", {"device": device_name(device), "packages": package_versions(),
                                                      "shape": {"heads": args.heads, "head_dim": args.head_dim}})
    if inners:
        variant_rows(record.add, inners, lengths, args.batch, args.bwd_batch, args.heads, args.head_dim, device,
                     args.max_seconds, modes, [x.strip() for x in args.precisions.split(",")])
        names = []
    for backward, B in [(bw, b) for bw, b in ((False, args.batch), (True, args.bwd_batch)) if MODES[bw] in modes]:
        for name in names:
            slow = False
            for T in lengths:
                if slow:
                    record.add({"impl": name, "T": T, "batch": B, "mode": MODES[backward],
                                "status": f"skipped: a shorter T took over {args.max_seconds} s"})
                    continue
                row = kernel_row(name, CONTENDERS[name], B, args.heads, T, args.head_dim, device, backward)
                record.add(row)
                slow = row["status"] == "ok" and row["ms"] > 1e3 * args.max_seconds
                if row["status"] in ("not installed", "needs CUDA"):
                    break
    wall_s = record.close()
    (out / "plots").mkdir(parents=True, exist_ok=True)
    from bench.plots import plot_kernel_speed  # matplotlib only once there is something to draw

    plot_kernel_speed(record.rows, out / "plots" / f"{stem}.png",
                      f"TTT kernels vs attention and Mamba, {args.heads} heads x {args.head_dim}, {record.header['device']}")
    print(f"[ttt-bench] wrote {record.path} and {out / 'plots' / f'{stem}.png'} in {wall_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
