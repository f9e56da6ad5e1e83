"""Mamba (Gu & Dao 2023, arXiv 2312.00752) and Mamba-2 (Dao & Gu 2024, arXiv 2405.21060).

    scan.py    Mamba's selective scan in PyTorch: chunked two-level scan, hand-written backward, decode step
    cpu_scan.py, cpu_scan.cpp  the same scan as one sequential C++ pass for CPU tensors (backend=cpp)
    triton_scan.py  the same scan as one sequential Triton pass for GPUs without mamba-ssm's CUDA build
               (backend=triton)
    ssd.py     Mamba-2's chunked SSD algorithm in PyTorch, and its decode step
    layers.py  the mixers and blocks, the mamba-ssm (cuda) / Triton (triton: ours for Mamba-1, mamba-ssm's SSD
               for Mamba-2) / C++ (cpp) / PyTorch (torch) backends

Size matching follows the papers: a Mamba block has about half the parameters of a Transformer block
(no FFN), so Mamba doubles the layer count of the Transformer of the same size (`layer_multiplier: 2`
in conf/arch: 125m -> 24 x 768, 350m -> 48 x 1024, 760m -> 48 x 1536, 1.3b -> 48 x 2048). Having no FFN,
a Mamba block is the same under ModelConfig.ffn true or false.
"""
from __future__ import annotations

import math

from architectures.accounting import Counts, embedding_params
from architectures.config import ModelConfig
from architectures.mamba.layers import Mamba2Block, MambaBlock, dt_rank, head_dim_for, mamba2_inner_width
from architectures.registry import ArchSpec, register


def mamba_count(cfg: ModelConfig, ctx: int) -> Counts:
    """A Mamba LM at context T (conventions in architectures/accounting.py). D = expand d, N = d_state,
    R = dt_rank, k = conv width, per layer:

      parameters    d (norm) + 2 d D (in_proj) + D k + D (conv) + D (R + 2 N) (x_proj) + D R + D (dt_proj)
                    + D N (A_log) + D (skip) + D d (out_proj)
      in_proj       2 d (2 D)                 x and the gate z
      conv          2 D k                     depthwise, k shifted multiply-adds (elementwise: unseen)
      x_proj        2 D (R + 2 N)             delta (low rank), B, C
      dt_proj       2 R D
      scan_update   5 D N                     a = exp(delta A) (2 D N), delta B u (D N), h <- a h + . (2 D N):
                                              elementwise (unseen), counted op by op in the decode step
                                              `selective_state_step`; the mamba maintainers' estimate is
                                              9 D N for the whole scan (state-spaces/mamba issue 110)
      scan_readout  2 D N                     y = C h (a batched product: seen)
      out_proj      2 D d
    logits 2 d V (tied head). Independent of T. State per layer: the conv inputs (k - 1) D and the
    SSM state D N.
    """
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    D, N, k = int(cfg.opt("expand")) * d, int(cfg.opt("d_state")), int(cfg.opt("d_conv"))
    R = dt_rank(cfg)
    layer_params = d + 2 * d * D + D * k + D + D * (R + 2 * N) + D * R + D + D * N + D + D * d
    return Counts(
        embedding_params=embedding_params(cfg),
        non_embedding_params=L * layer_params + d,
        fwd_terms={"projections": L * (2 * d * 2 * D + 2 * D * (R + 2 * N) + 2 * R * D + 2 * D * d),
                   "conv": L * 2 * D * k, "scan_update": L * 5 * D * N, "scan_readout": L * 2 * D * N,
                   "logits": 2 * d * V},
        unseen=frozenset({"conv", "scan_update"}),
        state_numbers=L * ((k - 1) * D + D * N),
    )


