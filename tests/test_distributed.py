"""Training on several processes (bench/distributed.py), on CPU with gloo.

Two processes (torch.multiprocessing, one fixture for all the checks) train a 5k-parameter Transformer
with DDP and with FSDP2, each rank on its half of every step's global batch; a one-process run of the same
global batch is the reference (fp32: losses within 1e-5). A third two-process FSDP run stops after its
step-3 checkpoint and one process finishes it; a one-process run stopped the same way is finished by two.
The SLURM launcher config composes into the sbatch job expected; submitit's local executor runs such a
job of two tasks end to end (slow).
"""
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import bench  # noqa: F401  (bounds OpenMP spin-waiting before torch loads, in the spawned ranks too)
import torch
import torch.multiprocessing as mp

from bench.train import Plan
from test_train import CopyTask, trainer_cfg

ROOT = Path(__file__).resolve().parent.parent
STEPS, CKPT_AT = 6, 3
# 12 sequences of 32 tokens a step, micro-batches of 4: one process accumulates 3 micro-batches; each of
# two processes takes 6 sequences as micro-batches of 4 and 2
CFG = dict(tokens=32 * 12 * STEPS, batch_tokens=32 * 12, micro_batch=4, log_every=1, ckpt_every=0)


def tiny_model():
    from architectures import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig("transformer", 16, 16, 2, 2, 32, 32, options={"backend": "sdpa"}))


class Stop(Exception):
    pass


def stop_after(n: int):
    """A bench.faults.crash_point that raises Stop after the n-th optimizer step (after its checkpoint)."""
    count = itertools.count(1)

    def point(name: str) -> None:
        if name == "step" and next(count) == n:
            raise Stop

    return point


class SeenCopyTask(CopyTask):
    """The copy task, keeping the sequences this process trained on."""

    def __init__(self):
        self.seen = []

    def loss(self, model, x, y):
        self.seen += x.tolist()
        return CopyTask.loss(model, x, y)


def fit(run_dir: Path, parallel: str, model=None, **kw) -> list:
    """Train `model` (tiny_model()) on the copy task into run_dir; returns the sequences this process
    trained on."""
    from bench.tracking import NullTracker
    from bench.train import train

    task = SeenCopyTask()
    run_dir.mkdir(parents=True, exist_ok=True)
    train(model or tiny_model(), task, trainer_cfg(**{**CFG, **kw}), 32, run_dir, NullTracker(),
          torch.device("cpu"), contextlib.nullcontext, parallel=parallel)
    return task.seen


