"""Our C++ CPU kernels (backend=cpp: mamba/cpu_scan.cpp, ttt/cpu_scan.cpp, and the layers' convs and norms,
causal_conv.cpp and rms_norm.cpp): built on first use, loaded with ctypes.

Each kernel is one C++ file with `extern "C"` entry points that take raw pointers and int64 sizes (no PyTorch
headers: a build takes 1 to 4 s), plus the headers beside this module (parallel_jobs.h, rms.h).
`Library(source)` compiles it with the C++ compiler `$CXX` (default `c++`) into $TTT_BENCH_CACHE (default
~/.cache/ttt-bench)/kernels, named by a hash of the source and headers, the flags, the compiler and the host
(it is built for this host's CPU, -march=native, so hosts sharing a home directory each build their own),
and says why not (`unavailable()`) when there is no compiler or the build fails; the backends that use it
then raise with that reason, and `auto` picks another. Processes sharing a cache build each library once
(`build_lock`).

The jobs of a call (one per sequence and head, or per tile of channels) run on PyTorch's own OpenMP threads:
the library is built with -fopenmp and needs libgomp.so.1, which the loader resolves to the copy PyTorch has
already loaded (tests/test_cpp_kernels.py checks there is one). Where that would not hold (not GCC, a PyTorch
with another runtime: `openmp_shared_with_torch`), or the compiler lacks OpenMP, it is built without, and its
jobs run on threads started per call. Those queued behind PyTorch's spin-waiting thread on 2 cores; measured
in one process, interleaved, cpu-xs batch 1 prefill per token at 1k / 2k / 8k: TTT-Linear (Transformer
backbone) 3.98 / 2.92 / 2.48 us against 4.49 / 3.34 / 2.61; Mamba 7.03 / 5.96 / 5.63 against 8.31 / 6.70 / 6.08;
a training step at batch 4, 1k / 4k: TTT-Linear 66 / 262 ms against 71 / 264, Mamba the same within 1%.

-ffast-math lets the compiler vectorise exp (glibc's libmvec) and sums over a row. It goes to the compile step
only: a shared library *linked* with it pulls in crtfastmath.o, which switches the whole process to flushing
denormals to zero when the library loads (gcc 12; tests/test_mamba.py checks that loading keeps them). On x86
the widest vectors pay (AVX-512 where present; gcc's -march=native otherwise keeps to 256 bits): Mamba's scan
forward at cpu-xs 8k, 11 against 16 ms.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from functools import cached_property, lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

INCLUDE = Path(__file__).parent  # the headers the kernels share (parallel_jobs.h, rms.h)
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c++17",
                 *(["-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64") else []))
LINK_FLAGS = ("-shared", "-pthread")
OPENMP_FLAGS = ("-fopenmp",)  # tried first: the jobs then run on PyTorch's OpenMP threads (parallel_jobs.h)
DTYPES = {torch.float32: "f32", torch.float64: "f64"}  # the entry points' suffixes
# compiled at once, each with one of these macros defined (the source keeps the other dtype's entry points out):
# TTT's kernels build in 3.8 s instead of 5.9 on 2 cores
PARTS = ("KERNEL_ONLY_F32", "KERNEL_ONLY_F64")


class Strided(NamedTuple):
    """A tensor a kernel reads (or writes) at the strides the call passes beside it, in any layout: Library.call
    checks its dtype and device, and the caller what the kernel assumes of its strides."""
    tensor: torch.Tensor


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def cache_dir() -> Path:
    """$TTT_BENCH_CACHE/kernels, as tasks/cache.py keeps generated sets; TTT_BENCH_CACHE=off: a directory of
    this process's own (the kernels are still built, once per process)."""
    where = os.environ.get("TTT_BENCH_CACHE", "~/.cache/ttt-bench")
    return (Path(_private_dir()) if where == "off" else Path(where).expanduser()) / "kernels"


@lru_cache(maxsize=None)
def _private_dir() -> str:
    return tempfile.mkdtemp(prefix="ttt-bench-kernels-")


@lru_cache(maxsize=None)
def openmp_shared_with_torch(cxx: str) -> bool:
    """Whether a library that `cxx -fopenmp` links would share PyTorch's OpenMP runtime: the compiler is GCC (its
    runtime is libgomp.so.1; clang's and Intel's compilers link their own), and PyTorch has loaded a library of
    that very name (a renamed copy, libgomp-<hash>.so.1 in some wheels, would not be matched by the loader) and no
    other OpenMP runtime. Else a second pool of threads would wait beside PyTorch's. Linux only (/proc)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return False
    names = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if "omp" in line}
    if "libgomp.so.1" not in names or any(n.startswith(("libomp", "libiomp")) for n in names):
        return False
    try:
        macros = subprocess.run([cxx, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "__GNUC__" in macros and not any(m in macros for m in ("__clang__", "__INTEL_COMPILER"))


def _run_all(cmds: list[list[str]]) -> None:
    """Run the commands at once; an OSError with the first failure's command and its error."""
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for cmd in cmds]
    errors = [(cmd, p.communicate()[1]) for cmd, p in procs]  # waits for each
    for (cmd, err), (_, p) in zip(errors, procs):
        if p.returncode != 0:
            raise OSError(f"`{' '.join(cmd)}` failed: {err.strip()[-600:]}")


