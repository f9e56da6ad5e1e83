"""The TTT inner loop in dual form, one mini-batch at a time (the fast PyTorch path).

Inside a mini-batch every gradient is taken at the weights W of its start, so the b updated
weights never need to be materialised: with E[i, j] = tok_i * a_j for j <= i (the rank-1 inner
learning rate, lower-triangular), TTT-Linear is (shared notes ttt_semantics.md, "Dual form")

    Z = K W + b,  G = LNgrad(Z, V - K)                       G: (b, f)
    Zbar = Q W + b - (E * QK^T) G - E G                        row i uses W_i = W - sum_j E[i,j] k_j^T G_j
    out = Q + LN(Zbar)
    W <- W - tok_b K^T (a * G),  b <- b - tok_b sum_j a_j G_j  (when the mini-batch is complete)

and TTT-MLP applies the same twice (layer 2 with X2 = gelu(K W1 + b1) in place of K).

Decoding and prefills that stop mid mini-batch carry the partial sums GW = K^T (a * G) and
Gb = sum_j a_j G_j of the mini-batch so far ("accumulators"): row i then also subtracts
tok_i (q_i GW + Gb). A trailing partial mini-batch is processed with the same formulas and
committed only when it completes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from architectures.ttt.inner import gelu_tanh, gelu_tanh_and_grad, layer_norm, ln_loss_grad

# inner weights of each inner model, as (name of the weight, name of its bias) per layer
LAYERS = {"linear": [("W", "b")], "mlp": [("W1", "b1"), ("W2", "b2")]}


@dataclass
class InnerState:
    """Inner weights at the start of the current mini-batch, the accumulators of the tokens of it
    seen so far, and how many those are (offset, 0 <= offset < b). Tensors are (B, H, ...), fp32."""

    params: dict[str, torch.Tensor]
    acc: dict[str, torch.Tensor] = field(default_factory=dict)
    offset: int = 0


def _piece_linear(p, acc, q, k, t, a, tok, E, M):
    """One piece (c <= b tokens) of a mini-batch, TTT-Linear. q, k, t = v - k: (B, H, c, f);
    a (B, H, c); tok (c,); E = tril(tok a^T), M = E * (Q K^T + 1): (B, H, c, c).
    Returns Zbar (B, H, c, f) and the accumulator increments of this piece."""
    W, b = p["W"], p["b"]  # (B|1, H, f, f), (B|1, H, 1, f)
    c = q.shape[-2]
    Z = torch.cat([k, q], dim=-2) @ W + b  # (B, H, 2c, f): K W + b, Q W + b in one matmul
    G = ln_loss_grad(Z[..., :c, :], t, *_ln(p))  # (B, H, c, f)
    zbar = Z[..., c:, :] - M @ G  # row i: q_i (W - sum_j E_ij k_j^T G_j) + b - sum_j E_ij G_j
    if acc:
        zbar = zbar - tok[:, None] * (q @ acc["W"] + acc["b"])
    aG = a[..., None] * G
    return zbar, {"W": k.transpose(-1, -2) @ aG, "b": aG.sum(-2, keepdim=True)}


def _piece_mlp(p, acc, q, k, t, a, tok, E, M):
    """TTT-MLP, f_res(x) = gelu(x W1 + b1) W2 + b2 (hidden 4f). Arguments as _piece_linear."""
    W1, b1, W2, b2 = p["W1"], p["b1"], p["W2"], p["b2"]
    c = q.shape[-2]
    Z1 = torch.cat([k, q], dim=-2) @ W1 + b1  # (B, H, 2c, 4f)
    X2, dX2 = gelu_tanh_and_grad(Z1[..., :c, :])  # (B, H, c, 4f)
    G2 = ln_loss_grad(X2 @ W2 + b2, t, *_ln(p))  # (B, H, c, f)
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


def _ln(p):
    return p["_ln_w"], p["_ln_b"]


def _lr_matrices(q, k, a, tok):
    """E[i, j] = tok_i a_j for j <= i and M = E * (Q K^T + 1), over the last two dims: (..., c, c)."""
    E = torch.tril(tok[:, None] * a[..., None, :])
    return E, E * (q @ k.transpose(-1, -2) + 1)


def _step(inner, params, acc, q, k, t, a, tok, E, M, complete: bool, piece=None):
    """Process one piece; return Zbar, the new params and the new accumulators."""
    zbar, inc = (piece or PIECE[inner])(params, acc, q, k, t, a, tok, E, M)
    total = {n: acc[n] + inc[n] for n in inc} if acc else inc
    if not complete:
        return zbar, params, total
    return zbar, {n: (params[n] - tok[-1] * total[n]) if n in total else params[n] for n in params}, {}


def _full_minibatches(inner, params, q, k, t, a, tok, b: int, group: int, piece=None):
    """Whole mini-batches from offset 0. Everything that does not depend on the inner weights
    (E, M) is computed for all mini-batches at once; the loop carries only the weights. With
    group > 0 the loop is recomputed in backward every `group` mini-batches."""
    B, H, T, f = q.shape
    n = T // b
    qs, ks, ts = (x.reshape(B, H, n, b, f) for x in (q, k, t))  # (B, H, n, b, f)
    As = a.reshape(B, H, n, b)
    Es, Ms = _lr_matrices(qs, ks, As, tok)  # (B, H, n, b, b)
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
             checkpoint_group: int = 0, full_piece=None):
    """Outputs (B, H, T, f) for T new tokens continuing `state`, and the state after them.

    q, k, v (B, H, T, f); a (B, H, T) key factor base_lr * gate / f; tok (b,) query factor
    tok_i = max(0, 1/i + delta_i); ln_w, ln_b (H, 1, f). Any T, any starting offset.
    full_piece: an optional drop-in for PIECE[inner] on whole mini-batches (e.g. torch.compile'd).
    """
    b, T = mini_batch, q.shape[2]
    t_all = v - k  # reconstruction target
    params = {**state.params, "_ln_w": ln_w, "_ln_b": ln_b}  # the LN rides along with the weights
    acc, off = state.acc, state.offset
    zbars, t = [], 0

    def piece(lo: int, hi: int, tok_piece, complete: bool):
        nonlocal params, acc
        sl = slice(lo, hi)
        E, M = _lr_matrices(q[:, :, sl], k[:, :, sl], a[:, :, sl], tok_piece)
        zbar, params, acc = _step(inner, params, acc, q[:, :, sl], k[:, :, sl], t_all[:, :, sl], a[:, :, sl],
                                  tok_piece, E, M, complete)
        zbars.append(zbar)

    if off:  # finish the mini-batch a previous call left open
        c = min(b - off, T)
        piece(0, c, tok[off:off + c], off + c == b)
        t, off = c, (off + c) % b
    n_full = (T - t) // b
    if n_full:
        sl = slice(t, t + n_full * b)
        full, params = _full_minibatches(inner, params, q[:, :, sl], k[:, :, sl], t_all[:, :, sl], a[:, :, sl],
                                         tok, b, checkpoint_group, full_piece)
        zbars.extend(full)
        t += n_full * b
    if t < T:  # a trailing partial mini-batch: processed, its update kept as accumulators
        piece(t, T, tok[: T - t], False)
        off = T - t
    out = q + layer_norm(torch.cat(zbars, dim=2), ln_w, ln_b)  # the residual is with Q
    weights = {n: p for n, p in params.items() if not n.startswith("_")}
    return out, InnerState(weights, acc, off)