@contextlib.contextmanager
def stopped_after_checkpoint():
    """Training raises Stop after step CKPT_AT, once its checkpoint is written (as a kill there would)."""
    import bench.train

    point, bench.train.crash_point = bench.train.crash_point, stop_after(CKPT_AT)
    try:
        with pytest.raises(Stop):
            yield
    finally:
        bench.train.crash_point = point


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: DDP and FSDP runs to the end, then an FSDP run stopped after its step-3 checkpoint, whose
    full weights at that point rank 0 keeps in stopped.pt."""
    from bench import distributed
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("ddp", "cpu")
    out = Path(out)
    seen = fit(out / "ddp", "ddp")
    (out / f"seen-{rank}.json").write_text(json.dumps(seen))
    fit(out / "fsdp", "fsdp")
    model = tiny_model()
    with stopped_after_checkpoint():
        fit(out / "stopped", "fsdp", model, ckpt_every=CKPT_AT)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, out / "stopped.pt")
    fit(out / "from_one", "fsdp")  # resumes the one-process checkpoint.pt the fixture left there
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("world2")
    with stopped_after_checkpoint():  # one process stops after its step-3 checkpoint.pt; two finish the run
        fit(out / "from_one", "none", ckpt_every=CKPT_AT)
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("world1")
    fit(out, "none")
    return losses(out)


def test_plan_splits_the_global_batch_over_the_ranks():
    plan = Plan.resolve(tokens=32 * 12 * 6, batch_tokens=32 * 12, micro_batch=4, ctx=32)
    assert plan.split(1) == (12, 4, 3)  # the one-process plan
    assert plan.split(2) == (6, 4, 2)  # accumulation adapts: micro-batches of 4 and 2
    assert plan.split(4) == (3, 3, 1) and plan.split(12) == (1, 1, 1)
    with pytest.raises(ValueError, match="do not split over 5 processes"):
        plan.split(5)


def test_parallel_auto_picks_by_world_size_and_model_size(monkeypatch):
    from bench import distributed

    assert distributed.resolve_mode("auto", 10**9) == "none"  # one process
    monkeypatch.setattr(distributed, "world_size", lambda: 8)
    assert distributed.resolve_mode("auto", 30_000_000) == "ddp"  # the CPU ladder
    assert distributed.resolve_mode("auto", 125_000_000) == "fsdp"  # the paper's sizes
    assert distributed.resolve_mode("ddp", 10**9) == "ddp"
    with pytest.raises(ValueError, match="trainer.parallel=none with 8 processes"):
        distributed.resolve_mode("none", 1000)
    with pytest.raises(ValueError, match="trainer.parallel must be one of"):
        distributed.resolve_mode("zero3", 1000)


def test_the_parallel_mode_is_not_part_of_a_runs_identity():
    """A run trained by several processes is reused, or resumed, by one, and the other way round."""
    from hydra import compose, initialize_config_dir

    from bench.fingerprint import config_fingerprint

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        a, b = (compose("config", overrides=[f"trainer.parallel={m}"]) for m in ("auto", "fsdp"))
    assert config_fingerprint(a) == config_fingerprint(b)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(two_processes, one_process, mode):
    two = losses(two_processes / mode)
    assert len(two) == len(one_process) == STEPS
    assert two == pytest.approx(one_process, abs=1e-5, rel=0)
    assert one_process[-1] < one_process[0]  # it trains
    assert (two_processes / mode / "checkpoint.dcp" / "latest").read_text() == f"step-{STEPS:08d}"


def test_each_rank_trains_on_its_half_of_every_global_batch(two_processes):
    seen = [json.loads((two_processes / f"seen-{r}.json").read_text()) for r in (0, 1)]
    task, per_step = CopyTask(), 12 // 2
    for step in range(STEPS):
        batch = task.batch(step, 12)[0].tolist()  # the step's global batch, a function of the step alone
        assert seen[0][step * per_step:(step + 1) * per_step] == batch[:per_step]
        assert seen[1][step * per_step:(step + 1) * per_step] == batch[per_step:]


def test_a_one_process_checkpoint_resumes_in_two(two_processes, one_process):
    from bench import distributed

    run = two_processes / "from_one"
    assert losses(run) == pytest.approx(one_process, abs=1e-5, rel=0)
    assert distributed.latest_sharded(run).name == f"step-{STEPS:08d}" and not (run / "checkpoint.pt").exists()


def test_sharded_checkpoint_of_two_processes_resumes_in_one(two_processes, one_process, tmp_path):
    from bench.train import load_sharded_checkpoint, make_optimizer
    from bench import distributed

    stopped = two_processes / "stopped"
    assert losses(stopped) == pytest.approx(one_process[:CKPT_AT], abs=1e-5, rel=0)
    path = distributed.latest_sharded(stopped)
    assert path.name == f"step-{CKPT_AT:08d}" and distributed.read_meta(path)["world_size"] == 2
    # the two ranks' shards load into one plain model bit for bit
    model = tiny_model()
    meta = load_sharded_checkpoint(path, model, make_optimizer(model, trainer_cfg(**CFG)), None)
    assert meta["step"] == CKPT_AT
    saved = torch.load(two_processes / "stopped.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # one process continues the run: the curve goes on as the uninterrupted one's
    fit(stopped, "none")
    assert losses(stopped) == pytest.approx(one_process, abs=1e-5, rel=0)
    assert (stopped / "checkpoint.pt").exists() and not (stopped / "checkpoint.dcp").exists()


# ---- make sweep LAUNCHER=slurm ----------------------------------------------------------------------

# bench.run's Hydra app with SLURM's executor made to believe srun exists: the job script it would submit
# is written to argv[1]; then (argv[2] == "local") its jobs run on submitit's local executor with the
# same number of tasks, or ("render") nothing runs.
SLURM_JOB = """
import runpy
import sys
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmExecutor

SlurmExecutor.affinity = classmethod(lambda cls: 1)
script, mode = Path(sys.argv[1]), sys.argv[2]


