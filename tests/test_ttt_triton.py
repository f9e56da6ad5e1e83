"""TTT Triton kernels against the PyTorch dual form (dual.py, itself checked against the token-by-token
reference and the paper's equations in test_ttt.py): outputs, final state and every gradient, any T,
padded head dims, bf16 inputs, the decode kernel, and the layer's backend selection.

Where CUDA is present the inputs and layers live on the GPU and the kernels run compiled (`make gpu-check`);
on CPU they run under TRITON_INTERPRET=1 (tests/conftest.py sets it). Shapes stay small either way.
`make test-kernels` runs this file alone."""
import copy
from dataclasses import replace

import pytest
import torch

from architectures import ModelConfig, build_model
from architectures.backends import BackendUnavailable
from architectures.ttt.dual import InnerState, ttt_dual
from architectures.ttt.layer import TTTLayer, resolve_ttt_backend
from architectures.ttt.dual_backward import gelu_tanh_second, linear_minibatch_backward, mlp_minibatch_backward
from architectures.ttt.inner import gelu_tanh_grad
from architectures.ttt import triton_linear, triton_mlp

F32, F64 = torch.float32, torch.float64
B_MB = 16  # mini-batch
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the kernels run
# Relative RMSE allowed against the fp32 dual form. The interpreter (CPU) and "ieee" products are exact
# fp32: 1e-5 holds with room. Compiled "tf32" products (the default on CUDA, triton_linear.Launch) round
# each factor to a 10-bit mantissa (2^-11 ~ 5e-4), which the LayerNorms' backward and a few mini-batches
# of state amplify: 2e-2 (bench/ttt_kernel_speed.py --variants measures it at the 1.3B shape).
TF32 = DEVICE.type == "cuda" and triton_linear.LAUNCH.precision == "tf32"
TOL = 2e-2 if TF32 else 1e-5


def rel_rmse(x, y) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


PARAMS = {"linear": ("W", "b"), "mlp": ("W1", "b1", "W2", "b2")}
KERNELS = {"linear": triton_linear, "mlp": triton_mlp}
IO = ["q", "k", "v", "a", "tok", "ln_w", "ln_b"]


