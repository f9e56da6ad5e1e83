"""Mamba and Mamba-2: our PyTorch scan, our C++ scan (backend=cpp) and SSD against mamba-ssm's own pure-PyTorch
oracles (forward and backward), decoding against prefill, causality, backends, FLOPs, and LMs that learn.

mamba-ssm's CPU install lacks its CUDA extension; an empty `selective_scan_cuda` module lets its
reference functions import. That shim lives here, in the tests only: the model never imports mamba-ssm
on CPU."""
import sys
import types
from pathlib import Path

import pytest
import torch

from architectures import ModelConfig, build_model
from architectures.backends import BackendUnavailable
from architectures.mamba import cpu_scan
from architectures.mamba.layers import resolve_backend
from architectures.mamba.scan import EAGER_STEPS, ChunkedScan, compiled_steps, selective_scan
from architectures.mamba.ssd import ssd_chunked

sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: E402
from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref  # noqa: E402

F64, F32 = torch.float64, torch.float32
CONF = Path(__file__).resolve().parent.parent / "conf"
LENGTHS = [1, 37, 64, 130, 256]


def scan_inputs(L, dtype, Bsz=2, D=12, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return {
        "u": r(Bsz, L, D), "delta": 0.5 * r(Bsz, L, D), "A": -torch.rand(D, N, generator=g, dtype=dtype) * 4,
        "B": r(Bsz, L, N), "C": r(Bsz, L, N), "D": r(D), "z": r(Bsz, L, D), "delta_bias": 0.5 * r(D),
    }


def grads_of(out, leaves, seed=1):
    """Gradients of a random projection of the outputs: every output element gets its own weight."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
    return torch.autograd.grad(loss, leaves)


def assert_close(a, b, rtol):
    scale = b.abs().max().clamp(min=1.0)
    assert (a - b).abs().max() <= rtol * scale, f"max err {(a - b).abs().max():.3g}, scale {scale:.3g}"


def transposed(t):
    return t.transpose(1, 2)  # (B, L, C) <-> (B, C, L): mamba-ssm's layout


# -- Mamba's selective scan ---------------------------------------------------------------------

def assert_matches_selective_scan_ref(L, D=12, **scan_options):
    """Forward and every gradient of selective_scan against mamba-ssm's selective_scan_ref (fp32)."""
    x = {k: v.requires_grad_() for k, v in scan_inputs(L, F32, D=D).items()}
    ours = selective_scan(**x, delta_softplus=True, return_last_state=True, **scan_options)
    ref_y, ref_last = selective_scan_ref(transposed(x["u"]), transposed(x["delta"]), x["A"], transposed(x["B"]),
                                         transposed(x["C"]), x["D"], transposed(x["z"]), x["delta_bias"],
                                         delta_softplus=True, return_last_state=True)
    ref = (transposed(ref_y), ref_last)
    for a, b in zip(ours, ref):
        assert_close(a, b, 1e-5)
    for a, b in zip(grads_of(ours, list(x.values())), grads_of(ref, list(x.values()))):
        assert_close(a, b, 1e-4)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_scan_matches_selective_scan_ref_fp32(L, chunk):
    """The chunked scan, forward and every gradient, against selective_scan_ref (which computes in fp32)."""
    assert_matches_selective_scan_ref(L, chunk_size=chunk)


def reference_by_steps(x, h0):
    """fp64 oracle: mamba-ssm's selective_state_update_ref (the decode step, no dtype casts) token by
    token. It updates the state in place, so it is a forward oracle only."""
    state = h0.clone()
    ys = [selective_state_update_ref(state, x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t], x["C"][:, t],
                                     x["D"], x["z"][:, t], x["delta_bias"], dt_softplus=True)
          for t in range(x["u"].shape[1])]
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("L", [37, 130])
def test_scan_fp64_with_initial_state_matches_stepwise_reference(L):
    x = scan_inputs(L, F64, seed=2)
    h0 = torch.randn(2, 12, 16, dtype=F64)
    ours = selective_scan(**x, delta_softplus=True, initial_state=h0, chunk_size=16, return_last_state=True)
    for a, b in zip(ours, reference_by_steps(x, h0)):
        assert_close(a, b, 1e-12)


