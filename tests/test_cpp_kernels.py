"""architectures/cpp_kernels.py: how the C++ CPU kernels are built and whose threads run their jobs."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architectures import cpp_kernels
from architectures.cpp_kernels import Strided
from architectures.mamba import cpu_scan as mamba_scan
from architectures.ttt import cpu_scan as ttt_scan

ROOT = Path(__file__).resolve().parent.parent


def test_the_kernels_run_on_pytorchs_own_openmp_threads():
    """Built with OpenMP (GCC, as `make install` expects), the libraries take the libgomp PyTorch loaded: one
    OpenMP runtime in the process, so no second pool of threads waits beside PyTorch's (parallel_jobs.h). A
    fresh process: nothing else loaded first."""
    code = ("import torch; from architectures import cpp_kernels as c; from architectures.ttt import cpu_scan as t; "
            "from architectures.mamba import cpu_scan as m; print(t.KERNEL.threads(), m.KERNEL.threads(), "
            "c.openmp_shared_with_torch(c.compiler())); "
            "print(*sorted({l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l}), sep='\\n')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    threads, shared = lines[0].rsplit(" ", 1)  # shared: False only with another compiler than GCC
    assert threads == ("openmp openmp" if shared == "True" else "per call per call")
    runtimes = [line for line in lines[1:] if line]
    torch_lib = (Path(torch.__file__).parent / "lib").resolve()  # /proc/self/maps names files by their real path
    assert len(runtimes) == 1 and Path(runtimes[0]).parent == torch_lib, runtimes  # (a venv may be a symlink)


@pytest.fixture
def per_call_libraries(monkeypatch, tmp_path):
    """The kernels built without OpenMP (threads started per call), in a cache of their own."""
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_kernels, "OPENMP_FLAGS", ())
    libs = {mod: cpp_kernels.Library(mod.KERNEL.source, mod.KERNEL.backend) for mod in (ttt_scan, mamba_scan)}
    assert all(lib.threads() == "per call" for lib in libs.values())
    return libs


def _mamba_scan(L=40, Bsz=3, D=70, N=16):
    """y, last and the gradients of the Mamba scan (3 x 3 tiles of channels: several jobs per thread)."""
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(Bsz, L, D, generator=g), torch.rand(Bsz, L, D, generator=g)
    At, Bm, Cm = -torch.rand(N, D, generator=g), torch.randn(Bsz, L, N, generator=g), torch.randn(Bsz, L, N, generator=g)
    leaves = [t.requires_grad_() for t in (x, delta, At, Bm, Cm)]
    y, last = mamba_scan.selective_scan_cpp(*leaves)
    grads = torch.autograd.grad((y * torch.randn(y.shape, generator=g)).sum() + last.sum(), leaves)
    return [y, last, *grads]


def _ttt_infer(Bsz=2, H=3, n=4, c=16, f=32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    q, k, v = r(Bsz, H, n * c, f), r(Bsz, H, n * c, f), r(Bsz, H, n * c, f)
    return ttt_scan.infer(q, k, v, torch.rand(Bsz, H, n * c, generator=g), torch.rand(c, generator=g), 1 + 0.1 * r(H, f), 0.1 * r(H, f), 0.1 * r(1, H, f, f),
                          torch.zeros(1, H, 1, f))


def test_openmp_and_threads_started_per_call_compute_the_same(per_call_libraries, monkeypatch):
    """Each job is one (sequence, head) or (sequence, tile of channels), computed alone: whoever runs it,
    the numbers are the same, bit for bit, on 2 threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    ours = {"ttt": _ttt_infer(), "mamba": _mamba_scan()}
    monkeypatch.setattr(ttt_scan, "KERNEL", per_call_libraries[ttt_scan])
    monkeypatch.setattr(mamba_scan, "KERNEL", per_call_libraries[mamba_scan])
    per_call = {"ttt": _ttt_infer(), "mamba": _mamba_scan()}
    for name in ours:
        for a, b in zip(ours[name], per_call[name], strict=True):
            assert torch.equal(a, b), name


def _wrapped_compiler(tmp_path, name: str, prologue: str) -> Path:
    """A shell script that runs `prologue` on its arguments, then the real c++."""
    cxx = tmp_path / name
    cxx.write_text(f'#!/bin/sh\n{prologue}\nexec c++ "$@"\n')
    cxx.chmod(cxx.stat().st_mode | stat.S_IEXEC)
    return cxx


@pytest.mark.parametrize("name,prologue", [
    # refuses -fopenmp (Apple's clang without libomp)
    ("cxx-without-openmp", 'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported: -fopenmp" >&2; exit 1; }; '
                           'done'),
    # says it is clang: its -fopenmp would link libomp, a second runtime beside PyTorch's libgomp
    ("clang-like", '[ "$1" = -dM ] && { echo "#define __GNUC__ 4"; echo "#define __clang__ 1"; exit 0; }'),
])
def test_a_compiler_without_pytorchs_openmp_builds_the_per_call_threads(monkeypatch, tmp_path, name, prologue):
    cxx = _wrapped_compiler(tmp_path, name, prologue)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path / "cache"))
    assert cpp_kernels.openmp_shared_with_torch(str(cxx)) == (name == "cxx-without-openmp")
    lib = cpp_kernels.Library(mamba_scan.KERNEL.source, mamba_scan.KERNEL.backend)  # the smaller build (1 s)
    assert lib.unavailable() is None
    assert lib.threads() == "per call"
    assert len(os.listdir(tmp_path / "cache" / "kernels")) == 1  # the build without OpenMP, nothing half-made