def inputs(inner="linear", B=2, H=2, T=37, f=16, dtype=F32, seed=0):
    """Random TTT inputs and initial inner weights away from every special value; all require grad.
    Biases are (1, H, n), the kernels' layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F32)
    x = {"q": r(B, H, T, f), "k": r(B, H, T, f), "v": r(B, H, T, f), "a": torch.rand(B, H, T, generator=g) * 0.3,
         "tok": 1 / torch.arange(1, B_MB + 1) + 0.1 * r(B_MB), "ln_w": 1 + 0.3 * r(H, f), "ln_b": 0.3 * r(H, f)}
    if inner == "linear":
        x.update(W=0.3 * r(1, H, f, f), b=0.3 * r(1, H, f))
    else:
        x.update(W1=r(1, H, f, 4 * f) / f ** 0.5, b1=0.3 * r(1, H, 4 * f), W2=r(1, H, 4 * f, f) / (2 * f ** 0.5),
                 b2=0.3 * r(1, H, f))
    return {n: t.to(DEVICE, dtype if n in "qkv" else F32).requires_grad_() for n, t in x.items()}


def dual(x, inner="linear", dtype=F32):
    """The PyTorch dual form on the same inputs (upcast): output and final state (biases (B, H, 1, n))."""
    c = {n: t.to(dtype) for n, t in x.items()}
    state = InnerState({n: (c[n][:, :, None] if n.startswith("b") else c[n]) for n in PARAMS[inner]})
    return ttt_dual(inner, state, c["q"], c["k"], c["v"], c["a"], c["tok"], c["ln_w"][:, None], c["ln_b"][:, None],
                    B_MB)


def prefill(x, inner="linear", group=16):
    return KERNELS[inner].prefill(*[x[n] for n in IO], {n: x[n] for n in PARAMS[inner]}, group)


def flat(state_dict):
    return {n: (t[:, :, 0] if n.startswith("b") else t) for n, t in state_dict.items()}


CASES = [("linear", 16, 64, 2), ("linear", 16, 37, 1), ("linear", 96, 37, 16), ("linear", 8, 53, 2),
         ("mlp", 16, 64, 2), ("mlp", 16, 37, 1), ("mlp", 24, 21, 16), ("mlp", 96, 21, 1)]


@pytest.mark.parametrize("inner,f,T,group", CASES)
def test_prefill_forward_state_and_every_gradient_match_the_dual_form(inner, f, T, group):
    """fp32: outputs, the final state and the accumulators of the trailing partial mini-batch, and the
    gradients of q, k, v, the lr factors, the inner LN and the initial inner weights (rel. RMSE < TOL).
    f = 8, 24, 96 pad."""
    check_prefill_against_dual(inner, f, T, group)


@pytest.mark.parametrize("f,w_rows,rows", [(96, None, 16), (96, 32, 32), (96, 128, 128), (32, 16, 16)])
def test_linear_prefill_with_w_in_tiles_of_rows_matches_the_dual_form(f, w_rows, rows):
    """Launch.w_rows: the TTT-Linear forward and backward with W (and the backward's dW) in memory, read `rows`
    rows at a time (_fwd_rows, _minibatch_backward_rows; past f = 64 the default, WIDE_W_ROWS; f = 32 in two
    tiles), or whole in registers (128 at f = 96's block). As above: outputs, state and every gradient, the
    backward from the checkpoints the forward wrote (group 2 over 3 whole mini-batches, then a partial one)."""
    with triton_linear.launch_settings(w_rows=w_rows) as launch:
        assert launch.rows(f) == rows
        check_prefill_against_dual("linear", f, 53, 2)


def check_prefill_against_dual(inner, f, T, group):
    x = inputs(inner, T=T, f=f)
    out_ref, state = dual(x, inner)
    out, params, acc = prefill(x, inner, group)
    assert rel_rmse(out, out_ref) < TOL
    for n, p in flat(state.params).items():
        assert rel_rmse(params[n], p.expand_as(params[n])) < TOL, n
    for n, p in flat(state.acc).items():
        assert rel_rmse(acc[n], p) < TOL, n
    names = IO + list(PARAMS[inner])
    dout = torch.randn_like(out_ref)
    want = torch.autograd.grad((out_ref * dout).sum(), [x[n] for n in names])
    got = torch.autograd.grad((out * dout).sum(), [x[n] for n in names])
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and rel_rmse(g, w) < TOL, name


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_gradient_through_the_final_state(inner):
    """A loss on the state after the sequence (as when a later chunk continues from it) flows back."""
    x = inputs(inner, T=32, f=16)
    _, state = dual(x, inner)
    _, params, _ = prefill(x, inner, group=1)
    first = PARAMS[inner][0]
    proj = torch.randn_like(params[first])
    leaves = [x["k"], x[first], x["a"]]
    want = torch.autograd.grad((state.params[first] * proj).sum(), leaves)
    got = torch.autograd.grad((params[first] * proj).sum(), leaves)
    for g, w in zip(got, want):
        assert rel_rmse(g, w) < TOL


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_bf16_inputs_with_fp32_state(inner):
    """bf16 q, k, v are read and computed in fp32 (the state stays fp32); the output is stored in bf16."""
    x = inputs(inner, T=37, f=16, dtype=torch.bfloat16)
    out_ref, state = dual(x, inner, F32)  # the same bf16 values, upcast
    out, params, _ = prefill(x, inner)
    first = PARAMS[inner][0]
    assert out.dtype == torch.bfloat16 and params[first].dtype == F32
    assert rel_rmse(out, out_ref) < max(TOL, 5e-3)  # bf16 output rounding: 2^-9 per element
    assert rel_rmse(params[first], state.params[first].expand_as(params[first])) < TOL
    dout = torch.randn_like(out_ref)
    want = torch.autograd.grad((out_ref * dout).sum(), [x["q"], x[first]])
    got = torch.autograd.grad((out.float() * dout).sum(), [x["q"], x[first]])
    assert all(rel_rmse(g, w) < max(TOL, 1e-2) for g, w in zip(got, want))


@pytest.mark.parametrize("inner,f", [("linear", 16), ("linear", 96), ("mlp", 16), ("mlp", 96)])
def test_decode_kernel_equals_the_dual_form_through_its_commits(inner, f):
    """Prefill 5 tokens (a partial mini-batch), then decode the rest one at a time, committing at 16 and 32 (f = 16:
    27 tokens, a whole mini-batch decoded from a commit) or at 16 (f = 96: 11 tokens, each of TTT-MLP's 0.6 s under
    the interpreter): the outputs and the final state equal one dual-form pass over all of them. f = 96: a padded
    block of 128, whose W the TTT-Linear kernel reads 64 rows at a time (decode_rows) and whose hidden units
    TTT-MLP's reads 16 at a time."""
    small = f < 64
    T = 2 * B_MB if small else B_MB
    x = {n: t.detach() for n, t in inputs(inner, B=2 if small else 1, H=2 if small else 1, T=T, f=f).items()}
    out_ref, state = dual(x, inner)
    first = {n: (t[:, :, :5] if n in "qkva" else t) for n, t in x.items()}
    out_first, params, acc = prefill(first, inner)
    params = {n: p.contiguous().clone() for n, p in params.items()}
    acc = {n: p.contiguous().clone() for n, p in acc.items()}
    outs = [out_first]
    for i in range(5, T):
        outs.append(KERNELS[inner].decode_step(x["q"][:, :, i], x["k"][:, :, i], x["v"][:, :, i], x["a"][:, :, i],
                                               x["tok"], x["ln_w"], x["ln_b"], params, acc, i % B_MB)[:, :, None])
    assert rel_rmse(torch.cat(outs, 2), out_ref) < TOL
    for n, p in flat(state.params).items():
        assert rel_rmse(params[n], p.expand_as(params[n])) < TOL, n
        assert acc[n].abs().max() == 0  # committed at the last token


def _autograd_vs_hand(inner, c, commit, seed=3):
    """One mini-batch of c tokens through dual.py with autograd (plus a loss on the committed state),
    against dual_backward's hand-derived gradients, fp64."""
    g = torch.Generator().manual_seed(seed)
    H, f = 3, 8
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=F64)).requires_grad_()
    t = {"q": r(2, H, c, f), "k": r(2, H, c, f), "v": r(2, H, c, f), "gamma": r(H, 1, f), "beta": r(H, 1, f)}
    if inner == "linear":
        w = {"W": r(1, H, f, f, scale=0.3), "b": r(1, H, 1, f)}
    else:
        w = {"W1": r(1, H, f, 4 * f, scale=0.3), "b1": r(1, H, 1, 4 * f), "W2": r(1, H, 4 * f, f, scale=0.3),
             "b2": r(1, H, 1, f)}
    a = (torch.rand(2, H, c, generator=g, dtype=F64) * 0.3).requires_grad_()
    tok = (1 / torch.arange(1, c + 1, dtype=F64)).requires_grad_()
    out, st = ttt_dual(inner, InnerState(dict(w)), t["q"], t["k"], t["v"], a, tok, t["gamma"], t["beta"], c)
    dout = torch.randn_like(out)
    dnext = {n: torch.randn(2, *p.shape[1:], dtype=F64) if commit else torch.zeros(2, *p.shape[1:], dtype=F64)
             for n, p in w.items()}
    loss = (out * dout).sum() + (sum((st.params[n] * dnext[n]).sum() for n in w) if commit else 0)
    leaves = [t["q"], t["k"], t["v"], a, tok, t["gamma"], t["beta"], *w.values()]
    want = torch.autograd.grad(loss, leaves)
    backward = linear_minibatch_backward if inner == "linear" else mlp_minibatch_backward
    with torch.no_grad():
        got = backward(*w.values(), t["q"], t["k"], t["v"], a, tok, t["gamma"], t["beta"], dout, *dnext.values(),
                       commit=commit)
    got = [*got[:4], got[4].sum((0, 1)), got[5].sum(0), got[6].sum(0), *[x.sum(0, keepdim=True) for x in got[7:]]]
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_hand_derived_backward_equals_autograd_fp64(inner):
    """dual_backward.py (the kernels' math in PyTorch) against autograd through dual.py: a whole mini-batch
    with an upstream gradient on the state it commits, and a partial one."""
    _autograd_vs_hand(inner, 16, True)
    _autograd_vs_hand(inner, 11, False)


