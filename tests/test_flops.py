"""The analytic counts of architectures/accounting.py, checked by measurement: parameters against the
built models, matrix-product FLOPs against torch's FlopCounterMode, the terms that counter cannot see
against an op-by-op count of the reference code, training = 3 x forward, the state against the decode
cache; and the size matching of architectures/sizing.py (parity by parameters, equal training FLOPs)."""
import csv
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

import architectures
from architectures import ModelConfig, build_model
from architectures.accounting import OpCounter, flop_counter
from architectures.layers import CausalConv
from architectures.mamba.layers import head_dim_for, mamba2_inner_width
from architectures.mamba.scan import selective_state_step
from architectures.sizing import FLOPS_TOLERANCE, SizeSpec, SizingError, reference_config, size_model
from bench.config import arch_config

CONF = Path(__file__).resolve().parent.parent / "conf"
ARCHS = ["transformer", "transformer_conv", "ttt_linear", "ttt_mlp", "ttt_linear_base", "ttt_mlp_base",
         "mamba", "mamba2",
         # the Table 1 ablation ladder (architectures/ttt TABLE1): linear attention, TTT with options off
         "table1_1_linear_attention", "table1_2_linear_attention_improved", "table1_3_ttt_equivalence",
         "table1_4_learnable_w0", "table1_5_ln_residual", "table1_6_mini_batch"]
# (width, depth, heads, T): T a multiple of TTT's mini-batch (16) and of the Mamba-2 chunk (64), so every
# count is exact, and one T that is neither (the trailing partial mini-batch / chunk costs less)
SHAPES = [(64, 2, 2, 128), (96, 3, 3, 192), (128, 1, 4, 200)]
PAPER_SIZES = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9}


def arch_options(arch: str, **overrides) -> dict:
    o = arch_config(arch)
    for key in ("name", "native", "layer_multiplier"):  # not model options: the recipe's, sizing's
        o.pop(key, None)
    if arch == "mamba2":
        o["chunk_size"] = 64  # several chunks at test lengths
    if arch in ("mamba", "mamba2") or "inner" in o:  # Mamba and TTT: PyTorch's scans, whose products
        o["backend"] = "torch"  # FlopCounterMode sees (backend=cpp, auto on CPU, runs them inside one C++ call)
    return {**o, **overrides}


def config(arch, d=64, L=2, H=2, T=128, V=257, **overrides) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=V, d_model=d, n_layers=L, n_heads=H, ffn_dim=2 * d + 8, max_seq_len=T,
                       options=arch_options(arch, **overrides))


def counted_forward(model, x) -> float:
    """FlopCounterMode on one forward; attention on the math path, whose products the counter sees."""
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as c, torch.no_grad():
        model(x)
    return c.get_total_flops()