def test_scan_backward_fp64_gradcheck():
    """The hand-written backward against finite differences, with an initial state, several chunks and
    a padded last chunk."""
    x = {k: v.requires_grad_() for k, v in scan_inputs(19, F64, Bsz=1, D=3, N=4, seed=4).items()}
    h0 = torch.randn(1, 3, 4, dtype=F64, requires_grad=True)
    names = list(x)

    def f(*leaves):
        kw = dict(zip(names, leaves[:-1]))
        return selective_scan(**kw, delta_softplus=True, initial_state=leaves[-1], chunk_size=8,
                              return_last_state=True)

    assert torch.autograd.gradcheck(f, (*x.values(), h0), eps=1e-6, atol=1e-7)


@pytest.mark.slow  # a compile each: 8-23 s from a cold cache. The compiled loop bodies run only with backend=torch
@pytest.mark.parametrize("chunk", [16, 13, 4])  # and trainer.compile=hot_path (auto: cpp on CPU, triton on CUDA)
def test_compiled_loop_bodies_match_eager(chunk):
    """trainer.compile=hot_path runs the scan's loop bodies through torch.compile: same numbers (an odd chunk
    leaves short blocks of positions; 18 chunks of 4, two blocks of chunk boundaries)."""
    x = {k: v.requires_grad_() for k, v in scan_inputs(70, F32, seed=5).items()}
    h0 = torch.randn(2, 12, 16, requires_grad=True)
    leaves = [*x.values(), h0]
    runs = [selective_scan(**x, initial_state=h0, chunk_size=chunk, return_last_state=True, steps=steps)
            for steps in (None, compiled_steps())]
    for a, b in zip(*runs):
        assert_close(a, b, 1e-6)
    for a, b in zip(grads_of(runs[0], leaves), grads_of(runs[1], leaves)):
        assert_close(a, b, 1e-5)


def test_short_sequences_take_shorter_chunks_in_prefill_and_training(monkeypatch):
    """The mixer scans with chunks of L / 64 tokens between 16 and its chunk_size (never longer than chunk_size),
    with and without a backward; selective_scan itself takes the chunk it is given (the tests above)."""
    import architectures.mamba.layers as layers
    from architectures.mamba.scan import chunk_for

    assert [chunk_for(L, 64) for L in (100, 1024, 2048, 4096, 32768)] == [16, 16, 32, 64, 64]
    assert chunk_for(1024, 8) == 8
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_size"])
        return selective_scan(*args, **kwargs)

    monkeypatch.setattr(layers, "selective_scan", spy)
    model = build_model(tiny("mamba", chunk_size=64))
    for L in (1024, 4096):
        model(torch.randint(0, 32, (1, L))).sum().backward()
        with torch.no_grad():
            model(torch.randint(0, 32, (1, L)))
    assert seen == [16] * 4 + [64] * 4  # 2 layers, with and without a backward


def test_scan_is_stable_under_strong_decay():
    """Large delta * |A| (a state reset every token) must not overflow: every factor is <= 1."""
    x = scan_inputs(130, F32, seed=3)
    x["delta_bias"] = torch.full_like(x["delta_bias"], 8.0)
    y = selective_scan(**x, delta_softplus=True, chunk_size=64)
    ref = transposed(selective_scan_ref(transposed(x["u"]), transposed(x["delta"]), x["A"], transposed(x["B"]),
                                        transposed(x["C"]), x["D"], transposed(x["z"]), x["delta_bias"],
                                        delta_softplus=True))
    assert torch.isfinite(y).all()
    assert_close(y, ref, 1e-5)


