"""Transformer++ (Llama-style): pre-norm blocks of RoPE multi-head attention and a SwiGLU FFN.

Attention backends: `flash_attn` (flash-attn 2 kernels, CUDA with fp16/bf16 inputs) and `sdpa`
(torch.nn.functional.scaled_dot_product_attention, any device). `auto` takes flash_attn where it
is importable and CUDA is present, sdpa otherwise; the choice is recorded in `backends()`.
An explicitly requested backend that cannot run raises instead of being replaced.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.accounting import Counts
from architectures.config import ModelConfig
from architectures.layers import RMSNorm, SwiGLU, apply_rope, rope_angles
from architectures.registry import ArchSpec, register

ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa")


class BackendUnavailable(RuntimeError):
    pass


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a missing CUDA extension (flash_attn_2_cuda) on CPU builds
        return None
    return flash_attn_func


def resolve_attention_backend(requested: str) -> str:
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTENTION_BACKENDS}, got {requested!r}")
    flash_ok = torch.cuda.is_available() and _flash_attn_func() is not None
    if requested == "flash_attn" and not flash_ok:
        raise BackendUnavailable("attn_backend=flash_attn needs CUDA and an importable flash-attn; use sdpa or auto")
    if requested == "auto":
        return "flash_attn" if flash_ok else "sdpa"
    return requested


class KVCache:
    """Preallocated keys and values (B, H, max_len, f); `length` tokens are filled."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} + {T} > {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, end, f)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.rope_theta = float(cfg.options.get("rope_theta", 1e4))
        self.backend = resolve_attention_backend(cfg.options.get("attn_backend", "auto"))
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def rotated_qk(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (B, H, T, f) of x (B, T, d) at positions start.., RoPE applied."""
        B, T, _ = x.shape
        H, f = self.n_heads, self.head_dim
        q = self.wq(x).view(B, T, H, f).transpose(1, 2)  # (B, H, T, f)
        k = self.wk(x).view(B, T, H, f).transpose(1, 2)
        cos, sin = rope_angles(f, torch.arange(start, start + T, device=x.device), self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, d = x.shape
        q, k = self.rotated_qk(x, 0 if cache is None else cache.length)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, f)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + T, f)
        y = self._attend(q, k, v)  # (B, H, T, f)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))

    def _attend(self, q, k, v):
        """Causal attention of T queries that are the last T of the S keys (bottom-right aligned)."""
        T, S = q.shape[2], k.shape[2]
        if self.backend == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # flash-attn takes (B, T, H, f) and aligns the causal mask bottom-right (>= 2.1)
            y = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return y.transpose(1, 2)
        if self.backend == "flash_attn":
            raise BackendUnavailable(f"flash_attn needs CUDA fp16/bf16 inputs, got {q.device} {q.dtype}")
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if T == 1:
            return F.scaled_dot_product_attention(q, k, v)
        mask = torch.arange(S, device=q.device)[None, :] <= (S - T + torch.arange(T, device=q.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (T, S), True = attend


class TransformerBlock(nn.Module):
    """h += Attn(RMSNorm(h)); h += SwiGLU(RMSNorm(h))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cache)
        return h + self.ffn(self.ffn_norm(h))

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.cfg.n_heads, max_len, self.cfg.head_dim, device, dtype)

    def backends(self) -> dict[str, str]:
        return {"attention": self.attn.backend}


def count(cfg: ModelConfig, ctx: int) -> Counts:
    """Transformer++ at context T (conventions in architectures/accounting.py).

    Parameters: embedding V d (tied with the head); per layer 4 d^2 (Q, K, V, O) + 3 d ffn (SwiGLU
    gate, up, down) + 2 d (two RMSNorms); final RMSNorm d.
    Forward FLOPs per token:
      projections   2 L (4 d^2 + 3 d ffn)
      attention     2 L 2 d (T + 1) / 2          QK^T and AV, causal-halved (sum over t of t + 1 keys,
                                                 divided by T)
      logits        2 d V
    State: the KV cache, 2 L T d numbers per sequence after T tokens.
    """
    L, d, V, ffn = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    return Counts(
        embedding_params=V * d,
        non_embedding_params=L * (4 * d * d + 3 * d * ffn + 2 * d) + d,
        fwd_terms={"projections": 2 * L * (4 * d * d + 3 * d * ffn),
                   "attention": 2 * L * 2 * d * (ctx + 1) / 2,
                   "logits": 2 * d * V},
        state_numbers=2 * L * ctx * d,
        attention="attention",
    )


register(ArchSpec(
    name="transformer",
    description="Transformer++ (Llama-style): RoPE attention + SwiGLU, pre-norm RMSNorm",
    build_block=TransformerBlock,
    count=count,
))