def test_gelu_second_derivative():
    x = torch.linspace(-6, 6, 101, dtype=F64, requires_grad=True)
    want, = torch.autograd.grad(gelu_tanh_grad(x).sum(), x)
    torch.testing.assert_close(gelu_tanh_second(x), want, rtol=1e-12, atol=1e-14)


# -- the layer -----------------------------------------------------------------------------------

def layer_cfg(backbone="mamba", backend="triton", inner="linear", d=64, heads=2):
    return ModelConfig("ttt_linear", 61, d, 1, heads, 2 * d, 256,  # inner, backbone: the options
                       options={"inner": inner, "backbone": backbone, "mini_batch": B_MB, "backend": backend,
                                "base_lr": 1.0 if inner == "linear" else 0.1})


@pytest.mark.parametrize("inner,backbone", [("linear", "mamba"), ("linear", "transformer"), ("mlp", "mamba")])
def test_layer_backends_agree_forward_and_backward(inner, backbone):
    torch.manual_seed(0)
    tri = TTTLayer(layer_cfg(backbone, inner=inner)).to(DEVICE)
    ref = copy.deepcopy(tri)
    ref.backend = "dual"  # autograd through the dual form
    assert (tri.backend, ref.backend) == ("triton", "dual")
    with torch.no_grad():
        for p in tri.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 35, 64, device=DEVICE)
    proj = torch.randn(2, 35, 64, device=DEVICE)
    y_tri, y_ref = tri(x), ref(x)
    assert rel_rmse(y_tri, y_ref) < TOL
    (y_tri * proj).sum().backward()
    (y_ref * proj).sum().backward()
    for (name, p), (_, p_ref) in zip(tri.named_parameters(), ref.named_parameters()):
        assert rel_rmse(p.grad, p_ref.grad) < max(TOL, 1e-4), name


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_the_prefill_operators_pass_opcheck(inner):
    """The prefill is two torch.library operators (forward, backward) so that torch.compile(model) traces around
    the kernels: their schema, fake (shape-only) versions, autograd registration and AOT dispatch, as
    torch.library.opcheck checks them, with a trailing partial mini-batch and W0 shared by the batch."""
    x = inputs(inner, B=1, H=1, T=B_MB + 5, f=16)
    params = [x[n] for n in PARAMS[inner]]
    op = {"linear": triton_linear.linear_prefill, "mlp": triton_mlp.mlp_prefill}[inner]
    torch.library.opcheck(op, (*(x[n] for n in IO), *params, 1, True))


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("pos", [3, B_MB - 1])
def test_the_decode_operators_pass_opcheck(inner, pos):
    """The decode step is a torch.library operator that writes the state in place (so that a compiled decode step
    calls it): its schema's mutated arguments, fake version and dispatch, as torch.library.opcheck checks them,
    inside a mini-batch and at its last token (the commit, which also writes the weights)."""
    x = {n: t.detach() for n, t in inputs(inner, B=2, H=2, T=1, f=16).items()}
    state = {n: x[n].expand(2, *x[n].shape[1:]).contiguous() for n in PARAMS[inner]}
    acc = {n: 0.1 * torch.randn_like(p) for n, p in state.items()}
    op = {"linear": triton_linear.linear_decode_step, "mlp": triton_mlp.mlp_decode_step}[inner]
    step = [x[n][:, :, 0] for n in ("q", "k", "v", "a")]
    torch.library.opcheck(op, (*step, x["tok"], x["ln_w"], x["ln_b"], *state.values(), *acc.values(), pos))