# -- Mamba's C++ scan (backend=cpp): the same contract, checked the same way ---------------------------

CPP_SHAPES = [(1, 12), (37, 12), (64, 70), (130, 33), (300, 70)]  # (L, D): segments of 64 tokens, tiles of 32 channels


@pytest.mark.parametrize("L,D", CPP_SHAPES)
def test_cpp_scan_matches_selective_scan_ref_fp32(L, D):
    """The C++ scan, forward and every gradient, against selective_scan_ref: one and several segments (the
    backward recomputes each from a saved state), a partial last segment, a partial last tile of channels."""
    assert_matches_selective_scan_ref(L, D, kernel="cpp")


@pytest.mark.parametrize("L", [37, 130])
def test_cpp_scan_fp64_with_initial_state_matches_stepwise_reference(L):
    x = scan_inputs(L, F64, seed=2)
    h0 = torch.randn(2, 12, 16, dtype=F64)
    ours = selective_scan(**x, delta_softplus=True, initial_state=h0, return_last_state=True, kernel="cpp")
    for a, b in zip(ours, reference_by_steps(x, h0)):
        assert_close(a, b, 1e-12)


def test_cpp_scan_backward_fp64_gradcheck():
    """The C++ backward against finite differences: an initial state, the last state's gradient, two segments
    (the second partial), two tiles of channels (the second partial), two sequences."""
    x = {k: v.requires_grad_() for k, v in scan_inputs(70, F64, Bsz=2, D=34, N=3, seed=4).items()}
    h0 = torch.randn(2, 34, 3, dtype=F64, requires_grad=True)
    names = list(x)

    def f(*leaves):
        kw = dict(zip(names, leaves[:-1]))
        return selective_scan(**kw, delta_softplus=True, initial_state=leaves[-1], return_last_state=True,
                              kernel="cpp")

    assert torch.autograd.gradcheck(f, (*x.values(), h0), eps=1e-6, atol=1e-7, fast_mode=True)


def test_cpp_scan_equals_chunked_scan_at_any_thread_count():
    """The kernel's jobs (sequence, tile of channels) are independent: 1 and 2 threads give the same bits (the
    kernel alone: torch's elementwise epilogue may round a tail element differently); the chunked scan agrees to
    fp32 rounding, with and without an initial state."""
    g = torch.Generator().manual_seed(6)
    Bsz, L, D, N = 3, 200, 70, 16
    r = lambda *shape: torch.randn(*shape, generator=g)
    leaves = [r(Bsz, L, D), torch.rand(Bsz, L, D, generator=g), -4 * torch.rand(N, D, generator=g), r(Bsz, L, N),
              r(Bsz, L, N), r(Bsz, N, D)]
    leaves = [t.requires_grad_() for t in leaves]  # x = delta u, delta, A^T, B, C, h0
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out = cpu_scan.selective_scan_cpp(*leaves)
            runs.append((out, grads_of(out, leaves)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]))
    for h0 in (leaves[-1], None):
        ours = cpu_scan.selective_scan_cpp(*leaves[:-1], h0)
        chunked = ChunkedScan.apply(*leaves[:-1], h0, 16, EAGER_STEPS)
        for a, b in zip(ours, chunked):
            assert_close(a, b, 1e-5)
        for a, b in zip(grads_of(ours, leaves[:-1]), grads_of(chunked, leaves[:-1])):
            assert_close(a, b, 1e-4)


def test_cpp_scan_is_stable_and_propagates_nan():
    """Strong decay (delta |A| up to about 30) stays finite; a NaN input gives NaN outputs (the library is
    compiled with -ffast-math, which must not hide a diverged run)."""
    x = scan_inputs(130, F32, seed=3)
    x["delta_bias"] = torch.full_like(x["delta_bias"], 8.0)
    y = selective_scan(**x, delta_softplus=True, kernel="cpp")
    assert torch.isfinite(y).all()
    assert_close(y, selective_scan(**x, delta_softplus=True, chunk_size=64), 1e-5)
    x["u"][0, 50, 3] = float("nan")
    y = selective_scan(**x, delta_softplus=True, kernel="cpp")
    assert torch.isnan(y[0, 50:, 3]).all() and torch.isfinite(y[1]).all()


