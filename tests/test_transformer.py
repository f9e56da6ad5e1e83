import pytest
import torch

import architectures
from architectures import ModelConfig, build_model
from architectures.layers import apply_rope, rope_angles, rope_angles_periodic
from architectures.shell import SequenceClassifier
from architectures.backends import BackendUnavailable
from architectures.transformer import resolve_attention_backend


def tiny(arch="transformer", **opts):
    torch.manual_seed(0)
    cfg = ModelConfig(arch, vocab_size=61, d_model=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=64,
                      options={"backend": "sdpa", **opts})
    return build_model(cfg).double().eval()


WITH_AND_WITHOUT_SHORT_CONV = pytest.mark.parametrize("arch", ["transformer", "transformer_conv"])


def test_registry_lists_names_for_unknown_arch():
    with pytest.raises(architectures.UnknownArchitecture, match="available: .*transformer"):
        architectures.get("nonexistent")


def test_an_arch_name_alone_builds_that_architecture():
    """ArchSpec owns its options' defaults (architectures/registry.py): the name is enough, without the YAML."""
    def built(arch):
        return build_model(ModelConfig(arch, vocab_size=61, d_model=32, n_layers=1, n_heads=4, ffn_dim=48))

    assert built("transformer_conv").blocks[0].conv.width == 4 and built("transformer").blocks[0].conv is None
    assert built("ttt_mlp").blocks[0].ttt.inner == "mlp" and built("ttt_linear").blocks[0].ttt.inner == "linear"
    row3 = built("table1_3_ttt_equivalence").blocks[0].ttt
    assert row3.backbone == "transformer" and not (row3.inner_ln or row3.learnable_w0 or row3.learnable_lr)


def test_an_option_the_architecture_does_not_read_is_an_error():
    cfg = ModelConfig("mamba", vocab_size=61, d_model=32, n_layers=1, n_heads=1, ffn_dim=48,
                      options={"d_stat": 16})  # misspelt
    with pytest.raises(ValueError, match="'mamba' has no option.*d_stat; it takes .*d_state"):
        build_model(cfg)
    with pytest.raises(KeyError, match="no option 'mini_batch'"):
        cfg.opt("mini_batch")