# -- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d,L,H,T", SHAPES)
def test_analytic_parameters_equal_the_model(arch, d, L, H, T):
    cfg = config(arch, d, L, H, T)
    counts = architectures.get(arch).count(cfg, T)
    model = build_model(cfg)
    assert counts.params == model.num_params()
    assert counts.non_embedding_params == model.num_params(non_embedding=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_untied_head_adds_its_parameters_and_no_flops(arch):
    tied, untied = config(arch), replace(config(arch), tie_embeddings=False)
    a, b = architectures.get(arch).count(tied, 128), architectures.get(arch).count(untied, 128)
    assert b.params == build_model(untied).num_params() == a.params + untied.vocab_size * untied.d_model
    assert b.non_embedding_params == build_model(untied).num_params(non_embedding=True) == a.non_embedding_params
    assert b.fwd_terms == a.fwd_terms


@pytest.mark.parametrize("arch", ARCHS)
def test_without_ffn_the_counts_drop_the_ffn_and_match_the_model(arch):
    """ffn=false: every block's FFN slot is the identity. The counts lose the SwiGLU (3 d ffn per layer), its
    norm (d) and its FLOPs; Mamba blocks, which have none, do not change; the model computes the same shape."""
    with_ffn, without = config(arch), replace(config(arch), ffn=False)
    a, b = architectures.get(arch).count(with_ffn, 128), architectures.get(arch).count(without, 128)
    model = build_model(without)
    assert b.params == model.num_params() and b.non_embedding_params == model.num_params(non_embedding=True)
    assert not any("ffn" in name for name, _ in model.named_parameters())
    L, d, ffn = with_ffn.n_layers, with_ffn.d_model, with_ffn.ffn_dim
    has_ffn = not arch.startswith("mamba")
    assert a.params - b.params == (L * (3 * d * ffn + d) if has_ffn else 0)
    assert a.fwd_flops - b.fwd_flops == (2 * L * 3 * d * ffn if has_ffn else 0)
    x = torch.randint(0, without.vocab_size, (2, 128))
    assert model(x).shape == (2, 128, without.vocab_size)
    measured = counted_forward(model, x) / (2 * 128)
    expected = b.seen_fwd_flops
    if b.attention:
        expected += b.fwd_terms[b.attention] * (2 * 128 / 129 - 1)
    assert measured == pytest.approx(expected, rel=1e-9)


def test_learned_positions_count_with_the_embeddings_and_replace_rope():
    """positions: learned adds max_seq_len x d embedding parameters (no FLOPs counted); the attention then has
    no RoPE, and a decode continues the positions where the prefill stopped."""
    cfg = config("transformer", T=64, positions="learned")
    rope = config("transformer", T=64)
    model = build_model(cfg)
    counts = architectures.get("transformer").count(cfg, 64)
    assert counts.params == model.num_params() == architectures.get("transformer").count(rope, 64).params + 64 * 64
    assert counts.non_embedding_params == model.num_params(non_embedding=True)
    assert not model.blocks[0].attn.rope and build_model(rope).blocks[0].attn.rope
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    full = model(x)
    state = model.new_state(2, 64)
    steps = torch.cat([model(x[:, :40], state)] + [model(x[:, t:t + 1], state) for t in range(40, 64)], dim=1)
    assert torch.allclose(full, steps, atol=1e-5)
    with pytest.raises(ValueError, match="learned positions cover 64"):
        model(torch.randint(0, cfg.vocab_size, (1, 65)))
    with pytest.raises(ValueError, match="positions must be one of"):
        build_model(config("transformer", positions="alibi"))


def test_logits_at_chosen_positions_are_those_of_the_full_forward():
    cfg = config("transformer", T=32)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 32))
    at = torch.rand(3, 32) < 0.2
    assert torch.allclose(model(x, at=at), model(x)[at], atol=1e-6)


def test_sizing_without_ffn_uses_a_reference_without_ffn():
    spec = SizeSpec.from_dict(OmegaConf.load(CONF / "size" / "cpu-s.yaml"))
    for arch in ("transformer", "ttt_linear", "mamba"):
        s = size_model(arch, arch_options(arch), spec, 512, 257, "params", ffn=False)
        assert not s.cfg.ffn and s.row()["ffn_dim"] is None
        ref = reference_config(spec, 512, 257, ffn=False)
        assert not ref.ffn and s.reference == architectures.get("transformer").count(ref, 512)
    flops = size_model("ttt_linear", arch_options("ttt_linear"), spec, 512, 257, "flops", ffn=False)
    assert abs(flops.flops_ratio - 1) < FLOPS_TOLERANCE and not flops.cfg.ffn


def test_mamba2_inner_width_override_builds_whole_heads():
    cfg = config("mamba2", d=80, d_inner=192)
    model = build_model(cfg)
    assert model.blocks[0].mixer.d_inner == mamba2_inner_width(cfg) == 192 and model.blocks[0].mixer.n_heads == 3
    assert architectures.get("mamba2").count(cfg, 128).params == model.num_params()


# -- FLOPs: what FlopCounterMode sees ----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d,L,H,T", SHAPES)
def test_matmul_flops_match_flop_counter(arch, d, L, H, T):
    """FlopCounterMode counts matrix products; the analytic terms it can see must agree.
    The math attention path computes all T x T scores: the analytic attention term is causal-halved,
    so the masked half, T(T-1)/2 of T^2, is added back before comparing."""
    cfg = config(arch, d, L, H, T)
    counts = architectures.get(arch).count(cfg, T)
    B = 2
    measured = counted_forward(build_model(cfg), torch.randint(0, cfg.vocab_size, (B, T))) / (B * T)
    expected = counts.seen_fwd_flops
    if counts.attention:
        expected += counts.fwd_terms[counts.attention] * (2 * T / (T + 1) - 1)
    exact = T % 16 == 0 and T % 64 == 0
    assert measured == pytest.approx(expected, rel=1e-9 if exact else 0.05), counts.fwd_terms


