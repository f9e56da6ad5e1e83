"""backend=cpp: Mamba-1's selective scan as one sequential C++ pass over the sequence, for CPU tensors.

scan.py's chunked schedule keeps Python's loops short, but on a CPU every position of it still reads and
writes a (D, N) state per token through memory, several times (local scans, true scans, and their adjoints).
`cpu_scan.cpp` instead walks each sequence once per tile of 32 channels with the tile's (N, 32) state in
cache, vectorised over the channels (glibc's vector exp). The forward keeps a state every 64 tokens
(1/64 of the chunked scan's saved states); the backward recomputes one 64-token segment at a time and runs
the adjoint back over it. The jobs, (sequence, tile) pairs, run on torch.get_num_threads() threads.
Measured on 2 cores (cpu-xs Mamba at 8k: B 1, L 8192, D 394, N 16, fp32), forward + backward of one layer's
scan: 52 ms here against 200 ms for the chunked scan with compiled loop bodies (/tmp script, this session).

The library is compiled on first use with the C++ compiler `$CXX` (default `c++`) and cached under
$TTT_BENCH_CACHE (default ~/.cache/ttt-bench) by a hash of the source, the flags, the compiler and the host
(it is built for this host's CPU: -march=native). `unavailable()` says why it cannot be built or loaded;
backend=auto then takes the chunked scan, and backend=cpp raises with that reason. The math is the chunked
scan's (same inputs, same gradients, fp32 or fp64); tests/test_mamba.py checks it against mamba-ssm's
selective_scan_ref and a step-by-step reference, forward and backward.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from architectures.backends import BackendUnavailable

SOURCE = Path(__file__).with_name("cpu_scan.cpp")
# -ffast-math lets the compiler vectorise exp (glibc's libmvec) and the sums over channels. It goes to the
# compile step only: a shared library *linked* with it pulls in crtfastmath.o, which switches the whole process
# to flushing denormals to zero when the library loads (gcc 12; tests/test_mamba.py checks it does not).
# On x86 the widest vectors pay (AVX-512 where present; gcc's -march=native otherwise keeps to 256 bits):
# 11 against 16 ms for the forward at the shape above.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c++17",
                 *(["-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64") else []))
LINK_FLAGS = ("-shared", "-pthread")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def cache_dir() -> Path:
    root = os.environ.get("TTT_BENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ttt-bench"
    return Path(root) / "kernels"


def _build(so: Path) -> None:
    """Compile and link SOURCE into `so` (atomically: concurrent runs may build the same library)."""
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        obj, lib = Path(tmp) / "scan.o", Path(tmp) / so.name
        for cmd in ([compiler(), *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                    [compiler(), *LINK_FLAGS, str(obj), "-o", str(lib)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise OSError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-600:]}")
        os.replace(lib, so)


@lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library, or None and why not."""
    try:
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *COMPILE_FLAGS, *LINK_FLAGS, compiler(),
                                        platform.node(), platform.machine()]).encode()).hexdigest()[:16]
        so = cache_dir() / f"mamba_scan-{key}.so"
        if not so.exists():
            _build(so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:  # no compiler, a failed build, an unloadable library
        return None, (f"needs a C++ compiler (CXX={compiler()}) to build {SOURCE.name}: {e}")
    for fn in (lib.mamba_scan_tile, lib.mamba_scan_segment):
        fn.restype = ctypes.c_int64
    return lib, None


def unavailable() -> str | None:
    """None when the kernel runs here, else why not ("needs ...")."""
    return _library()[1]


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _lib() -> ctypes.CDLL:
    lib, why = _library()
    if lib is None:
        raise BackendUnavailable(f"Mamba backend=cpp {why}")
    return lib


def _call(name: str, dtype: torch.dtype, *args) -> None:
    """mamba_scan_{name}_{f32|f64}(*args): tensors (or None) as pointers, ints as int64."""
    fn = getattr(_lib(), f"mamba_scan_{name}_{DTYPES[dtype]}")
    fn(*(ctypes.c_int64(a) if isinstance(a, int) else _ptr(a) for a in args))


def _forward(x, delta, At, Bm, Cm, h0, keep_states: bool):
    """y (B, L, D), the last state (B, N, D) and, if keep_states, the state every segment (B, L/SEG, N, D)."""
    (Bsz, L, D), N = x.shape, At.shape[0]
    seg = _lib().mamba_scan_segment()
    y, last = torch.empty_like(x), x.new_empty(Bsz, N, D)
    ckpt = x.new_empty(Bsz, -(-L // seg), N, D) if keep_states else None
    _call("forward", x.dtype, x, delta, At, Bm, Cm, h0, y, last, ckpt, Bsz, L, D, N, torch.get_num_threads())
    return y, last, ckpt


class SelectiveScanCpp(torch.autograd.Function):
    """(x = delta * u, delta, A^T, B, C, h0) -> (y = sum_n C h, last state), as scan.ChunkedScan."""

    @staticmethod
    def forward(ctx, x, delta, At, Bm, Cm, h0):
        y, last, ckpt = _forward(x, delta, At, Bm, Cm, h0, keep_states=True)
        ctx.save_for_backward(x, delta, At, Bm, Cm, ckpt)
        ctx.has_h0 = h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, delta, At, Bm, Cm, ckpt = ctx.saved_tensors
        (Bsz, L, D), N = x.shape, At.shape[0]
        tiles = -(-D // _lib().mamba_scan_tile())
        dx, ddelta, dA, dh0 = torch.empty_like(x), torch.empty_like(x), x.new_empty(Bsz, N, D), x.new_empty(Bsz, N, D)
        dB, dC = x.new_empty(Bsz, tiles, L, N), x.new_empty(Bsz, tiles, L, N)  # per tile of channels: summed below
        _call("backward", x.dtype, x, delta, At, Bm, Cm, ckpt, dy.contiguous(), dlast.contiguous(), dx, ddelta, dA,
              dB, dC, dh0, Bsz, L, D, N, torch.get_num_threads())
        return dx, ddelta, dA.sum(0), dB.sum(1), dC.sum(1), dh0 if ctx.has_h0 else None


def selective_scan_cpp(x, delta, At, Bm, Cm, h0=None):
    """x, delta (B, L, D); At = A^T (N, D); Bm, Cm (B, L, N); h0 (B, N, D) or None, all CPU tensors of one
    dtype (fp32 or fp64). Returns y (B, L, D) = sum_n C h and the last state (B, N, D)."""
    args = (x, delta, At, Bm, Cm, h0)
    given = [t for t in args if t is not None]
    if any(t.device.type != "cpu" for t in given) or any(t.dtype != x.dtype for t in given) or x.dtype not in DTYPES:
        raise ValueError("the cpp scan takes CPU tensors of one dtype, fp32 or fp64; got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in given))
    args = tuple(None if t is None else t.contiguous() for t in args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return SelectiveScanCpp.apply(*args)
    return _forward(*args, keep_states=False)[:2]
