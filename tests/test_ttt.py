"""TTT-Linear / TTT-MLP: the dual form against the token-by-token reference, the reference against
the paper's equations, decoding against prefill (docs/ttt_math.md)."""
import copy

import pytest
import torch

from architectures import ModelConfig, build_model
from architectures.backends import BackendUnavailable
from architectures.ttt.dual import InnerState, ttt_dual
from architectures.ttt.inner import gelu_tanh, gelu_tanh_grad, layer_norm, layer_norm_fused, ln_loss_grad
from architectures.ttt.layer import TTTLayer
from architectures.ttt.reference import ttt_reference

ARCHS = {"ttt_linear": ("linear", "mamba"), "ttt_mlp": ("mlp", "mamba"),
         "ttt_linear_base": ("linear", "transformer"), "ttt_mlp_base": ("mlp", "transformer")}
F64 = torch.float64


def layer_cfg(inner="linear", backbone="mamba", d=32, heads=2, backend="dual", **kw):
    opts = {"inner": inner, "backbone": backbone, "mini_batch": 16, "base_lr": 1.0 if inner == "linear" else 0.1,
            "backend": backend, **kw}
    return ModelConfig("ttt_linear", 61, d, 1, heads, 2 * d, 256, options=opts)  # inner, backbone: opts


def perturbed_layer(cfg, seed=0):
    """A layer whose every parameter is away from its init (so no gradient is trivially zero)."""
    torch.manual_seed(seed)
    layer = TTTLayer(cfg).to(F64)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 0.3 if name in ("W", "W1", "W2") else 0.1
            p.add_(torch.randn_like(p) * scale)
    return layer


def random_inputs(B, H, T, f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, f, generator=g, dtype=dtype) for _ in range(3))
    a = torch.rand(B, H, T, generator=g, dtype=dtype) / f
    tok = 1.0 / torch.arange(1, 17, dtype=dtype) + 0.05 * torch.randn(16, generator=g, dtype=dtype)
    ln_w = 1 + 0.1 * torch.randn(H, f, generator=g, dtype=dtype)
    ln_b = 0.1 * torch.randn(H, f, generator=g, dtype=dtype)
    return q, k, v, a, tok.clamp(min=0), ln_w, ln_b


