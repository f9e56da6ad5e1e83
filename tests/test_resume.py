"""Sweeps that survive: kill -9 at any point and the same command finishes the sweep with the same
numbers; divergence and bad checkpoints fail clearly (bench/train.py, bench/run.py, bench/sweep.py).

The kill tests run `python -m bench.sweep` in a subprocess with TTT_BENCH_CRASH_AT (bench/faults.py),
which SIGKILLs the process at a named point; the rerun must end with the metrics of an uninterrupted
sweep, bit for bit (CPU, fp32, one thread, so reductions keep their order).
"""
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent

# one tiny Transformer (smoke-xs, ctx 256), 8 steps, a checkpoint every 2 steps
SWEEP = ["--arch", "transformer", "--ctx", "256", "--profile", "smoke", "--sizes", "smoke-xs", "--",
         "trainer.tokens=32768", "trainer.ckpt_every=2", "trainer.threads=1", "trainer.thread_governor=false",
         "trainer.quiet=true", "logger=none"]


def run_sweep(results: Path, args=SWEEP, crash_at: str | None = None, extra=()):
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("TTT_BENCH_CRASH_AT", None)
    if crash_at:
        env["TTT_BENCH_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "bench.sweep", "--results", str(results), *extra, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def outcome(results: Path) -> dict:
    """What a finished sweep computed, per run: its metrics curve (less wall-clock fields) and evaluation."""
    out = {}
    for path in sorted(results.glob("runs/*/*/summary.json")):
        s = json.loads(path.read_text())
        curve = [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
                 for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
        out[s["run"]] = {"status": s["status"], "val_loss": s.get("val_loss"), "val_bpb": s.get("val_bpb"),
                         "train_loss": s.get("train_loss"), "steps": s.get("steps"), "curve": curve}
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    results = tmp_path_factory.mktemp("uninterrupted")
    res = run_sweep(results)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return outcome(results)


def kill_and_rerun(results: Path, crash_at: str, args=SWEEP):
    killed = run_sweep(results, args, crash_at=crash_at)
    assert killed.returncode != 0, f"{crash_at} was never reached:\n{killed.stdout[-2000:]}"
    again = run_sweep(results, args)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    return killed, again


@pytest.mark.slow  # ~60 s of sweep subprocesses; with the five crash points below in `make test-slow`
def test_killed_mid_training_the_same_command_finishes_with_identical_numbers(tmp_path, uninterrupted):
    killed, again = kill_and_rerun(tmp_path, "step:5")  # after step 5; the last checkpoint is step 4
    assert "continued sweep" in again.stdout
    assert len(list(tmp_path.glob("runs/*"))) == 1, "the rerun made a second sweep"
    ckpt_steps = [json.loads(line)["step"] for line in
                  next(tmp_path.glob("runs/*/*/metrics.jsonl")).read_text().splitlines()]
    assert ckpt_steps == list(range(1, 9)), "metrics.jsonl has duplicate or missing steps"
    assert outcome(tmp_path) == uninterrupted
    with open(tmp_path / "summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"]
    # run once more: everything is reused, nothing retrained
    third = run_sweep(tmp_path)
    assert third.returncode == 0 and "(reused)" in third.stdout and "reused (ok" in third.stdout
    assert outcome(tmp_path) == uninterrupted


@pytest.mark.slow
def test_fresh_starts_a_new_sweep_and_resume_names_one(tmp_path):
    args = SWEEP[:-5] + ["trainer.tokens=8192", "trainer.quiet=true", "logger=none"]
    assert run_sweep(tmp_path, args).returncode == 0
    assert run_sweep(tmp_path, args, extra=["--fresh"]).returncode == 0
    sweeps = sorted(p.name for p in tmp_path.glob("runs/*"))
    assert len(sweeps) == 2
    res = run_sweep(tmp_path, args, extra=["--resume", sweeps[0]])
    assert res.returncode == 0 and f"resumed sweep {sweeps[0]}" in res.stdout and "(reused)" in res.stdout
    res = run_sweep(tmp_path, args, extra=["--resume", "nonexistent"])
    assert res.returncode == 2 and "RESUME=nonexistent: no such sweep" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["checkpoint:2", "checkpoint:4", "step:7", "summary:1", "report:1"])
def test_killed_anywhere_the_rerun_matches(tmp_path, uninterrupted, crash_at):
    """checkpoint:N dies half-way through writing the N-th checkpoint (4: the final one), summary:1 after the
    run's summary (before the report), report:1 half-way through summary.csv."""
    kill_and_rerun(tmp_path, crash_at)
    assert outcome(tmp_path) == uninterrupted
    assert not list(tmp_path.glob("runs/*/*/.*.tmp")), "a killed write's temporary file was left"
    with open(tmp_path / "summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"]


@pytest.mark.slow
def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    """lr 1e30 overflows at once: that run is `diverged` at its step, the lr 3e-3 run still trains, the sweep
    exits non-zero; run again, the diverged run is reused, not retrained."""
    args = ["--arch", "transformer", "--ctx", "256", "--profile", "smoke", "--sizes", "smoke-xs", "--",
            "trainer.tokens=8192", "trainer.quiet=true", "logger=none", "trainer.ckpt_every=1",
            "trainer.lr=1e30,3e-3", "run_name=${arch.name}-${size.name}-lr${trainer.lr}"]
    res = run_sweep(tmp_path, args)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/summary.json")}
    bad, good = summaries["transformer-smoke-xs-lr1e+30"], summaries["transformer-smoke-xs-lr0.003"]
    assert bad["status"] == "diverged" and bad["diverged_step"] >= 0 and "diverged at step" in bad["error"]
    assert good["status"] == "ok" and math.isfinite(good["val_loss"])
    again = run_sweep(tmp_path, args)
    assert again.returncode == 1 and "reused (diverged" in again.stdout


@pytest.mark.slow
def test_two_sweeps_into_one_results_folder_leave_summary_csv_whole(tmp_path):
    """Different commands, run at once into one RESULTS: both finish, summary.csv holds both."""
    a = SWEEP[:-5] + ["trainer.tokens=8192", "trainer.quiet=true", "logger=none"]
    b = [*a[:a.index("--")], "--", "seed=1", *a[a.index("--") + 1:]]
    out = {}
    threads = [threading.Thread(target=lambda k, args: out.__setitem__(k, run_sweep(tmp_path, args)), args=(k, args))
               for k, args in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["a"].returncode == 0 and out["b"].returncode == 0, out["a"].stderr[-1000:] + out["b"].stderr[-1000:]
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["seed"] for r in rows) == ["0", "1"] and all(r["status"] == "ok" for r in rows)


# --- the trainer's checkpoint and divergence handling, in process ---------------------------------------

class CopyTask:
    vocab_size = 16

    def __init__(self, nan_at_step: int | None = None):
        self.nan_at_step = nan_at_step
        self.step = -1

    def batch(self, step, n):
        self.step = step
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 16, (n, 32), generator=g)
        return x, x.clone()

    def loss(self, model, x, y):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        return loss * float("nan") if self.step == self.nan_at_step else loss


