"""The causal depthwise conv's Triton kernels (architectures/triton_conv.py) against the equation and against
CausalConv's PyTorch multiply-adds (the reference every backend's conv is checked against in test_mamba.py):
output and the gradients of x, weight and bias; then the layers whose backend is triton run their convs there.

Where CUDA is present the inputs live on the GPU and the kernels run compiled (`make gpu-check`); on CPU they run
under TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
import pytest
import torch

from architectures import ModelConfig, build_model
from architectures import triton_conv
from architectures.layers import CausalConv
from architectures.triton_conv import causal_conv, causal_conv_backward, causal_conv_triton

F32, F64 = torch.float32, torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the kernels run
TOL = {F64: 1e-12, F32: 1e-5}  # the largest error over the largest value of each output and gradient


def conv_and_input(B, T, C, k, dtype, seed=0):
    torch.manual_seed(seed)
    conv = CausalConv(C, k).to(DEVICE, dtype)
    x = torch.randn(B, T, C, device=DEVICE, dtype=dtype, requires_grad=True)
    return conv, x


def output_and_grads(y, conv, x, seed=1):
    """y and the gradients of x, weight and bias of <y, dy> for a random dy (drawn in fp32, in bf16 values when y is
    bf16: the same dy for a bf16 run and its fp32 reference)."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=F32).to(torch.bfloat16 if y.dtype == torch.bfloat16 else y.dtype)
    dy = dy.to(DEVICE)
    return [y, *torch.autograd.grad((y.float() * dy.float()).sum(), (x, conv.weight, conv.bias))]


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_the_kernel_computes_the_equation():
    """y[b, t, c] = bias[c] + sum_j w[c, j] x[b, t + j - (k - 1), c], x before token 0 read as 0 (fp64, loops)."""
    B, T, C, k = 2, 9, 5, 4
    conv, x = conv_and_input(B, T, C, k, F64)
    y = causal_conv_triton(x, conv.weight, conv.bias).detach().cpu()
    w, bias, xs = conv.weight.detach().cpu(), conv.bias.detach().cpu(), x.detach().cpu()
    for b in range(B):
        for t in range(T):
            for c in range(C):
                want = bias[c] + sum(w[c, j] * xs[b, t + j - (k - 1), c] for j in range(k) if t + j - (k - 1) >= 0)
                assert abs(y[b, t, c] - want) < 1e-12


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("programs", [triton_conv.BACKWARD_PROGRAMS, 1])
def test_forward_and_backward_match_the_multiply_adds(dtype, k, programs, monkeypatch):
    """Tokens and channels not a multiple of the tiles (45 = 32 + 13, 70 = 64 + 6); programs=1: one backward
    program per sequence and channel block walks both token blocks, else one block each."""
    monkeypatch.setattr(triton_conv, "BACKWARD_PROGRAMS", programs)
    assert triton_conv.backward_runs(2, 45, 70) == ((2, 1) if programs == 1 else (1, 2))
    conv, x = conv_and_input(2, 45, 70, k, dtype)
    ref = output_and_grads(conv(x)[0], conv, x)
    ours = output_and_grads(causal_conv_triton(x, conv.weight, conv.bias), conv, x)
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


def test_bf16_inputs_are_summed_in_fp32():
    """bf16 activations (training under autocast), fp32 weights: y and dx in bf16 within its rounding of the fp32
    result on the same inputs; dweight and dbias in fp32, as the parameters."""
    conv, x32 = conv_and_input(2, 40, 24, 4, F32)
    x16 = x32.detach().to(torch.bfloat16).requires_grad_()
    x_ref = x16.detach().float().requires_grad_()  # the same values in fp32
    ref = output_and_grads(causal_conv_triton(x_ref, conv.weight, conv.bias).to(torch.bfloat16), conv, x_ref)
    ours = output_and_grads(causal_conv_triton(x16, conv.weight, conv.bias), conv, x16)
    assert ours[0].dtype == ours[1].dtype == torch.bfloat16 and ours[2].dtype == ours[3].dtype == F32
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        assert rel_err(a, b) <= (1e-2 if a.dtype == torch.bfloat16 else 1e-5), f"{name}: {rel_err(a, b):.2e}"


def test_the_conv_operators_pass_opcheck():
    """Forward and backward are torch.library operators so that torch.compile(model) traces around the kernels:
    their schema, fake (shape-only) versions, autograd registration and AOT dispatch, as opcheck checks them."""
    conv, x = conv_and_input(1, 37, 20, 4, F32)
    torch.library.opcheck(causal_conv, (x, conv.weight, conv.bias))
    torch.library.opcheck(causal_conv_backward, (x.detach(), conv.weight.detach(), torch.randn_like(x)))


@pytest.mark.parametrize("arch, convs_per_layer", [("ttt_linear", 3), ("mamba", 1)])
def test_layers_whose_backend_is_triton_run_their_convs_in_triton(arch, convs_per_layer, monkeypatch):
    """TTT-Linear's pre-conv and QK convs, Mamba's conv: over a prompt from the zero state, the kernels; a decode
    step (a state to continue) takes the multiply-adds. backend=torch (or dual) never does. (Mamba-2's backend=triton
    layer, conv included, is held to backend=torch in test_mamba_triton.py; so are TTT's and Mamba's in theirs.)"""
    calls = []
    monkeypatch.setattr(triton_conv, "causal_conv_triton",
                        lambda *a: calls.append(a[0].shape) or causal_conv(a[0].contiguous(), *a[1:]))
    options = {"backend": "triton", **({"mini_batch": 16} if arch == "ttt_linear" else {"chunk_size": 16})}
    cfg = ModelConfig(arch, 61, 32, 2, 2, 64, 128, options=options)
    model = build_model(cfg).to(DEVICE).eval()
    idx = torch.randint(0, 61, (1, 32), device=DEVICE)
    with torch.no_grad():
        cache = model.new_state(1, 64)
        model(idx, cache)
        assert len(calls) == convs_per_layer * cfg.n_layers
        model(idx[:, :1], cache)  # one token after the prompt
    assert len(calls) == convs_per_layer * cfg.n_layers
    calls.clear()
    plain = "torch" if arch == "mamba" else "dual"  # the PyTorch backend of each
    build_model(ModelConfig(arch, 61, 32, 2, 2, 64, 128, options={**options, "backend": plain})).to(DEVICE)(idx)
    assert calls == []
