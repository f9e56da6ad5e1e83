"""The Table 1 ablation ladder of the TTT paper (arXiv 2407.04620) as configuration: every row builds from
its conf/arch YAML, trains a step, and is counted right; Theorem 1 holds numerically (row 3, TTT with
f(x) = W x, batch GD over the sequence, eta = 1/2, W0 = 0, equals row 2, linear attention without
normalizer or feature map, at every position); the ladder is the published table's."""
import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import architectures
from architectures import ModelConfig, build_model
from architectures.layers import apply_rope, rope_angles
from architectures.backends import BackendUnavailable
from architectures.ttt import TABLE1
from architectures.ttt.layer import TTTLayer, resolve_ttt_backend
from bench import published
from bench.config import arch_config

CONF = Path(__file__).resolve().parent.parent / "conf"
F64 = torch.float64
V = 61


def arch_options(arch: str, **overrides) -> dict:
    o = arch_config(arch)
    for key in ("name", "native", "layer_multiplier"):
        o.pop(key, None)
    return {**o, **overrides}


def model(arch: str, T: int, d=32, L=2, H=2, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch, V, d, L, H, 2 * d + 8, T, options=arch_options(arch, **overrides))
    return build_model(cfg)


def test_the_ladder_is_the_published_table():
    rows = published.load("table1")
    assert [(r, label) for r, label, _ in TABLE1] == list(zip(rows["row"], rows["configuration"]))
    assert all(arch in architectures.names() and (CONF / "arch" / f"{arch}.yaml").exists() for *_, arch in TABLE1)


@pytest.mark.parametrize("row,arch", [(r, a) for r, _, a in TABLE1], ids=[a for *_, a in TABLE1])
def test_every_ladder_row_builds_trains_and_is_counted(row, arch):
    T = 48
    m = model(arch, T)
    counts = architectures.get(arch).count(m.cfg, T)
    assert counts.params == m.num_params() and counts.non_embedding_params == m.num_params(non_embedding=True)
    x = torch.randint(0, V, (2, T))
    loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_each_row_changes_what_the_paper_says():
    """Rows 3 -> 7 add parameters only where the row says: W0 (row 4), the inner LN and the bias b0 (row 5),
    nothing (row 6: b is not a parameter), the lr gate and token offset (row 7)."""
    T, d, H, L = 48, 32, 2, 2
    p = {a: model(a, T, d, L, H).num_params() for _, _, a in TABLE1}
    f = d // H
    assert p["table1_2_linear_attention_improved"] == p["table1_1_linear_attention"] == p["table1_3_ttt_equivalence"]
    assert p["table1_4_learnable_w0"] - p["table1_3_ttt_equivalence"] == L * H * f * f
    assert p["table1_5_ln_residual"] - p["table1_4_learnable_w0"] == L * (2 * d + H * f)
    assert p["table1_6_mini_batch"] == p["table1_5_ln_residual"]
    assert p["ttt_linear_base"] - p["table1_6_mini_batch"] == L * (d * H + H + 16)


def _row2_from_row3(row3):
    """Row 2 (linear attention) with row 3's weights: the same projections, post-norm, norms and FFN."""
    row2 = model("table1_2_linear_attention_improved", row3.cfg.max_seq_len, chunk_size=16).to(F64)
    state = {}
    for name, t in row3.state_dict().items():
        state[name.replace(".ttt_norm.", ".attn_norm.").replace(".ttt.", ".attn.")] = t
    row2.load_state_dict(state)  # strict: every weight of each has its counterpart
    return row2


