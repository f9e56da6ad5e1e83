"""Mamba-1's Triton selective scan (backend=triton, architectures/mamba/triton_scan.py) against our chunked scan
(scan.py, itself checked against mamba-ssm's selective_scan_ref in test_mamba.py): outputs, the last state and
every gradient, then the layer with backend=triton against backend=torch, decoding against prefill. Then Mamba-2's
backend=triton (mamba-ssm's Triton SSD after our conv) against backend=torch (ssd.py, checked against mamba-ssm's
ssd_minimal_discrete in test_mamba.py), the same way.

Where CUDA is present the inputs and models live on the GPU and the kernels run compiled (`make gpu-check`); on
CPU they run under TRITON_INTERPRET=1 (tests/conftest.py sets it). Shapes stay small either way."""
import contextlib
import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from triton.runtime.autotuner import Autotuner

from architectures import ModelConfig, build_model
from architectures.mamba.scan import EAGER_STEPS, ChunkedScan, selective_scan
from architectures.mamba import layers, triton_scan
from architectures.mamba.triton_scan import BLOCK_D, SEG, selective_scan_triton

F32, F64 = torch.float32, torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the kernels run
TOL = {F64: 1e-12, F32: 1e-5}  # the largest error over the largest value of each output and gradient
SHORT_SEG = 8  # tokens per segment in most tests: several segments in a few tokens (the interpreter runs every
#                token of a segment, padding included, in Python)


@pytest.fixture
def short_segments(monkeypatch):
    monkeypatch.setattr(triton_scan, "SEG", SHORT_SEG)


def recurrence_inputs(B, L, D, N, dtype, h0: bool, seed=0):
    """The scan's own inputs (x = delta u, delta, A^T, B, C, h0), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x = {"x": r(B, L, D), "delta": torch.rand(B, L, D, generator=g, dtype=dtype) * 0.5,
         "At": -torch.rand(N, D, generator=g, dtype=dtype) * 2, "Bm": r(B, L, N), "Cm": r(B, L, N),
         "h0": r(B, N, D) if h0 else None}
    return {k: None if v is None else v.to(DEVICE).requires_grad_() for k, v in x.items()}


def outputs_and_grads(scan, x: dict, seed=1):
    """(y, last) and the gradient of a random projection of both (through the last state too) for every input."""
    y, last = scan(*x.values())
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in (y, last))
    leaves = [t for t in x.values() if t is not None]
    return [y, last, *torch.autograd.grad(loss, leaves)]


def assert_close(ours, ref, tol, names):
    for name, a, b in zip(names, ours, ref):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= tol, f"{name}: {err:.2e}"


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("B,L,D,N,h0,seg", [
    (2, 2 * SHORT_SEG + 3, BLOCK_D + 8, 16, True, SHORT_SEG),  # 3 segments, the last short; a partial 2nd block
    (1, 5, 7, 3, False, SEG),  # shorter than a segment; N not a power of two
    (1, 2 * SEG, BLOCK_D, 4, True, SEG),  # whole segments of the default length, one whole block
])
def test_triton_scan_equals_the_chunked_scan_forward_and_backward(B, L, D, N, h0, seg, dtype, monkeypatch):
    monkeypatch.setattr(triton_scan, "SEG", seg)
    x = recurrence_inputs(B, L, D, N, dtype, h0)
    ours = outputs_and_grads(selective_scan_triton, x)
    ref = outputs_and_grads(lambda *a: ChunkedScan.apply(*a, 16, EAGER_STEPS), x)
    names = ["y", "last", *(k for k, v in x.items() if v is not None)]
    assert_close(ours, ref, TOL[dtype], names)


def test_without_a_gradient_the_forward_keeps_no_states_and_gives_the_same_numbers(short_segments):
    x = recurrence_inputs(2, SHORT_SEG + 3, 12, 16, F64, h0=True)
    with_grad = selective_scan_triton(*x.values())
    with torch.no_grad():
        without = selective_scan_triton(*x.values())
    for a, b in zip(with_grad, without):
        assert torch.equal(a.detach(), b)


def test_selective_scan_with_the_triton_kernel_equals_the_chunked_one(short_segments):
    """selective_scan(kernel="triton") around the kernel: softplus(delta + bias), D, z, the initial state (B, D, N)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    B, L, D, N = 2, 19, 12, 16
    x = {"u": r(B, L, D), "delta": 0.5 * r(B, L, D), "A": -torch.rand(D, N, generator=g, dtype=F64) * 4,
         "B": r(B, L, N), "C": r(B, L, N), "D": r(D), "z": r(B, L, D), "delta_bias": 0.5 * r(D),
         "initial_state": r(B, D, N)}
    x = {k: v.to(DEVICE).requires_grad_() for k, v in x.items()}
    runs = [selective_scan(**x, return_last_state=True, kernel=k) for k in ("triton", "chunked")]
    grads = [torch.autograd.grad(sum((o * (i + 1.5)).sum() for i, o in enumerate(run)), list(x.values()))
             for run in runs]
    assert_close([*runs[0], *grads[0]], [*runs[1], *grads[1]], TOL[F64], ["y", "last", *x])


