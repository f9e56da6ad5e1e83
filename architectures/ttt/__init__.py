"""TTT layers (Sun et al. 2024, arXiv 2407.04620): TTT-Linear and TTT-MLP, on the Mamba backbone
(the paper's default) and on the Transformer backbone.

    reference.py      the primal form, token by token (the test oracle)
    dual.py           the dual form over mini-batches (trains with autograd; decoding and any T)
    dual_backward.py  the dual form's backward derived by hand, in PyTorch (what the kernels compute)
    scan.py           TTT-Linear's loop over whole mini-batches as one autograd op with that backward
    cpu_scan.py, .cpp scan.py's two loops in C++ for CPU tensors (backend=cpp)
    triton_linear.py  TTT-Linear Triton kernels: prefill forward/backward, decode
    triton_mlp.py     TTT-MLP Triton kernels: prefill forward/backward, decode
    triton_op.py      the kernels behind dual.py's op signature and state (InnerState)
    layer.py          the layer and block modules (backend auto | triton | cpp | torch | scan | dual | reference)
"""
from __future__ import annotations

from architectures.accounting import Counts, embedding_params
from architectures.config import ModelConfig
from architectures.registry import ArchSpec, register
from architectures.ttt.dual import LONG_PIECE
from architectures.ttt.layer import TTTBlock, resolve_mini_batch, ttt_flags


def count(cfg: ModelConfig, ctx: int) -> Counts:
    """A TTT LM at context T (conventions in architectures/accounting.py). d width, H heads,
    f = d / H head dim, b mini-batch, k conv width, L layers, V vocab.

    Parameters per layer (the Table 1 options, layer.py, drop the terms marked with theirs):
      projections   4 d^2                   Wq, Wv, Wo and Wg (Mamba backbone) or Wk (Transformer one)
      lr gate       d H + H                 theta_h and beta_h                      (learnable_lr)
      token offset  b                       delta; b = max_seq_len for "seq"        (learnable_lr)
      inner LN      2 d                                                             (inner_ln)
      inner model   H (f^2 + f)             linear: W0, b0 (H f^2 without inner_bias)   (learnable_w0)
                                            mlp: H (8 f^2 + 5 f) for W1 (f x 4f), b1, W2, b2
                                            (none without learnable_w0: W0 = 0 is a fixed buffer)
      post norm     2 d                     LayerNorm
      norms, FFN    2 d + 3 d ffn           (d without the FFN, cfg.ffn false: its norm and SwiGLU go)
      convs         3 (d k + d) + d         pre-conv, convq, convk and the conv norm (Mamba backbone)
    Forward FLOPs per token (the dual form, dual.py, per head and token, for whole mini-batches):
      projections   2 L 4 d^2,   lr gate 2 L d H (learnable_lr),   FFN 2 L 3 d ffn (cfg.ffn),   logits 2 d V
      convs         2 L 3 d k                                         (Mamba backbone)
      inner linear  L H (6 f^2 + 4 b f)     [K; Q] W (4 f^2), K^T (a G) (2 f^2); Q K^T and M G over the
                                            full b x b block as computed (2 b f each)
      inner mlp     L H (56 f^2 + 20 b f)   [K; Q] W1 (16 f^2), X2 W2, G2 W2^T, Xbar2 W2, K^T aG1,
                                            X2^T aG2 (8 f^2 each); Q K^T (2 b f), M G1 (8 b f),
                                            Xbar2 X2^T (8 b f), (E * .) G2 (2 b f)
    with b the mini-batch, or T when T < b. A mini-batch longer than c = 64 tokens (dual.LONG_PIECE;
    "seq": b = T) is processed in pieces of c through the accumulators, which adds the accumulator's
    product with Q (linear 2 f^2; mlp Q accW1 and Xbar2 accW2, 8 f^2 each) in place of b by c:
      long linear   L H (8 f^2 + 4 c f),    long mlp   L H (72 f^2 + 20 c f),    c = min(64, T)
    Independent of T otherwise: the state has a fixed size. LN, its closed-form gradient and GELU are
    O(d) elementwise work, not counted; so are the bias, LN and residual the options remove.
    State per sequence: per layer the inner weights plus their accumulators inside the current
    mini-batch (2 x the inner model's parameters), plus 3 (k - 1) d conv inputs (Mamba backbone).
    """
    L, d, H, f, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    ffn = cfg.ffn_dim if cfg.ffn else 0
    b, k = resolve_mini_batch(cfg), int(cfg.opt("conv_width"))
    flags = ttt_flags(cfg)
    mamba = cfg.opt("backbone") == "mamba"
    linear = cfg.opt("inner") == "linear"
    inner_state = H * (f * f + (f if flags["inner_bias"] else 0)) if linear else H * (8 * f * f + 5 * f)
    inner_params = inner_state if flags["learnable_w0"] else 0
    lr_params = d * H + H + b if flags["learnable_lr"] else 0
    layer_params = (4 * d * d + lr_params + (2 * d if flags["inner_ln"] else 0) + inner_params + 2 * d
                    + (2 * d if cfg.ffn else d) + 3 * d * ffn + ((3 * (d * k + d) + d) if mamba else 0))
    long = b > LONG_PIECE  # pieces through the accumulators (dual.py)
    bf = min(LONG_PIECE if long else b, ctx)  # the side of the blocks as computed
    acc_q = (2 if linear else 16) * f * f if long else 0
    terms = {"projections": 2 * L * 4 * d * d, "lr_gate": 2 * L * d * H, "ffn": 2 * L * 3 * d * ffn,
             "inner": L * H * ((6 * f * f + 4 * bf * f) if linear else (56 * f * f + 20 * bf * f)) + L * H * acc_q,
             "logits": 2 * d * V}
    if not flags["learnable_lr"]:
        del terms["lr_gate"]
    if not cfg.ffn:
        del terms["ffn"]
    if mamba:
        terms["convs"] = 2 * L * 3 * d * k
    return Counts(
        embedding_params=embedding_params(cfg),
        non_embedding_params=L * layer_params + d,
        fwd_terms=terms,
        state_numbers=L * (2 * inner_state + (3 * (k - 1) * d if mamba else 0)),
        unseen=frozenset({"convs"}),  # layers.CausalConv: shifted multiply-adds, elementwise
    )