def test_loading_the_cpp_scan_keeps_denormals():
    """-ffast-math goes to the compile step only: a library linked with it would switch the whole process to
    flushing denormals to zero when it loads (gcc's crtfastmath.o). A fresh process: the training entry
    points flush denormals on purpose (bench/denormals.py), and a test before this one may have called them."""
    import subprocess

    code = ("import torch; from architectures.mamba import cpu_scan; assert cpu_scan.unavailable() is None; "
            "print((torch.tensor(1e-40) * 1.0).item())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) != 0.0


def test_cpp_scan_takes_cpu_tensors_of_one_dtype():
    x = scan_inputs(8, F32)
    with pytest.raises(ValueError, match="CPU tensors of one dtype"):
        cpu_scan.selective_scan_cpp(x["u"], x["delta"].double(), x["A"].t(), x["B"], x["C"])


def test_without_a_compiler_auto_takes_the_chunked_scan_and_cpp_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path))
    cpu_scan.KERNEL.reset()
    try:
        assert "needs a C++ compiler" in cpu_scan.unavailable()
        if not torch.cuda.is_available():
            assert resolve_backend("auto", "mamba") == "torch"
        with pytest.raises(BackendUnavailable, match="backend=cpp needs a C\\+\\+ compiler"):
            resolve_backend("cpp", "mamba")
    finally:
        cpu_scan.KERNEL.reset()


# -- Mamba-2's SSD ------------------------------------------------------------------------------

def ssd_inputs(L, dtype, b=2, H=4, P=8, G=2, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return {"x": r(b, L, H, P), "a": -torch.rand(b, L, H, generator=g, dtype=dtype),
            "B": r(b, L, G, N), "C": r(b, L, G, N), "h0": r(b, H, P, N)}


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-11), (F32, 1e-4)])
@pytest.mark.parametrize("L", LENGTHS)
def test_ssd_matches_ssd_minimal_discrete(L, dtype, rtol):
    s = {k: v.requires_grad_() for k, v in ssd_inputs(L, dtype).items()}
    ours = ssd_chunked(s["x"], s["a"], s["B"], s["C"], 16, s["h0"])
    rep = lambda t: t.repeat_interleave(2, dim=2)  # groups -> heads, as mamba-ssm maps them
    block = 16 if L % 16 == 0 else L  # the oracle needs whole blocks; any block length is the same math
    ref = ssd_minimal_discrete(s["x"], s["a"], rep(s["B"]), rep(s["C"]), block, initial_states=s["h0"][:, None])
    for a, b in zip(ours, ref):
        assert_close(a, b, rtol)
    for a, b in zip(grads_of(ours, list(s.values())), grads_of(ref, list(s.values()))):
        assert_close(a, b, 10 * rtol)


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-11), (F32, 1e-4)])
@pytest.mark.parametrize("L,h0", [(150, True), (64, False), (3, True)])
def test_cpp_ssd_scan_matches_the_chunked_ssd(L, h0, dtype, rtol):
    """Mamba-2's SSM in C++ (cpu_scan.ssd_scan_cpp, backend=cpp: one sequential pass per sequence and head, states
    saved every 64 tokens and recomputed in the backward): y, the last state and every gradient (x, a, B, C over
    2 groups of 2 heads, h0) equal the chunked SSD's, across segments (150), on one (64), within one (3)."""
    s = ssd_inputs(L, dtype)
    leaves = [s[k].requires_grad_() for k in ("x", "a", "B", "C")] + ([s["h0"].requires_grad_()] if h0 else [])
    init = leaves[4] if h0 else None
    ours = cpu_scan.ssd_scan_cpp(*leaves[:4], init)
    ref = ssd_chunked(*leaves[:4], 16, init)
    for a, b in zip(ours, ref):
        assert_close(a, b, rtol)
    for a, b in zip(grads_of(ours, leaves), grads_of(ref, leaves), strict=True):
        assert b.abs().max() > 0
        assert_close(a, b, 10 * rtol)
    with torch.no_grad():  # without a gradient: no states kept, the same numbers
        for a, b in zip(cpu_scan.ssd_scan_cpp(*leaves[:4], init), ours):
            assert torch.equal(a, b)


