"""`make gpu-check ARGS=--smoke`: the GPU machine's one prepared script, run on CPU with tiny shapes, and its
one-page report (bench/gpu_report.py) read from a folder of stage outputs."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.gpu_report import main as gpu_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # every stage on CPU under the interpreter: about 2 minutes on 2 cores
def test_gpu_check_smoke_runs_every_stage_and_writes_the_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "WANDB_MODE": "disabled"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for --smoke
    res = subprocess.run(["bash", ".ci/gpu-check", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    stages = (tmp_path / "stages.txt").read_text().split("\n")
    names = [line.split()[0] for line in stages if line]
    assert names == ["env", "kernel-tests", "kernel-variants", "kernel-variants-mlp", "kernel-speed", "train-125m",
                     "decode-1.3b", "kernel-variants-mamba", "report"]
    assert all(" rc=0 " in line for line in stages if line), stages
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kernel_tests"]["passed"] > 0 and report["kernel_tests"]["failed"] == 0
    assert {r["arch"] for r in report["train"]} == {"transformer", "ttt_linear", "ttt_mlp", "mamba", "mamba2"}
    assert all(r["tokens_per_s"] > 0 for r in report["train"] if r["status"] == "ok")
    assert {r["arch"] for r in report["decode"]} == {"transformer", "ttt_linear", "mamba2"}
    assert report["kernel_variants"] and report["kernel_speed"]
    assert {v["kernel"] for v in report["best_variants"]} == {"ttt_linear", "ttt_mlp", "mamba scan"}
    fastest = {r["mode"]: r for r in report["mlp_over_linear"] if r["launch"] == "fastest of each"}
    assert set(fastest) == {"fwd", "fwd+bwd"} and all(r["mlp_over_linear"] > 0 for r in fastest.values()), fastest
    # at most 8 files come back from the device tool: the summary and one archive of the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.tgz", "report.json", "report.md", "stages.txt"]
    with tarfile.open(tmp_path / "gpu-check.tgz") as tar:
        names = tar.getnames()
    assert "./kernel-tests.log" in names and "./results/throughput.csv" in names


@pytest.mark.slow  # 15 s on 2 cores; test_step_profile.py checks the profile itself in the fast tier
def test_the_profile_stage_runs_and_its_kinds_reach_the_report(tmp_path):
    """profile-125m (not in the default stages: a second call's) on CPU with tiny shapes: bench/step_profile.py's rows
    in report.json and a table in report.md."""
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "WANDB_MODE": "disabled"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", ".ci/gpu-check", "--smoke", "--stages", "env,profile-125m"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "profile-125m rc=0 " in (tmp_path / "stages.txt").read_text()
    rows = {r["arch"]: r for r in json.loads((tmp_path / "report.json").read_text())["profile"]}
    assert set(rows) == {"transformer", "ttt_linear", "mamba"}
    assert rows["ttt_linear"]["TTT inner loop"] > 0 and rows["mamba"]["SSM scan"] > 0
    assert rows["transformer"]["step_ms"] > 0
    assert "## Where a training step's time goes" in (tmp_path / "report.md").read_text()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_report_from_stage_outputs(tmp_path):
    """A stage that timed out and a failed test are reported; the ratios are ours over fla's, MLP over
    Linear and each architecture's training tokens/s over the Transformer's."""
    _write(tmp_path / "stages.txt", "env rc=0 15s-limit took=3s\nkernel-tests rc=124 120s-limit took=120s\n")
    _write(tmp_path / "env.log", "3.12.3\ntorch 2.11.0+cu130 cuda True NVIDIA H200\ntriton 3.6.0\n")
    _write(tmp_path / "kernel-tests.xml",
           '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0" time="12.5">'
           '<testcase name="test_a"/><testcase name="test_b"><failure message="assert 0.5 &lt; 0.02&#10;more"/>'
           '</testcase><testcase name="test_c"/></testsuite></testsuites>')
    rows = [{"impl": "ttt_linear [triton]", "mode": "fwd", "T": 2048, "status": "ok", "ms": 1.0},
            {"impl": "fla chunk_ttt_linear (different semantics)", "mode": "fwd", "T": 2048, "status": "ok",
             "ms": 1.25},
            {"impl": "ttt_mlp [triton]", "mode": "fwd", "T": 2048, "status": "ok", "ms": 10.0},
            {"impl": "causal conv [triton]", "mode": "fwd", "T": 2048, "status": "ok", "ms": 0.5},
            {"impl": "causal conv [torch multiply-adds]", "mode": "fwd", "T": 2048, "status": "ok", "ms": 2.0}]
    _write(tmp_path / "results" / "bench" / "ttt_kernel_speed.json", json.dumps({"device": "GPU X", "rows": rows}))
    _write(tmp_path / "results" / "throughput.csv",
           "arch,size,mode,ctx,batch,time_per_token_s,tokens_per_s,backend,status\n"
           "transformer,125m,train,2048,8,1e-5,200000,attention=sdpa,ok\n"
           "ttt_linear,125m,train,2048,8,2e-5,100000,ttt=triton,ok\n"
           "mamba,125m,train,2048,8,,,ssm=torch,skipped: predicted 5 s per call > --max-seconds 4\n"
           "transformer,1.3b,decode,2048,16,0.05,320,attention=sdpa,ok\n")
    assert gpu_report([str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["device"] == "NVIDIA H200" and r["stages"][1]["timed_out"]
    assert r["kernel_tests"]["failed"] == 1 and r["kernel_tests"]["failures"][0] == {
        "test": "test_b", "message": "assert 0.5 < 0.02"}
    assert r["kernel_speed"] == [{"mode": "fwd", "T": 2048, "ttt_linear_ms": 1.0, "ttt_mlp_ms": 10.0, "fla_ms": 1.25,
                                  "linear_over_fla": 0.8, "mlp_over_linear": 10.0, "conv_ms": 0.5,
                                  "conv_ops_ms": 2.0, "conv_over_ops": 0.25}]
    train = {t["arch"]: t for t in r["train"]}
    assert train["ttt_linear"]["over_transformer"] == 0.5 and train["mamba"]["tokens_per_s"] is None
    assert r["decode"][0]["ms_per_step"] == pytest.approx(50.0)
    md = (tmp_path / "report.md").read_text()
    assert "# make gpu-check on NVIDIA H200" in md and "2 passed, 1 failed" in md
    assert "| 2048 | 1 | 1.25 | 0.8 | 10 | 10 | 0.5 | 2 | 0.25 |" in md
    assert r["train_compiled"] == [] and "compile=model" not in md  # that stage did not run
    _write(tmp_path / "results" / "compiled" / "throughput.csv",  # train-125m-compiled's, a results folder apart
           "arch,size,mode,ctx,batch,time_per_token_s,tokens_per_s,backend,status,compile\n"
           "ttt_linear,125m,train,2048,8,1e-5,240000,ttt=triton,ok,model\n"
           "transformer,125m,train,2048,8,1e-5,300000,attention=sdpa,ok,model\n")
    assert gpu_report([str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert {t["arch"]: t["over_transformer"] for t in r["train_compiled"]} == {"ttt_linear": 0.8, "transformer": 1.0}
    assert len(r["train"]) == 3 and "## Training tokens/s under trainer.compile=model" in (
        tmp_path / "report.md").read_text()
    assert r["decode_compiled"] == [] and "through torch.compile" not in (tmp_path / "report.md").read_text()
    _write(tmp_path / "results" / "compiled-decode" / "throughput.csv",  # decode-1.3b-compiled's
           "arch,size,mode,ctx,batch,time_per_token_s,tokens_per_s,backend,status,graph,compile\n"
           "ttt_linear,1.3b,decode,2048,16,0.002,8000,ttt=triton,ok,cuda_graph (16 steps per replay),model\n")
    assert gpu_report([str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    row = r["decode_compiled"][0]
    assert row["ms_per_step"] == pytest.approx(2.0) and row["compile"] == "model"
    assert "## Decode step through torch.compile" in (tmp_path / "report.md").read_text()
    _write(tmp_path / "results" / "mlp-triton" / "throughput.csv",  # train-125m-mlp-triton's: no Transformer row
           "arch,size,mode,ctx,batch,time_per_token_s,tokens_per_s,backend,status,compile\n"
           "ttt_mlp,125m,train,2048,8,1e-5,120000,ttt=triton,ok,none\n")
    assert gpu_report([str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert [(t["backend"], t["over_transformer"]) for t in r["train_mlp_triton"]] == [("ttt=triton", 0.6)]
    assert "## TTT-MLP trained on its Triton kernels" in (tmp_path / "report.md").read_text()
    assert r["profile"] == [] and "Where a training step" not in (tmp_path / "report.md").read_text()
    _write(tmp_path / "results" / "profile" / "profile.json", json.dumps([  # profile-125m's
        {"arch": "transformer", "backend": "attention=sdpa", "step_ms": 60.0, "tokens_per_s": 270000.0,
         "kinds_ms": {"matmul": 30.0, "attention": 12.0}},
        {"arch": "ttt_linear", "backend": "ttt=triton", "step_ms": 150.0, "tokens_per_s": 110000.0,
         "kinds_ms": {"TTT inner loop": 40.0, "matmul": 31.0}}]))
    assert gpu_report([str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["profile"][1] == {"arch": "ttt_linear", "backend": "ttt=triton", "step_ms": 150.0,
                               "tokens_per_s": 110000.0, "TTT inner loop": 40.0, "matmul": 31.0}
    assert "| ttt_linear | ttt=triton | 150 | 1.1e+05 | 31 |  | 40 |" in (tmp_path / "report.md").read_text()
    assert gpu_report([str(tmp_path / "missing")]) == 2


def test_the_fastest_launch_variant_is_chosen_per_head_dim(tmp_path):
    """kernel-variants (1.3B: head dim 64) and kernel-variants-760m (head dim 96) write variants of the same
    kernel to two folders: the report keeps the fastest of each head dim apart and lists every row with its own."""
    _write(tmp_path / "stages.txt", "env rc=0 15s-limit took=3s\n")
    for folder, f, ms4, ms8 in (("results", 64, 1.0, 1.5), ("results/760m", 96, 3.0, 2.0)):
        rows = [{"impl": f"ttt_linear [triton tf32, {w} warps, 3 stages]", "head_dim": f, "mode": "fwd", "T": 2048,
                 "batch": 16, "status": "ok", "ms": ms, "variant": {"num_warps": w}} for w, ms in ((4, ms4), (8, ms8))]
        _write(tmp_path / folder / "bench" / "ttt_kernel_variants.json", json.dumps({"rows": rows}))
    assert gpu_report([str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    best = {v["head_dim"]: (v["variant"]["num_warps"], v["ms"]) for v in r["best_variants"]}
    assert best == {64: (4, 1.0), 96: (8, 2.0)}
    assert "| ttt_linear [triton tf32, 8 warps, 3 stages] | 96 | fwd | 2048 | 16 | 2 |" in (
        tmp_path / "report.md").read_text()


def test_ttt_mlp_over_ttt_linear_pairs_the_same_shape_and_launch_then_the_fastest_of_each(tmp_path):
    """Issue 16's TTT-MLP within 4x of TTT-Linear, from the two kernel-variants stages: a ratio per launch setting
    both were timed at (same head dim, mode, T and batch), then fastest over fastest; a launch or a length only one
    of them ran pairs with nothing, and TTT-Linear's rows of W in tiles (past f = 64) are not TTT-MLP's launches."""
    def row(kernel, warps, stages, ms, T=2048, **extra):
        return {"impl": f"{kernel} [triton tf32, {warps} warps, {stages} stages]", "head_dim": 64, "mode": "fwd",
                "T": T, "batch": 16, "status": "ok", "ms": ms,
                "variant": {"precision": "tf32", "num_warps": warps, "num_stages": stages, **extra}}
    linear = [row("ttt_linear", 4, 3, 1.0), row("ttt_linear", 8, 3, 0.8), row("ttt_linear", 4, 1, 0.9),
              row("ttt_linear", 8, 3, 0.1, w_rows=32), row("ttt_linear", 4, 3, 4.0, T=8192)]
    mlp = [row("ttt_mlp", 4, 3, 3.0), row("ttt_mlp", 8, 3, 4.0), row("ttt_mlp", 4, 1, 2.7)]
    _write(tmp_path / "stages.txt", "env rc=0 15s-limit took=3s\n")
    _write(tmp_path / "results" / "bench" / "ttt_kernel_variants.json", json.dumps({"rows": linear}))
    _write(tmp_path / "results" / "mlp" / "bench" / "ttt_kernel_variants.json", json.dumps({"rows": mlp}))
    assert gpu_report([str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert [(x["launch"], x["ttt_linear_ms"], x["ttt_mlp_ms"], x["mlp_over_linear"]) for x in r["mlp_over_linear"]] == [
        ("tf32, 4 warps, 3 stages", 1.0, 3.0, 3.0), ("tf32, 8 warps, 3 stages", 0.8, 4.0, 5.0),
        ("tf32, 4 warps, 1 stages", 0.9, 2.7, 3.0), ("fastest of each", 0.8, 2.7, 3.375)]
    assert "| 64 | fwd | 2048 | 16 | fastest of each | 0.8 | 2.7 | 3.375 |" in (tmp_path / "report.md").read_text()


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    res = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), "--stages", "env,nope"], capture_output=True,
                         text=True, env={**os.environ, "OUT": str(tmp_path / "out"), "PY": "false"}, timeout=30)
    assert res.returncode == 2 and "unknown stage: nope" in res.stderr
    assert not (tmp_path / "out" / "env.log").exists()