def test_processes_that_need_a_library_at_once_build_it_once(tmp_path):
    """Two processes loading one library from an empty cache at the same moment (as pytest-xdist's workers or a
    JOBS=2 sweep start): one builds it while the other waits on kernels.lock, then loads what was built. The
    compiler here logs each object it compiles and takes a second over it, so the two would overlap without the
    lock: 4 objects compiled (2 per build) instead of 2."""
    log, go = tmp_path / "compiled.log", tmp_path / "go"
    cxx = _wrapped_compiler(tmp_path, "slow-cxx", f'case " $* " in *" -c "*) echo "$*" >> "{log}"; sleep 1;; esac')
    loader = ("import pathlib, time\n"
              "from architectures.mamba import cpu_scan\n"
              "print('ready', flush=True)\n"
              f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
              "print(cpu_scan.KERNEL.unavailable())\n")
    env = {**os.environ, "CXX": str(cxx), "TTT_BENCH_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", loader], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        go.touch()  # both start loading now
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [out.strip() for out, _ in outs] == ["None", "None"], outs  # both loaded it
    assert len(log.read_text().splitlines()) == 2, log.read_text()  # one build: its fp32 and fp64 objects
    assert len(os.listdir(tmp_path / "cache" / "kernels")) == 1


@pytest.mark.parametrize("bad", ["strided", "fp16", "mixed"])
def test_a_call_takes_only_contiguous_cpu_tensors_of_one_float_dtype(bad):
    """The kernels read raw memory: a strided view not marked Strided, a dtype without an entry point, or tensors
    of two dtypes (Strided ones included) are a ValueError before any pointer is passed. A good call after it runs
    (the entry point's types were set once)."""
    q, k, v = (torch.randn(2, 3, 64, 32) for _ in range(3))
    args = dict(a=torch.rand(2, 3, 64), tok=torch.rand(16), gamma=torch.ones(3, 32), beta=torch.zeros(3, 32),
                W0=torch.zeros(1, 3, 32, 32), b0=torch.zeros(1, 3, 1, 32))
    rows = (q.stride(0), q.stride(1), q.stride(2))
    if bad == "strided":
        W = torch.zeros(2, 3, 32, 32).transpose(-1, -2)
        call = lambda: ttt_scan.KERNEL.call("ttt_linear_scan_infer", torch.float32, Strided(q), Strided(k), Strided(v),
                                            *rows, Strided(args["a"]), 192, 64, 1, args["tok"], args["gamma"],
                                            args["beta"], W, torch.zeros(2, 3, 32), Strided(torch.empty_like(k)),
                                            *rows, 4, 6, 3, 16, 32, 1)
        match = "contiguous CPU tensors"
    elif bad == "fp16":
        call = lambda: ttt_scan.infer(q.half(), k.half(), v.half(), *args.values())
        match = "fp32 or fp64"
    else:
        call = lambda: ttt_scan.KERNEL.call("ttt_linear_scan_infer", torch.float32, Strided(q), Strided(k.double()))
        match = "torch.float64 on cpu"
    with pytest.raises(ValueError, match=match):
        call()
    out, W, b = ttt_scan.infer(q, k, v, *args.values())
    assert out.shape == q.shape and torch.isfinite(out).all() and W.shape == (2, 3, 32, 32)


def test_inference_reads_any_layout_of_its_inputs():
    """cpu_scan.infer reads q, k, v and a where they lie when q, k, v share a layout with a unit stride along the
    head dim (the layer's head-transposed views); q in another layout (here: transposed rows) is copied first. The
    numbers are those of contiguous inputs, bit for bit, and the output is laid out (B, T, H, f)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 64, 32, generator=g) for _ in range(3))
    a = torch.rand(2, 3, 64, generator=g)
    W0 = 0.1 * torch.randn(1, 3, 32, 32, generator=g)
    rest = (torch.rand(16, generator=g), torch.ones(3, 32), torch.zeros(3, 32), W0, torch.zeros(1, 3, 1, 32))
    want = ttt_scan.infer(q, k, v, a, *rest)
    assert want[0].transpose(1, 2).is_contiguous()
    q_rows_transposed = q.mT.contiguous().mT  # the same values, a stride of 64 along the head dim
    a_as_the_layer = a.mT.contiguous().mT  # (B, H, T) laid out (B, T, H), as the layer's key factor
    for got in (ttt_scan.infer(q_rows_transposed, k, v, a, *rest), ttt_scan.infer(q, k, v, a_as_the_layer, *rest)):
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)


def test_a_failed_build_says_which_command_failed_and_why(monkeypatch, tmp_path):
    """The two objects (one per dtype) compile at once; one failing is the library's reason it is unavailable,
    and nothing half-made stays in the cache."""
    cxx = _wrapped_compiler(tmp_path, "fails-on-f64", 'case "$*" in *-DKERNEL_ONLY_F64*) '
                                                     'echo "error: no room for doubles" >&2; exit 1;; esac')
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path / "cache"))
    lib = cpp_kernels.Library(mamba_scan.KERNEL.source, mamba_scan.KERNEL.backend)
    why = lib.unavailable()
    assert "-DKERNEL_ONLY_F64" in why and "error: no room for doubles" in why, why
    assert os.listdir(tmp_path / "cache" / "kernels") == []