def initial(inner, H, f, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if inner == "linear":
        return {"W": 0.3 * torch.randn(H, f, f, generator=g, dtype=dtype), "b": 0.1 * torch.randn(H, f, generator=g, dtype=dtype)}
    return {"W1": 0.3 * torch.randn(H, f, 4 * f, generator=g, dtype=dtype), "b1": 0.1 * torch.randn(H, 4 * f, generator=g, dtype=dtype),
            "W2": 0.2 * torch.randn(H, 4 * f, f, generator=g, dtype=dtype), "b2": 0.1 * torch.randn(H, f, generator=g, dtype=dtype)}


def dual_from_fresh(inner, init, q, k, v, a, tok, ln_w, ln_b):
    state = InnerState({n: (p if p.dim() == 3 else p[:, None, :]).unsqueeze(0) for n, p in init.items()})
    return ttt_dual(inner, state, q, k, v, a, tok, ln_w[:, None], ln_b[:, None], 16)


# -- the pieces against autograd and the paper's equations ------------------------------------

def test_ln_gradient_formula_equals_autograd():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 24, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(3, 5, 24, generator=g, dtype=F64)
    w, b = 1 + 0.2 * torch.randn(24, generator=g, dtype=F64), 0.1 * torch.randn(24, generator=g, dtype=F64)
    loss = 0.5 * (layer_norm(z, w, b) - t).pow(2).sum()
    (auto,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(ln_loss_grad(z.detach(), t, w, b), auto, rtol=1e-12, atol=1e-12)


def test_the_fused_layer_norm_equals_the_formula_forward_and_backward():
    """inner.layer_norm_fused (PyTorch's LayerNorm kernel, then the per-head affine: dual.py's outputs) against
    layer_norm's formula (reference.py's), per-head weights (H, 1, f) broadcast over (B, H, T, f), fp64."""
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(2, 3, 7, 24, generator=g, dtype=F64), 1 + 0.2 * torch.randn(3, 1, 24, generator=g, dtype=F64),
              0.1 * torch.randn(3, 1, 24, generator=g, dtype=F64)]
    leaves = [x.requires_grad_() for x in leaves]
    dy = torch.randn(2, 3, 7, 24, generator=g, dtype=F64)
    runs = [(y, *torch.autograd.grad((y * dy).sum(), leaves)) for y in (layer_norm(*leaves), layer_norm_fused(*leaves))]
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_gelu_tanh_and_its_derivative():
    x = torch.linspace(-5, 5, 101, dtype=F64, requires_grad=True)
    torch.testing.assert_close(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))
    (auto,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    torch.testing.assert_close(gelu_tanh_grad(x.detach()), auto)


def test_reference_follows_the_paper_equations_for_two_tokens():
    """out_i = q_i + LN(q_i W_i + b_i), W_i = W - sum_{j<=i} tok_i a_j k_j^T G_j, G_j = dl/dZ at (W, b)."""
    q, k, v, a, tok, ln_w, ln_b = random_inputs(1, 1, 2, 8, F64)
    init = initial("linear", 1, 8, F64)
    W, b = init["W"][0], init["b"][0]
    G = [ln_loss_grad(k[0, 0, j] @ W + b, v[0, 0, j] - k[0, 0, j], ln_w[0], ln_b[0]) for j in range(2)]
    expect = []
    for i in range(2):
        Wi = W - sum(tok[i] * a[0, 0, j] * torch.outer(k[0, 0, j], G[j]) for j in range(i + 1))
        bi = b - sum(tok[i] * a[0, 0, j] * G[j] for j in range(i + 1))
        expect.append(q[0, 0, i] + layer_norm(q[0, 0, i] @ Wi + bi, ln_w[0], ln_b[0]))
    out = ttt_reference(init, q, k, v, a, tok, ln_w, ln_b, 16, "linear")
    torch.testing.assert_close(out[0, 0], torch.stack(expect), rtol=1e-12, atol=1e-12)


# -- dual form == reference --------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("f,T", [(16, 37), (64, 21), (96, 18)])
def test_dual_equals_reference_fp64(inner, f, T):
    q, k, v, a, tok, ln_w, ln_b = random_inputs(2, 2, T, f, F64)
    init = initial(inner, 2, f, F64)
    ref = ttt_reference(init, q, k, v, a, tok, ln_w, ln_b, 16, inner)
    out, _ = dual_from_fresh(inner, init, q, k, v, a, tok, ln_w, ln_b)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_dual_equals_reference_fp32(inner):
    q, k, v, a, tok, ln_w, ln_b = random_inputs(2, 2, 40, 16, torch.float32)
    init = initial(inner, 2, 16, torch.float32)
    ref = ttt_reference(init, q, k, v, a, tok, ln_w, ln_b, 16, inner)
    out, _ = dual_from_fresh(inner, init, q, k, v, a, tok, ln_w, ln_b)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def assert_layer_equals_reference(layer):
    """The layer's outputs and the gradient of every parameter equal the token-by-token reference's (fp64),
    over two full mini-batches and a partial one; no gradient may be zero."""
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    x = torch.randn(2, 35, 32, dtype=F64)
    proj = torch.randn(2, 35, 32, dtype=F64)
    out = layer(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-10, atol=1e-10)
    (out * proj).sum().backward()
    (ref(x) * proj).sum().backward()
    for (name, p), (_, p_ref) in zip(layer.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("arch,backend", [(a, "dual") for a in ARCHS]
                         + [(a, b) for a in ("ttt_linear", "ttt_linear_base") for b in ("scan", "cpp")]
                         + [(a, "cpp") for a in ("ttt_mlp", "ttt_mlp_base")])
def test_every_parameter_gradient_equals_reference(arch, backend):
    """dual.py (autograd) and scan.py / cpu_scan.MLPScan (the hand-derived backward, in Python or C++) against the
    reference, fp64."""
    inner, backbone = ARCHS[arch]
    assert_layer_equals_reference(perturbed_layer(layer_cfg(inner, backbone, backend=backend)))


# the Table 1 ablation options (layer.py): each off, against the reference (autograd of the loss as written)
ABLATIONS = [("linear", {"inner_ln": False}), ("linear", {"inner_residual": False}), ("linear", {"inner_bias": False}),
             ("linear", {"learnable_lr": False, "base_lr": 0.5}), ("linear", {"mini_batch": "seq"}),
             ("linear", {"learnable_w0": False, "inner_ln": False}),
             ("mlp", {"inner_ln": False, "inner_residual": False})]


@pytest.mark.parametrize("inner,opts", ABLATIONS, ids=[f"{i}-{'-'.join(o)}" for i, o in ABLATIONS])
def test_ablation_options_dual_equals_reference(inner, opts):
    assert_layer_equals_reference(perturbed_layer(layer_cfg(inner, "transformer", backend="dual", **opts)))


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_long_minibatch_in_pieces_equals_one_block_and_the_reference(inner, monkeypatch):
    """b > dual.LONG_PIECE (b = T, "seq"): pieces of 64 through the accumulators equal one b x b block, and the
    reference; so does a prefill that stops inside a piece, continued."""
    import architectures.ttt.dual as dual_mod

    B, H, T, f = 1, 2, 150, 16
    q, k, v, a, _, ln_w, ln_b = random_inputs(B, H, T, f, F64)
    tok = 1.0 / torch.arange(1, T + 1, dtype=F64)
    init = initial(inner, H, f, F64)
    state = lambda: InnerState({n: (p if p.dim() == 3 else p[:, None, :]).unsqueeze(0) for n, p in init.items()})
    run = lambda st, sl: ttt_dual(inner, st, q[:, :, sl], k[:, :, sl], v[:, :, sl], a[:, :, sl], tok,
                                  ln_w[:, None], ln_b[:, None], T)
    pieces, _ = run(state(), slice(0, T))
    first, st = run(state(), slice(0, 70))
    rest, _ = run(st, slice(70, T))
    monkeypatch.setattr(dual_mod, "LONG_PIECE", 10 ** 6)
    block, _ = run(state(), slice(0, T))
    torch.testing.assert_close(pieces, block, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(torch.cat([first, rest], 2), block, rtol=1e-11, atol=1e-11)
    ref = ttt_reference(init, q[..., :100, :], k[..., :100, :], v[..., :100, :], a[..., :100], tok[:100], ln_w, ln_b,
                        T, inner)
    torch.testing.assert_close(pieces[..., :100, :], ref, rtol=1e-10, atol=1e-10)


def test_ablation_options_default_to_the_paper_ttt():
    """Unset options are the paper's TTT: the same parameters, and the same outputs, as all set to true."""
    paper = perturbed_layer(layer_cfg("linear", "mamba"))
    explicit = TTTLayer(layer_cfg("linear", "mamba", inner_ln=True, inner_residual=True, inner_bias=True,
                                  learnable_w0=True, learnable_lr=True)).to(F64)
    explicit.load_state_dict(paper.state_dict())
    assert [n for n, _ in paper.named_parameters()] == [n for n, _ in explicit.named_parameters()]
    x = torch.randn(1, 20, 32, dtype=F64)
    torch.testing.assert_close(explicit(x), paper(x), rtol=0, atol=0)


def test_gradient_checkpointing_changes_nothing():
    a = perturbed_layer(layer_cfg("mlp", checkpoint_group=2))
    b = copy.deepcopy(a)
    b.checkpoint_group = 0
    x = torch.randn(1, 70, 32, dtype=F64)
    (a(x).sum() * 1).backward()
    (b(x).sum() * 1).backward()
    for (n, p), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, pb.grad, msg=n)


def test_partial_minibatch_update_is_not_committed():
    q, k, v, a, tok, ln_w, ln_b = random_inputs(1, 2, 20, 16, F64)
    init = initial("linear", 2, 16, F64)
    _, s16 = dual_from_fresh("linear", init, q[:, :, :16], k[:, :, :16], v[:, :, :16], a[:, :, :16], tok, ln_w, ln_b)
    _, s20 = dual_from_fresh("linear", init, q, k, v, a, tok, ln_w, ln_b)
    assert (s16.offset, s20.offset) == (0, 4)
    torch.testing.assert_close(s20.params["W"], s16.params["W"])
    assert s20.acc["W"].abs().max() > 0


# -- decoding ------------------------------------------------------------------------------------

def tiny_model(arch):
    inner, backbone = ARCHS[arch]
    torch.manual_seed(0)
    cfg = ModelConfig(arch, 61, 32, 2, 2, 48, 128, options={"inner": inner, "backbone": backbone, "mini_batch": 16,
                                                           "base_lr": 1.0})
    model = build_model(cfg).to(F64).eval()
    with torch.no_grad():  # move W0, b0 and the LN off their init so every path matters
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("W", "b", "W1", "b1", "W2", "b2", "token_offset", "ln_bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_then_decode_equals_one_prefill(arch):
    model = tiny_model(arch)
    x = torch.randint(0, 61, (2, 45))
    full = model(x)
    state = model.new_state(2, 45)
    # the prefill ends mid mini-batch (7 tokens), decoding crosses two mini-batch boundaries
    outs = [model(x[:, :7], state)] + [model(x[:, t:t + 1], state) for t in range(7, 45)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def _decoded(arch: str, backend: str, x, steps_until: int, grad: bool = True):
    """tiny_model(arch) on `backend` over x (2, T): a prefill of 7 tokens (ending mid mini-batch), single tokens
    up to steps_until, then the rest in one call. Returns the outputs (2, T, vocab) and the last block's inner
    state."""
    model = tiny_model(arch)
    for block in model.blocks:
        block.ttt.backend = backend
    state = model.new_state(2, x.shape[1])
    with torch.set_grad_enabled(grad):
        outs = [model(x[:, :7], state)] + [model(x[:, t:t + 1], state) for t in range(7, steps_until)]
        outs.append(model(x[:, steps_until:], state))
    return torch.cat(outs, 1), state.caches[-1].inner


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp_base"])
def test_the_reference_backend_decodes_what_the_dual_form_does(arch):
    """Every backend takes and returns one state (InnerState, layer.py): the token-by-token reference,
    continued from the state a prefill leaves mid mini-batch and decoding across boundaries, gives the dual
    form's outputs and final state (fp64)."""
    x = torch.randint(0, 61, (2, 37))
    (out_d, inner_d), (out_r, inner_r) = (_decoded(arch, backend, x, 20) for backend in ("dual", "reference"))
    torch.testing.assert_close(out_r, out_d, rtol=1e-10, atol=1e-10)
    assert inner_r.offset == inner_d.offset == 37 % 16
    for n in inner_d.params:
        torch.testing.assert_close(inner_r.params[n].expand_as(inner_d.params[n]), inner_d.params[n],
                                   rtol=1e-10, atol=1e-10, msg=n)
        torch.testing.assert_close(inner_r.acc[n], inner_d.acc[n], rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cpp_decode_equals_the_dual_form(arch):
    """Without a gradient, backend=cpp takes the tokens inside a mini-batch (decoding; a prefill's open and trailing
    pieces) as one C++ call each (cpu_scan.decode, decode_mlp): continued from a prefill that ends mid mini-batch,
    decoding across two boundaries, then a prefill that finishes an open mini-batch and leaves another open, the
    outputs and the final state equal the dual form's (fp64), for both inner models on both backbones."""
    x = torch.randint(0, 61, (2, 60))  # the last call: 8 tokens to a boundary, 12 after it
    (out_d, inner_d), (out_c, inner_c) = (_decoded(arch, backend, x, 40, grad=False) for backend in ("dual", "cpp"))
    torch.testing.assert_close(out_c, out_d, rtol=1e-11, atol=1e-11)
    assert inner_c.offset == inner_d.offset == 60 % 16
    assert inner_c.params.keys() == inner_d.params.keys() == inner_c.acc.keys()
    for n in inner_d.params:
        torch.testing.assert_close(inner_c.params[n], inner_d.params[n], rtol=1e-11, atol=1e-11, msg=n)
        torch.testing.assert_close(inner_c.acc[n], inner_d.acc[n], rtol=1e-11, atol=1e-11, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("complete", [False, True])
def test_cpp_decode_writes_only_what_it_returns(dtype, complete):
    """cpu_scan.decode reads the weights (the layer's own W0, b0 at a sequence's start, broadcast over the batch)
    and the accumulators without writing them, and returns new ones: an open mini-batch keeps its W, b (the same
    tensors), a complete one returns the committed weights and no accumulators. Both dtypes equal the dual form's
    step."""
    from architectures.ttt import cpu_scan

    B, H, c, f = 2, 2, 3, 16
    q, k, v, a, tok, ln_w, ln_b = random_inputs(B, H, c, f, dtype, seed=3)
    init = initial("linear", H, f, dtype)
    W, b = init["W"][None], init["b"][:, None, :][None]  # (1, H, f, f), (1, H, 1, f)
    acc = {"W": 0.05 * torch.randn(B, H, f, f, dtype=dtype), "b": 0.05 * torch.randn(B, H, 1, f, dtype=dtype)}
    given = [x.clone() for x in (W, b, acc["W"], acc["b"])]
    off = 16 - c if complete else 16 - c - 1  # the mini-batch's tokens before these
    out, params, acc_after = cpu_scan.decode(q, k, v - k, a, tok[off:off + c], complete, ln_w, ln_b, W, b, acc)
    for x, x0 in zip((W, b, acc["W"], acc["b"]), given):
        assert torch.equal(x, x0)
    if complete:
        assert acc_after == {} and params["W"].shape == (B, H, f, f)
    else:
        assert params["W"] is W and params["b"] is b and acc_after["W"].shape == (B, H, f, f)
    state = InnerState({"W": W, "b": b}, acc, off)
    out_d, new_d = ttt_dual("linear", state, q, k, v, a, tok, ln_w[:, None], ln_b[:, None], 16)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out_d, **tol)
    for n in ("W", "b"):
        torch.testing.assert_close(params[n].expand_as(new_d.params[n]), new_d.params[n], **tol)
        if not complete:
            torch.testing.assert_close(acc_after[n], new_d.acc[n], **tol)


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp_base"])
def test_chained_prefills_equal_one(arch):
    model = tiny_model(arch)
    x = torch.randint(0, 61, (2, 50))
    state = model.new_state(2, 50)
    outs = [model(x[:, :20], state), model(x[:, 20:23], state), model(x[:, 23:], state)]
    torch.testing.assert_close(torch.cat(outs, 1), model(x), rtol=1e-10, atol=1e-10)


def test_generate_runs_with_the_ttt_cache():
    model = tiny_model("ttt_linear")
    out = model.generate(torch.randint(0, 61, (1, 9)), max_new_tokens=20, temperature=0)
    assert out.shape == (1, 29)
    torch.testing.assert_close(out[:, 9 + 5], model(out[:, :14])[:, -1].argmax(-1))


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp"])
def test_causality(arch):
    """A change at position 25 leaves every earlier output as it was and changes the later ones."""
    model = tiny_model(arch)
    x = torch.randint(0, 61, (1, 40))
    y = x.clone()
    y[:, 25:] = (y[:, 25:] + 1) % 61
    out_x, out_y = model(x), model(y)
    torch.testing.assert_close(out_x[:, :25], out_y[:, :25])
    assert (out_x[:, 25:] - out_y[:, 25:]).abs().amax(-1).min() > 1e-6  # every later position moved


# -- the inner learning rate ---------------------------------------------------------------------

def test_inner_lr_is_rank_one_with_the_paper_factors():
    layer = TTTLayer(layer_cfg(d=48, heads=3)).to(F64)
    torch.nn.init.normal_(layer.lr_gate.weight, std=0.5)
    x = torch.randn(2, 16, 48, dtype=F64)
    E = layer.inner_lr(x)  # (B, H, b, b)
    assert E.shape == (2, 3, 16, 16)
    assert (torch.linalg.matrix_rank(E) == 1).all()
    i = torch.arange(1, 17, dtype=F64)
    # rows scale as 1/i (delta = 0 at init); the column factor is the per-key gate base_lr * sigmoid(.) / f
    torch.testing.assert_close(E / E[..., :1, :], (1.0 / i)[:, None].expand(16, 16).expand_as(E))
    gate = torch.sigmoid(x @ layer.lr_gate.weight.T + layer.lr_gate.bias).transpose(1, 2)  # (B, H, b)
    torch.testing.assert_close(E[..., 0, :], 1.0 * gate / 16)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_token_factor_is_the_paper_formula_from_its_cached_positions(dtype):
    """tok_i = max(0, 1/i + delta_i): from 1/i made once per (b, dtype, device), even when first made in inference
    mode (a prefill), the same numbers as the formula, bit for bit, and the gradient of delta through it."""
    from architectures.ttt.layer import _inverse_positions

    layer = TTTLayer(layer_cfg(d=48, heads=3)).to(dtype)
    with torch.no_grad():
        layer.token_offset.copy_(torch.linspace(-0.9, 0.3, 16))  # some tokens clamped to 0
    _inverse_positions.cache_clear()
    with torch.inference_mode():
        layer.token_factor()
    tok = layer.token_factor()
    i = torch.arange(1, 17, dtype=dtype)
    want = torch.clamp(1.0 / i + layer.token_offset, min=0.0)
    assert torch.equal(tok, want) and (tok == 0).any() and _inverse_positions.cache_info().hits >= 1
    (grad,) = torch.autograd.grad(tok.sum(), layer.token_offset)
    assert torch.equal(grad, (want > 0).to(dtype))


def test_ttt_mlp_base_lr_warms_up_with_the_outer_lr():
    layer = TTTLayer(layer_cfg("mlp", base_lr_init=0.01))
    layer.set_train_progress(0, 10)
    assert layer.base_lr_now == pytest.approx(0.01 + 0.009)
    layer.set_train_progress(9, 10)
    assert layer.base_lr_now == pytest.approx(0.1)


COMPILING = pytest.mark.slow  # torch.compile's inductor: seconds per graph from a cold cache (12-19 s for the first
#                               of a process); it runs only where asked for (backend=scan/dual; on CPU auto is cpp)


@pytest.mark.parametrize("backend", [pytest.param("scan", marks=COMPILING), pytest.param("dual", marks=COMPILING),
                                     "cpp"])
def test_compiled_hot_path_matches_eager(backend):
    """trainer.compile=hot_path (the CPU profile) compiles the per-mini-batch work: same numbers."""
    from bench.train import compile_for_training

    torch.manual_seed(0)
    cfg = ModelConfig("ttt_linear", 61, 32, 1, 2, 48, 64, options={"inner": "linear", "backbone": "mamba",
                                                                  "backend": backend})
    eager = build_model(cfg)
    compiled = copy.deepcopy(eager)
    compile_for_training(compiled, "hot_path")
    x = torch.randint(0, 61, (2, 48))
    for m in (eager, compiled):
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for (n, p), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("T,offset,f", [(53, 0, 8), (87, 5, 12), (32, 0, 8)])
def test_cpp_mlp_training_equals_autograd_through_the_dual_form(T, offset, f):
    """TTT-MLP's whole mini-batches with a gradient under backend=cpp: both loops in C++ (cpu_scan.MLPScan, the
    hand-derived backward of dual_backward.mlp_minibatch_backward): outputs, the state after and the gradient of
    every input, the initial weights (broadcast over a batch of 2) and the LN included, equal autograd through the
    dual form in fp64, with a loss on the outputs and on the final state. (87, 5): an open mini-batch first and a
    trailing one after (the dual form's pieces around the C++ call); f = 12: hidden 48, left-over columns."""
    from architectures.ttt.scan import CPP

    B, H = 2, 2
    q, k, v, a, tok, ln_w, ln_b = random_inputs(B, H, T, f, F64, seed=2)
    init = {n: (p if p.dim() == 3 else p[:, None, :])[None] for n, p in initial("mlp", H, f, F64).items()}
    g0 = torch.Generator().manual_seed(5)
    acc = {n: 0.05 * torch.randn(B, *p.shape[1:], generator=g0, dtype=F64) for n, p in init.items()} if offset else {}

    def run(scan):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, a, tok, ln_w, ln_b, *init.values(), *acc.values())]
        weights, sums = dict(zip(init, leaves[7:11])), dict(zip(acc, leaves[11:]))
        out, new = ttt_dual("mlp", InnerState(weights, sums, offset), *leaves[:5], leaves[5][:, None],
                            leaves[6][:, None], 16, scan=scan)
        g = torch.Generator().manual_seed(7)
        loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum()
        for n in sorted(new.params):  # by name: the two paths build their dicts in different orders
            loss = loss + (new.params[n] * torch.randn(new.params[n].shape, generator=g, dtype=F64)).sum()
        for n in sorted(new.acc):
            loss = loss + (new.acc[n] * torch.randn(new.acc[n].shape, generator=g, dtype=F64)).sum()
        return out, new, torch.autograd.grad(loss, leaves)

    out, new, grads = run(CPP)
    out_d, new_d, grads_d = run(None)
    torch.testing.assert_close(out, out_d, rtol=1e-11, atol=1e-11)
    for n in init:
        torch.testing.assert_close(new.params[n], new_d.params[n], rtol=1e-11, atol=1e-11, msg=n)
    names = ["q", "k", "v", "a", "tok", "ln_w", "ln_b", *init, *[f"acc {n}" for n in acc]]
    for name, g, gd in zip(names, grads, grads_d, strict=True):
        assert gd.abs().max() > 0, name
        torch.testing.assert_close(g, gd, rtol=1e-10, atol=1e-11, msg=name)


def test_cpp_mlp_training_in_fp32_stays_at_fp32_rounding():
    """fp32 at a real head dim (64, hidden 256) and 16 mini-batches: the C++ gradients are within fp32 rounding of
    the fp64 dual form's, as close as the fp32 dual form's."""
    from architectures.ttt.scan import CPP

    B, H, T, f = 1, 2, 256, 64
    q, k, v, a, tok, ln_w, ln_b = random_inputs(B, H, T, f, F64, seed=2)
    init = {n: (p if p.dim() == 3 else p[:, None, :])[None] for n, p in initial("mlp", H, f, F64).items()}

    def grads(dt, scan):
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v, a, tok, ln_w, ln_b, *init.values())]
        out, new = ttt_dual("mlp", InnerState(dict(zip(init, leaves[7:]))), *leaves[:5], leaves[5][:, None],
                            leaves[6][:, None], 16, scan=scan)
        g = torch.Generator().manual_seed(7)
        loss = (out.double() * torch.randn(out.shape, generator=g, dtype=F64)).sum()
        return [x.double() for x in torch.autograd.grad(loss, leaves)]

    ours, dual32, exact = grads(torch.float32, CPP), grads(torch.float32, None), grads(F64, None)
    for name, g, g32, g64 in zip(["q", "k", "v", "a", "tok", "ln_w", "ln_b", *init], ours, dual32, exact):
        scale = g64.abs().max()
        err, err32 = (g - g64).abs().max() / scale, (g32 - g64).abs().max() / scale
        assert torch.isfinite(g).all() and err < 1e-4 and err < 10 * err32 + 1e-6, (name, err, err32)


# -- scan.py: the loop over whole mini-batches as one autograd op, against autograd through dual.py ---------

def _scan_case(B=2, H=2, T=87, f=8, offset=5, seed=0):
    """Inputs that exercise every path: a batch over a broadcast W0, a state left mid mini-batch (offset), whole
    mini-batches, a trailing partial one; every tensor a leaf that needs its gradient."""
    q, k, v, a, tok, ln_w, ln_b = random_inputs(B, H, T, f, F64, seed)
    init = initial("linear", H, f, F64)
    W, b = init["W"][None], init["b"][:, None, :][None]  # (1, H, f, f), (1, H, 1, f)
    acc = {"W": 0.05 * torch.randn(B, H, f, f, dtype=F64), "b": 0.05 * torch.randn(B, H, 1, f, dtype=F64)}
    leaves = [x.clone().requires_grad_() for x in (q, k, v, a, tok, ln_w, ln_b, W, b, acc["W"], acc["b"])]
    return leaves, offset


def _run_scan_case(leaves, offset, scan):
    q, k, v, a, tok, ln_w, ln_b, W, b, accW, accb = leaves
    state = InnerState({"W": W, "b": b}, {"W": accW, "b": accb} if offset else {}, offset)
    out, new = ttt_dual("linear", state, q, k, v, a, tok, ln_w[:, None], ln_b[:, None], 16, scan=scan)
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum()
                      for x in (*new.params.values(), *new.acc.values()))  # through the final state too
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out, new, grads


