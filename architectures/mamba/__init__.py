"""Mamba (Gu & Dao 2023, arXiv 2312.00752) and Mamba-2 (Dao & Gu 2024, arXiv 2405.21060).

    scan.py    Mamba's selective scan in PyTorch: chunked two-level scan, hand-written backward, decode step
    ssd.py     Mamba-2's chunked SSD algorithm in PyTorch, and its decode step
    layers.py  the mixers and blocks, the mamba-ssm (cuda) / ours (torch) backends

Size matching follows the papers: a Mamba block has about half the parameters of a Transformer block
(no FFN), so Mamba doubles the layer count of the Transformer of the same size (`layer_multiplier: 2`
in conf/arch: 125m -> 24 x 768, 350m -> 48 x 1024, 760m -> 48 x 1536, 1.3b -> 48 x 2048).
"""
from __future__ import annotations

import math

from architectures.config import ModelConfig
from architectures.mamba.layers import Mamba2Block, MambaBlock, head_dim_for
from architectures.registry import ArchSpec, register


def mamba_flops_per_token(cfg: ModelConfig, ctx: int) -> dict:
    """Analytic forward FLOPs per token of a Mamba LM (a multiply-add = 2 FLOPs; training = 3 x forward).

    D = expand * d, N = d_state, R = dt_rank, k = conv width, per layer:
      in_proj     2 d (2 D)
      conv        2 D k                      depthwise
      x_proj      2 D (R + 2 N)
      dt_proj     2 R D
      scan        9 D N                      the selective scan (state-spaces/mamba issue 110: exp(delta A),
                                             delta B u, the state update, C h: FLOP counters miss it)
      out_proj    2 D d
    logits 2 d V (tied head). Independent of the context.
    """
    o, d, L, V = cfg.options, cfg.d_model, cfg.n_layers, cfg.vocab_size
    D, N, k = int(o.get("expand", 2)) * d, int(o.get("d_state", 16)), int(o.get("d_conv", 4))
    rank = o.get("dt_rank", "auto")
    R = math.ceil(d / 16) if rank in (None, "auto") else int(rank)
    scan = 9 * D * N
    layer = 2 * d * 2 * D + 2 * D * k + 2 * D * (R + 2 * N) + 2 * R * D + scan + 2 * D * d
    fwd = L * layer + 2 * d * V
    return {"fwd": fwd, "train": 3 * fwd, "scan_fwd": L * scan}


def mamba2_flops_per_token(cfg: ModelConfig, ctx: int) -> dict:
    """Analytic forward FLOPs per token of a Mamba-2 LM (a multiply-add = 2 FLOPs; training = 3 x forward).

    D = expand * d, N = d_state, G groups, H = D / headdim heads, k = conv width, Q = chunk size
    (min(chunk_size, ctx)), per layer:
      in_proj     2 d (2 D + 2 G N + H)      z, x, B, C, dt
      conv        2 (D + 2 G N) k
      SSD         2 Q (D + G N)              intra-chunk: C B^T per group and the masked scores times x,
                                             counted over the full Q x Q block, as computed
                  + 4 D N                    chunk states (B^T x) and the carried-in read-out (C S)
      out_proj    2 D d
    logits 2 d V. The methodology notes estimate the state terms at about 6 D N, which also counts the
    recurrent update of the decode form; the chunked algorithm that trains does 4 D N in matmuls
    (checked with FlopCounterMode in tests/test_mamba.py) plus elementwise decays not counted here.
    """
    o, d, L, V = cfg.options, cfg.d_model, cfg.n_layers, cfg.vocab_size
    D, N, k = int(o.get("expand", 2)) * d, int(o.get("d_state", 128)), int(o.get("d_conv", 4))
    G = int(o.get("ngroups", 1))
    H = D // head_dim_for(D, int(o.get("headdim", 64)))
    Q = min(int(o.get("chunk_size", 256)), ctx)
    ssd = 2 * Q * (D + G * N) + 4 * D * N
    layer = 2 * d * (2 * D + 2 * G * N + H) + 2 * (D + 2 * G * N) * k + ssd + 2 * D * d
    fwd = L * layer + 2 * d * V
    return {"fwd": fwd, "train": 3 * fwd, "ssd_fwd": L * ssd}


register(ArchSpec(
    name="mamba",
    description="Mamba: selective SSM blocks (d_state 16, expand 2), layers doubled to match a Transformer",
    build_block=MambaBlock,
    flops_per_token=mamba_flops_per_token,
))
register(ArchSpec(
    name="mamba2",
    description="Mamba-2: SSD blocks (heads of 64, d_state 128, gated RMSNorm), layers doubled",
    build_block=Mamba2Block,
    flops_per_token=mamba2_flops_per_token,
))