def mamba2_count(cfg: ModelConfig, ctx: int) -> Counts:
    """A Mamba-2 LM at context T (conventions in architectures/accounting.py). D = d_inner (expand d
    unless set by FLOP matching), N = d_state, G groups, P head dim, H = D / P heads, k conv width,
    Q = min(chunk_size, T), per layer:

      parameters    d (norm) + d (2 D + 2 G N + H) (in_proj) + (D + 2 G N)(k + 1) (conv) + 3 H (dt_bias,
                    A_log, skip) + D (gated norm) + D d (out_proj)
      in_proj       2 d (2 D + 2 G N + H)     z, x, B, C, dt
      conv          2 (D + 2 G N) k           depthwise over x, B, C (elementwise: unseen)
      ssd           2 Q (D + G N)             intra-chunk: C B^T per group and the masked scores times x,
                                              over the full Q x Q block as computed
                    + 4 D N                   chunk states (B^T x) and the carried-in read-out (C S);
                                              times ceil(T / Q) Q / T: a partial last chunk is padded
      out_proj      2 D d
    logits 2 d V. A common estimate puts the state terms at about 6 D N, which counts the
    recurrent update of the decode form; the chunked algorithm that trains does 4 D N in products.
    Its elementwise decays (segment sums, O(Q H) per token) are not counted. State per layer: conv
    inputs (k - 1)(D + 2 G N) and the SSM state D N (H x P x N).
    """
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    D = mamba2_inner_width(cfg)
    N, k, G = int(cfg.opt("d_state")), int(cfg.opt("d_conv")), int(cfg.opt("ngroups"))
    H = D // head_dim_for(D, int(cfg.opt("headdim")))
    Q = min(int(cfg.opt("chunk_size")), ctx)
    padded = math.ceil(ctx / Q) * Q / ctx  # the last chunk is computed whole
    layer_params = d + d * (2 * D + 2 * G * N + H) + (D + 2 * G * N) * (k + 1) + 3 * H + D + D * d
    return Counts(
        embedding_params=embedding_params(cfg),
        non_embedding_params=L * layer_params + d,
        fwd_terms={"projections": L * (2 * d * (2 * D + 2 * G * N + H) + 2 * D * d),
                   "conv": L * 2 * (D + 2 * G * N) * k,
                   "ssd": L * (2 * Q * (D + G * N) + 4 * D * N) * padded,
                   "logits": 2 * d * V},
        unseen=frozenset({"conv"}),
        state_numbers=L * ((k - 1) * (D + 2 * G * N) + D * N),
    )


DT_INIT = {"dt_min": 1e-3, "dt_max": 0.1, "dt_init_floor": 1e-4}  # dt ~ exp(U(log dt_min, log dt_max)), floored
register(ArchSpec(
    name="mamba",
    description="Mamba: selective SSM blocks (d_state 16, expand 2), layers doubled to match a Transformer",
    build_block=MambaBlock,
    count=mamba_count,
    options={"d_state": 16, "expand": 2, "d_conv": 4, "dt_rank": "auto", **DT_INIT, "dt_scale": 1.0,
             "chunk_size": 64,  # torch backend: positions per local scan (scan.py)
             "backend": "auto"},  # auto | cuda (mamba-ssm's kernels) | triton (our Triton scan, GPU) | cpp (our
                                  #   C++ scan, CPU) | torch (ours)
    width_rule="mamba",
))
register(ArchSpec(
    name="mamba2",
    description="Mamba-2: SSD blocks (heads of 64, d_state 128, gated RMSNorm), layers doubled",
    build_block=Mamba2Block,
    count=mamba2_count,
    options={"d_state": 128, "expand": 2, "d_inner": None,  # None: expand x d_model (sizing may set whole heads)
             "headdim": 64, "ngroups": 1, "d_conv": 4, "chunk_size": 256, **DT_INIT, "A_init_range": (1, 16),
             "backend": "auto"},  # auto | cuda (mamba-ssm's kernels) | triton (mamba-ssm's Triton SSD, our conv;
                                  #   GPU) | cpp (our C++ SSM, CPU) | torch (ours)
    width_rule="mamba2",
))
