"""TTT layers (Sun et al. 2024, arXiv 2407.04620): TTT-Linear and TTT-MLP, on the Mamba backbone
(the paper's default) and on the Transformer backbone.

    reference.py      the primal form, token by token (the test oracle)
    dual.py           the dual form over mini-batches (trains with autograd; decoding and any T)
    dual_backward.py  the dual form's backward derived by hand, in PyTorch (what the kernels compute)
    triton_linear.py  TTT-Linear Triton kernels: prefill forward/backward, decode
    triton_mlp.py     TTT-MLP Triton kernels: prefill forward/backward, decode
    layer.py          the layer and block modules (backend auto | triton | torch)
"""
from __future__ import annotations

from architectures.accounting import Counts, embedding_params
from architectures.config import ModelConfig
from architectures.registry import ArchSpec, register
from architectures.ttt.layer import TTTBlock


def count(cfg: ModelConfig, ctx: int) -> Counts:
    """A TTT LM at context T (conventions in architectures/accounting.py). d width, H heads,
    f = d / H head dim, b mini-batch, k conv width, L layers, V vocab.

    Parameters per layer:
      projections   4 d^2                   Wq, Wv, Wo and Wg (Mamba backbone) or Wk (Transformer one)
      lr gate       d H + H                 theta_h and beta_h
      token offset  b                       delta
      inner LN      2 d
      inner model   H (f^2 + f)             linear: W, b;  mlp: H (8 f^2 + 5 f) for W1 (f x 4f), b1, W2, b2
      post norm     2 d                     LayerNorm
      norms, FFN    2 d + 3 d ffn
      convs         3 (d k + d) + d         pre-conv, convq, convk and the conv norm (Mamba backbone)
    Forward FLOPs per token (the dual form, dual.py, per head and token, for whole mini-batches):
      projections   2 L 4 d^2,   lr gate 2 L d H,   FFN 2 L 3 d ffn,   logits 2 d V
      convs         2 L 3 d k                                         (Mamba backbone)
      inner linear  L H (6 f^2 + 4 b f)     [K; Q] W (4 f^2), K^T (a G) (2 f^2); Q K^T and M G over the
                                            full b x b block as computed (2 b f each)
      inner mlp     L H (56 f^2 + 20 b f)   [K; Q] W1 (16 f^2), X2 W2, G2 W2^T, Xbar2 W2, K^T aG1,
                                            X2^T aG2 (8 f^2 each); Q K^T (2 b f), M G1 (8 b f),
                                            Xbar2 X2^T (8 b f), (E * .) G2 (2 b f)
    Independent of T: the state has a fixed size. LN, its closed-form gradient and GELU are O(d)
    elementwise work, not counted.
    State per sequence: per layer the inner weights plus their accumulators inside the current
    mini-batch (2 x the inner model's parameters), plus 3 (k - 1) d conv inputs (Mamba backbone).
    """
    o = cfg.options
    L, d, H, f, V, ffn = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size, cfg.ffn_dim
    b, k = int(o.get("mini_batch", 16)), int(o.get("conv_width", 4))
    mamba = o.get("backbone", "mamba") == "mamba"
    linear = o.get("inner", "linear") == "linear"
    inner_params = H * (f * f + f) if linear else H * (8 * f * f + 5 * f)
    layer_params = (4 * d * d + d * H + H + b + 2 * d + inner_params + 2 * d + 2 * d + 3 * d * ffn
                    + ((3 * (d * k + d) + d) if mamba else 0))
    terms = {"projections": 2 * L * 4 * d * d, "lr_gate": 2 * L * d * H, "ffn": 2 * L * 3 * d * ffn,
             "inner": L * H * ((6 * f * f + 4 * b * f) if linear else (56 * f * f + 20 * b * f)),
             "logits": 2 * d * V}
    if mamba:
        terms["convs"] = 2 * L * 3 * d * k
    return Counts(
        embedding_params=embedding_params(cfg),
        non_embedding_params=L * layer_params + d,
        fwd_terms=terms,
        state_numbers=L * (2 * inner_params + (3 * (k - 1) * d if mamba else 0)),
    )


for _name, _inner, _backbone, _desc in [
    ("ttt_linear", "linear", "mamba", "TTT-Linear, Mamba backbone (pre-conv, shared QK + convs, gate)"),
    ("ttt_mlp", "mlp", "mamba", "TTT-MLP, Mamba backbone (pre-conv, shared QK + convs, gate)"),
    ("ttt_linear_base", "linear", "transformer", "TTT-Linear, Transformer backbone (separate Q, K, V)"),
    ("ttt_mlp_base", "mlp", "transformer", "TTT-MLP, Transformer backbone (separate Q, K, V)"),
]:
    register(ArchSpec(name=_name, description=_desc, build_block=TTTBlock, count=count))