@pytest.mark.slow  # 11-12 s of compiling from a cold cache; runs only with backend=torch and trainer.compile=hot_path
def test_compiled_ssd_matches_eager():
    """trainer.compile=hot_path runs the chunked SSD through torch.compile: same numbers."""
    from architectures.mamba.layers import compiled_ssd

    s = {k: v.requires_grad_() for k, v in ssd_inputs(24, F32).items()}
    runs = [fn(s["x"], s["a"], s["B"], s["C"], 16, s["h0"]) for fn in (ssd_chunked, compiled_ssd())]
    for a, b in zip(*runs):
        assert_close(a, b, 1e-5)
    for a, b in zip(grads_of(runs[0], list(s.values())), grads_of(runs[1], list(s.values()))):
        assert_close(a, b, 1e-5)


# -- the models -----------------------------------------------------------------------------------

def test_causal_conv_is_a_depthwise_conv1d():
    """layers.CausalConv, the one conv of every architecture (Mamba's, TTT's, transformer_conv's)."""
    from architectures.layers import CausalConv

    conv = CausalConv(6, 4).double()
    x, state = torch.randn(2, 9, 6, dtype=F64), torch.randn(2, 3, 6, dtype=F64)
    y, new_state = conv(x, state)
    ref = torch.nn.functional.conv1d(torch.cat([state, x], 1).transpose(1, 2), conv.weight[:, None], conv.bias,
                                     groups=6).transpose(1, 2)
    assert (y - ref).abs().max() < 1e-12 and torch.equal(new_state, x[:, -3:])


@pytest.mark.parametrize("B,T,C,k,with_state,dtype", [(2, 600, 70, 4, False, F64), (1, 5, 8, 4, True, F64),
                                                       (3, 517, 33, 3, True, F64), (2, 300, 40, 4, True, F32),
                                                       (2, 2, 8, 4, True, F64), (2, 2, 8, 4, False, F32)])