@pytest.mark.parametrize("kernels,f", [("eager", 8), pytest.param("compiled", 8, marks=COMPILING),
                                       pytest.param("blocks", 8, marks=COMPILING), ("cpp", 8), ("cpp", 45)])
@pytest.mark.parametrize("T,offset", [(87, 5), (64, 0), (16, 0)])
def test_scan_equals_autograd_through_the_dual_form_fp64(kernels, f, T, offset):
    """Outputs, the state after the call and the gradient of every input (q, k, v, a, tok, the LN, W0, b0
    and the accumulators of an open mini-batch) through scan.py equal autograd through dual.py. `blocks`: the
    compiled loop bodies over 2 mini-batches from the first (87 tokens: two blocks and one mini-batch alone).
    `cpp`: both loops in C++ (cpu_scan.cpp), at f = 45 also through its register blocks of 32 columns and 4
    rows with the columns and rows left over."""
    from architectures.ttt.scan import CPP, EAGER, ScanKernels

    scan = {"eager": EAGER, "compiled": ScanKernels.compiled(), "cpp": CPP,
            "blocks": ScanKernels.compiled(block=2, blocked_from=0)}[kernels]
    if kernels == "blocks":
        assert scan.blocked(T // 16) == T // 16 - (T // 16) % 2
    leaves, off = _scan_case(T=T, f=f, offset=offset)
    out, new, grads = _run_scan_case(leaves, off, scan)
    out_d, new_d, grads_d = _run_scan_case(leaves, off, None)
    torch.testing.assert_close(out, out_d, rtol=1e-12, atol=1e-12)
    for n in new_d.params:
        torch.testing.assert_close(new.params[n], new_d.params[n], rtol=1e-12, atol=1e-12)
    names = ["q", "k", "v", "a", "tok", "ln_w", "ln_b", "W0", "b0", "accW", "accb"]
    for name, g, gd in zip(names, grads, grads_d):
        if gd is None:  # the accumulators without an open mini-batch
            assert g is None, name
            continue
        assert gd.abs().max() > 0, name
        torch.testing.assert_close(g, gd, rtol=1e-10, atol=1e-11, msg=name)


def _laid_out_as_the_layer(*xs):
    """(B, H, T[, f]) tensors with the same values, laid out (B, T, H[, f]) as the layer's projections are: its q, k,
    v and a are head-transposed views, which C++ inference reads where they lie."""
    return [x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs]


@pytest.mark.parametrize("layout", ["contiguous", "head-transposed"])
@pytest.mark.parametrize("T,offset,f", [(87, 5, 8), (64, 0, 8), (53, 0, 45), (16, 0, 8), (9, 3, 8)])
def test_cpp_inference_equals_the_dual_form_and_the_reference(T, offset, f, layout):
    """Without a gradient, backend=cpp runs whole mini-batches as one C++ call that also forms the target v - k,
    builds M and applies the LN and the residual (cpu_scan.infer): outputs and the state after the call equal the
    dual form's in fp64 (an open mini-batch continued, whole ones, a trailing partial one; f = 45 through the
    products' left-over rows and columns), and the outputs of a fresh state equal the token-by-token reference.
    (9, 3): no whole mini-batch, the C++ call is skipped. head-transposed: q, k, v, a as the layer passes them."""
    from architectures.ttt.scan import CPP

    leaves, off = _scan_case(T=T, f=f, offset=offset)
    q, k, v, a, tok, ln_w, ln_b, W, b, accW, accb = (x.detach() for x in leaves)
    if layout == "head-transposed":
        q, k, v, a = _laid_out_as_the_layer(q, k, v, a)
    state = lambda o: InnerState({"W": W, "b": b}, {"W": accW, "b": accb} if o else {}, o)
    run = lambda o, scan: ttt_dual("linear", state(o), q, k, v, a, tok, ln_w[:, None], ln_b[:, None], 16, scan=scan)
    with torch.no_grad():
        out, new = run(off, CPP)
        out_d, new_d = run(off, None)
        fresh, _ = run(0, CPP)
    torch.testing.assert_close(out, out_d, rtol=1e-12, atol=1e-12)
    assert new.offset == new_d.offset
    for n in ("W", "b"):
        torch.testing.assert_close(new.params[n], new_d.params[n], rtol=1e-12, atol=1e-12)
        if new_d.acc:
            torch.testing.assert_close(new.acc[n], new_d.acc[n], rtol=1e-12, atol=1e-12)
    ref = ttt_reference({"W": W[0], "b": b[0, :, 0]}, q[:1], k[:1], v[:1], a[:1], tok, ln_w, ln_b, 16, "linear")
    torch.testing.assert_close(fresh[:1], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "head-transposed"])