@WITH_AND_WITHOUT_SHORT_CONV
def test_kv_cache_decode_equals_full_forward(arch):
    model = tiny(arch)
    x = torch.randint(0, 61, (3, 23))
    full = model(x)  # (B, T, V)
    state = model.new_state(3, 23)
    steps = [model(x[:, :7], state)] + [model(x[:, t:t + 1], state) for t in range(7, 23)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@WITH_AND_WITHOUT_SHORT_CONV
def test_chained_prefills_equal_one_prefill(arch):
    model = tiny(arch)
    x = torch.randint(0, 61, (2, 30))
    state = model.new_state(2, 30)
    out = torch.cat([model(x[:, :11], state), model(x[:, 11:19], state), model(x[:, 19:], state)], 1)
    torch.testing.assert_close(out, model(x), rtol=1e-9, atol=1e-9)


@WITH_AND_WITHOUT_SHORT_CONV
def test_causality(arch):
    model = tiny(arch)
    x = torch.randint(0, 61, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 61, (2, 8))
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_decode_state_overflow_is_an_error():
    model = tiny()
    state = model.new_state(1, 4)
    with pytest.raises(ValueError, match="decode state holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), state)


@WITH_AND_WITHOUT_SHORT_CONV
def test_generate_greedy_matches_argmax_of_full_forward(arch):
    model = tiny(arch)
    prompt = torch.randint(0, 61, (2, 5))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 11)
    # each generated token is the argmax of a fresh full forward over what precedes it
    for t in range(5, 11):
        torch.testing.assert_close(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


def test_short_conv_feeds_attention_each_position_and_its_predecessors():
    """With the short conv, a change at position t reaches the first block's attention input at
    t .. t + k - 1 and nowhere else; without it (short_conv 0), only at t."""
    for k, moved in [(0, [5]), (4, [5, 6, 7, 8])]:
        block = tiny("transformer_conv", short_conv=k).blocks[0]
        seen = []
        block.attn.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        h = torch.randn(1, 12, 32, dtype=torch.float64)
        g = h.clone()
        g[0, 5] += 1.0
        block(h), block(g)
        changed = ((seen[1] - seen[0]).abs().amax(-1)[0] > 1e-12).nonzero().flatten().tolist()
        assert changed == moved, (k, changed)


def test_short_conv_width_is_checked():
    with pytest.raises(ValueError, match="short_conv must be 0"):
        tiny("transformer_conv", short_conv=1)


def test_untied_head_is_its_own_matrix():
    torch.manual_seed(0)
    cfg = ModelConfig("transformer", vocab_size=61, d_model=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=64,
                      options={"backend": "sdpa"}, tie_embeddings=False)
    model = build_model(cfg).double().eval()
    assert model.head.weight.data_ptr() != model.embed.weight.data_ptr()
    x = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(model(x), model.hidden(x) @ model.head.weight.T)
    model.head.weight.grad = None
    model(x).sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_init_and_tied_head():
    model = tiny()
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.num_params() - model.num_params(non_embedding=True) == 61 * 32


def test_backend_resolution_on_cpu():
    assert resolve_attention_backend("sdpa") == "sdpa"
    if not torch.cuda.is_available():
        assert resolve_attention_backend("auto") == "sdpa"
        with pytest.raises(BackendUnavailable):
            resolve_attention_backend("flash_attn")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_attention_backend("xformers")
    assert tiny().backends() == {"attention": "sdpa"}


def test_rope_is_a_rotation_and_relative():
    q = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    for interleaved in (False, True):
        c0, s0 = rope_angles(8, torch.arange(5))
        c1, s1 = rope_angles(8, torch.arange(5) + 7)
        qa, ka = apply_rope(q, c0, s0, interleaved), apply_rope(k, c0, s0, interleaved)
        qb, kb = apply_rope(q, c1, s1, interleaved), apply_rope(k, c1, s1, interleaved)
        torch.testing.assert_close(qa.norm(dim=-1), q.norm(dim=-1))  # norms kept
        # shift-invariant scores (the angles are computed in fp32)
        torch.testing.assert_close(qa @ ka.transpose(-1, -2), qb @ kb.transpose(-1, -2), rtol=1e-5, atol=1e-5)


def test_interleaved_rope_rotates_adjacent_pairs():
    x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    cos, sin = rope_angles(4, torch.tensor([1]))
    y = apply_rope(x, cos, sin, interleaved=True)
    torch.testing.assert_close(y[..., :2], torch.stack([cos[0, 0], sin[0, 0]]).view(1, 1, 1, 2))
    torch.testing.assert_close(y[..., 2:], torch.zeros(1, 1, 1, 2))


def _interleaved_rope_case():
    """A head-transposed (non-contiguous) input as the TTT layer passes it, its angles, and the rotation by hand."""
    x = torch.randn(2, 37, 3, 16).transpose(1, 2)  # (B, H, T, f) view of (B, T, H, f)
    cos, sin = rope_angles(16, torch.arange(37) % 16)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return x, cos, sin, torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def test_interleaved_rope_eager_complex_form_equals_the_rotation_by_hand():
    """Eager, the interleaved rotation is one complex product."""
    x, cos, sin, by_hand = _interleaved_rope_case()
    torch.testing.assert_close(apply_rope(x, cos, sin, interleaved=True), by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # the first torch.compile of a process costs 12-19 s of inductor start-up from a cold cache
def test_interleaved_rope_compiled_real_form_equals_the_rotation_by_hand():
    """Under torch.compile (no complex kernels in inductor) the real-arithmetic form: the same numbers."""
    x, cos, sin, by_hand = _interleaved_rope_case()
    compiled = torch.compile(lambda t: apply_rope(t, cos, sin, interleaved=True))
    torch.testing.assert_close(compiled(x), by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("start,T", [(0, 1), (5, 1), (15, 1), (3, 9), (11, 37), (0, 48)])
def test_periodic_rope_table_equals_the_angles_it_replaces(start, T):
    """TTT's RoPE restarts every mini-batch: the angles at (start + 0 .. T - 1) mod 16 come from one cached table
    (a slice inside a period, an index across its end), equal to rope_angles at those positions. A table first made
    in inference mode still goes into a graph that trains."""
    from architectures.layers import rope_period

    rope_period.cache_clear()  # the table is made here, in inference mode
    with torch.inference_mode():
        cos, sin = rope_angles_periodic(8, start, T, 16, 1e4, "cpu")
    want_cos, want_sin = rope_angles(8, (start + torch.arange(T)) % 16)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    cos, sin = rope_angles_periodic(8, start, T, 16, 1e4, "cpu")
    x = torch.randn(1, 1, T, 4, requires_grad=True)
    (x * cos * sin).sum().backward()  # saves the table for the backward (compiled RoPE's real products do)
    torch.testing.assert_close(x.grad, (cos * sin).expand_as(x))


@pytest.mark.parametrize("start,T", [(0, 48), (16, 32), (0, 16), (3, 48), (0, 40), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_periodic_rope_equals_apply_rope_with_the_periodic_angles(start, T, dtype):
    """apply_rope_periodic, the TTT layer's RoPE on (B, T, H, f): whole periods from a period's start (0, 48; 16, 32;
    0, 16) rotate every period by one table, the rest (an offset, a trailing part, a decode step) take the angles
    path; both equal apply_rope on the head-major layout with rope_angles at (start + t) mod 16, and so does the
    gradient through them, from a table first made in inference mode (a prefill before training)."""
    from architectures.layers import rope_period, _rope_period_rotations, apply_rope_periodic

    x = torch.randn(2, T, 3, 8, dtype=dtype, requires_grad=True)  # (B, T, H, f)
    rope_period.cache_clear()
    _rope_period_rotations.cache_clear()
    with torch.inference_mode():
        apply_rope_periodic(x.detach(), start, 16, 1e4)
    cos, sin = rope_angles(8, (start + torch.arange(T)) % 16)
    want = apply_rope(x.transpose(1, 2), cos, sin, interleaved=True).transpose(1, 2)
    got = apply_rope_periodic(x, start, 16, 1e4)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(want)
    (g_want,) = torch.autograd.grad(want, x, dy)
    (g_got,) = torch.autograd.grad(got, x, dy)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # a torch.compile: inductor's start-up from a cold cache
def test_periodic_rope_under_torch_compile_computes_the_angles_in_the_graph():
    """trainer.compile=model traces the TTT layer: the periodic angles are then computed in the graph (one graph,
    no trace of the table's cache, whose wrapper dynamo would warn about on every compile), and equal eager's."""
    import warnings

    from architectures.layers import rope_period

    def rotate(x, seen: int):
        cos, sin = rope_angles_periodic(8, seen, x.shape[2], 16, 1e4, x.device)
        return apply_rope(x, cos, sin, interleaved=True)

    rope_period.cache_clear()
    x = torch.randn(1, 2, 40, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(rotate, fullgraph=True)(x, 3)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert rope_period.cache_info().currsize == 0
    torch.testing.assert_close(y, rotate(x, 3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classification_head_respects_lengths(pooling):
    clf = SequenceClassifier(tiny(), n_classes=3, pooling=pooling).double()
    x = torch.randint(0, 61, (2, 10))
    lengths = torch.tensor([6, 10])
    out = clf(x, lengths)
    assert out.shape == (2, 3)
    x2 = x.clone()
    x2[0, 6:] = 0  # padding after the length does not change the logits
    torch.testing.assert_close(clf(x2, lengths)[0], out[0])