@pytest.mark.slow  # torch.compile: inductor from a cold cache (on a GPU, `make gpu-check` runs it)
@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp"])
def test_compiled_model_equals_eager_forward_and_every_parameter_gradient(arch):
    """trainer.compile=model: torch.compile traces the model around the kernels' operators in one graph (the glue
    fuses, the kernels run as they are): the same outputs and parameter gradients as the eager model."""
    torch.manual_seed(0)
    inner = arch.split("_")[1]
    cfg = ModelConfig(arch, 61, 32, 1, 2, 64, 64, options={"inner": inner, "mini_batch": B_MB, "backend": "triton"})
    eager = build_model(cfg).to(DEVICE)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    idx = torch.randint(0, 61, (2, 2 * B_MB + 5), device=DEVICE)
    outs = [m(idx) for m in (eager, compiled)]
    assert rel_rmse(outs[1], outs[0]) < 1e-5
    for out in outs:
        out.square().mean().backward()
    for (name, p), p_c in zip(eager.named_parameters(), compiled.parameters()):
        assert rel_rmse(p_c.grad, p.grad) < 1e-4, name


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp"])
def test_generate_with_the_triton_decode_kernel_equals_one_prefill(arch):
    """Prefill 7 tokens, decode 26 one at a time through the cache (decode kernel), as one prefill. TTT-Linear
    with 2 layers (each keeps its own state); TTT-MLP with one (its kernel is the slower one to interpret)."""
    torch.manual_seed(0)
    inner = arch.split("_")[1]
    layers = 2 if inner == "linear" else 1
    cfg = ModelConfig(arch, 61, 32, layers, 2, 64, 64, options={"inner": inner, "mini_batch": B_MB,
                                                                "backend": "triton"})
    model = build_model(cfg).to(DEVICE).eval()
    assert model.backends() == {"ttt": "triton"}
    idx = torch.randint(0, 61, (2, 33), device=DEVICE)
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(2, 33)
        steps = [model(idx[:, :7], state)] + [model(idx[:, i:i + 1], state) for i in range(7, 33)]
    assert rel_rmse(torch.cat(steps, 1), full) < TOL