def test_the_kernel_refuses_mixed_or_half_dtypes():
    x = recurrence_inputs(1, 4, 4, 4, F32, h0=False)
    with pytest.raises(ValueError, match="one dtype, fp32 or fp64"):
        selective_scan_triton(x["x"], x["delta"].double(), x["At"], x["Bm"], x["Cm"])
    with pytest.raises(ValueError, match="one dtype, fp32 or fp64"):
        selective_scan_triton(*(t.bfloat16() for t in (x["x"], x["delta"], x["At"], x["Bm"], x["Cm"])))


def test_the_scan_operators_pass_opcheck(short_segments):
    """The scan is two torch.library operators (forward, backward) so that torch.compile(model) traces around the
    kernels: their schema, fake (shape-only) versions, autograd registration and AOT dispatch, as
    torch.library.opcheck checks them, with and without an initial state."""
    for h0 in (True, False):
        x = recurrence_inputs(1, SHORT_SEG + 3, 12, 4, F32, h0)
        torch.library.opcheck(triton_scan.mamba_scan, (*x.values(), True))


def tiny_mamba(backend: str) -> ModelConfig:
    return ModelConfig("mamba", 61, 32, 2, 2, 64, 256, options={"backend": backend, "chunk_size": 16})


def assert_triton_equals_torch(config, B: int, T: int):
    """The model of config("triton") against config("torch") from the same weights: the output (fp32) and every
    parameter's gradient."""
    torch.manual_seed(0)
    ref = build_model(config("torch")).to(DEVICE)
    ours = build_model(config("triton")).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    assert ours.backends() == {"ssm": "triton"}
    idx = torch.randint(0, 61, (B, T), device=DEVICE)
    out_ref, out = ref(idx), ours(idx)
    assert ((out - out_ref).abs().max() / out_ref.abs().max()).item() < 1e-5
    out_ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        assert ((p.grad - p_ref.grad).abs().max() / p_ref.grad.abs().max()).item() < 1e-4, name


def decode_error(model, B: int, T: int) -> float:
    """A prefill of 11 tokens, two tokens one at a time, then a prefill of the rest from that state, against one
    prefill of all T: the largest difference over the largest output."""
    idx = torch.randint(0, 61, (B, T), device=DEVICE)
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(B, T)
        parts = [model(idx[:, :11], state), model(idx[:, 11:12], state), model(idx[:, 12:13], state),
                 model(idx[:, 13:], state)]
    return ((torch.cat(parts, dim=1) - full).abs().max() / full.abs().max()).item()


def test_the_layer_with_backend_triton_equals_backend_torch_forward_and_every_parameter_gradient(short_segments):
    assert_triton_equals_torch(tiny_mamba, 2, 2 * SHORT_SEG + 5)


def test_decode_after_a_triton_prefill_equals_one_prefill(short_segments):
    """The first prefill ends mid-segment; the last one starts from the kernel's initial state. fp64."""
    torch.manual_seed(0)
    model = build_model(tiny_mamba("triton")).double().to(DEVICE).eval()
    assert decode_error(model, 2, 30) < 1e-12


@pytest.mark.slow  # torch.compile: inductor from a cold cache (on a GPU, `make gpu-check` runs it)
def test_compiled_model_equals_eager_forward_and_every_parameter_gradient(short_segments):
    """trainer.compile=model: torch.compile traces the mixer around the scan's operators (one graph): the same
    outputs and parameter gradients as the eager model."""
    torch.manual_seed(0)
    eager = build_model(tiny_mamba("triton")).to(DEVICE)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    idx = torch.randint(0, 61, (2, 2 * SHORT_SEG + 5), device=DEVICE)
    outs = [m(idx) for m in (eager, compiled)]
    assert ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item() < 1e-5
    for out in outs:
        out.square().mean().backward()
    for (name, p), p_c in zip(eager.named_parameters(), compiled.parameters()):
        assert ((p_c.grad - p.grad).abs().max() / p.grad.abs().max()).item() < 1e-4, name