@pytest.mark.parametrize("T,offset,f", [(87, 5, 8), (64, 0, 8), (53, 0, 12), (16, 0, 8), (9, 3, 8), (3, 13, 8)])
def test_cpp_mlp_inference_equals_the_dual_form(T, offset, f, layout):
    """TTT-MLP without a gradient under backend=cpp: whole mini-batches in one C++ call (cpu_scan.infer_mlp), an
    open mini-batch continued and a trailing one as pieces (decode_mlp), each with the LN and the residual: the
    outputs and the state after equal the dual form's in fp64, over a batch of 2 from a broadcast initial state,
    and the given state is not written to. f = 12: hidden 48, through the products' left-over columns; (3, 13):
    the 3 tokens that finish a mini-batch (its commit). head-transposed: q, k, v, a as the layer passes them."""
    from architectures.ttt.scan import CPP

    B, H = 2, 2
    q, k, v, a, tok, ln_w, ln_b = random_inputs(B, H, T, f, F64, seed=2)
    if layout == "head-transposed":
        q, k, v, a = _laid_out_as_the_layer(q, k, v, a)
    init = {n: (p if p.dim() == 3 else p[:, None, :])[None] for n, p in initial("mlp", H, f, F64).items()}
    g = torch.Generator().manual_seed(5)
    acc = {n: 0.05 * torch.randn(B, *p.shape[1:], generator=g, dtype=F64) for n, p in init.items()} if offset else {}
    given = {n: x.clone() for n, x in (*init.items(), *[("acc" + n, x) for n, x in acc.items()])}
    with torch.no_grad():
        out, new = ttt_dual("mlp", InnerState(init, acc, offset), q, k, v, a, tok, ln_w[:, None], ln_b[:, None], 16,
                            scan=CPP)
    out_d, new_d = ttt_dual("mlp", InnerState(init, acc, offset), q, k, v, a, tok, ln_w[:, None], ln_b[:, None], 16)
    torch.testing.assert_close(out, out_d, rtol=1e-11, atol=1e-11)
    assert new.offset == new_d.offset == (offset + T) % 16
    for n in init:
        torch.testing.assert_close(new.params[n].expand_as(new_d.params[n]), new_d.params[n], rtol=1e-11, atol=1e-11,
                                   msg=n)
        assert (n in new.acc) == (n in new_d.acc)
        if new_d.acc:
            torch.testing.assert_close(new.acc[n], new_d.acc[n], rtol=1e-11, atol=1e-11, msg=n)
    for n, x in (*init.items(), *[("acc" + n, x) for n, x in acc.items()]):
        assert torch.equal(x, given[n]), n