def test_cpp_causal_conv_equals_the_pytorch_ops(B, T, C, k, with_state, dtype):
    """CausalConv under a cpp backend (layers._CausalConvCpp, causal_conv.cpp): the output, the state after, and
    the gradients of x, the weights, the bias and the state before equal the k shifted multiply-adds through
    autograd. 600 and 517 tokens: several jobs of 256 rows, the last one short; 2 tokens: fewer than the k - 1
    the state holds, so the window reads the state (or zeros) past x's first row, and the state after keeps part
    of the one before."""
    from architectures.layers import CausalConv

    g = torch.Generator().manual_seed(3)
    conv = CausalConv(C, k).to(dtype)
    x = torch.randn(B, T, C, generator=g, dtype=dtype).requires_grad_()
    state = torch.randn(B, k - 1, C, generator=g, dtype=dtype).requires_grad_() if with_state else None
    dy, dstate = torch.randn(B, T, C, generator=g, dtype=dtype), torch.randn(B, k - 1, C, generator=g, dtype=dtype)
    leaves = [x, conv.weight, conv.bias] + ([state] if with_state else [])
    runs = []
    for cpp in (False, True):
        conv.cpp = cpp
        y, after = conv(x, state)
        runs.append([y, after, *torch.autograd.grad((y * dy).sum() + (after * dstate).sum(), leaves)])
    tol = 1e-12 if dtype == F64 else 1e-6  # relative to each tensor's largest entry (dw sums 600 products)
    for name, a, b in zip(["y", "state after", "dx", "dw", "dbias", "dstate"], *runs):
        assert (b - a).abs().max() <= tol * a.abs().max(), name
    with torch.no_grad():  # a prefill: the kernel's forward alone
        y, after = conv(x, state)
    assert (y - runs[0][0]).abs().max() <= tol * runs[0][0].abs().max() and torch.equal(after, runs[0][1])


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "ttt_linear", "transformer_conv"])
def test_the_convs_and_norms_run_in_cpp_exactly_where_the_layers_backend_is_cpp(arch):
    """The blocks' convs and RMSNorms (not the shell's final norm, nor Mamba-2's gated one) follow their layer's
    backend."""
    from architectures.layers import CausalConv, RMSNorm

    for backend in ("sdpa",) if arch == "transformer_conv" else ("cpp", "torch"):  # attention has no cpp
        opts = {"mamba": {"chunk_size": 16}, "mamba2": {"chunk_size": 16, "headdim": 16, "d_state": 32}}.get(arch, {})
        model = build_model(ModelConfig(arch, 61, 32, 2, 2, 64, 256, options={**opts, "backend": backend}))
        convs = [m for m in model.modules() if isinstance(m, CausalConv)]
        assert len(convs) == {"mamba": 2, "mamba2": 2, "ttt_linear": 6, "transformer_conv": 2}[arch]
        assert all(m.cpp == (backend == "cpp") for m in convs), arch
        norms = [m for m in model.blocks.modules() if isinstance(m, RMSNorm)]
        assert len(norms) == {"mamba": 2, "mamba2": 2, "ttt_linear": 6, "transformer_conv": 4}[arch]
        assert all(m.cpp == (backend == "cpp") for m in norms) and not model.norm.cpp, arch


@pytest.mark.parametrize("T", [600, 5, 3, 2, 1])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_residual_in_one_cpp_pass_equals_the_modules(T, with_state, monkeypatch):
    """layers.conv_residual, the TTT block's h + conv(norm_in(h)) and norm_out of it: with the modules' `cpp` set, in
    fp32 without a gradient, one C++ pass (causal_conv.cpp's conv_residual_forward) whose h', x and new conv state
    equal the PyTorch ops' (F.rms_norm, the conv's shifted products), from zeros or from a given state (600 tokens:
    jobs of 256 that normalise the rows before their span again; 3 = k - 1 tokens; 2 and 1 tokens, a decode step:
    the new state partly the old one's rows)."""
    import architectures.layers as layers

    g = torch.Generator().manual_seed(2)
    B, C = 2, 70
    norm_in, conv, norm_out = layers.RMSNorm(C), layers.CausalConv(C, 4), layers.RMSNorm(C)
    for p in (norm_in.weight, norm_out.weight, conv.weight, conv.bias):
        p.data = torch.randn(p.shape, generator=g)
    h = 3 * torch.randn(B, T, C, generator=g)
    state = torch.randn(B, 3, C, generator=g) if with_state else None
    with torch.no_grad():
        want = layers.conv_residual(h, norm_in, conv, norm_out, state)  # cpp unset: F.rms_norm and PyTorch's conv
        for m in (norm_in, conv, norm_out):
            m.cpp = True
        calls = []
        call = layers.CONV_KERNEL.call
        monkeypatch.setattr(layers.CONV_KERNEL, "call", lambda name, *a: calls.append(name) or call(name, *a))
        got = layers.conv_residual(h, norm_in, conv, norm_out, state)
    assert calls == ["conv_residual_forward"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 600, 70), (1, 1, 64), (3, 5, 8)])