@pytest.mark.parametrize("arch", ["transformer", "ttt_linear", "ttt_mlp", "mamba", "mamba2", "table1_1_linear_attention",
                                  "table1_3_ttt_equivalence"])
def test_training_costs_three_forwards(arch):
    """Training FLOPs = 3 x forward: measured forward + backward over forward, for every architecture's
    PyTorch path (our grouped-conv backward formula; torch 2.13's charges depthwise convs d times)."""
    cfg = config(arch, 64, 2, 2, 128)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 128))
    fwd = counted_forward(model, x)
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as c:
        model(x).logsumexp(-1).sum().backward()
    assert c.get_total_flops() / fwd == pytest.approx(3.0, rel=0.05)


def test_grouped_conv_backward_counts_two_forwards():
    x = torch.randn(2, 48, 100, requires_grad=True)
    w = torch.randn(48, 1, 4, requires_grad=True)
    with flop_counter() as c:
        torch.nn.functional.conv1d(x, w, groups=48).sum().backward()
    counts = {str(k): v for k, v in c.get_flop_counts()["Global"].items()}
    assert counts["aten.convolution"] == 2 * 2 * 48 * 4 * 97
    assert counts["aten.convolution_backward"] == 2 * counts["aten.convolution"]


# -- FLOPs the counter cannot see, counted op by op in the reference code ----------------------

def test_mamba_scan_update_counted_in_the_decode_step():
    """selective_state_step is the recurrence as written (one token): its state-sized elementwise
    work is the analytic scan_update term, and its product the scan_readout term."""
    d, N, B = 64, 16, 3
    cfg = config("mamba", d=d, L=1, d_state=N)
    D = 2 * d
    counts = architectures.get("mamba").count(cfg, 128)
    args = (torch.zeros(B, D, N), torch.randn(B, D), torch.randn(B, D), -torch.rand(D, N), torch.randn(B, N),
            torch.randn(B, N))
    with OpCounter() as ops:
        selective_state_step(*[a.clone() for a in args], D=torch.randn(D), z=torch.randn(B, D),
                             delta_bias=torch.randn(D))
    assert ops.flops(numel=B * D * N) / B == counts.fwd_terms["scan_update"]
    with flop_counter() as c:
        selective_state_step(*[a.clone() for a in args])
    assert c.get_total_flops() / B == counts.fwd_terms["scan_readout"]


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_mamba_conv_counted_op_by_op(arch):
    """The depthwise conv is k shifted multiply-adds (elementwise, unseen by FlopCounterMode)."""
    cfg = config(arch, d=64, L=1)
    counts = architectures.get(arch).count(cfg, 128)
    block = build_model(cfg).blocks[0].mixer
    conv = block.conv
    assert isinstance(conv, CausalConv)
    B, T = 2, 50
    with OpCounter() as ops, torch.no_grad():
        conv(torch.randn(B, T, conv.weight.shape[0]))
    assert ops.flops() / (B * T) == counts.fwd_terms["conv"]
    assert "conv" in counts.unseen


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp", "transformer_conv"])
def test_ttt_and_short_convs_counted_op_by_op(arch):
    """TTT's pre-conv and Q/K convs (Mamba backbone) and transformer_conv's short conv are the same
    CausalConv: elementwise, unseen by FlopCounterMode, counted op by op as the `convs` term."""
    cfg = config(arch, d=64, L=1)
    counts = architectures.get(arch).count(cfg, 128)
    convs = [m for m in build_model(cfg).modules() if isinstance(m, CausalConv)]
    assert convs and "convs" in counts.unseen
    B, T = 2, 50
    with OpCounter() as ops, torch.no_grad():
        for conv in convs:
            conv(torch.randn(B, T, conv.weight.shape[0]))
    assert ops.flops() / (B * T) == counts.fwd_terms["convs"]


# -- state -------------------------------------------------------------------------------------