def _cache_tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor of each TTT block's decode cache: the three conv states and the inner state."""
    out = {}
    for i, c in enumerate(state.caches):
        out.update({f"{i}.{n}": getattr(c, n) for n in ("conv_pre", "conv_q", "conv_k")})
        out.update({f"{i}.{n}": t for n, t in c.inner.params.items()})
        out.update({f"{i}.acc.{n}": t for n, t in c.inner.acc.items()})
    return out


def _ttt_model(arch, layers=1):
    cfg = ModelConfig(arch, 61, 32, layers, 2, 64, 64, options={"inner": arch.split("_")[1], "mini_batch": B_MB,
                                                                "backend": "triton"})
    return build_model(cfg).to(DEVICE).eval()


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp"])
@pytest.mark.parametrize("prompt", [7, 0])
def test_decode_updates_the_cache_in_place(arch, prompt):
    """After a prefill without gradient (prompt 7) or a first decode step (prompt 0: that step copies the
    layer's initial weights), every decode step reads and writes the same cache tensors, across the commits at
    16 and 32: no copy of the state per token, and what a CUDA graph of steps needs to continue the sequence.
    The layer's own weights are never written, and the outputs equal one prefill's."""
    torch.manual_seed(0)
    model = _ttt_model(arch)
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    B = 2 if prompt else 1  # batch 1: the initial weights have the state's shape, and only ownership guards them
    idx = torch.randint(0, 61, (B, 34), device=DEVICE)
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(B, 34)
        steps = [model(idx[:, :max(prompt, 1)], state)]
        where = {n: t.data_ptr() for n, t in _cache_tensors(state).items()}
        assert state.caches[0].inner.owned
        for i in range(max(prompt, 1), 34):
            steps.append(model(idx[:, i:i + 1], state))
            assert {n: t.data_ptr() for n, t in _cache_tensors(state).items()} == where, i
    assert rel_rmse(torch.cat(steps, 1), full) < TOL
    for n, p in model.state_dict().items():
        assert torch.equal(p, weights[n]), n


