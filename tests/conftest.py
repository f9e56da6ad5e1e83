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

# generated evaluation sets (tasks/cache.py) go to a fresh directory, not the user's cache
import tempfile  # noqa: E402

os.environ.setdefault("TTT_BENCH_CACHE", tempfile.mkdtemp(prefix="ttt-bench-cache-"))