def run_locally(self, fn, *iterables):
    ex = self._executor
    script.write_text(ex._make_submission_file_text(ex._submitit_command_str, "uid"))
    if mode == "render":
        raise SystemExit(0)
    local = submitit.LocalExecutor(ex.folder)
    local.update_parameters(tasks_per_node=ex.parameters["ntasks_per_node"], timeout_min=10)
    return local.map_array(fn, *iterables)


submitit.AutoExecutor.map_array = run_locally
sys.argv = ["bench/run.py", *sys.argv[3:]]
runpy.run_module("bench.run", run_name="__main__", alter_sys=True)
"""

SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=acct",
         "hydra.launcher.nodes=1", "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=30"]
RUN = ["arch=transformer", "size=smoke-xs", "profile=smoke", "ctx=256", "logger=none", "trainer.quiet=true",
       "trainer.tokens=8192", "trainer.device=cpu", "sweep_id=slurm"]


def slurm_job(tmp_path: Path, mode: str):
    script = tmp_path / "job.sh"
    res = subprocess.run([sys.executable, "-c", SLURM_JOB, str(script), mode, "--multirun", *SLURM, *RUN,
                          f"results={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return script.read_text()


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=SLURM, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert {k: launcher[k] for k in ("partition", "account", "nodes", "gpus_per_node", "tasks_per_node",
                                     "timeout_min")} == dict(partition="gpu", account="acct", nodes=1,
                                                             gpus_per_node=2, tasks_per_node=2, timeout_min=30)


def test_the_slurm_job_is_one_task_per_gpu_under_srun(tmp_path):
    script = slurm_job(tmp_path, "render")
    for flag in ("--partition=gpu", "--account=acct", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2",
                 "--time=30", "--job-name=run"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "export SLURM_KILL_BAD_EXIT=1\n" in script
    command = script.strip().splitlines()[-1]  # every task unpickles the Hydra job and runs bench.run's main
    assert command.startswith("srun --unbuffered --output ") and command.endswith(
        f"{sys.executable} -u -m submitit.core._submit {tmp_path}/runs/slurm/.submitit/%j")


@pytest.mark.slow
def test_the_slurm_job_trains_a_run_on_two_ranks_under_submitits_local_executor(tmp_path):
    slurm_job(tmp_path, "local")
    summary = json.loads(next(tmp_path.glob("runs/slurm/*/summary.json")).read_text())
    assert (summary["status"], summary["parallel"], summary["world_size"]) == ("ok", "ddp", 2)
    assert summary["steps"] == 2 and summary["val_bpb"] > 0


def test_sweep_launchers(tmp_path):
    from argparse import Namespace

    from bench.config import UsageError
    from bench.sweep import run_command
    from bench.threads import cpu_cores

    def cmd(**kw):
        args = dict(launcher="local", nproc="1", jobs="1", nodes="", gpus_per_node="", timeout_min="",
                    partition="", account="")
        return run_command(Namespace(**{**args, **kw}))

    assert cmd() == [sys.executable, "-m", "bench.run", "--multirun"]  # today's command
    assert cmd(nproc="8") == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
                              "-m", "bench.run", "--multirun"]
    # JOBS=2: two runs at once, a process each, the cores shared out, a line per finished run (no bars)
    assert cmd(jobs="2") == [sys.executable, "-m", "bench.run", "--multirun", "hydra/launcher=joblib",
                             "hydra.launcher.n_jobs=2", f"trainer.threads={max(1, cpu_cores() // 2)}",
                             "trainer.quiet=true"]
    assert cmd(launcher="slurm", nodes="2", gpus_per_node="8", account="acct")[4:] == [
        "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=8",
        "hydra.launcher.account=acct"]
    for kw, message in [(dict(launcher="cloud"), "unknown LAUNCHER 'cloud'; available: local, slurm"),
                        (dict(partition="gpu"), "PARTITION= need LAUNCHER=slurm"),
                        (dict(nproc="0"), "NPROC must be a positive integer"),
                        (dict(launcher="slurm", nproc="2"), "NPROC and JOBS are for one machine"),
                        (dict(launcher="slurm", jobs="2"), "NPROC and JOBS are for one machine"),
                        (dict(jobs="2", nproc="2"), "give one of them"),
                        (dict(jobs="two"), "JOBS must be a positive integer"),
                        (dict(launcher="slurm", nodes="two"), "NODES must be a positive integer")]:
        with pytest.raises(UsageError, match=message):
            cmd(**kw)