@pytest.mark.slow  # torch.compile: inductor from a cold cache (on a GPU, `make gpu-check` runs it)
@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp"])
def test_a_compiled_decode_step_calls_the_kernel_in_place(arch):
    """The decode step through torch.compile (`make throughput ARGS=--compile-decode`, bench/latency._compiled):
    one graph with the decode kernel in it (an operator that writes the state: no graph break), the eager step's
    outputs, and the cache's tensors updated where they are."""
    from torch._dynamo.utils import counters

    from bench.latency import _compiled

    torch.manual_seed(0)
    model = _ttt_model(arch)
    idx = torch.randint(0, 61, (2, 7), device=DEVICE)
    tok = torch.randint(0, 61, (2, 1), device=DEVICE)
    outs = {}
    for compiled in (False, True):
        state = model.new_state(2, 7 + 2 * B_MB + 10)
        step = lambda: model(tok, state)
        with torch.no_grad():
            model(idx, state)
            where = {n: t.data_ptr() for n, t in _cache_tensors(state).items()}
            if compiled:
                torch._dynamo.reset()
                counters.clear()
                step, note = _compiled(step, model)
                assert note == "model" and not counters["graph_break"], (note, dict(counters["graph_break"]))
            else:
                for _ in range(2 * B_MB):
                    step()
            outs[compiled] = torch.cat([step() for _ in range(10)], 1)  # tokens 40-49: the 48th commits
        assert {n: t.data_ptr() for n, t in _cache_tensors(state).items()} == where
    assert rel_rmse(outs[True], outs[False]) < TOL


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_decode_copies_a_state_autograd_keeps(inner):
    """A prefill that records a gradient returns a state autograd saved for its backward: not owned, so the
    decode step after it works on copies and the backward still sees the prefill's values."""
    from architectures.ttt.triton_op import ttt_triton

    x = inputs(inner, T=8, f=16)
    params = {n: x[n][:, :, None] if n.startswith("b") else x[n] for n in PARAMS[inner]}
    tokens = lambda span: [x[n][:, :, span] for n in ("q", "k", "v", "a")]
    rest = [x["tok"], x["ln_w"][:, None], x["ln_b"][:, None], B_MB]
    out, state = ttt_triton(inner, InnerState(params), *tokens(slice(0, 7)), *rest)
    assert not state.owned
    kept = [*state.params.items(), *[(f"acc.{n}", t) for n, t in state.acc.items()]]
    before = {n: (t.detach().clone(), t._version) for n, t in kept}
    with torch.no_grad():
        _, after = ttt_triton(inner, state, *tokens(slice(7, 8)), *rest)
    assert after.owned
    for n, t in kept:
        assert torch.equal(t.detach(), before[n][0]) and t._version == before[n][1], n
    (out.sum() + sum(p.sum() for p in state.params.values())).backward()  # autograd's saved tensors are intact


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need CUDA; on CPU "
                    "test_decode_updates_the_cache_in_place checks what a replay relies on")
