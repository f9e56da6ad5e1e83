"""The TTT inner loop in dual form, one mini-batch at a time (the fast PyTorch path).

Inside a mini-batch every gradient is taken at the weights W of its start, so the b updated
weights never need to be materialised: with E[i, j] = tok_i * a_j for j <= i (the rank-1 inner
learning rate, lower-triangular), TTT-Linear is (docs/ttt_math.md, "Dual form")

    Z = K W + b,  G = LNgrad(Z, V - K)                       G: (b, f)
    Zbar = Q W + b - (E * QK^T) G - E G                        row i uses W_i = W - sum_j E[i,j] k_j^T G_j
    out = Q + LN(Zbar)
    W <- W - tok_b K^T (a * G),  b <- b - tok_b sum_j a_j G_j  (when the mini-batch is complete)

and TTT-MLP applies the same twice (layer 2 with X2 = gelu(K W1 + b1) in place of K).

Decoding and prefills that stop mid mini-batch carry the partial sums GW = K^T (a * G) and
Gb = sum_j a_j G_j of the mini-batch so far ("accumulators"): row i then also subtracts
tok_i (q_i GW + Gb). A trailing partial mini-batch is processed with the same formulas and
committed only when it completes. Mini-batches longer than LONG_PIECE tokens go the same way, one
piece of LONG_PIECE tokens at a time.

The Table 1 ablation options (layer.py) change only what the formulas above make of it:
inner_ln=false drops the LN (G = Z - t, out = Q + Zbar), inner_residual=false the residual
(t = V, out = LN(Zbar)), inner_bias=false the bias (M = E * QK^T); a constant eta is tok = 1,
a = eta. With all four and W0 = 0, b = T, eta = 1 this is linear attention (Theorem 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from architectures.ttt import cpu_scan
from architectures.ttt.inner import gelu_tanh, gelu_tanh_and_grad, layer_norm_fused, ln_loss_grad
from architectures.ttt.scan import ScanKernels, linear_scan

# mini-batches longer than this many tokens are processed in pieces of it, carrying the accumulators between
# pieces (exact: every gradient of a mini-batch is taken at the weights of its start). Batch GD over the whole
# sequence (b = T) then costs O(T (f^2 + LONG_PIECE f)) per head rather than the O(T^2 f) of one T x T block.
LONG_PIECE = 64

# inner weights of each inner model, as (name of the weight, name of its bias) per layer
LAYERS = {"linear": [("W", "b")], "mlp": [("W1", "b1"), ("W2", "b2")]}


@dataclass
class InnerState:
    """Inner weights at the start of the current mini-batch, the accumulators of the tokens of it
    seen so far, and how many those are (offset, 0 <= offset < b). Tensors are (B, H, ...), fp32;
    biases (names starting with "b") are (B, H, 1, n), rows that broadcast over tokens (the Triton kernels
    take them as (B, H, n): flat_biases / row_biases convert). owned: the tensors belong to this state alone
    (made by the Triton backend without a gradient), so its decode kernel may update them in place; a state
    built from a layer's initial weights, or kept by autograd, is copied first."""

    params: dict[str, torch.Tensor]
    acc: dict[str, torch.Tensor] = field(default_factory=dict)
    offset: int = 0
    owned: bool = False

    @classmethod
    def fresh(cls, init: dict[str, torch.Tensor]) -> "InnerState":
        """The state before any token, from a layer's per-head initial weights (H, ...), biases (H, n)."""
        return cls(row_biases({n: p[None] for n, p in init.items()}))


