"""TTT Triton kernels against the PyTorch dual form (dual.py, itself checked against the token-by-token
reference and the paper's equations in test_ttt.py): outputs, final state and every gradient, any T,
padded head dims, bf16 inputs, the decode kernel, and the layer's backend selection.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it); shapes stay small.
`make test-kernels` runs this file alone."""
import copy

import pytest
import torch

from architectures import ModelConfig, build_model
from architectures.transformer import BackendUnavailable
from architectures.ttt.dual import InnerState, ttt_dual
from architectures.ttt.layer import TTTLayer, resolve_ttt_backend
from architectures.ttt.linear_backward import minibatch_backward
from architectures.ttt.triton_linear import ttt_linear_decode_step, ttt_linear_prefill

F32, F64 = torch.float32, torch.float64
B_MB = 16  # mini-batch


def rel_rmse(x, y) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def inputs(B=2, H=2, T=37, f=16, dtype=F32, seed=0):
    """Random TTT-Linear inputs away from every special value; all leaves require grad."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F32)
    x = {"q": r(B, H, T, f), "k": r(B, H, T, f), "v": r(B, H, T, f), "a": torch.rand(B, H, T, generator=g) * 0.3,
         "tok": 1 / torch.arange(1, B_MB + 1) + 0.1 * r(B_MB), "ln_w": 1 + 0.3 * r(H, f), "ln_b": 0.3 * r(H, f),
         "W0": 0.3 * r(1, H, f, f), "b0": 0.3 * r(1, H, f)}
    return {n: t.to(dtype if n in "qkv" else F32).requires_grad_() for n, t in x.items()}


def dual(x, dtype=F32):
    """The PyTorch dual form on the same inputs (upcast): output and final state."""
    c = {n: t.to(dtype) for n, t in x.items()}
    state = InnerState({"W": c["W0"], "b": c["b0"][:, :, None]})
    return ttt_dual("linear", state, c["q"], c["k"], c["v"], c["a"], c["tok"], c["ln_w"][:, None], c["ln_b"][:, None],
                    B_MB)


NAMES = ["q", "k", "v", "a", "tok", "ln_w", "ln_b", "W0", "b0"]


@pytest.mark.parametrize("f,T,group", [(16, 64, 2), (16, 37, 1), (96, 37, 16), (8, 53, 2)])
def test_prefill_forward_state_and_every_gradient_match_the_dual_form(f, T, group):
    """fp32: outputs, the final state and the accumulators of the trailing partial mini-batch, and the
    gradients of q, k, v, the lr factors, the inner LN, W0 and b0 (the issue asks rel. RMSE < 1e-3; the
    kernels are exact fp32 products: 1e-5 holds with room)."""
    x = inputs(T=T, f=f)
    out_ref, state = dual(x)
    out, (W, b), (GW, Gb) = ttt_linear_prefill(*[x[n] for n in NAMES], group=group)
    assert rel_rmse(out, out_ref) < 1e-5
    assert rel_rmse(W, state.params["W"].expand_as(W)) < 1e-5
    assert rel_rmse(b, state.params["b"][:, :, 0].expand_as(b)) < 1e-5
    if T % B_MB:
        assert rel_rmse(GW, state.acc["W"]) < 1e-5 and rel_rmse(Gb, state.acc["b"][:, :, 0]) < 1e-5
    dout = torch.randn_like(out_ref)
    want = torch.autograd.grad((out_ref * dout).sum(), [x[n] for n in NAMES])
    got = torch.autograd.grad((out * dout).sum(), [x[n] for n in NAMES])
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and rel_rmse(g, w) < 1e-5, name


def test_gradient_through_the_final_state():
    """A loss on the state after the sequence (as when a later chunk continues from it) flows back."""
    x = inputs(T=32, f=16)
    _, state = dual(x)
    _, (W, b), _ = ttt_linear_prefill(*[x[n] for n in NAMES], group=1)
    proj = torch.randn_like(W)
    want = torch.autograd.grad((state.params["W"] * proj).sum(), [x["k"], x["W0"], x["a"]])
    got = torch.autograd.grad((W * proj).sum(), [x["k"], x["W0"], x["a"]])
    for g, w in zip(got, want):
        assert rel_rmse(g, w) < 1e-5


def test_bf16_inputs_with_fp32_state():
    """bf16 q, k, v are read and computed in fp32 (the state stays fp32); the output is stored in bf16."""
    x = inputs(T=37, f=16, dtype=torch.bfloat16)
    out_ref, state = dual(x, F32)  # the same bf16 values, upcast
    out, (W, _), _ = ttt_linear_prefill(*[x[n] for n in NAMES])
    assert out.dtype == torch.bfloat16 and W.dtype == F32
    assert rel_rmse(out, out_ref) < 5e-3  # bf16 output rounding: 2^-9 per element
    assert rel_rmse(W, state.params["W"].expand_as(W)) < 1e-5
    dout = torch.randn_like(out_ref)
    want = torch.autograd.grad((out_ref * dout).sum(), [x["q"], x["W0"]])
    got = torch.autograd.grad((out.float() * dout).sum(), [x["q"], x["W0"]])
    assert all(rel_rmse(g, w) < 1e-2 for g, w in zip(got, want))


def test_decode_kernel_equals_the_dual_form_over_two_minibatches():
    """Prefill 5 tokens, then decode 27 one at a time (committing at 16 and 32): the outputs and the
    final state equal one dual-form pass over all 32."""
    x = {n: t.detach() for n, t in inputs(T=32, f=16).items()}
    out_ref, state = dual(x)
    out5, (W, b), (GW, Gb) = ttt_linear_prefill(*[x[n][:, :, :5] if n in "qkva" else x[n] for n in NAMES])
    outs = [out5]
    W, b, GW, Gb = (t.contiguous().clone() for t in (W, b, GW, Gb))
    for i in range(5, 32):
        outs.append(ttt_linear_decode_step(x["q"][:, :, i], x["k"][:, :, i], x["v"][:, :, i], x["a"][:, :, i],
                                           x["tok"], x["ln_w"], x["ln_b"], W, b, GW, Gb, i % B_MB)[:, :, None])
    assert rel_rmse(torch.cat(outs, 2), out_ref) < 1e-5
    assert rel_rmse(W, state.params["W"].expand_as(W)) < 1e-5 and GW.abs().max() == 0  # committed at 32


def test_hand_derived_backward_equals_autograd_fp64():
    """linear_backward.py (the kernel's math in PyTorch) against autograd through dual.py, one mini-batch
    with an upstream state gradient, and a partial one."""
    g = torch.Generator().manual_seed(3)
    H, f = 3, 8
    for c, commit in [(16, True), (11, False)]:
        t = {n: torch.randn(*s, generator=g, dtype=F64, requires_grad=True) for n, s in
             [("q", (2, H, c, f)), ("k", (2, H, c, f)), ("v", (2, H, c, f)), ("gamma", (H, 1, f)), ("beta", (H, 1, f)),
              ("W", (1, H, f, f)), ("b", (1, H, 1, f))]}
        a = (torch.rand(2, H, c, generator=g, dtype=F64) * 0.3).requires_grad_()
        tok = (1 / torch.arange(1, c + 1, dtype=F64)).requires_grad_()
        out, st = ttt_dual("linear", InnerState({"W": t["W"], "b": t["b"]}), t["q"], t["k"], t["v"], a,
                           tok, t["gamma"], t["beta"], c)
        dout, dWn, dbn = torch.randn_like(out), torch.randn(2, H, f, f, dtype=F64), torch.randn(2, H, 1, f, dtype=F64)
        loss = (out * dout).sum() + ((st.params["W"] * dWn).sum() + (st.params["b"] * dbn).sum() if commit else 0)
        leaves = [t["q"], t["k"], t["v"], a, tok, t["gamma"], t["beta"], t["W"], t["b"]]
        want = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            got = minibatch_backward(t["W"], t["b"], t["q"], t["k"], t["v"], a, tok, t["gamma"], t["beta"], dout,
                                     dWn if commit else torch.zeros_like(dWn), dbn if commit else torch.zeros_like(dbn),
                                     commit)
        got = [*got[:4], got[4].sum((0, 1)), got[5].sum(0), got[6].sum(0), got[7].sum(0, keepdim=True),
               got[8].sum(0, keepdim=True)]
        for gg, w in zip(got, want):
            torch.testing.assert_close(gg, w, rtol=1e-10, atol=1e-12)


# -- the layer -----------------------------------------------------------------------------------

def layer_cfg(backbone="mamba", backend="triton", inner="linear", d=64, heads=2):
    return ModelConfig("ttt_linear", 61, d, 1, heads, 2 * d, 256,
                       options={"inner": inner, "backbone": backbone, "mini_batch": B_MB, "backend": backend})


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_layer_backends_agree_forward_and_backward(backbone):
    torch.manual_seed(0)
    tri = TTTLayer(layer_cfg(backbone))
    ref = copy.deepcopy(tri)
    ref.backend = "torch"
    assert (tri.resolved_impl(), ref.resolved_impl()) == ("triton", "dual")
    with torch.no_grad():
        for p in tri.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 35, 64)
    proj = torch.randn(2, 35, 64)
    y_tri, y_ref = tri(x), ref(x)
    assert rel_rmse(y_tri, y_ref) < 1e-5
    (y_tri * proj).sum().backward()
    (y_ref * proj).sum().backward()
    for (name, p), (_, p_ref) in zip(tri.named_parameters(), ref.named_parameters()):
        assert rel_rmse(p.grad, p_ref.grad) < 1e-4, name


def test_generate_with_the_triton_decode_kernel_equals_one_prefill():
    """Prefill 7 tokens, decode 26 one at a time through the cache (decode kernel), as one prefill."""
    torch.manual_seed(0)
    cfg = ModelConfig("ttt_linear", 61, 32, 2, 2, 64, 64, options={"mini_batch": B_MB, "backend": "triton"})
    model = build_model(cfg).eval()
    assert model.backends() == {"ttt": "triton"}
    idx = torch.randint(0, 61, (2, 33))
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(2, 33)
        steps = [model(idx[:, :7], state)] + [model(idx[:, i:i + 1], state) for i in range(7, 33)]
    assert rel_rmse(torch.cat(steps, 1), full) < 1e-5


def test_backend_selection():
    assert resolve_ttt_backend("torch", "linear") == "torch"
    assert resolve_ttt_backend("auto", "linear") == ("triton" if torch.cuda.is_available() else "torch")
    with pytest.raises(BackendUnavailable, match="no Triton kernel for TTT-mlp"):
        resolve_ttt_backend("triton", "mlp")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_ttt_backend("cuda", "linear")
    with pytest.raises(ValueError, match="needs backend=torch"):
        TTTLayer(ModelConfig("ttt_linear", 61, 32, 1, 2, 64, 64, options={"backend": "triton", "impl": "reference"}))