@pytest.mark.parametrize("impl", ["dual", "reference"])
def test_theorem1_row3_equals_row2_at_every_position(impl):
    """Theorem 1: TTT with f(x) = W x, the loss 0.5 ||k W - v||^2 (the paper's ||.||^2 with eta = 1/2), batch
    GD from W0 = 0 over the whole sequence (b = T: every gradient at W0), gives W_t = sum_{s<=t} k_s^T v_s and
    z_t = q_t W_t = sum_{s<=t} (q_t . k_s) v_s, linear attention. The two layers as configured, fp64: the
    TTT dual form (one T x T mini-batch) or its token-by-token reference (gradients by autograd of the loss)
    against the chunked linear attention (chunks of 16, through a state), logits and gradients. (A single
    T x T block is checked against the pieces in tests/test_ttt.py.)"""
    T = 80  # TTT: one mini-batch, in pieces of 64 and 16 (dual.LONG_PIECE); linear attention: 5 chunks of 16
    row3 = model("table1_3_ttt_equivalence", T, backend=impl).to(F64)
    with torch.no_grad():  # post-norm off its init so every weight matters
        for name, p in row3.named_parameters():
            if "post_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    row2 = _row2_from_row3(row3)
    assert row3.blocks[0].ttt.mini_batch == T and not hasattr(row3.blocks[0].ttt, "lr_gate")
    x = torch.randint(0, V, (2, T))
    y3, y2 = row3(x), row2(x)
    torch.testing.assert_close(y3, y2, rtol=1e-10, atol=1e-10)
    # the layers themselves, on the same input, at every position
    h = torch.randn(2, T, 32, dtype=F64)
    torch.testing.assert_close(row3.blocks[0].ttt(h), row2.blocks[0].attn(h), rtol=1e-11, atol=1e-12)
    # and their gradients
    y3.logsumexp(-1).sum().backward()
    y2.logsumexp(-1).sum().backward()
    grads2 = dict(row2.named_parameters())
    for name, p in row3.named_parameters():
        p2 = grads2[name.replace(".ttt_norm.", ".attn_norm.").replace(".ttt.", ".attn.")]
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_theorem1_needs_each_of_its_conditions():
    """Not a tautology: learnable W0 away from 0 (row 4), or mini-batches shorter than T, break the equality."""
    T = 32
    row3 = model("table1_3_ttt_equivalence", T).to(F64)
    row2 = _row2_from_row3(row3)
    x = torch.randint(0, V, (1, T))
    torch.testing.assert_close(row3(x), row2(x), rtol=1e-10, atol=1e-10)
    minibatched = model("table1_3_ttt_equivalence", T, mini_batch=8).to(F64)
    minibatched.load_state_dict(row3.state_dict())
    assert (minibatched(x)[:, 8:] - row2(x)[:, 8:]).abs().max() > 1e-3
    torch.testing.assert_close(minibatched(x)[:, :8], row2(x)[:, :8])  # the first mini-batch is the same
    row4 = model("table1_4_learnable_w0", T).to(F64)
    row4.load_state_dict(row3.state_dict(), strict=False)  # all but W0, which row 4 draws ~ N(0, 0.02)
    assert (row4(x) - row2(x)).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["table1_1_linear_attention", "table1_3_ttt_equivalence", "table1_6_mini_batch"])
def test_prefill_then_decode_equals_one_prefill(arch):
    chunks = {"chunk_size": 16} if "linear_attention" in arch else {}  # several chunks (linear attention's option)
    m = model(arch, 40, **chunks).to(F64).eval()
    x = torch.randint(0, V, (2, 40))
    state = m.new_state(2, 40)
    outs = [m(x[:, :21], state)] + [m(x[:, t:t + 1], state) for t in range(21, 40)]
    torch.testing.assert_close(torch.cat(outs, 1), m(x), rtol=1e-10, atol=1e-10)


def test_linear_attention_result_does_not_depend_on_the_chunk():
    a = model("table1_1_linear_attention", 50, chunk_size=64).to(F64)
    b = copy.deepcopy(a)
    b.blocks[0].attn.chunk = b.blocks[1].attn.chunk = 7
    x = torch.randint(0, V, (2, 50))
    torch.testing.assert_close(a(x), b(x), rtol=1e-11, atol=1e-11)


def test_linear_attention_normalizer_and_feature_map_by_hand():
    """Row 1 for one head: z_t = sum_s (phi(q_t) . phi(k_s)) v_s / sum_s phi(q_t) . phi(k_s), phi = elu + 1,
    then the post-norm and Wo."""
    arch = "table1_1_linear_attention"
    cfg = ModelConfig(arch, V, 8, 1, 1, 16, 12, options=arch_options(arch))
    layer = build_model(cfg).blocks[0].attn.to(F64)
    x = torch.randn(1, 12, 8, dtype=F64)
    cos, sin = rope_angles(8, torch.arange(12), 1e4)
    rope = lambda t: apply_rope(t[:, None], cos, sin, interleaved=True)[0, 0]  # (1, 1, T, f) -> (T, f)
    phi = lambda t: torch.nn.functional.elu(t) + 1
    q, k, v = phi(rope(layer.wq(x))), phi(rope(layer.wk(x))), layer.wv(x)[0]
    a = torch.tril(q @ k.T)
    z = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(layer(x)[0], layer.wo(layer.post_norm(z)), rtol=1e-10, atol=1e-10)


def test_options_that_need_the_pytorch_path():
    with pytest.raises(BackendUnavailable, match="inner_ln"):
        resolve_ttt_backend("triton", "linear", paper_f=False)
    assert resolve_ttt_backend("auto", "linear", paper_f=False) == "dual"
    with pytest.raises(BackendUnavailable, match="backend=scan .*inner_ln"):
        resolve_ttt_backend("scan", "linear", paper_f=False)
    with pytest.raises(ValueError, match="TTT-Linear only"):
        TTTLayer(ModelConfig("ttt_mlp", V, 32, 1, 2, 64, 64, options={"inner": "mlp", "learnable_w0": False}))
