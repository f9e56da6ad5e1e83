"""The Makefile's other software, read from `make -n` (nothing runs): TORCH= (another torch and the Triton it pins)
and TRITON= go first on the path of every pytest run of the tiers they name; gpu-rehearsal runs gpu-check's smoke in
a copy of the GPU machine's software."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def pytest_runs(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if "-m pytest" in line]


@pytest.mark.parametrize("target", ["test", "test-slow", "test-kernels"])
@pytest.mark.parametrize("side", ["TORCH=2.11.0", "TRITON=3.6.0"])
def test_a_side_install_goes_first_on_the_path_of_every_pytest_run(target, side):
    folder = "/.venv/" + side.lower().replace("=", "-")  # TORCH=2.11.0 -> /.venv/torch-2.11.0
    runs = pytest_runs(dry_run(target, side))
    assert runs and all('PYTHONPATH="' in line and folder in line for line in runs), runs


def test_without_one_the_tiers_run_on_our_own_torch():
    runs = pytest_runs(dry_run("test"))
    assert len(runs) == 2 and not any("PYTHONPATH=" in line for line in runs), runs


def test_torch_and_triton_together_are_refused_with_the_reason():
    out = dry_run("test", "TORCH=2.11.0", "TRITON=3.6.0")
    assert out.returncode != 0 and "brings the Triton it pins" in out.stderr


def test_the_gpu_rehearsal_runs_the_smoke_in_the_gpu_machines_copy_with_the_wheels_on_its_path(tmp_path):
    """make gpu-rehearsal: .ci/gpu-check --smoke under VENV/gpu-machine's Python (torch 2.11, Triton 3.6, only the
    GPU machine's packages), gpu/wheels installed into its site/ and first on the path, as on that machine."""
    venv = tmp_path / "venv"  # none there: the dry run shows the install too
    out = dry_run("gpu-rehearsal", f"VENV={venv}", "RESULTS=/tmp/r")
    assert out.returncode == 0, out.stderr
    text = out.stdout.replace("\\\n", " ")
    assert f"{venv}/gpu-machine/bin/python -m pip install -q torch==2.11.0 " in text, text
    assert f'--target "{venv}/gpu-machine/site" gpu/wheels/*.whl' in text, text
    run = next(line for line in text.splitlines() if "bash .ci/gpu-check" in line)
    assert f'PYTHONPATH="{venv}/gpu-machine/site"' in run and f"PY={venv}/gpu-machine/bin/python" in run, run
    assert run.split()[-1] == "--smoke" and 'OUT="/tmp/r/gpu-rehearsal"' in run, run