def trainer_cfg(**kw):
    base = dict(lr=3e-3, tokens=32 * 8 * 12, batch_tokens=32 * 8, micro_batch=4, min_lr=1e-5, warmup_frac=0.1,
                betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0, log_every=1, ckpt_every=4,
                resume=True, quiet=True, compile="none")
    return OmegaConf.create({**base, **kw})


def tiny_model():
    from architectures import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig("transformer", 16, 32, 2, 2, 64, 32, options={"backend": "sdpa"}))


def train_tiny(run_dir, task=None, identity=None, **kw):
    from bench.tracking import NullTracker
    from bench.train import train

    return train(tiny_model(), task or CopyTask(), trainer_cfg(**kw), 32, run_dir, NullTracker(), torch.device("cpu"),
                 contextlib.nullcontext, identity=identity)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    from bench.train import CHECKPOINT, Diverged

    with pytest.raises(Diverged) as err:
        train_tiny(tmp_path, CopyTask(nan_at_step=6))
    assert err.value.step == 6 and err.value.last_checkpoint == 4
    assert "diverged at step 6" in str(err.value) and "last good checkpoint (step 4)" in str(err.value)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_truncated_checkpoint_fails_with_the_file_and_the_fix(tmp_path):
    from bench.train import CHECKPOINT, CheckpointError

    train_tiny(tmp_path, tokens=32 * 8 * 4)
    ckpt = tmp_path / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint {ckpt} cannot be read .*delete {ckpt}.*FRESH=1"):
        train_tiny(tmp_path)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    from bench.train import CheckpointError

    train_tiny(tmp_path, tokens=32 * 8 * 4, identity={"arch": "transformer", "size": "cpu-xs", "config_hash": "a"})
    with pytest.raises(CheckpointError, match=r"belongs to another run \(size 'cpu-xs', this run 'cpu-s'\)"):
        train_tiny(tmp_path, identity={"arch": "transformer", "size": "cpu-s", "config_hash": "a"})


def test_resume_cuts_the_curve_back_to_the_checkpoint(tmp_path):
    from bench.train import resume_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    resume_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_wall_clock_checkpoints(tmp_path):
    """ckpt_every_s: a checkpoint as soon as that many seconds have passed (here every step)."""
    from bench.train import CHECKPOINT, save_checkpoint

    saved = []
    import bench.train as train_mod

    def spy(path, model, optimizer, step, extra):
        saved.append(step)
        save_checkpoint(path, model, optimizer, step, extra)

    original, train_mod.save_checkpoint = train_mod.save_checkpoint, spy
    try:
        train_tiny(tmp_path, ckpt_every=0, ckpt_every_s=1e-9)
    finally:
        train_mod.save_checkpoint = original
    assert saved == list(range(1, 13)) and (tmp_path / CHECKPOINT).exists()
