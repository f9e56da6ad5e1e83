"""The TTT inner model's pieces: per-head LayerNorm, its closed-form gradient, tanh-GELU.

Notation (shared notes, ttt_semantics.md): f = head dim, Z = f_res(x) the inner model's pre-norm
output, t = XV - XK the reconstruction target, loss per token l = 0.5 * ||LN(Z) - t||^2.
"""
from __future__ import annotations

import math

import torch

LN_EPS = 1e-6


def layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """Per-head LN over the last dim. z (..., f); weight, bias broadcast to it (e.g. (H, 1, f))."""
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    return (z - mu) / torch.sqrt(var + eps) * weight + bias


def ln_loss_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 eps: float = LN_EPS) -> torch.Tensor:
    """G = dl/dZ of l = 0.5 * ||LN(Z) - t||^2, row by row, in closed form:

        zhat = (Z - mu) / sigma,  y = gamma * zhat + beta,  Gx = (y - t) * gamma
        G = (f * Gx - sum_f(Gx) - zhat * sum_f(Gx * zhat)) / (f * sigma)
    """
    f = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    sigma = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + eps)
    zhat = (z - mu) / sigma
    gx = (weight * zhat + bias - target) * weight
    return (f * gx - gx.sum(-1, keepdim=True) - zhat * (gx * zhat).sum(-1, keepdim=True)) / (f * sigma)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as jax.nn.gelu(approximate=True)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh / dx."""
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))
    th = torch.tanh(u)
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x.pow(2))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