def test_cpp_mlp_inference_in_fp32_stays_at_fp32_rounding():
    """fp32 at a real head dim (64, hidden 256) with large inner steps (pre-activations far into GELU's tails, where
    exp(-2u) of a fast-math tanh overflowed to NaN before its argument was clamped): the C++ outputs and final
    weights are within fp32 rounding of the fp64 dual form, as close as the fp32 dual form is."""
    from architectures.ttt.scan import CPP

    B, H, T, f = 1, 2, 256, 64
    q, k, v, a, tok, ln_w, ln_b = random_inputs(B, H, T, f, F64, seed=2)
    a = 10 * a
    init = {n: (p if p.dim() == 3 else p[:, None, :])[None] for n, p in initial("mlp", H, f, F64).items()}
    run = lambda dt, scan: ttt_dual("mlp", InnerState({n: p.to(dt) for n, p in init.items()}),
                                    *[x.to(dt) for x in (q, k, v, a, tok)], ln_w[:, None].to(dt), ln_b[:, None].to(dt),
                                    16, scan=scan)
    with torch.no_grad():
        (out, new), (out32, new32), (out64, new64) = run(torch.float32, CPP), run(torch.float32, None), run(F64, None)
    err, err_dual = (out.double() - out64).abs().max(), (out32.double() - out64).abs().max()
    assert torch.isfinite(out).all() and err < 2e-5 and err < 3 * err_dual, (err, err_dual)
    for n in init:
        torch.testing.assert_close(new.params[n].double(), new64.params[n], rtol=1e-4, atol=1e-5, msg=n)