@contextmanager
def build_lock(kernels: Path):
    """Held while a library is built into the directory `kernels`, through the file beside it (kernels.lock):
    processes that need a library at once (pytest-xdist's workers, JOBS=2 sweeps on one cache) build it once, the
    others waiting and then loading it. Without fcntl (not POSIX) there is no lock: concurrent builds stay correct
    (Library._build replaces atomically), only repeated."""
    kernels.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(kernels.with_name(kernels.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        yield


class Library:
    """One C++ kernel file, built and loaded on first use (module docstring)."""

    def __init__(self, source: Path, backend: str):
        self.source, self.backend = source, backend  # backend: how errors name it, e.g. "Mamba backend=cpp"
        self._entries = {}  # symbol -> the loaded entry point, its argument types set

    def _build(self, so: Path, extra: tuple[str, ...]) -> None:
        """Compile and link into `so` (atomically: concurrent runs may build the same library)."""
        if extra == OPENMP_FLAGS and not openmp_shared_with_torch(compiler()):
            raise OSError(f"{compiler()} -fopenmp would not use PyTorch's OpenMP runtime (openmp_shared_with_torch)")
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            objs, lib = [Path(tmp) / f"{part}.o" for part in PARTS], Path(tmp) / so.name
            _run_all([[compiler(), *COMPILE_FLAGS, *extra, f"-I{INCLUDE}", f"-D{part}", "-c", str(self.source),
                       "-o", str(obj)] for part, obj in zip(PARTS, objs)])
            _run_all([[compiler(), *LINK_FLAGS, *extra, *map(str, objs), "-o", str(lib)]])
            os.replace(lib, so)

    @cached_property
    def _loaded(self) -> tuple[ctypes.CDLL | None, str | None, bool]:
        """(library, why not, built with OpenMP): with OPENMP_FLAGS where the compiler takes them, else without."""
        why, texts = None, None
        for extra in (OPENMP_FLAGS, ()):
            try:
                texts = texts or [p.read_text() for p in (self.source, *sorted(INCLUDE.glob("*.h")))]  # read once
                key = hashlib.sha256("\0".join([*texts, *COMPILE_FLAGS, *LINK_FLAGS, *PARTS, *extra, compiler(),
                                                platform.node(), platform.machine()]).encode()).hexdigest()[:16]
                so = cache_dir() / f"{self.source.parent.name}_{self.source.stem}-{key}.so"
                if not so.exists():
                    with build_lock(so.parent):
                        if not so.exists():  # not built while this process waited for the lock
                            self._build(so, extra)
                return ctypes.CDLL(str(so)), None, bool(extra)
            except (OSError, subprocess.SubprocessError) as e:  # no compiler, a failed build, an unloadable library
                why = f"needs a C++ compiler (CXX={compiler()}) to build {self.source.name}: {e}"
        return None, why, False

    def reset(self) -> None:
        """Forget the loaded library (tests: build again under another $CXX or cache)."""
        self.__dict__.pop("_loaded", None)
        self._entries = {}

    def unavailable(self) -> str | None:
        """None when the kernel runs here, else why not ("needs ...")."""
        return self._loaded[1]

    def threads(self) -> str:
        """Whose threads run the jobs: "openmp" (PyTorch's OpenMP threads) or "per call" (started per call)."""
        self.lib()
        return "openmp" if self._loaded[2] else "per call"

    def lib(self) -> ctypes.CDLL:
        lib, why, _ = self._loaded
        if lib is None:
            from architectures.backends import BackendUnavailable

            raise BackendUnavailable(f"{self.backend} {why}")
        return lib

    def call(self, name: str, dtype: torch.dtype, *args) -> None:
        """`{name}_{f32|f64}(*args)`: tensors (or None) as pointers, ints as int64, floats as double. The kernels
        read raw memory, so every tensor must be a contiguous CPU tensor of `dtype` (fp32 or fp64), or a `Strided`
        one of them, whose strides the call passes beside it. The entry point's argument types are set on its first
        call (a call of 22 arguments then costs about 10 us, 2 of them in ctypes, against 20 when every argument was
        wrapped per call)."""
        if dtype not in DTYPES:
            raise ValueError(f"{self.backend} takes fp32 or fp64 tensors, got {dtype}")
        values = []
        for a in args:  # one pass, as few calls per argument as can be (a call passes up to 50)
            strided = type(a) is Strided
            t = a.tensor if strided else a
            if isinstance(t, torch.Tensor):
                if t.dtype != dtype or not t.is_cpu or not (strided or t.is_contiguous()):
                    self._refuse(dtype, args)
                values.append(t.data_ptr())
            else:
                values.append(a)
        self._entry(f"{name}_{DTYPES[dtype]}", args)(*values)

    def _refuse(self, dtype: torch.dtype, args: tuple) -> None:
        """A call's tensors are not what the kernels read: say which dtypes and devices they are."""
        tensors = [x.tensor if isinstance(x, Strided) else x for x in args if isinstance(x, (torch.Tensor, Strided))]
        raise ValueError(f"{self.backend} takes contiguous CPU tensors of one dtype, fp32 or fp64; got "
                         + ", ".join(sorted({f"{t.dtype} on {t.device}" for t in tensors})))

    def _entry(self, symbol: str, args: tuple):
        """The entry point, its argument types set from the first call's arguments (tensor or None: a pointer)."""
        fn = self._entries.get(symbol)
        if fn is not None:
            return fn
        fn = self._entries[symbol] = getattr(self.lib(), symbol)
        if fn.argtypes is None:
            fn.argtypes = [ctypes.c_int64 if isinstance(a, int) else ctypes.c_double if isinstance(a, float)
                           else ctypes.c_void_p for a in args]
            fn.restype = None
        return fn

    def constant(self, name: str) -> int:
        """An int64 the library exports as a function of no arguments (a compile-time constant)."""
        fn = getattr(self.lib(), name)
        fn.restype = ctypes.c_int64
        return fn()