# -- Mamba-2: mamba-ssm's Triton SSD (backend=triton) ---------------------------------------------------------

@pytest.fixture
def ssd_here(monkeypatch):
    """mamba-ssm's Triton SSD on this machine's device. Its autotuner's timing is answered here (every config ties,
    so the first one runs): these tests check the wiring and the math, and compile one config per kernel instead of
    timing a dozen. On CPU, under the interpreter, its two other CUDA calls outside the kernels are answered too:
    the device guard around each launch (a no-op) and the SM count one backward grid is sized by. The kernels' code
    itself runs unchanged."""
    monkeypatch.setattr(Autotuner, "do_bench", property(lambda self: lambda fn, quantiles=None: [1.0, 1.0, 1.0]))
    if torch.cuda.is_available():
        if layers.triton_ssd() is None:  # a GPU machine without mamba-ssm: `make gpu-wheels` brings it
            pytest.skip("mamba-ssm is not installed here")
        return
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=4))
    monkeypatch.setattr(layers, "triton_ssd_unavailable", lambda: None)


def tiny_mamba2(backend: str) -> ModelConfig:
    """One block of 4 heads of 16 in 2 groups sharing B and C, chunks of 16."""
    return ModelConfig("mamba2", 61, 32, 1, 2, 64, 256, options={"backend": backend, "chunk_size": 16,
                                                                  "headdim": 16, "d_state": 32, "ngroups": 2})


def test_mamba2_with_backend_triton_equals_backend_torch_forward_and_every_parameter_gradient(ssd_here):
    """Three chunks, the last one partial."""
    assert_triton_equals_torch(tiny_mamba2, 2, 41)


def test_mamba2_decode_after_a_triton_prefill_equals_one_prefill(ssd_here):
    """The first prefill ends mid-chunk, the two single tokens run ours, the last prefill starts from the SSD's
    initial state and our conv's carried inputs. fp32."""
    torch.manual_seed(0)
    model = build_model(tiny_mamba2("triton")).to(DEVICE).eval()
    assert decode_error(model, 1, 30) < 1e-5


def test_mamba_ssm_without_its_cuda_build_still_gives_its_triton_ssd():
    """mamba-ssm's __init__ imports its CUDA extension, which an install with MAMBA_SKIP_CUDA_BUILD lacks (as this
    CPU machine's; tests/test_mamba.py stubs it for its oracles, so this runs in a fresh process)."""
    if importlib.util.find_spec("mamba_ssm") is None:  # a GPU machine without it: `make gpu-wheels` brings it
        pytest.skip("mamba-ssm is not installed here")
    code = ("from architectures.mamba.layers import triton_ssd; f = triton_ssd(); "
            "assert f is not None and f.__name__ == 'mamba_chunk_scan_combined', f")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# -- launch settings and their benchmark --------------------------------------------------------------------

def test_launch_settings_apply_inside_and_are_checked():
    x = torch.zeros(2, 8, 256)
    warps = triton_scan.NUM_WARPS
    assert triton_scan._grid(x) == (2, 256 // BLOCK_D)
    with triton_scan.launch_settings(BLOCK_D=128, NUM_WARPS=1):
        assert triton_scan._grid(x) == (2, 2) and triton_scan.NUM_WARPS == 1
    assert triton_scan._grid(x) == (2, 256 // BLOCK_D) and triton_scan.NUM_WARPS == warps
    for bad in ({"BLOCK_D": 48}, {"NUM_WARPS": 32}, {"WARPS": 2}):
        with pytest.raises(ValueError, match="launch setting"):
            with triton_scan.launch_settings(**bad):
                pass


@pytest.mark.slow  # 12 s on 2 cores under the interpreter; `make test-kernels` and gpu-check's kernel tests run it
def test_launch_variants_benchmark_times_every_setting_with_the_same_numbers(tmp_path):
    """bench/ttt_kernel_speed.py --variants mamba: each BLOCK_D x warps setting timed, with its output and du
    against the default's. The per-channel math is the same, so they agree up to the order of fp32 sums over N
    (exactly, under the interpreter)."""
    import json

    from bench.ttt_kernel_speed import MAMBA_VARIANTS, main

    assert main(["--smoke", "--variants", "mamba", "--lengths", "32", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench" / "ttt_kernel_variants.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == MAMBA_VARIANTS * 2
    assert all(r["status"] == "ok" for r in rows) and {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        errors = [r["out_rel_rmse"]] + ([r["dq_rel_rmse"]] if r["mode"] == "fwd+bwd" else [])
        assert all(e == 0 if DEVICE.type == "cpu" else e < 1e-5 for e in errors), r