@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp"])
def test_cuda_graph_of_decode_steps_continues_the_sequence(arch):
    """A CUDA graph of one mini-batch of decode steps (bench/latency.py times decoding so), replayed twice on new
    tokens, gives the outputs of eager decoding: each replay starts from the state the one before it left."""
    torch.manual_seed(0)
    model = _ttt_model(arch, layers=2)
    idx = torch.randint(0, 61, (2, 4 * B_MB), device=DEVICE)
    with torch.no_grad():
        ref_state = model.new_state(2, 4 * B_MB)
        model(idx[:, :B_MB], ref_state)
        want = torch.cat([model(idx[:, i:i + 1], ref_state) for i in range(B_MB, 4 * B_MB)], 1)
        state = model.new_state(2, 4 * B_MB)
        model(idx[:, :B_MB], state)
        tokens = idx[:, B_MB:2 * B_MB].clone()  # the graph's input, refilled before each replay
        steps = lambda: torch.cat([model(tokens[:, i:i + 1], state) for i in range(B_MB)], 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = [steps()]  # eager: warms up (compiles) and decodes the second mini-batch
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = steps()  # recorded, not run
        for m in (2, 3):
            tokens.copy_(idx[:, m * B_MB:(m + 1) * B_MB])
            graph.replay()
            got.append(out.clone())
    torch.cuda.synchronize()
    assert rel_rmse(torch.cat(got, 1), want) < TOL


def test_backend_selection(monkeypatch):
    assert resolve_ttt_backend("torch", "mlp") == "dual"
    assert resolve_ttt_backend("auto", "linear") == ("triton" if torch.cuda.is_available() else "cpp")
    assert resolve_ttt_backend("triton", "linear") == "triton"  # CUDA, or the interpreter (these tests)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_ttt_backend("cuda", "linear")
    # TTT-MLP's tiled kernels run at any head dim when asked for; auto takes them up to 32 until they are timed
    # (above it: the dual form on CUDA, cpp without CUDA)
    assert resolve_ttt_backend("auto", "mlp", head_dim=64) == ("dual" if torch.cuda.is_available() else "cpp")
    assert resolve_ttt_backend("triton", "mlp", head_dim=64) == "triton"
    assert resolve_ttt_backend("triton", "mlp", head_dim=32) == "triton"
    with pytest.raises(ValueError,
                       match="backend must be one of .*'triton', 'cpp', 'torch', 'scan', 'dual', 'reference'"):
        TTTLayer(ModelConfig("ttt_linear", 61, 32, 1, 2, 64, 64, options={"backend": "fast"}))
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailable, match="needs triton and CUDA"):
            resolve_ttt_backend("triton", "linear")


def test_launch_settings_are_checked_and_restored(monkeypatch):
    from architectures.ttt.triton_linear import DEFAULT_STAGES, LAUNCH, _launch_from_env, launch_settings

    before = (LAUNCH.precision, LAUNCH.num_warps, LAUNCH.num_stages)
    with launch_settings(precision="ieee", num_warps=2, num_stages=1) as launch:
        assert launch is LAUNCH
        assert (launch.precision, launch.warps("mlp", "bwd", 64), launch.num_stages) == ("ieee", 2, 1)
    assert (LAUNCH.precision, LAUNCH.num_warps, LAUNCH.num_stages) == before
    with pytest.raises(ValueError, match="precision must be one of"):
        with launch_settings(precision="fp8"):
            pass
    with pytest.raises(TypeError):
        with launch_settings(warps=8):
            pass
    assert (LAUNCH.precision, LAUNCH.num_warps, LAUNCH.num_stages) == before
    monkeypatch.setenv("TTT_TRITON_PRECISION", "ieee")
    monkeypatch.setenv("TTT_TRITON_WARPS", "2")
    assert (_launch_from_env().precision, _launch_from_env().num_warps) == ("ieee", 2)
    monkeypatch.setenv("TTT_TRITON_WARPS", "3")
    with pytest.raises(ValueError, match="num_warps"):
        _launch_from_env()
    monkeypatch.setenv("TTT_TRITON_WARPS", "4")
    monkeypatch.setenv("TTT_TRITON_STAGES", "1")
    assert _launch_from_env().num_stages == 1
    monkeypatch.setenv("TTT_TRITON_STAGES", "0")
    with pytest.raises(ValueError, match="num_stages"):
        _launch_from_env()
    monkeypatch.delenv("TTT_TRITON_STAGES")
    launch = _launch_from_env()  # the stages per kernel: 1 for TTT-Linear's backward with W in tiles of rows
    assert launch.num_stages is None and launch.stages("linear", "bwd", 64) == DEFAULT_STAGES
    assert (launch.stages("linear", "bwd", 96), launch.stages("linear", "fwd", 96)) == (1, DEFAULT_STAGES)
    assert launch.stages("mlp", "bwd", 128) == DEFAULT_STAGES
    assert replace(launch, num_stages=2).stages("linear", "bwd", 96) == 2
    assert (LAUNCH.rows(64), LAUNCH.rows(96), LAUNCH.rows(16)) == (64, triton_linear.WIDE_W_ROWS, 16)
    monkeypatch.setenv("TTT_TRITON_W_ROWS", "32")
    assert (_launch_from_env().rows(64), _launch_from_env().rows(16)) == (32, 16)
    monkeypatch.setenv("TTT_TRITON_W_ROWS", "8")  # tl.dot needs 16 or more
    with pytest.raises(ValueError, match="w_rows"):
        _launch_from_env()


