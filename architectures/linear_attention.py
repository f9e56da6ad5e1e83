"""Causal linear attention, Table 1 rows 1-2 of the TTT paper (Sun et al. 2024, arXiv 2407.04620), on the
Transformer backbone (the TTT paper's Table 1 rows 1-7 replace attention in it):

    h += LinAttn(RMSNorm(h));  h += SwiGLU(RMSNorm(h))

LinAttn(x), x (B, T, d), H heads of f = d / H:
    q, k, v = x Wq, x Wk, x Wv                                    (B, H, T, f), no biases
    q, k    = RoPE(q), RoPE(k)   interleaved pairs, absolute positions (the TTT layer's rotation, whose
                                 positions mod b are absolute when b = T: Theorem 1 then holds exactly)
    q, k    = phi(q), phi(k)     phi = elu + 1 (feature_map: elu1, Katharopoulos et al. 2020) or identity
    z_t     = sum_{s<=t} (q_t . k_s) v_s                          the numerator, always
            / (sum_{s<=t} q_t . k_s + eps)                        the normalizer (normalizer: true)
    out     = Wo( LayerNorm_d(concat_heads(z)) )                  the TTT layer's output path ("post-norm")

Options (conf/arch/table1_1_linear_attention.yaml, table1_2_linear_attention_improved.yaml):
    feature_map   elu1 | identity   phi
    normalizer    true | false      divide by sum_s q_t . k_s (eps 1e-6)
    chunk_size    64                C, the chunk of the chunked form below (any T; the result does not
                                    depend on it)
    rope_theta    10000.0
Row 1 ("Linear attention", Katharopoulos et al.) is elu1 + normalizer; row 2 ("Linear attn. improved",
the paper's fn 8: z_t = sum_s v_s k_s^T q_t, after Qin et al. 2022, whose NormAttention also drops the
normalizer and normalizes the output) is identity without the normalizer. Both keep the post-norm, so
that each row of the ladder changes only what the paper's row names; row 2 is then exactly Table 1 row 3
(TTT with f(x) = W x, batch GD over the sequence, eta = 1/2, W0 = 0; tests/test_table1.py).

The chunked form (training and prefill; decoding is the same with chunks of one token): with the state
S = sum_s k_s^T v_s' (per head f x f', v' = [v, 1] with the normalizer, so its last column is sum_s k_s),
each chunk of C tokens is
    out_c = Q_c S_<c + tril(Q_c K_c^T) V_c',     S <- S + K_c^T V_c'
The state is kept in fp32 under autocast (as TTT's inner weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.accounting import Counts, embedding_params
from architectures.config import ModelConfig
from architectures.layers import RMSNorm, SwiGLU, apply_rope, rope_angles
from architectures.registry import ArchSpec, register

FEATURE_MAPS = ("elu1", "identity")
NORMALIZER_EPS = 1e-6  # Katharopoulos et al.'s code (fast_transformers, LinearAttention eps)


def linear_attention_options(cfg: ModelConfig) -> tuple[str, bool, int]:
    """(feature_map, normalizer, chunk_size) from the config's options, validated."""
    fmap, norm, chunk = str(cfg.opt("feature_map")), bool(cfg.opt("normalizer")), int(cfg.opt("chunk_size"))
    if fmap not in FEATURE_MAPS or chunk <= 0:
        raise ValueError(f"linear attention: feature_map in {FEATURE_MAPS}, chunk_size > 0; got {fmap!r}, {chunk}")
    return fmap, norm, chunk


def chunked_linear_attention(q, k, v, state, chunk: int):
    """sum_{s<=t} (q_t . k_s) v_s for every t, continuing `state` (sum over earlier tokens of k_s^T v_s).
    q, k (B, H, T, f); v (B, H, T, e); state (B|1, H, f, e). Returns (B, H, T, e) and the new state."""
    B, H, T, f = q.shape
    e = v.shape[-1]
    outs, t = [], 0
    n = T // chunk
    if n:  # whole chunks at once: the state before each chunk from an exclusive cumulative sum
        qs, ks, vs = (x[:, :, : n * chunk].reshape(B, H, n, chunk, x.shape[-1]) for x in (q, k, v))  # (B, H, n, C, .)
        kv = ks.transpose(-1, -2) @ vs  # (B, H, n, f, e)
        before = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1].cumsum(2)], dim=2) + state[:, :, None]
        scores = torch.tril(qs @ ks.transpose(-1, -2))  # (B, H, n, C, C)
        outs.append((qs @ before + scores @ vs).reshape(B, H, n * chunk, e))
        state = before[:, :, -1] + kv[:, :, -1]
        t = n * chunk
    if t < T:  # the trailing partial chunk
        qc, kc, vc = q[:, :, t:], k[:, :, t:], v[:, :, t:]
        outs.append(qc @ state + torch.tril(qc @ kc.transpose(-1, -2)) @ vc)
        state = state + kc.transpose(-1, -2) @ vc
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), state


class LinearAttentionCache:
    """Decode state of one linear-attention block: S (B, H, f, f'); `seen` is the shell's count."""

    def __init__(self):
        self.state: torch.Tensor | None = None
        self.seen = 0


class LinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.feature_map, self.normalizer, self.chunk = linear_attention_options(cfg)
        self.rope_theta = float(cfg.opt("rope_theta"))
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.post_norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor, cache: LinearAttentionCache | None = None) -> torch.Tensor:
        B, T, d = x.shape
        H, f = self.n_heads, self.head_dim
        seen = 0 if cache is None else cache.seen
        q, k, v = (w(x).view(B, T, H, f).transpose(1, 2) for w in (self.wq, self.wk, self.wv))  # (B, H, T, f)
        cos, sin = rope_angles(f, seen + torch.arange(T, device=x.device), self.rope_theta)
        q, k = apply_rope(q, cos, sin, interleaved=True), apply_rope(k, cos, sin, interleaved=True)
        dt = torch.promote_types(self.post_norm.weight.dtype, torch.float32)  # fp32, or fp64 in tests
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
            if self.feature_map == "elu1":
                q, k = F.elu(q) + 1, F.elu(k) + 1
            if self.normalizer:
                v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, T, f + 1)
            state = cache.state if cache is not None and cache.state is not None else \
                torch.zeros(1, H, f, v.shape[-1], device=x.device, dtype=dt)
            z, state = chunked_linear_attention(q, k, v, state, self.chunk)
            if self.normalizer:
                z = z[..., :f] / (z[..., f:] + NORMALIZER_EPS)
        if cache is not None:
            cache.state = state
        y = self.post_norm(z.to(x.dtype).transpose(1, 2).reshape(B, T, d))
        return self.wo(y)


class LinearAttentionBlock(nn.Module):
    """h += LinAttn(RMSNorm(h)); [h += SwiGLU(RMSNorm(h))] (cfg.ffn)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = LinearAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.ffn else None
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim) if cfg.ffn else None

    def forward(self, h: torch.Tensor, cache: LinearAttentionCache | None = None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cache)
        return h if self.ffn is None else h + self.ffn(self.ffn_norm(h))

    def new_cache(self, batch: int, max_len: int, device, dtype) -> LinearAttentionCache:
        return LinearAttentionCache()

    def backends(self) -> dict[str, str]:
        return {"linear_attention": "torch"}


def count(cfg: ModelConfig, ctx: int) -> Counts:
    """Linear attention at context T (conventions in architectures/accounting.py). d width, H heads,
    f = d / H, f' = f + 1 with the normalizer (its denominator is one more value column), else f;
    C = min(chunk_size, T), L layers, V vocab.

    Parameters: embedding V d (2 V d untied); per layer 4 d^2 (Q, K, V, O) + 2 d (post-norm LayerNorm)
    + 2 d (two RMSNorms) + 3 d ffn (SwiGLU); final RMSNorm d. Without the FFN (cfg.ffn false) its 3 d ffn,
    its norm's d and its FLOPs go.
    Forward FLOPs per token:
      projections   2 L 4 d^2,   FFN 2 L 3 d ffn,   logits 2 d V
      linear_attn   L H (4 f f' + 2 C f + 2 C f')   Q_c S (2 f f'), K_c^T V_c' (2 f f'); Q_c K_c^T (2 C f)
                                                    and its product with V_c' (2 C f') over the full C x C
                                                    block as computed
    Independent of T (for T >= C): the state has a fixed size. The feature map, the division, the mask
    and the cumulative sum of the chunk states (f f' / C per head and token) are elementwise, not counted.
    State per sequence: L H f f' (S, whose last column is sum_s k_s with the normalizer).
    """
    L, d, H, f, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    ffn = cfg.ffn_dim if cfg.ffn else 0
    _, normalizer, chunk = linear_attention_options(cfg)
    fv, C = f + int(normalizer), min(chunk, ctx)
    terms = {"projections": 2 * L * 4 * d * d, "ffn": 2 * L * 3 * d * ffn,
             "linear_attn": L * H * (4 * f * fv + 2 * C * f + 2 * C * fv), "logits": 2 * d * V}
    if not cfg.ffn:
        del terms["ffn"]
    return Counts(
        embedding_params=embedding_params(cfg),
        non_embedding_params=L * (4 * d * d + 2 * d + (2 * d if cfg.ffn else d) + 3 * d * ffn) + d,
        fwd_terms=terms,
        state_numbers=L * H * f * fv,
    )


for _name, _desc, _fmap, _norm in [
    ("table1_1_linear_attention", "Table 1 row 1: linear attention (Katharopoulos et al.: elu+1 feature map, "
                                  "normalizer), Transformer backbone", "elu1", True),
    ("table1_2_linear_attention_improved", "Table 1 row 2: linear attention without normalizer or feature map, "
                                           "Transformer backbone (= row 3 by Theorem 1)", "identity", False),
]:
    register(ArchSpec(name=_name, description=_desc, build_block=LinearAttentionBlock, count=count,
                      options={"feature_map": _fmap,  # elu1 (elu + 1 on q and k, after RoPE) | identity
                               "normalizer": _norm,   # divide by sum_s q_t . k_s
                               "chunk_size": 64,      # C of the chunked form; the result does not depend on it
                               "rope_theta": 1e4}))
