"""The TTT inner model's pieces: per-head LayerNorm, its closed-form gradient, tanh-GELU.

Notation (docs/ttt_math.md): f = head dim, Z = f_res(x) the inner model's pre-norm
output, t = XV - XK the reconstruction target, loss per token l = 0.5 * ||LN(Z) - t||^2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN_EPS = 1e-6


def layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """Per-head LN over the last dim. z (..., f); weight, bias broadcast to it (e.g. (H, 1, f))."""
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    return (z - mu) / torch.sqrt(var + eps) * weight + bias


def layer_norm_fused(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """layer_norm through PyTorch's LayerNorm kernel (one pass forward, one backward), then the per-head affine:
    the same numbers to rounding. Training through it at cpu-xs 8k (2 heads of 32): 1.2 ms against 5.6 ms forward
    and backward. dual.py's outputs use it; reference.py keeps layer_norm's formula."""
    return F.layer_norm(z, z.shape[-1:], eps=eps) * weight + bias


def ln_loss_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 eps: float = LN_EPS) -> torch.Tensor:
    """G = dl/dZ of l = 0.5 * ||LN(Z) - t||^2, row by row, in closed form:

        zhat = (Z - mu) / sigma,  y = gamma * zhat + beta,  Gx = (y - t) * gamma
        G = (f * Gx - sum_f(Gx) - zhat * sum_f(Gx * zhat)) / (f * sigma)
          = (Gx - mean_f(Gx) - zhat * mean_f(Gx * zhat)) / sigma
    """
    return ln_loss_grad_stats(z, target, weight, bias, eps)[0]


def ln_loss_grad_stats(z, target, weight, bias, eps: float = LN_EPS):
    """ln_loss_grad's G with the LN's zhat and 1/sigma, which the hand-derived backward reads (scan.py)."""
    var, mu = torch.var_mean(z, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    zhat = (z - mu) * rstd
    gx = (weight * zhat + bias - target) * weight
    return (gx - gx.mean(-1, keepdim=True) - zhat * (gx * zhat).mean(-1, keepdim=True)) * rstd, zhat, rstd


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as jax.nn.gelu(approximate=True)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh / dx."""
    return gelu_tanh_and_grad(x)[1]


def gelu_tanh_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x), its derivative), sharing the tanh: with u = c (x + 0.044715 x^3),
    gelu = 0.5 x (1 + tanh u), gelu' = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 * 0.044715 x^2)."""
    x2 = x * x
    th = torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x2))
    half_1p = 0.5 * (1.0 + th)
    grad = half_1p + (0.5 * _SQRT_2_OVER_PI) * x * (1.0 - th * th) * (1.0 + 3 * 0.044715 * x2)
    return x * half_1p, grad