# Every option of a TTT layer (layer.py) at the paper's TTT-Linear, Mamba backbone; conf/arch/ttt_*.yaml and
# table1_*.yaml write only what differs
OPTIONS = {
    "inner": "linear",         # linear (TTT-Linear) | mlp (TTT-MLP: a 2-layer MLP, hidden 4x)
    "backbone": "mamba",       # mamba (pre-conv, shared QK with two convs, output gate) | transformer
    "mini_batch": 16,          # b: tokens per inner gradient step | "seq" (b = T)
    "base_lr": 1.0,            # eta_base (TTT-MLP: 0.1, MLP below)
    "base_lr_init": None,      # warmed up linearly to base_lr over the outer warmup; None: base_lr (no warmup)
    "conv_width": 4,
    "rope_theta": 1e4,
    "backend": "auto",         # auto | triton | torch | scan | dual | reference (layer.py docstring)
    "checkpoint_group": 0,     # recompute the inner loop in backward every G mini-batches (0: off)
    "learnable_lr": True,      # the Table 1 switches (layer.py module docstring): the paper's TTT has them all
    "learnable_w0": True,
    "inner_ln": True,
    "inner_residual": True,
    "inner_bias": True,
}
MLP = {"inner": "mlp", "base_lr": 0.1, "base_lr_init": 0.01}  # TTT-MLP's eta_base, warmed up from 0.01
#   (ttt_base_lr, ttt_base_lr_init of the JAX code's TTT-MLP runs, ttt/train.py)
ROW3 = {"backbone": "transformer", "mini_batch": "seq", "learnable_lr": False, "learnable_w0": False,
        "inner_ln": False, "inner_residual": False, "inner_bias": False}  # f(x) = W x, b = T, W0 = 0
ROW4 = {**ROW3, "learnable_w0": True}
ROW5 = {**ROW4, "inner_ln": True, "inner_residual": True, "inner_bias": True}
ROW6 = {**ROW5, "mini_batch": 16}

for _name, _desc, _options in [
    ("ttt_linear", "TTT-Linear, Mamba backbone (pre-conv, shared QK + convs, gate)", {}),
    ("ttt_mlp", "TTT-MLP, Mamba backbone (pre-conv, shared QK + convs, gate)", MLP),
    ("ttt_linear_base", "TTT-Linear, Transformer backbone (separate Q, K, V)", {"backbone": "transformer"}),
    ("ttt_mlp_base", "TTT-MLP, Transformer backbone (separate Q, K, V)", {**MLP, "backbone": "transformer"}),
    # the Table 1 ablation ladder, rows 3-6 (conf/arch/table1_*.yaml write the same options)
    ("table1_3_ttt_equivalence",
     "Table 1 row 3: TTT with f(x) = W x, batch GD over the sequence (b = T), eta = 1/2, W0 = 0 (= row 2)", ROW3),
    ("table1_4_learnable_w0", "Table 1 row 4: row 3 + learnable W0", ROW4),
    ("table1_5_ln_residual", "Table 1 row 5: row 4 + LN and residual in f", ROW5),
    ("table1_6_mini_batch", "Table 1 row 6: row 5 + mini-batch TTT (b = 16)", ROW6),
]:
    register(ArchSpec(name=_name, description=_desc, build_block=TTTBlock, count=count,
                      options={**OPTIONS, **_options}))

# Table 1 of the paper (v2; results/published/table1.csv): from linear attention to TTT-Linear, one change
# per row, each row a registered arch. Rows 1-2: architectures/linear_attention.py; rows 3-6 turn the TTT
# options (layer.py) off; row 7 is ttt_linear_base (learnable eta, Transformer backbone), row 8 ttt_linear.
# (row, the paper's row label, arch)
TABLE1 = [
    (1, "Linear attention", "table1_1_linear_attention"),
    (2, "Linear attn. improved", "table1_2_linear_attention_improved"),
    (3, "TTT equivalence", "table1_3_ttt_equivalence"),
    (4, "+ learnable W0", "table1_4_learnable_w0"),
    (5, "+ LN and residual in f", "table1_5_ln_residual"),
    (6, "+ mini-batch TTT", "table1_6_mini_batch"),
    (7, "+ learnable η", "ttt_linear_base"),
    (8, "+ Mamba backbone", "ttt_linear"),
]
