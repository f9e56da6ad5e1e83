"""Tokens/s of one TTT layer: the token-by-token reference vs the dual form, forward and
forward+backward, at the 125M shape (d=768, 12 heads of 64, T=2048), batch 1 and 4, on this machine.

Two scopes are timed: `layer` (the whole TTTLayer: projections, convs, RoPE, inner loop, post-norm,
gate, output projection) and `inner` (the inner loop alone, ttt_reference vs ttt_dual on the same
q, k, v, lr tensors: the only part in which the two implementations differ). The layer ratio is
bounded by the projections both share (Amdahl).

    python -m bench.ttt_layer_speed [--d 768 --heads 12 --T 2048 --batches 1,4 --ref-tokens 64]
    make bench-ttt

The reference is a Python loop over tokens whose work per token does not depend on the position
(each token sums at most b = 16 gradients), so its tokens/s is measured on the first --ref-tokens
tokens of the same input; the dual form runs the whole T. Ratios come from one run of this script.
Writes RESULTS/bench/ttt_layer_speed.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from architectures import ModelConfig
from architectures.ttt.layer import TTTLayer
from bench.results import atomic_write_json, device_name
from bench.timing import time_forward_and_backward


def inner_loop_speed(layer: TTTLayer, x: torch.Tensor, impl: str, repeats: int) -> dict:
    """The inner loop alone on the q, k, v and key factors the layer computes for x."""
    from architectures.ttt.dual import InnerState, ttt_dual
    from architectures.ttt.reference import ttt_reference

    B, T, d = x.shape
    H, f = layer.n_heads, layer.head_dim
    with torch.no_grad():
        q, k, v = (torch.randn(B, H, T, f) for _ in range(3))
        a = layer.key_factor(x)
    leaves = [q, k, v, a, layer.ln_weight, layer.ln_bias, *layer.initial_params().values()]

    def call():
        tok, ln_w, ln_b = layer.token_factor(), layer.ln_weight, layer.ln_bias
        init = layer.initial_params()
        if impl == "reference":
            return ttt_reference(init, q, k, v, a, tok, ln_w, ln_b, layer.mini_batch, layer.inner)
        state = InnerState.fresh(init)
        return ttt_dual(layer.inner, state, q, k, v, a, tok, ln_w[:, None], ln_b[:, None], layer.mini_batch)[0]

    for t in (q, k, v, a):
        t.requires_grad_()
    return _tokens_per_s(B * T, *time_forward_and_backward(call, leaves, repeats))


def layer_speed(layer: TTTLayer, x: torch.Tensor, repeats: int) -> dict:
    leaves = [x.requires_grad_(), *layer.parameters()]
    return _tokens_per_s(x.shape[0] * x.shape[1], *time_forward_and_backward(lambda: layer(x), leaves, repeats))


def _tokens_per_s(n: int, fwd_s: float, fwd_bwd_s: float) -> dict:
    return {"fwd_tokens_per_s": n / fwd_s, "fwd_bwd_tokens_per_s": n / fwd_bwd_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--inner", default="linear,mlp")
    p.add_argument("--ref-tokens", type=int, default=64, help="tokens the reference is timed on")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"device: {device_name('cpu')}, {torch.get_num_threads()} threads; d={args.d}, {args.heads} heads, T={args.T}")
    print(f"{'layer':<11} {'scope':<6} {'B':>2} {'impl':<9} {'T':>5} {'fwd tok/s':>11} {'fwd+bwd tok/s':>14}")
    for inner in args.inner.split(","):
        cfg = ModelConfig(f"ttt_{inner}", 257, args.d, 1, args.heads, 4 * args.d, args.T,
                          options={"inner": inner, "backbone": "mamba", "backend": "dual"})
        layer = TTTLayer(cfg)
        for scope in ("layer", "inner"):
            for B in (int(b) for b in args.batches.split(",")):
                x = torch.randn(B, args.T, args.d)
                res = {}
                for impl, T, reps in (("dual", args.T, args.repeats), ("reference", args.ref_tokens, 1)):
                    xi = x[:, :T].clone()
                    if scope == "layer":
                        layer.backend = impl
                        res[impl] = layer_speed(layer, xi, reps)
                    else:
                        res[impl] = inner_loop_speed(layer, xi, impl, reps)
                    row = {"layer": f"ttt_{inner}", "scope": scope, "batch": B, "impl": impl,
                           "timed_tokens_per_seq": T, **res[impl]}
                    rows.append(row)
                    print(f"{row['layer']:<11} {scope:<6} {B:>2} {impl:<9} {T:>5} {row['fwd_tokens_per_s']:>11,.1f} "
                          f"{row['fwd_bwd_tokens_per_s']:>14,.1f}")
                fwd = res["dual"]["fwd_tokens_per_s"] / res["reference"]["fwd_tokens_per_s"]
                fb = res["dual"]["fwd_bwd_tokens_per_s"] / res["reference"]["fwd_bwd_tokens_per_s"]
                print(f"{'':<11} {scope:<6} {B:>2} dual/reference: forward {fwd:,.1f}x, forward+backward {fb:,.1f}x")
                rows.append({"layer": f"ttt_{inner}", "scope": scope, "batch": B, "impl": "dual/reference",
                             "fwd_speedup": fwd, "fwd_bwd_speedup": fb})
        layer.backend = "dual"
    out = Path(args.results) / "bench" / "ttt_layer_speed.json"
    atomic_write_json(out, {"device": device_name("cpu"), "threads": torch.get_num_threads(), "d": args.d,
                            "heads": args.heads, "T": args.T, "ref_tokens": args.ref_tokens, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
