"""The plain reference of the TTT inner loop: the primal form, token by token, read off the paper.

For each mini-batch of b tokens, with weights theta at its start (Sun et al. 2024, eq. 5-6 and
Sec. 2.4-2.7; docs/ttt_math.md):

    g_j    = grad_theta l(theta; k_j, v_j),  l = 0.5 * ||LN(f_res(k_j; theta)) - (v_j - k_j)||^2
    theta_i = theta - sum_{j <= i} eta[i, j] * g_j,   eta[i, j] = tok_i * a_j (rank 1)
    out_i  = q_i + LN(f_res(q_i; theta_i))

and theta <- theta_b once the mini-batch is complete. Under the Table 1 options (layer.py) f loses its LN
or its residual (l = 0.5 * ||f(k_j) - v_j||^2 with f as configured), TTT-Linear its bias.
The gradients come from torch.func.grad of the loss as written, not from the closed form the fast paths use, so this is an independent check.
Slow (a Python loop over tokens): it is the oracle of the tests, never used for training.
"""
from __future__ import annotations

import torch
from torch.func import grad, vmap

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
    """Outputs (B, H, T, f) of the TTT inner loop from fresh initial weights.

    init: per-head initial weights, e.g. {"W": (H, f, f), "b": (H, f)} (linear) or W1, b1, W2, b2 (mlp)
    q, k, v: (B, H, T, f); lr_key: (B, H, T) the key factor a_j = base_lr * gate_j / f
    tok: (mini_batch,) the query factor tok_i = max(0, 1/i + delta_i); ln_w, ln_b: (H, f)
    ln, residual: f with its LN and its residual (inner_ln, inner_residual; ln_w, ln_b unused without LN)
    A trailing partial mini-batch is processed and its update is not committed.
    """
    B, H, T, f = q.shape
    theta = {n: p.expand(B, *p.shape) for n, p in init.items()}  # (B, H, ...)
    g_fn = _per_batch_head(lambda p, kk, vv, w, bb: grad(inner_loss)(p, kk, vv, w, bb, inner, ln, residual), 2)
    out_fn = _per_batch_head(lambda p, qq, w, bb: inner_output(p, qq, w, bb, inner, ln, residual), 1)
    outs = []
    for start in range(0, T, mini_batch):
        end = min(start + mini_batch, T)
        grads = [g_fn(theta, k[:, :, j], v[:, :, j], ln_w, ln_b) for j in range(start, end)]  # at theta of the start
        for i in range(start, end):
            eta = [tok[i - start] * lr_key[:, :, j] for j in range(start, i + 1)]  # each (B, H)
            theta_i = {n: theta[n] - sum(e.view(B, H, *[1] * (theta[n].dim() - 2)) * g[n]
                                         for e, g in zip(eta, grads[: i - start + 1]))
                       for n in theta}
            outs.append(out_fn(theta_i, q[:, :, i], ln_w, ln_b))  # (B, H, f)
        if end - start == mini_batch:
            theta = theta_i
    return torch.stack(outs, dim=2)  # (B, H, T, f)