def flat_biases(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Biases (..., 1, n) -> (..., n); weights as they are."""
    return {n: (t.squeeze(-2) if n.startswith("b") else t) for n, t in d.items()}


def row_biases(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Biases (..., n) -> (..., 1, n); weights as they are."""
    return {n: (t.unsqueeze(-2) if n.startswith("b") else t) for n, t in d.items()}


def _piece_linear(p, acc, q, k, t, a, tok, E, M):
    """One piece (c <= b tokens) of a mini-batch, TTT-Linear. q, k, t = v - k: (B, H, c, f);
    a (B, H, c); tok (c,); E = tril(tok a^T), M = E * (Q K^T + 1): (B, H, c, c).
    Returns Zbar (B, H, c, f) and the accumulator increments of this piece."""
    W, b = p["W"], p.get("b")  # (B|1, H, f, f), (B|1, H, 1, f) or None (inner_bias=false)
    c = q.shape[-2]
    Z = torch.cat([k, q], dim=-2) @ W  # (B, H, 2c, f): K W, Q W in one matmul
    if b is not None:
        Z = Z + b
    G = _loss_grad(Z[..., :c, :], t, p)  # (B, H, c, f)
    zbar = Z[..., c:, :] - M @ G  # row i: q_i (W - sum_j E_ij k_j^T G_j) + b - sum_j E_ij G_j
    if acc:
        zbar = zbar - tok[:, None] * (q @ acc["W"] + acc["b"] if b is not None else q @ acc["W"])
    aG = a[..., None] * G
    inc = {"W": k.transpose(-1, -2) @ aG}
    if b is not None:
        inc["b"] = aG.sum(-2, keepdim=True)
    return zbar, inc


def _piece_mlp(p, acc, q, k, t, a, tok, E, M):
    """TTT-MLP, f_res(x) = gelu(x W1 + b1) W2 + b2 (hidden 4f). Arguments as _piece_linear."""
    W1, b1, W2, b2 = p["W1"], p["b1"], p["W2"], p["b2"]
    c = q.shape[-2]
    Z1 = torch.cat([k, q], dim=-2) @ W1 + b1  # (B, H, 2c, 4f)
    X2, dX2 = gelu_tanh_and_grad(Z1[..., :c, :])  # (B, H, c, 4f)
    G2 = _loss_grad(X2 @ W2 + b2, t, p)  # (B, H, c, f)
    G1 = (G2 @ W2.transpose(-1, -2)) * dX2  # (B, H, c, 4f)
    zbar1 = Z1[..., c:, :] - M @ G1
    if acc:
        zbar1 = zbar1 - tok[:, None] * (q @ acc["W1"] + acc["b1"])
    xbar2 = gelu_tanh(zbar1)
    zbar2 = xbar2 @ W2 + b2 - (E * (xbar2 @ X2.transpose(-1, -2) + 1)) @ G2
    if acc:
        zbar2 = zbar2 - tok[:, None] * (xbar2 @ acc["W2"] + acc["b2"])
    aG1, aG2 = a[..., None] * G1, a[..., None] * G2
    return zbar2, {"W1": k.transpose(-1, -2) @ aG1, "b1": aG1.sum(-2, keepdim=True),
                   "W2": X2.transpose(-1, -2) @ aG2, "b2": aG2.sum(-2, keepdim=True)}


PIECE = {"linear": _piece_linear, "mlp": _piece_mlp}


def _loss_grad(z, t, p):
    """dl/dZ of l = 0.5 ||LN(Z) - t||^2, or of 0.5 ||Z - t||^2 = Z - t without the inner LN
    (inner_ln=false: no "_ln_w" rides along with the weights)."""
    if "_ln_w" in p:
        return ln_loss_grad(z, t, p["_ln_w"], p["_ln_b"])
    return z - t


def _lr_matrices(q, k, a, tok, bias: bool = True):
    """E[i, j] = tok_i a_j for j <= i and M = E * (Q K^T + 1), over the last two dims: (..., c, c).
    The + 1 is the bias's gradient; without an inner bias (inner_bias=false) M = E * Q K^T."""
    E = torch.tril(tok[:, None] * a[..., None, :])
    scores = q @ k.transpose(-1, -2)
    return E, E * (scores + 1 if bias else scores)


def _has_bias(inner: str, params) -> bool:
    return inner == "mlp" or "b" in params


def _step(inner, params, acc, q, k, t, a, tok, E, M, complete: bool, piece=None):
    """Process one piece; return Zbar, the new params and the new accumulators."""
    zbar, inc = (piece or PIECE[inner])(params, acc, q, k, t, a, tok, E, M)
    total = {n: acc[n] + inc[n] for n in inc} if acc else inc
    if not complete:
        return zbar, params, total
    return zbar, {n: (params[n] - tok[-1] * total[n]) if n in total else params[n] for n in params}, {}


def _full_minibatches(inner, params, q, k, t, a, tok, b: int, group: int, piece=None, scan: ScanKernels | None = None):
    """Whole mini-batches from offset 0: their Zbar pieces and the weights after them. Everything that does not
    depend on the inner weights (E, M) is computed for all mini-batches at once; the loop carries only the
    weights. With group > 0 the loop is recomputed in backward every `group` mini-batches. scan: the loop is one
    autograd op with a hand-derived backward (scan.py; TTT-Linear with its LN and bias; with scan.cpp and no
    gradient, ttt_dual calls cpu_scan instead)."""
    B, H, T, f = q.shape
    n = T // b
    qs, ks, ts = (x.reshape(B, H, n, b, f) for x in (q, k, t))  # (B, H, n, b, f)
    As = a.reshape(B, H, n, b)
    Es, Ms = _lr_matrices(qs, ks, As, tok, _has_bias(inner, params))  # (B, H, n, b, b)
    if scan is not None:
        zbar, W, bias = linear_scan(qs, ks, ts, As, Ms, tok[-1:], params["W"], params["b"],
                                    params["_ln_w"], params["_ln_b"], scan)
        return [zbar.reshape(B, H, T, f)], {**params, "W": W, "b": bias}
    # unbind, not indexing: the backward of n index ops would add n full-size zero tensors
    per_mb = list(zip(*(x.unbind(2) for x in (qs, ks, ts, As, Es, Ms))))
    names = sorted(params)

    def run(first: int, count: int, *flat):
        ps = dict(zip(names, flat))
        zbars = []
        for i in range(first, first + count):
            qi, ki, ti, ai, Ei, Mi = per_mb[i]
            zbar, ps, _ = _step(inner, ps, {}, qi, ki, ti, ai, tok, Ei, Mi, True, piece)
            zbars.append(zbar)
        return (torch.cat(zbars, dim=2), *[ps[m] for m in names])

    zbars = []
    step = group if group > 0 else n
    for first in range(0, n, step):
        count = min(step, n - first)
        flat = [params[m] for m in names]
        if group > 0 and torch.is_grad_enabled():
            res = checkpoint(run, first, count, *flat, use_reentrant=False)
        else:
            res = run(first, count, *flat)
        zbars.append(res[0])
        params = dict(zip(names, res[1:]))
    return zbars, params


def ttt_dual(inner: str, state: InnerState, q, k, v, a, tok, ln_w, ln_b, mini_batch: int,
             checkpoint_group: int = 0, full_piece=None, ln: bool = True, residual: bool = True,
             scan: ScanKernels | None = None):
    """Outputs (B, H, T, f) for T new tokens continuing `state`, and the state after them.

    q, k, v (B, H, T, f); a (B, H, T) key factor base_lr * gate / f; tok (b,) query factor
    tok_i = max(0, 1/i + delta_i); ln_w, ln_b (H, 1, f). Any T, any starting offset.
    full_piece: an optional drop-in for PIECE[inner] on whole mini-batches (e.g. torch.compile'd).
    ln=False, residual=False: f without its LN (ln_w, ln_b unused) or its residual, i.e.
    out = [q +] [LN](Zbar) with the target [v - k | v] (the options inner_ln, inner_residual).
    A TTT-Linear state without "b" has no inner bias (inner_bias=false).
    scan: whole mini-batches of TTT-Linear (with its LN, residual and bias) go through scan.py's one
    autograd op, with these elementwise kernels, instead of full_piece or the per-mini-batch ops (the
    same math, 2x faster to train on CPU). With scan.cpp and no gradient, whole mini-batches (cpu_scan.infer,
    infer_mlp) and the pieces inside one (cpu_scan.decode, decode_mlp: decoding, an open or trailing mini-batch)
    are one C++ call each, for TTT-Linear and TTT-MLP; with a gradient, TTT-MLP's whole mini-batches go through
    cpu_scan.MLPScan (both loops in C++). Other options ignore it.
    """
    b, T = mini_batch, q.shape[2]

    def target(sl: slice) -> torch.Tensor:
        """A span's reconstruction target: f(k) = k + LN(f_res(k)) should be v."""
        return v[:, :, sl] - k[:, :, sl] if residual else v[:, :, sl]

    params = dict(state.params)
    if ln:
        params.update(_ln_w=ln_w, _ln_b=ln_b)  # the LN rides along with the weights
    bias = _has_bias(inner, params)
    acc, off = state.acc, state.offset
    outs, t = [], 0  # the outputs of consecutive spans of tokens

    def finish(zbar, sl: slice):
        """A span's output from its Zbar: [q +] [LN](Zbar)."""
        out = layer_norm_fused(zbar, ln_w, ln_b) if ln else zbar
        return q[:, :, sl] + out if residual else out  # the residual is with Q

    # without a gradient, backend=cpp runs whole mini-batches and the pieces inside one (decoding) as one C++ call
    # each, the LN and the residual included (cpu_scan.py); not in a compiled step (a decode step through
    # torch.compile, bench/latency._compiled), where a C++ call would break the graph and PyTorch's ops fuse. The
    # fused ops are the faster: with the C++ decode as an operator in the graph (torch.library, no graph break)
    # TTT-Linear decoded at 0.41-0.43 ms per token against 0.28-0.32 (`make throughput ARCH=ttt_linear
    # SIZE=cpu-xs CTX=2k ARGS="--modes decode --compile-decode"`, 2 cores, 2026-12-02)
    cpp = (scan is not None and scan.cpp and ln and residual and bias and not torch.is_grad_enabled()
           and not torch.compiler.is_compiling())
    gamma, beta = (ln_w.reshape(q.shape[1], -1), ln_b.reshape(q.shape[1], -1)) if ln else (None, None)  # (H, f)

    def piece(lo: int, hi: int, tok_piece, complete: bool):
        nonlocal params, acc
        sl = slice(lo, hi)
        if cpp:
            span = (q[:, :, sl], k[:, :, sl], target(sl), a[:, :, sl], tok_piece, complete, gamma, beta)
            if inner == "linear":
                out, new, acc = cpu_scan.decode(*span, params["W"], params["b"], acc)
            else:
                out, new, acc = cpu_scan.decode_mlp(*span, params, acc)
            params = {**params, **new}
            outs.append(out)
            return
        E, M = _lr_matrices(q[:, :, sl], k[:, :, sl], a[:, :, sl], tok_piece, bias)
        zbar, params, acc = _step(inner, params, acc, q[:, :, sl], k[:, :, sl], target(sl), a[:, :, sl],
                                  tok_piece, E, M, complete)
        outs.append(finish(zbar, sl))

    if b > LONG_PIECE:  # long mini-batches (b = T, "seq"): pieces of LONG_PIECE through the accumulators
        while t < T:
            c = min(LONG_PIECE, b - off, T - t)  # a piece never crosses a mini-batch boundary
            if not acc:  # zeros at a mini-batch's start: every piece computes the same products
                acc = {n: torch.zeros_like(p) for n, p in params.items() if not n.startswith("_")}
            piece(t, t + c, tok[off:off + c], off + c == b)
            t, off = t + c, (off + c) % b
    else:
        if off:  # finish the mini-batch a previous call left open
            c = min(b - off, T)
            piece(0, c, tok[off:off + c], off + c == b)
            t, off = c, (off + c) % b
        n_full = (T - t) // b
        if n_full:
            sl = slice(t, t + n_full * b)
            if cpp:  # the outputs straight from C++, which reads v where it lies and forms the target itself
                span = (q[:, :, sl], k[:, :, sl], v[:, :, sl], a[:, :, sl], tok)
                if inner == "linear":
                    out, W, bias_after = cpu_scan.infer(*span, gamma, beta, params["W"], params["b"])
                    new = {"W": W, "b": bias_after}
                else:
                    out, new = cpu_scan.infer_mlp(*span, gamma, beta, params)
            else:
                span = (q[:, :, sl], k[:, :, sl], target(sl), a[:, :, sl], tok)
                if inner == "mlp" and scan is not None and scan.cpp and ln and residual and checkpoint_group == 0:
                    zbar, new = cpu_scan.mlp_scan(*span, gamma, beta, params)  # TTT-MLP training: both loops in C++
                    out = finish(zbar, sl)
                else:
                    linear_scan = inner == "linear" and ln and residual and bias and checkpoint_group == 0
                    use_scan = scan if linear_scan else None
                    full, new = _full_minibatches(inner, params, *span, b, checkpoint_group, full_piece, use_scan)
                    out = finish(full[0] if len(full) == 1 else torch.cat(full, dim=2), sl)
            params = {**params, **new}
            outs.append(out)
            t += n_full * b
        if t < T:  # a trailing partial mini-batch: processed, its update kept as accumulators
            piece(t, T, tok[: T - t], False)
            off = T - t
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    weights = {n: p for n, p in params.items() if not n.startswith("_")}
    return out, InnerState(weights, acc, off)
