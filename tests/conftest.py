import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# OpenMP's spin-waiting bounded before torch loads, as `import bench` does for the entry points
from bench.threads import configure_openmp  # noqa: E402

configure_openmp()

# Triton kernels run on CPU under the interpreter; it must be chosen before a kernel is defined
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs the tests in several processes (pytest-xdist): each takes its share of the cores, as
# two processes of two threads each on two cores would make every parallel op wait for a descheduled thread
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    from bench.threads import cpu_cores  # noqa: E402

    torch.set_num_threads(max(1, cpu_cores() // _workers))

# generated evaluation sets (tasks/cache.py) and the C++ kernels (architectures/cpp_kernels.py) go to a fresh
# directory, not the user's cache, removed when the process that made it exits (pytest-xdist's workers inherit it)
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "TTT_BENCH_CACHE" not in os.environ:
    os.environ["TTT_BENCH_CACHE"] = tempfile.mkdtemp(prefix="ttt-bench-cache-")
    atexit.register(shutil.rmtree, os.environ["TTT_BENCH_CACHE"], ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """The versions the tests ran under, shown under -q too (`make test-kernels TRITON=3.6.0` puts another Triton
    first on the path)."""
    try:
        import triton

        where = f"triton {triton.__version__} ({Path(triton.__file__).parent})"
    except ImportError:
        where = "triton not installed"
    mode = "CUDA" if torch.cuda.is_available() else "the interpreter (TRITON_INTERPRET=1)"
    terminalreporter.write_line(f"torch {torch.__version__}, {where}, Triton kernels on {mode}")
