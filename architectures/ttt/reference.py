"""The plain reference of the TTT inner loop: the primal form, token by token, read off the paper.

For each mini-batch of b tokens, with weights theta at its start (Sun et al. 2024, eq. 5-6 and
Sec. 2.4-2.7; docs/ttt_math.md):

    g_j    = grad_theta l(theta; k_j, v_j),  l = 0.5 * ||LN(f_res(k_j; theta)) - (v_j - k_j)||^2
    theta_i = theta - sum_{j <= i} eta[i, j] * g_j,   eta[i, j] = tok_i * a_j (rank 1)
    out_i  = q_i + LN(f_res(q_i; theta_i))

and theta <- theta_b once the mini-batch is complete. Under the Table 1 options (layer.py) f loses its LN
or its residual (l = 0.5 * ||f(k_j) - v_j||^2 with f as configured), TTT-Linear its bias.
The gradients come from torch.func.grad of the loss as written, not from the closed form the fast paths use, so this is an independent check.
Slow (a Python loop over tokens): it is the oracle of the tests, never used for training. ttt_reference_op
has dual.py's op signature and state (InnerState), so a layer with backend=reference also decodes.
"""
from __future__ import annotations

import torch
from torch.func import grad, vmap

from architectures.ttt.dual import InnerState, flat_biases, row_biases
from architectures.ttt.inner import gelu_tanh, layer_norm


def f_res(params: dict, x: torch.Tensor, inner: str) -> torch.Tensor:
    """The inner model without its LN and residual, for one head. x (f,). TTT-Linear without "b" has
    no bias (inner_bias=false)."""
    if inner == "linear":
        return x @ params["W"] + params["b"] if "b" in params else x @ params["W"]
    return gelu_tanh(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


def f(params: dict, x: torch.Tensor, ln_w, ln_b, inner: str, ln: bool = True, residual: bool = True):
    """The inner model f(x) = x + LN(f_res(x)), without its LN (ln=False) or its residual
    (residual=False): the options inner_ln, inner_residual. One token of one head."""
    z = f_res(params, x, inner)
    z = layer_norm(z, ln_w, ln_b) if ln else z
    return x + z if residual else z


def inner_loss(params: dict, k: torch.Tensor, v: torch.Tensor, ln_w, ln_b, inner: str, ln: bool = True,
               residual: bool = True) -> torch.Tensor:
    """l(theta; k, v) = 0.5 * ||f(k) - v||^2 for one token of one head; with the residual this is the
    paper's 0.5 * ||LN(f_res(k)) - (v - k)||^2."""
    return 0.5 * (f(params, k, ln_w, ln_b, inner, ln, residual) - v).pow(2).sum()


def inner_output(params: dict, q: torch.Tensor, ln_w, ln_b, inner: str, ln: bool = True,
                 residual: bool = True) -> torch.Tensor:
    """f(q) = q + LN(f_res(q)) (or without LN / residual) for one token of one head."""
    return f(params, q, ln_w, ln_b, inner, ln, residual)


def _per_batch_head(fn, n_batched: int):
    """vmap fn(params, *tensors, ln_w, ln_b) over heads (dim 0 of everything) then batch (dim 0 of
    params and tensors, LN weights shared)."""
    over_heads = vmap(fn, in_dims=(0,) * (1 + n_batched) + (0, 0))
    return vmap(over_heads, in_dims=(0,) * (1 + n_batched) + (None, None))


def ttt_reference(init: dict, q, k, v, lr_key, tok, ln_w, ln_b, mini_batch: int, inner: str,
                  ln: bool = True, residual: bool = True):
    """Outputs (B, H, T, f) of the TTT inner loop from fresh initial weights (the tests' entry point).

    init: per-head initial weights, e.g. {"W": (H, f, f), "b": (H, f)} (linear) or W1, b1, W2, b2 (mlp)
    q, k, v: (B, H, T, f); lr_key: (B, H, T) the key factor a_j = base_lr * gate_j / f
    tok: (mini_batch,) the query factor tok_i = max(0, 1/i + delta_i); ln_w, ln_b: (H, f)
    ln, residual: f with its LN and its residual (inner_ln, inner_residual; ln_w, ln_b unused without LN)
    A trailing partial mini-batch is processed and its update is not committed.
    """
    return ttt_reference_op(inner, InnerState.fresh(init), q, k, v, lr_key, tok, ln_w[:, None], ln_b[:, None], mini_batch,
                            ln, residual)[0]


def ttt_reference_op(inner: str, state: InnerState, q, k, v, lr_key, tok, ln_w, ln_b, mini_batch: int,
                     ln: bool = True, residual: bool = True) -> tuple[torch.Tensor, InnerState]:
    """The primal form behind dual.ttt_dual's op signature (backend=reference): outputs (B, H, T, f) for T
    new tokens continuing `state` (InnerState: the weights at the open mini-batch's start, the sum of
    a_j g_j over its tokens seen so far, their count), and the state after them; ln_w, ln_b (H, 1, f)."""
    B, H, T, f = q.shape
    ln_w, ln_b = ln_w[:, 0], ln_b[:, 0]  # (H, f)
    theta = {n: p.expand(B, *p.shape[1:]) for n, p in flat_biases(state.params).items()}  # (B, H, ...), biases
    acc = {n: p.expand(B, *p.shape[1:]) for n, p in flat_biases(state.acc).items()}       # (B, H, n)
    off = state.offset
    g_fn = _per_batch_head(lambda p, kk, vv, w, bb: grad(inner_loss)(p, kk, vv, w, bb, inner, ln, residual), 2)
    out_fn = _per_batch_head(lambda p, qq, w, bb: inner_output(p, qq, w, bb, inner, ln, residual), 1)
    outs, t = [], 0
    while t < T:
        end = min(t + mini_batch - off, T)  # the rest of the open mini-batch, or of the tokens
        total = dict(acc) if acc else {n: torch.zeros_like(p) for n, p in theta.items()}  # sum_j a_j g_j
        for j in range(t, end):
            g = g_fn(theta, k[:, :, j], v[:, :, j], ln_w, ln_b)  # at the weights of the mini-batch's start
            a_j = lr_key[:, :, j]
            total = {n: total[n] + a_j.view(B, H, *[1] * (theta[n].dim() - 2)) * g[n] for n in theta}
            theta_i = {n: theta[n] - tok[off + j - t] * total[n] for n in theta}
            outs.append(out_fn(theta_i, q[:, :, j], ln_w, ln_b))  # (B, H, f)
        off, t = off + end - t, end
        theta, acc, off = (theta_i, {}, 0) if off == mini_batch else (theta, total, off)
    return torch.stack(outs, dim=2), InnerState(row_biases(theta), row_biases(acc), off)