def _rotated(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The interleaved RoPE of x (B, H, T, f) by angles (T, f/2), in x's own precision (fp64 here: the layer's RoPE
    rotates in fp32)."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("f", [8, 12])
@pytest.mark.parametrize("qk", ["given", "convs from zeros", "convs from states"])
def test_cpp_inference_rotates_q_and_k_and_computes_the_key_factor(inner, f, qk):
    """With RoPE tables and a Gate (what the layer's prefill passes, TTTLayer._cpp_prefill), cpu_scan.infer and
    infer_mlp rotate q and k by the angles of positions 0 .. c - 1 of every mini-batch and compute a = scale *
    sigmoid(x theta^T + bias) in C++; given Convs instead of q and k, they compute q and k as the causal convs of u
    (layers.CausalConv, width 4, from zero rows or from given states). Outputs and final weights equal those of the
    same call given q, k (convolved and) rotated beforehand and a itself, in fp64 (3 mini-batches, a batch of 2 over
    a broadcast initial state, q, k, v, u and x laid out as the layer's projections and input are)."""
    from architectures.layers import CausalConv
    from architectures.ttt import cpu_scan

    B, H, T, c = 2, 2, 48, 16
    d = H * f
    q, k, v, _, tok, ln_w, ln_b = random_inputs(B, H, T, f, F64, seed=3)
    q, k, v = _laid_out_as_the_layer(q, k, v)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, d, generator=g, dtype=F64)
    theta, bias = 0.3 * torch.randn(H, d, generator=g, dtype=F64), torch.randn(H, generator=g, dtype=F64)
    scale = 0.7 / f
    a = (scale * torch.sigmoid(x @ theta.T + bias)).transpose(1, 2)  # (B, H, T): TTTLayer.key_factor's formula
    angles = torch.arange(c, dtype=F64)[:, None] * 1e4 ** (-torch.arange(0, f, 2, dtype=F64) / f)  # (c, f/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    every = angles.repeat(T // c, 1)  # (T, f/2): the RoPE restarts every mini-batch
    q_in, k_in = q, k  # what the C++ call gets
    if qk != "given":
        u = torch.randn(B, T, d, generator=g, dtype=F64)
        convs = [CausalConv(d, 4).double() for _ in range(2)]
        states = [None, None] if qk == "convs from zeros" else [torch.randn(B, 3, d, generator=g, dtype=F64)
                                                                for _ in range(2)]
        with torch.no_grad():
            q, k = (conv(u, st)[0].view(B, T, H, f).transpose(1, 2) for conv, st in zip(convs, states))
        q_in, k_in = cpu_scan.Convs(u, convs[0].weight, convs[0].bias, convs[1].weight, convs[1].bias, *states), None
    init = {n: (p if p.dim() == 3 else p[:, None, :])[None] for n, p in initial(inner, H, f, F64).items()}
    with torch.no_grad():
        if inner == "linear":
            run = lambda *args, **kw: cpu_scan.infer(*args, tok, ln_w, ln_b, init["W"], init["b"], **kw)
            out, *after = run(q_in, k_in, v, cpu_scan.Gate(x, theta, bias, scale), rope=(cos, sin))
            want, *want_after = run(_rotated(q, every), _rotated(k, every), v, a)
        else:
            out, after = cpu_scan.infer_mlp(q_in, k_in, v, cpu_scan.Gate(x, theta, bias, scale), tok, ln_w, ln_b,
                                            init, rope=(cos, sin))
            want, want_after = cpu_scan.infer_mlp(_rotated(q, every), _rotated(k, every), v, a, tok, ln_w, ln_b, init)
            after, want_after = list(after.values()), list(want_after.values())
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(after, want_after):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qk", ["given", "convs from states"])
def test_cpp_gather_is_decodings_q_k_target_and_key_factor(qk):
    """cpu_scan.gather (the inputs of tokens inside one mini-batch, TTTLayer._cpp_decode): for 7 tokens at positions 5
    .. 11 of their mini-batch, q and k (given, or the convs of u from given states) rotated by the RoPE of those
    positions, the target v - k and a = scale * sigmoid(x theta^T + bias), contiguous, equal to the same formulas in
    fp64 (1e-12)."""
    from architectures.layers import CausalConv
    from architectures.ttt import cpu_scan

    B, H, c, f, pos0 = 2, 2, 7, 8, 5
    d = H * f
    g = torch.Generator().manual_seed(7)
    q, k, v = _laid_out_as_the_layer(*(torch.randn(B, H, c, f, generator=g, dtype=F64) for _ in range(3)))
    x = torch.randn(B, c, d, generator=g, dtype=F64)
    theta, bias = 0.3 * torch.randn(H, d, generator=g, dtype=F64), torch.randn(H, generator=g, dtype=F64)
    angles = torch.arange(16, dtype=F64)[:, None] * 1e4 ** (-torch.arange(0, f, 2, dtype=F64) / f)  # (16, f/2)
    q_in, k_in = q, k
    if qk != "given":
        u = torch.randn(B, c, d, generator=g, dtype=F64)
        convs = [CausalConv(d, 4).double() for _ in range(2)]
        states = [torch.randn(B, 3, d, generator=g, dtype=F64) for _ in range(2)]
        with torch.no_grad():
            q, k = (conv(u, st)[0].view(B, c, H, f).transpose(1, 2) for conv, st in zip(convs, states))
        q_in, k_in = cpu_scan.Convs(u, convs[0].weight, convs[0].bias, convs[1].weight, convs[1].bias, *states), None
    with torch.no_grad():
        got = cpu_scan.gather(q_in, k_in, v, cpu_scan.Gate(x, theta, bias, 0.1), (angles.cos(), angles.sin()), pos0)
    q_rot, k_rot = (_rotated(t, angles[pos0:pos0 + c]) for t in (q, k))
    want = (q_rot, k_rot, v - k_rot, (0.1 * torch.sigmoid(x @ theta.T + bias)).transpose(1, 2))
    for a, b in zip(got, want):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gated", [True, False])
