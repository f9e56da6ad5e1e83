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

from architectures.ttt.inner import gelu_tanh, gelu_tanh_grad, layer_norm, ln_loss_grad

# inner weights of each inner model, as (name of the weight, name of its bias) per layer
LAYERS = {"linear": [("W", "b")], "mlp": [("W1", "b1"), ("W2", "b2")]}


@dataclass
class InnerState:
    """Inner weights at the start of the current mini-batch, the accumulators of the tokens of it
    seen so far, and how many those are (offset, 0 <= offset < b). Tensors are (B, H, ...), fp32."""

    params: dict[str, torch.Tensor]
    acc: dict[str, torch.Tensor] = field(default_factory=dict)
    offset: int = 0


def _chunk_linear(p, acc, q, k, v, a, tok, ln_w, ln_b):
    """One piece of a mini-batch. q, k, v (B, H, c, f); a (B, H, c); tok (c,). Returns out and the
    accumulator increments (the update over this piece, before the tok_b factor)."""
    W, b = p["W"], p["b"]  # (B|1, H, f, f), (B|1, H, 1, f)
    G = ln_loss_grad(k @ W + b, v - k, ln_w, ln_b)  # (B, H, c, f)
    E = torch.tril(tok[:, None] * a[..., None, :])  # (B, H, c, c): E[i, j] = tok_i a_j, j <= i
    zbar = q @ W + b - (E * (q @ k.transpose(-1, -2))) @ G - E @ G  # (B, H, c, f)
    if acc:
        zbar = zbar - tok[:, None] * (q @ acc["W"] + acc["b"])
    out = q + layer_norm(zbar, ln_w, ln_b)
    aG = a[..., None] * G  # (B, H, c, f)
    return out, {"W": k.transpose(-1, -2) @ aG, "b": aG.sum(-2, keepdim=True)}


def _chunk_mlp(p, acc, q, k, v, a, tok, ln_w, ln_b):
    """TTT-MLP: f_res(x) = gelu(x W1 + b1) W2 + b2, hidden 4f. Shapes as _chunk_linear."""
    W1, b1, W2, b2 = p["W1"], p["b1"], p["W2"], p["b2"]
    Z1 = k @ W1 + b1  # (B, H, c, 4f)
    X2 = gelu_tanh(Z1)
    G2 = ln_loss_grad(X2 @ W2 + b2, v - k, ln_w, ln_b)  # (B, H, c, f)
    G1 = (G2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(Z1)  # (B, H, c, 4f)
    E = torch.tril(tok[:, None] * a[..., None, :])  # (B, H, c, c)
    zbar1 = q @ W1 + b1 - (E * (q @ k.transpose(-1, -2))) @ G1 - E @ G1
    if acc:
        zbar1 = zbar1 - tok[:, None] * (q @ acc["W1"] + acc["b1"])
    xbar2 = gelu_tanh(zbar1)
    zbar2 = xbar2 @ W2 + b2 - (E * (xbar2 @ X2.transpose(-1, -2))) @ G2 - E @ G2
    if acc:
        zbar2 = zbar2 - tok[:, None] * (xbar2 @ acc["W2"] + acc["b2"])
    out = q + layer_norm(zbar2, ln_w, ln_b)
    aG1, aG2 = a[..., None] * G1, a[..., None] * G2
    return out, {"W1": k.transpose(-1, -2) @ aG1, "b1": aG1.sum(-2, keepdim=True),
                 "W2": X2.transpose(-1, -2) @ aG2, "b2": aG2.sum(-2, keepdim=True)}


CHUNK = {"linear": _chunk_linear, "mlp": _chunk_mlp}


def _step(inner, params, acc, q, k, v, a, tok, ln_w, ln_b, complete: bool):
    """Process one piece; return out, the new params and the new accumulators."""
    out, inc = CHUNK[inner](params, acc, q, k, v, a, tok, ln_w, ln_b)
    total = {n: acc[n] + inc[n] for n in inc} if acc else inc
    if not complete:
        return out, params, total
    return out, {n: params[n] - tok[-1] * total[n] for n in params}, {}


def _full_minibatches(inner, params, q, k, v, a, tok, ln_w, ln_b, n: int, b: int, group: int):
    """n whole mini-batches from offset 0, optionally recomputed in groups of `group` in backward."""
    names = sorted(params)

    def run(first: int, count: int, *flat):
        ps = dict(zip(names, flat))
        outs = []
        for i in range(first, first + count):
            sl = slice(i * b, (i + 1) * b)
            out, ps, _ = _step(inner, ps, {}, q[:, :, sl], k[:, :, sl], v[:, :, sl], a[:, :, sl], tok, ln_w, ln_b, True)
            outs.append(out)
        return (torch.cat(outs, dim=2), *[ps[m] for m in names])

    outs = []
    step = group if group > 0 else n
    for first in range(0, n, step):
        count = min(step, n - first)
        flat = [params[m] for m in names]
        if group > 0 and torch.is_grad_enabled():
            res = checkpoint(run, first, count, *flat, use_reentrant=False)
        else:
            res = run(first, count, *flat)
        outs.append(res[0])
        params = dict(zip(names, res[1:]))
    return outs, params


def ttt_dual(inner: str, state: InnerState, q, k, v, a, tok, ln_w, ln_b, mini_batch: int,
             checkpoint_group: int = 0):
    """Outputs (B, H, T, f) for T new tokens continuing `state`, and the state after them.

    q, k, v (B, H, T, f); a (B, H, T) key factor base_lr * gate / f; tok (b,) query factor
    tok_i = max(0, 1/i + delta_i); ln_w, ln_b (H, 1, f). Any T, any starting offset.
    """
    b, T = mini_batch, q.shape[2]
    params, acc, off = state.params, state.acc, state.offset
    outs, t = [], 0
    if off:  # finish the mini-batch a previous call left open
        c = min(b - off, T)
        out, params, acc = _step(inner, params, acc, q[:, :, :c], k[:, :, :c], v[:, :, :c], a[:, :, :c],
                                 tok[off:off + c], ln_w, ln_b, off + c == b)
        outs.append(out)
        t, off = c, (off + c) % b
    n_full = (T - t) // b
    if n_full:
        sl = slice(t, t + n_full * b)
        full, params = _full_minibatches(inner, params, q[:, :, sl], k[:, :, sl], v[:, :, sl], a[:, :, sl],
                                         tok, ln_w, ln_b, n_full, b, checkpoint_group)
        outs.extend(full)
        t += n_full * b
    if t < T:  # a trailing partial mini-batch: processed, its update kept as accumulators
        c = T - t
        out, params, acc = _step(inner, params, acc, q[:, :, t:], k[:, :, t:], v[:, :, t:], a[:, :, t:],
                                 tok[:c], ln_w, ln_b, False)
        outs.append(out)
        off = c
    return torch.cat(outs, dim=2), InnerState(params, acc, off)
