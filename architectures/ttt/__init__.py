"""TTT layers (Sun et al. 2024, arXiv 2407.04620): TTT-Linear and TTT-MLP, on the Mamba backbone
(the paper's default) and on the Transformer backbone.

    reference.py  the primal form, token by token (the test oracle)
    dual.py       the dual form over mini-batches (trains with autograd; decoding and any T)
    layer.py      the layer and block modules
"""
from __future__ import annotations

from architectures.config import ModelConfig
from architectures.registry import ArchSpec, register
from architectures.ttt.layer import TTTBlock


def flops_per_token(cfg: ModelConfig, ctx: int) -> dict:
    """Analytic forward FLOPs per token (a multiply-add = 2 FLOPs; training = 3 x forward).

      projections   2 * L * (4 d^2 + d H)        Wq, Wv, Wo + (Wg on the Mamba backbone, Wk on the
                                                 Transformer one); the lr gate d -> H
      convs         2 * L * 3 d k                pre-conv, convq, convk (Mamba backbone only)
      FFN           2 * L * 3 d ffn
      inner loop, per head and token, b = mini-batch, f = head dim (from dual.py, one mini-batch):
        linear      6 f^2 (K W, Q W, K^T (aG)) + 6 b f (tril(QK^T), (E*A) G, E G, counted over the
                    full b x b block, as the dual form computes it)
        mlp         56 f^2 (K W1, X2 W2, G2 W2^T, Q W1, Xbar2 W2, K^T aG1, X2^T aG2 at hidden 4f)
                    + 30 b f (QK^T, Xbar2 X2^T and the E products at widths f and 4f)
      logits        2 d V
    Independent of the context: the state has a fixed size. Checked against FlopCounterMode in
    the FLOP-accounting issue; elementwise terms (LN, GELU, its gradient) are not counted.
    """
    o = cfg.options
    L, d, H, f, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    b = int(o.get("mini_batch", 16))
    mamba = o.get("backbone", "mamba") == "mamba"
    k = int(o.get("conv_width", 4))
    proj = 2 * (4 * d * d + d * H)
    convs = 2 * 3 * d * k if mamba else 0
    ffn = 2 * 3 * d * cfg.ffn_dim
    inner = H * ((6 * f * f + 6 * b * f) if o.get("inner", "linear") == "linear" else (56 * f * f + 30 * b * f))
    fwd = L * (proj + convs + ffn + inner) + 2 * d * V
    return {"fwd": fwd, "train": 3 * fwd, "inner_fwd": L * inner}


for _name, _inner, _backbone, _desc in [
    ("ttt_linear", "linear", "mamba", "TTT-Linear, Mamba backbone (pre-conv, shared QK + convs, gate)"),
    ("ttt_mlp", "mlp", "mamba", "TTT-MLP, Mamba backbone (pre-conv, shared QK + convs, gate)"),
    ("ttt_linear_base", "linear", "transformer", "TTT-Linear, Transformer backbone (separate Q, K, V)"),
    ("ttt_mlp_base", "mlp", "transformer", "TTT-MLP, Transformer backbone (separate Q, K, V)"),
]:
    register(ArchSpec(name=_name, description=_desc, build_block=TTTBlock, flops_per_token=flops_per_token))