def test_cpp_output_is_the_post_norm_times_the_gelu_gate(gated):
    """cpu_scan.output (the layer's output before Wo in C++): LayerNorm over each token's d features with the
    post-norm's weight, bias and eps, times gelu_tanh of the gate where one is given (the Mamba backbone), equal to
    F.layer_norm and F.gelu in fp64 (150 rows: jobs of 64, the last one short; gate values far into GELU's tails)."""
    import torch.nn.functional as F

    from architectures.ttt import cpu_scan

    g = torch.Generator().manual_seed(6)
    z = 3 * torch.randn(2, 75, 40, generator=g, dtype=F64)
    weight, bias = torch.randn(40, generator=g, dtype=F64), torch.randn(40, generator=g, dtype=F64)
    gate = 12 * torch.randn(2, 75, 40, generator=g, dtype=F64) if gated else None
    want = F.layer_norm(z, (40,), weight, bias, 1e-6)
    if gated:
        want = want * F.gelu(gate, approximate="tanh")
    torch.testing.assert_close(cpu_scan.output(z, weight, bias, gate, 1e-6), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cpp_prefill_and_decode_equal_the_layers_step_by_step_path(arch, monkeypatch):
    """Under backend=cpp a prefill of whole mini-batches takes TTTLayer._cpp_prefill (the convs, the RoPE, the key
    factor and the inner loop in one C++ call, the post-norm and the gate in another) and tokens inside one
    mini-batch take _cpp_decode (cpu_scan.gather, then the decode kernel): in fp32 the logits of two prefills (the
    second from the first's cache), five decode steps, the 11 tokens that finish their mini-batch at once and a step
    that starts the next equal the same model's with the layer's ops run one by one (_inner_loop), every arch. A
    prefill of 20 tokens, or of 16 from the middle of a mini-batch, takes _inner_loop."""
    inner, backbone = ARCHS[arch]
    torch.manual_seed(0)
    cfg = ModelConfig(arch, 61, 32, 2, 2, 48, 128, options={"inner": inner, "backbone": backbone, "mini_batch": 16,
                                                           "backend": "cpp"})
    model = build_model(cfg).eval()
    with torch.no_grad():  # the lr gate's bias, the token offsets and W0 off their init: every input matters
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("bias", "token_offset", "W", "b", "W1", "W2"):
                p.add_(0.1 * torch.randn_like(p))
    idx = torch.randint(0, 61, (2, 49), generator=torch.Generator().manual_seed(1))
    paths = {name: getattr(TTTLayer, name) for name in ("_cpp_prefill_applies", "_cpp_decode_applies")}
    taken = []

    def recording(on: bool):
        for name, applies in paths.items():
            monkeypatch.setattr(TTTLayer, name, (lambda f, n: lambda *args: f(*args) and not taken.append(n))(
                applies, name) if on else (lambda *args: False))

    def run():  # per call: 16, 16 (whole mini-batches), 5 x 1, 11 (finishing the mini-batch), 1 (starting the next)
        state, spans = model.new_state(2, 64), [(0, 16), (16, 32), *[(t, t + 1) for t in range(32, 37)], (37, 48),
                                                (48, 49)]
        with torch.no_grad():
            return torch.cat([model(idx[:, lo:hi], state) for lo, hi in spans], 1)

    recording(True)
    got = run()
    assert taken == ["_cpp_prefill_applies"] * 4 + ["_cpp_decode_applies"] * 14, taken  # two layers per call
    recording(False)
    torch.testing.assert_close(got, run(), rtol=1e-5, atol=1e-5)
    recording(True)
    taken.clear()
    with torch.no_grad():
        model(idx[:, :20], model.new_state(2, 64))  # 20 tokens: a trailing partial mini-batch
        state = model.new_state(2, 64)
        model(idx[:, :5], state)
        taken.clear()
        model(idx[:, 5:21], state)  # 16 tokens from the middle of a mini-batch
    assert taken == [], taken


def test_cpp_inference_leaves_the_initial_weights_alone():
    """The C++ call updates its weights in place: a copy of them, never the layer's W0, b0 (B = 1 and a broadcast
    W0 make expand() + contiguous() a no-op view)."""
    from architectures.ttt.scan import CPP

    leaves, _ = _scan_case(B=1, T=64, offset=0)
    q, k, v, a, tok, ln_w, ln_b, W, b, *_ = (x.detach() for x in leaves)
    W0, b0 = W.clone(), b.clone()
    with torch.no_grad():
        _, new = ttt_dual("linear", InnerState({"W": W, "b": b}), q, k, v, a, tok, ln_w[:, None], ln_b[:, None], 16,
                          scan=CPP)
    assert torch.equal(W, W0) and torch.equal(b, b0) and not torch.equal(new.params["W"], W0)


@pytest.mark.parametrize("kernels", ["eager", "cpp"])
def test_scan_equals_autograd_through_the_dual_form_fp32(kernels):
    """fp32 at a longer sequence and a real head dim: 16 mini-batches, errors stay at fp32 rounding."""
    from architectures.ttt.scan import CPP, EAGER

    leaves, off = _scan_case(B=1, H=2, T=256, f=64, offset=0)
    leaves = [x.detach().float().requires_grad_() for x in leaves]
    out, _, grads = _run_scan_case(leaves, off, {"eager": EAGER, "cpp": CPP}[kernels])
    out_d, _, grads_d = _run_scan_case(leaves, off, None)
    torch.testing.assert_close(out, out_d, rtol=1e-4, atol=1e-4)
    for g, gd in zip(grads, grads_d):
        if gd is not None:
            torch.testing.assert_close(g, gd, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("requested", ["torch", "auto"] if not torch.cuda.is_available() else ["torch"])
def test_torch_backend_runs_scan_where_it_applies(requested):
    """backend=torch: scan for TTT-Linear with the paper's inner model, dual for TTT-MLP and the Table 1 options
    that scan does not cover; auto on a machine without CUDA: cpp for both inner models with the paper's inner
    model (their loops in C++, training and inference); backend=scan or cpp where it does not apply is
    BackendUnavailable with the reason, not a silent dual; a name outside the vocabulary is a ValueError."""
    fast = "scan" if requested == "torch" else "cpp"
    assert TTTLayer(layer_cfg("linear", backend=requested)).backend == fast
    assert TTTLayer(layer_cfg("linear", "transformer", backend=requested)).backend == fast
    assert TTTLayer(layer_cfg("mlp", backend=requested)).backend == ("dual" if requested == "torch" else "cpp")
    assert TTTLayer(layer_cfg("linear", backend=requested, inner_ln=False)).backend == "dual"
    assert TTTLayer(layer_cfg("linear", backend=requested, mini_batch="seq")).backend == "dual"
    assert TTTLayer(layer_cfg("mlp", backend=requested, inner_ln=False, inner_residual=False)).backend == "dual"
    for backend, bad, why in [("scan", {"inner": "mlp"}, "use backend=dual for TTT-MLP"),
                              ("scan", {"inner_bias": False}, "inner_bias"), ("cpp", {"inner_bias": False}, "inner_bias"),
                              ("cpp", {"inner": "mlp", "inner_ln": False}, "inner_ln")]:
        with pytest.raises(BackendUnavailable, match=f"backend={backend} .*{why}"):
            TTTLayer(layer_cfg(**{"backend": backend, **bad}))
    with pytest.raises(ValueError, match="backend must be one of .*'cpp', 'torch', 'scan', 'dual', 'reference'"):
        TTTLayer(layer_cfg(backend="fast"))


def test_without_a_compiler_auto_takes_scan_and_cpp_says_why(monkeypatch, tmp_path):
    from architectures.ttt import cpu_scan

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path))
    cpu_scan.KERNEL.reset()
    try:
        if not torch.cuda.is_available():
            assert TTTLayer(layer_cfg("linear", backend="auto")).backend == "scan"
        with pytest.raises(BackendUnavailable, match="backend=cpp needs a C\\+\\+ compiler"):
            TTTLayer(layer_cfg("linear", backend="cpp"))
    finally:
        cpu_scan.KERNEL.reset()


def test_renamed_options_name_their_new_spelling():
    """A config that still says impl= or attn_backend= is told the new name, not 'no such option'."""
    with pytest.raises(ValueError, match="'impl' is now part of `backend`"):
        build_model(ModelConfig("ttt_linear", 61, 32, 1, 2, 64, 64, options={"impl": "dual"}))
    with pytest.raises(ValueError, match="'attn_backend' is now `backend`"):
        build_model(ModelConfig("transformer", 61, 32, 1, 2, 64, 64, options={"attn_backend": "sdpa"}))
