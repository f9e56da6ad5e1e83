"""Transformer++ (Llama-style): pre-norm blocks of RoPE multi-head attention and a SwiGLU FFN.

    h += Attn(RMSNorm(h))                   (arch transformer)
    h += Attn(CausalConv_k(RMSNorm(h)))     (arch transformer_conv: short_conv = k = 4)
    h += SwiGLU(RMSNorm(h))                 (ModelConfig.ffn; false: no FFN, the block is its first line)

Positions (options.positions): rope (RoPE on queries and keys, the default), learned (absolute position
embeddings added to the token embeddings by the shell, GPT-2's and Zoology's attention; no RoPE) or none.

The optional short convolution feeds attention, as in Zoology's attention baseline (a Hybrid of a
width-3 BaseConv then MHA; Arora et al. 2023, arXiv 2312.04927): queries, keys and values each see
their token and its k - 1 predecessors, the previous-token half of a recall circuit that plain
attention must otherwise learn in a layer of its own.

Attention backends: `flash_attn` (flash-attn 2 kernels, CUDA with fp16/bf16 inputs) and `sdpa`
(torch.nn.functional.scaled_dot_product_attention, any device). `auto` takes flash_attn where it
is importable and CUDA is present, sdpa otherwise; the choice is recorded in `backends()`.
An explicitly requested backend that cannot run raises instead of being replaced.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.accounting import Counts, embedding_params
from architectures.backends import BackendUnavailable, resolve, runs
from architectures.config import ModelConfig
from architectures.layers import CausalConv, RMSNorm, SwiGLU, apply_rope, keep_state, rope_angles
from architectures.registry import ArchSpec, register


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a missing CUDA extension (flash_attn_2_cuda) on CPU builds
        return None
    return flash_attn_func


def resolve_attention_backend(requested: str) -> str:
    """backend: flash_attn where CUDA and flash-attn are present, else PyTorch's SDPA (architectures/backends.py)."""
    def flash_attn() -> str | None:
        if torch.cuda.is_available() and _flash_attn_func() is not None:
            return None
        return "needs CUDA and an importable flash-attn"

    return resolve("backend", requested, {"flash_attn": flash_attn, "sdpa": runs})


class KVCache:
    """Preallocated keys and values (B, H, max_len, f), filled up to `seen` (the shell's count: DecodeState).
    With a short conv, also its last k - 1 inputs (B, k-1, d)."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.seen = 0
        self.conv: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys and values after the `seen` ones; all of them so far."""
        T = k.shape[2]
        end = self.seen + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.seen} + {T} > {self.k.shape[2]}")
        self.k[:, :, self.seen:end] = k
        self.v[:, :, self.seen:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, end, f)


POSITIONS = ("rope", "learned", "none")


def positions(cfg: ModelConfig) -> str:
    """options.positions: rope | learned | none (module docstring)."""
    p = str(cfg.opt("positions"))
    if p not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {p!r}")
    return p


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.rope = positions(cfg) == "rope"
        self.rope_theta = float(cfg.opt("rope_theta"))
        self.backend = resolve_attention_backend(str(cfg.opt("backend")))
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def rotated_qk(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (B, H, T, f) of x (B, T, d) at positions start.., RoPE applied (positions: rope)."""
        B, T, _ = x.shape
        H, f = self.n_heads, self.head_dim
        q = self.wq(x).view(B, T, H, f).transpose(1, 2)  # (B, H, T, f)
        k = self.wk(x).view(B, T, H, f).transpose(1, 2)
        if not self.rope:
            return q, k
        cos, sin = rope_angles(f, torch.arange(start, start + T, device=x.device), self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, d = x.shape
        q, k = self.rotated_qk(x, 0 if cache is None else cache.seen)
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


def short_conv_width(cfg: ModelConfig) -> int:
    """k of the conv before attention, 0 for none (options.short_conv; conf/arch/transformer_conv.yaml: 4)."""
    k = int(cfg.opt("short_conv"))
    if k < 0 or k == 1:
        raise ValueError(f"short_conv must be 0 (none) or a conv width >= 2, got {k}")
    return k


class TransformerBlock(nn.Module):
    """h += Attn([CausalConv_k](RMSNorm(h))); [h += SwiGLU(RMSNorm(h))]."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        k = short_conv_width(cfg)
        self.conv = CausalConv(cfg.d_model, k) if k else None
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.ffn else None
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim) if cfg.ffn else None

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.attn_norm(h)  # (B, T, d)
        if self.conv is not None:
            x, state = self.conv(x, None if cache is None else cache.conv)
            if cache is not None:
                cache.conv = keep_state(cache.conv, state)
        h = h + self.attn(x, cache)
        return h if self.ffn is None else h + self.ffn(self.ffn_norm(h))

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.cfg.n_heads, max_len, self.cfg.head_dim, device, dtype)

    def backends(self) -> dict[str, str]:
        return {"attention": self.attn.backend}


def count(cfg: ModelConfig, ctx: int) -> Counts:
    """Transformer++ at context T (conventions in architectures/accounting.py).

    Parameters: embedding V d (2 V d with an untied head; + T_max d learned positions); per layer 4 d^2
    (Q, K, V, O) + 3 d ffn (SwiGLU gate, up, down) + 2 d (two RMSNorms) [+ d k + d: short conv weight and
    bias]; final RMSNorm d. Without the FFN (cfg.ffn false) the 3 d ffn + d of the FFN and its norm go.
    Forward FLOPs per token:
      projections   2 L (4 d^2 + 3 d ffn)        (2 L 4 d^2 without the FFN)
      attention     2 L 2 d (T + 1) / 2          QK^T and AV, causal-halved (sum over t of t + 1 keys,
                                                 divided by T)
      convs         2 L d k                      (short conv only)
      logits        2 d V
    State: the KV cache, 2 L T d numbers per sequence after T tokens [+ L (k - 1) d conv inputs].
    """
    L, d, V, k = cfg.n_layers, cfg.d_model, cfg.vocab_size, short_conv_width(cfg)
    ffn = cfg.ffn_dim if cfg.ffn else 0
    norms = 2 * d if cfg.ffn else d
    terms = {"projections": 2 * L * (4 * d * d + 3 * d * ffn),
             "attention": 2 * L * 2 * d * (ctx + 1) / 2,
             "logits": 2 * d * V}
    if k:
        terms["convs"] = 2 * L * d * k
    return Counts(
        embedding_params=embedding_params(cfg),
        non_embedding_params=L * (4 * d * d + 3 * d * ffn + norms + ((d * k + d) if k else 0)) + d,
        fwd_terms=terms,
        state_numbers=2 * L * ctx * d + (L * (k - 1) * d if k else 0),
        attention="attention",
        unseen=frozenset({"convs"}),  # layers.CausalConv: shifted multiply-adds, elementwise
    )


OPTIONS = {
    "backend": "auto",       # auto | flash_attn | sdpa (resolve_attention_backend)
    "rope_theta": 1e4,
    "positions": "rope",     # rope | learned | none (module docstring)
    "short_conv": 0,         # k of a causal conv before attention (0: none)
}
register(ArchSpec(
    name="transformer",
    description="Transformer++ (Llama-style): RoPE attention + SwiGLU, pre-norm RMSNorm",
    build_block=TransformerBlock,
    count=count,
    options=OPTIONS,
))
register(ArchSpec(
    name="transformer_conv",
    description="Transformer++ with a short causal conv (width 4) feeding attention, as Zoology's attention",
    build_block=TransformerBlock,
    count=count,
    options={**OPTIONS, "short_conv": 4},
))