def test_cpp_rms_norm_equals_f_rms_norm(shape, monkeypatch):
    """RMSNorm with `cpp` set (rms_norm.cpp) in fp32 equals F.rms_norm (600 rows: several jobs of 256, the last one
    short; one row: a decode step): without a gradient one C++ forward (layers._rms_norm_cpp), with one the C++
    forward and backward (layers._RMSNormCpp), its gradients those of F.rms_norm. In fp64 the PyTorch ops run."""
    import architectures.layers as layers

    calls, cpp = [], layers._rms_norm_cpp
    monkeypatch.setattr(layers, "_rms_norm_cpp", lambda *args: calls.append(args[0].shape) or cpp(*args))
    g = torch.Generator().manual_seed(0)
    norm = layers.RMSNorm(shape[-1])
    norm.weight.data = torch.randn(shape[-1], generator=g)
    norm.cpp = True
    x = (3 * torch.randn(*shape, generator=g)).requires_grad_()
    with torch.no_grad():
        got = norm(x)
    assert calls == [shape]
    want = torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    y = norm(x)
    assert type(y.grad_fn).__name__ == "_RMSNormCppBackward" and calls == [shape, shape]
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    dy = torch.randn(*shape, generator=g)
    grads = [torch.autograd.grad(out, (x, norm.weight), dy) for out in (y, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        norm.double()(x.double())
    assert calls == [shape, shape]


@pytest.mark.parametrize("shape", [(2, 600, 70), (1, 1, 64)])
def test_add_rms_norm_in_one_cpp_pass_equals_the_add_and_the_norm(shape, monkeypatch):
    """layers.add_rms_norm (a block's residual add and the norm after it): with the norm's `cpp` set, in fp32 without
    a gradient, one C++ pass whose h + y and norm equal the add and F.rms_norm (600 rows: several jobs; one row: a
    decode step); with a gradient, the add and the norm's own path, the same numbers."""
    import architectures.layers as layers

    g = torch.Generator().manual_seed(3)
    norm = layers.RMSNorm(shape[-1])
    norm.weight.data = torch.randn(shape[-1], generator=g)
    norm.cpp = True
    h, y = (3 * torch.randn(*shape, generator=g) for _ in range(2))
    want = (h + y, torch.nn.functional.rms_norm(h + y, norm.weight.shape, norm.weight, norm.eps))
    calls, call = [], layers.NORM_KERNEL.call
    monkeypatch.setattr(layers.NORM_KERNEL, "call", lambda name, *a: calls.append(name) or call(name, *a))
    with torch.no_grad():
        got = layers.add_rms_norm(h, y, norm)
    assert calls == ["rms_norm_residual_forward"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(layers.add_rms_norm(h, y, norm), want):  # with a gradient: the add, then _RMSNormCpp
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
    assert calls == ["rms_norm_residual_forward", "rms_norm_forward"]


@pytest.mark.parametrize("shape", [(2, 600, 70), (1, 1, 64), (3, 5, 8)])
def test_cpp_rms_norm_backward_equals_autograd_in_fp64(shape):
    """rms_norm.cpp's backward (layers._RMSNormCpp, dx and the per-job partial sums of dw) against autograd through
    F.rms_norm in fp64, to rounding."""
    from architectures.layers import _RMSNormCpp

    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    got = _RMSNormCpp.apply(x, w, 1e-6)
    want = torch.nn.functional.rms_norm(x, w.shape, w, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (x, w), dy), torch.autograd.grad(want, (x, w), dy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


MODELS = [("mamba", "torch"), ("mamba", "cpp"), ("mamba2", "torch"), ("mamba2", "cpp")]  # (arch, backend)


def tiny(arch, **opts):
    base = {"backend": "torch", "chunk_size": 16}
    if arch == "mamba2":
        base.update(headdim=16, d_state=32)
    return ModelConfig(arch, 61, 32, 2, 2, 64, 256, options={**base, **opts})


@pytest.mark.parametrize("arch,backend", MODELS)
def test_decode_equals_prefill(arch, backend):
    """A prefill that ends mid-chunk, tokens one at a time, then another multi-token prefill."""
    torch.manual_seed(0)
    model = build_model(tiny(arch, backend=backend)).double().eval()
    idx = torch.randint(0, 61, (2, 60))
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(2, 60)
        parts = [model(idx[:, :21], state)] + [model(idx[:, t:t + 1], state) for t in range(21, 40)]
        parts.append(model(idx[:, 40:], state))
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-10
    assert all(c.seen == 60 for c in state.caches)


@pytest.mark.parametrize("arch,backend", MODELS)
def test_causal(arch, backend):
    torch.manual_seed(0)
    model = build_model(tiny(arch, backend=backend)).double().eval()
    idx = torch.randint(0, 61, (1, 50))
    changed = idx.clone()
    changed[0, 30] = (idx[0, 30] + 1) % 61
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert (a[:, :30] - b[:, :30]).abs().max() < 1e-12
    assert (a[:, 30:] - b[:, 30:]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_special_init_survives_the_shell(arch):
    """The shell re-initialises every nn.Linear; dt and A keep Mamba's initialisation."""
    model = build_model(tiny(arch, dt_min=1e-3, dt_max=0.1))
    mixer = model.blocks[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    if arch == "mamba":
        assert torch.equal(mixer.A_log[3], torch.log(torch.arange(1, 17.0)))
        assert mixer.dt_weight.abs().max() <= mixer.dt_rank ** -0.5
    else:
        assert ((-torch.exp(mixer.A_log) <= -1) & (-torch.exp(mixer.A_log) >= -16)).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_backends(arch, monkeypatch):
    assert resolve_backend("torch", arch) == "torch"
    cpu_only = not torch.cuda.is_available()
    expected = "cpp" if cpu_only else resolve_backend("auto", arch)
    assert expected != "cpp" or cpu_only  # the C++ scans are for runs on machines without CUDA
    assert build_model(tiny(arch, backend="auto")).backends() == {"ssm": expected}
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="backend=cuda needs CUDA"):
            build_model(tiny(arch, backend="cuda"))
    if arch == "mamba":  # by name: on CUDA, or on CPU under the interpreter (TRITON_INTERPRET=1 here); auto: CUDA
        assert resolve_backend("triton", arch) == "triton" and (expected != "triton" or not cpu_only)
        if cpu_only:
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(BackendUnavailable, match="backend=triton needs triton and CUDA"):
                resolve_backend("triton", arch)
    elif cpu_only:  # mamba-ssm's Triton SSD: CUDA only (tests/test_mamba_triton.py runs it under the interpreter)
        with pytest.raises(BackendUnavailable, match="Triton SSD for Mamba-2, which needs CUDA"):
            resolve_backend("triton", arch)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tritonn", arch)


def test_layer_multiplier_doubles_the_layers():
    from omegaconf import OmegaConf

    from bench.config import arch_config, model_config

    cfg = OmegaConf.create({"arch": arch_config("mamba"), "ctx": 2048, "match": "params",
                            "size": OmegaConf.load(CONF / "size" / "125m.yaml")})
    mcfg = model_config(cfg, 50277).cfg
    assert (mcfg.n_layers, mcfg.d_model) == (24, 768) and "layer_multiplier" not in mcfg.options
    cfg.arch = arch_config("transformer")
    assert model_config(cfg, 50277).cfg.n_layers == 12


@pytest.mark.parametrize("arch,backend", MODELS)
def test_lm_learns(arch, backend):
    """A few AdamW steps on a repeating pattern: the loss falls well below its start."""
    torch.manual_seed(0)
    model = build_model(tiny(arch, backend=backend))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pattern = torch.randint(0, 61, (1, 24))
    data = pattern.repeat(4, 6)[:, :129]  # (4, 129)
    losses = []
    for _ in range(30):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
