"""`make check-kernels`: the TTT Triton kernels compiled for sm_90 without a GPU (ptxas ships with triton), in a
subprocess without TRITON_INTERPRET (under the interpreter `triton.jit` gives functions that do not compile)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(tmp_path, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench.kernel_compile_check", "--head-dims", "64", "--results",
                          str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads((tmp_path / "bench" / "kernel_compile_check.json").read_text())


def test_the_decode_kernel_compiles_as_launched_without_spills(tmp_path):
    """TTT-Linear's decode kernel at head dim 64 as decode_step launches it (8 warps): no spill stores (4 warps
    spilled 108 B)."""
    (row,) = check(tmp_path, "--only", "linear decode")
    assert (row["status"], row["num_warps"], row["spill_store_bytes"]) == ("ok", 8, 0), row


def test_a_launch_variant_compiles_as_asked(tmp_path):
    """--num-stages compiles the prefill kernels without software pipelining: the TTT-Linear forward at head dim
    64 and 4 warps then spills nothing (56 B at Triton's default 3 stages: triton_linear.DEFAULT_STAGES)."""
    (row,) = check(tmp_path, "--only", "linear forward", "--num-stages", "1")
    assert (row["status"], row["num_warps"], row["num_stages"], row["spill_store_bytes"]) == ("ok", 4, 1, 0), row