def test_the_760m_layer_times_w_whole_against_tiles_of_rows(tmp_path):
    """Past f = 64 (96: a block of 128) --variants adds 8 warps at 1 stage (the backward's default there), W whole
    in registers and in tiles of 32 rows to the default (tiles of 16, WIDE_W_ROWS), each named by what ran; all
    equal under the interpreter."""
    import json

    from bench.ttt_kernel_speed import VARIANTS, WIDE_ROW_VARIANTS, main

    assert main(["--smoke", "--variants", "linear", "--lengths", "16", "--head-dim", "96", "--modes", "fwd",
                 "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench" / "ttt_kernel_variants.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == VARIANTS + WIDE_ROW_VARIANTS
    assert {r["head_dim"] for r in rows} == {96} and all(r["status"] == "ok" for r in rows)
    assert rows[1]["impl"] == "ttt_linear [triton ieee, 8 warps, 3 stages, W in 16-row tiles]"
    assert rows[-3]["impl"] == "ttt_linear [triton tf32, 8 warps, 1 stages, W in 16-row tiles]"
    assert rows[-2]["impl"].endswith("3 stages, W whole]") and rows[-1]["impl"].endswith("W in 32-row tiles]")
    if DEVICE.type == "cpu":  # exact products, summed in another order by the tiles
        assert all(r["out_rel_rmse"] < 1e-6 for r in rows)


def test_kernel_variants_benchmark_smoke(tmp_path):
    """--variants: every launch variant timed, with its error against the first (exact) one. The
    interpreter computes exact products whatever the setting (errors 0); compiled, "ieee" stays exact
    and "tf32" differs by about 1e-3."""
    import json

    from architectures.ttt.triton_linear import DEFAULT_STAGES
    from bench.ttt_kernel_speed import VARIANTS, main

    assert main(["--smoke", "--variants", "linear", "--lengths", "32", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench" / "ttt_kernel_variants.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == VARIANTS * 2 and {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert VARIANTS[0]["num_stages"] == DEFAULT_STAGES and VARIANTS[-1]["num_stages"] == 1
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        errors = [r["out_rel_rmse"]] + ([r["dq_rel_rmse"]] if r["mode"] == "fwd+bwd" else [])
        if DEVICE.type == "cpu":
            assert all(e == 0 for e in errors), r
        elif r["variant"]["precision"] == "ieee":
            assert all(e < 1e-4 for e in errors), r  # exact products; other warps sum in another order
        else:
            assert all(0 < e < 2e-2 for e in errors), r


def test_kernel_benchmark_smoke(tmp_path):
    """bench/ttt_kernel_speed.py end to end on tiny shapes (one length: the interpreter's calls are most of this
    file's time): every contender either ran or says why not."""
    import json

    from bench.ttt_kernel_speed import main

    assert main(["--smoke", "--lengths", "32", "--only", "triton,dual,sdpa,flash", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench" / "ttt_kernel_speed.json").read_text())["rows"]
    ran = {(r["impl"], r["mode"]) for r in rows if r["status"] == "ok"}
    for impl in ("ttt_linear [triton]", "ttt_mlp [triton]", "ttt_linear [torch dual form]", "attention [sdpa]",
                 "mamba scan [triton]"):
        assert {(impl, "fwd"), (impl, "fwd+bwd")} <= ran, impl
    ssd = {r["status"] for r in rows if r["impl"] == "mamba2 ssd [mamba-ssm triton]"}
    assert ssd <= {"ok", "not installed"} if torch.cuda.is_available() else ssd == {"needs CUDA"}
    assert all(r["status"] in ("ok", "not installed") for r in rows if r["impl"] != "mamba2 ssd [mamba-ssm triton]")
    assert (tmp_path / "plots" / "ttt_kernel_speed.png").stat().st_size > 10_000