def _numbers(obj, seen=None) -> int:
    """Numbers held in tensors reachable from a cache object (tensors, dicts, lists, attributes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_numbers(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_numbers(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_numbers(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize("arch", ARCHS)
def test_state_size_is_the_decode_cache(arch):
    """After a prefill of T tokens (mid mini-batch, so TTT holds its accumulators), the decode state
    of one sequence holds exactly the analytic number of numbers."""
    T = 2 * 16 + 5
    cfg = config(arch, 64, 2, 2, T)
    if cfg.options.get("mini_batch") == "seq":  # b = max_seq_len: longer than the prefill, so it ends mid mini-batch
        cfg = replace(cfg, max_seq_len=2 * T)
    model = build_model(cfg)
    state = model.new_state(1, T)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, T)), state)
    assert _numbers(state.caches) == architectures.get(arch).count(cfg, T).state_numbers


@pytest.mark.parametrize("arch", ARCHS)
def test_the_shell_keeps_the_one_count_of_tokens_seen(arch):
    """Blocks read cache.seen (the position of their first new token) and never change it; the shell's
    DecodeState advances every cache together after all blocks ran."""
    T = 21
    cfg = config(arch, 64, 2, 2, 2 * T)
    if cfg.options.get("mini_batch") == "seq":
        cfg = replace(cfg, max_seq_len=4 * T)
    model = build_model(cfg)
    state = model.new_state(1, 2 * T)
    idx = torch.randint(0, cfg.vocab_size, (1, T + 2))
    with torch.no_grad():
        model.blocks[0](model.embed(idx[:, :T]), state.caches[0])  # a block alone: the count stays
        assert [c.seen for c in state.caches] == [0] * cfg.n_layers
        state = model.new_state(1, 2 * T)
        model(idx[:, :T], state)
        model(idx[:, T:T + 1], state)
        model(idx[:, T + 1:], state)
    assert state.seen == T + 2 and [c.seen for c in state.caches] == [T + 2] * cfg.n_layers


# -- size matching -----------------------------------------------------------------------------

def sized(arch, size, ctx, match, vocab=32000):
    spec = SizeSpec.from_dict(OmegaConf.load(CONF / "size" / f"{size}.yaml"))
    options = arch_config(arch)
    options.pop("name")
    return size_model(arch, options, spec, ctx, vocab, match)


@pytest.mark.parametrize("size", list(PAPER_SIZES))
def test_paper_sizes_match_by_parameters(size):
    """Llama-2 vocabulary: the Transformer is near its name (125m: 105-130M), TTT-Linear within 2% of it
    (the paper's parity), Mamba with twice the layers within 10%."""
    ref = sized("transformer", size, 2048, "params")
    assert 0.84 <= ref.counts.params / PAPER_SIZES[size] <= 1.04
    for arch, tol in [("ttt_linear", 0.02), ("ttt_linear_base", 0.02), ("mamba", 0.10), ("mamba2", 0.10)]:
        s = sized(arch, size, 2048, "params")
        assert abs(s.counts.params / ref.counts.params - 1) < tol, (arch, s.counts.params, ref.counts.params)
    assert sized("mamba", size, 2048, "params").cfg.n_layers == 2 * ref.cfg.n_layers


# the smoke sizes use match=params (conf/profile/smoke.yaml): they are too small to FLOP-match Mamba-2; so do
# Zoology's (TASK=mqar_zoology compares every model at one width)
SIZES = sorted(p.stem for p in (CONF / "size").glob("*.yaml") if not p.stem.startswith(("smoke", "zoology")))


@pytest.mark.parametrize("vocab", [257, 32000])
@pytest.mark.parametrize("size", SIZES)
def test_match_flops_within_two_percent_at_2k_and_32k(size, vocab):
    for ctx in (2048, 32768):
        ref = sized("transformer", size, ctx, "flops", vocab)
        for arch in ARCHS:
            s = sized(arch, size, ctx, "flops", vocab)
            assert abs(s.flops_ratio - 1) < FLOPS_TOLERANCE, (arch, ctx, s.flops_ratio)
            c = s.cfg
            assert c.n_layers == ref.cfg.n_layers * (2 if arch.startswith("mamba") else 1)
            if arch == "mamba2":
                D = mamba2_inner_width(c)
                assert head_dim_for(D, 64) == head_dim_for(2 * ref.cfg.d_model, 64)  # whole heads
            elif arch != "mamba":
                assert c.n_heads == ref.cfg.n_heads and c.head_dim % 2 == 0 and c.ffn_dim % 8 == 0
            # the resolved config builds, and its count is what the sizing used
            assert architectures.get(arch).count(c, ctx).train_flops == s.counts.train_flops


def test_an_unmatchable_size_fails_with_the_remedy():
    """Mamba-2's d_state-128 SSD costs more than the 1-layer, 32-wide smoke Transformer at any width."""
    with pytest.raises(SizingError, match="match=params"):
        sized("mamba2", "smoke-xs", 2048, "flops", vocab=257)


def test_match_params_keeps_the_reference_dimensions():
    s = sized("ttt_mlp", "cpu-s", 2048, "params")
    ref = sized("transformer", "cpu-s", 2048, "params")
    assert (s.cfg.d_model, s.cfg.n_heads, s.cfg.ffn_dim, s.cfg.n_layers) == \
           (ref.cfg.d_model, ref.cfg.n_heads, ref.cfg.ffn_dim, ref.cfg.n_layers)


def test_recurrent_models_widen_with_context_under_flop_matching():
    """The Transformer's attention grows with T; equal FLOPs buys the recurrent models width."""
    for arch in ("ttt_linear", "mamba"):
        assert sized(arch, "125m", 32768, "flops").cfg.d_model > 1.5 * sized(arch, "125m", 2048, "flops").cfg.d_model


def test_sizes_command_writes_the_table(tmp_path, capsys):
    from bench.sizes import COLUMNS, main

    assert main(["--size", "125m", "--ctx", "2k,32k", "--match", "params,flops", "--vocab", "32000",
                 "--results", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sizes.csv")))
    from bench.config import parse_archs

    assert list(rows[0]) == COLUMNS and len(rows) == 2 * 2 * len(parse_archs("all"))  # the main architectures
    need = ["arch", "size", "ctx", "match", "vocab", "layers", "d_model", "heads", "params", "non_embedding_params",
            "fwd_flops_per_token", "train_flops_per_token", "state_size", "token_budget"]
    assert set(need) <= set(COLUMNS)
    for r in rows:
        assert float(r["train_flops_per_token"]) == pytest.approx(3 * float(r["fwd_flops_per_token"]))
        if r["match"] == "flops":
            assert math.isclose(float(r["flops_vs_ref"]), 1, abs_tol=FLOPS_TOLERANCE)
    assert "ttt_linear" in capsys.readouterr().out


def test_sizes_command_shows_the_models_a_task_trains(tmp_path, capsys):
    """make sizes composes as a run does (bench/config.py): TASK=mqar_zoology's models have no FFN, one
    attention head, learned positions and 2 Mamba layers, at its own ladder and the profile's match rule."""
    from bench.sizes import main

    assert main(["--task", "mqar_zoology", "--ctx", "64", "--vocab", "8192", "--arch", "transformer,mamba",
                 "--results", str(tmp_path)]) == 0
    rows = {r["arch"]: r for r in csv.DictReader(open(tmp_path / "sizes.csv"))}
    assert rows["transformer"]["ffn_dim"] == "" and float(rows["transformer"]["heads"]) == 1
    assert rows["mamba"]["layers"] == "2" and rows["transformer"]["token_budget"] == ""
    assert float(rows["transformer"]["params"]) == 8192 * 64 + 64 * 64 + 2 * (4 * 64 * 64 + 64) + 64  # + positions
    assert "zoology" in capsys.readouterr().out


def test_sizes_command_rejects_bad_input(tmp_path, capsys):
    from bench.sizes import main

    assert main(["--size", "huge", "--results", str(tmp_path)]) == 2
    assert main(["--match", "bytes", "--results", str(tmp_path)]) == 2
    assert main(["--vocab", "-5", "--results", str(tmp_path)]) == 2
    assert not (tmp_path / "sizes.csv").exists()
    assert "unknown SIZE 'huge'" in capsys.readouterr().err
