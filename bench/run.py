"""One training + evaluation run; the Hydra app behind `make sweep` (which calls it with --multirun).

    python -m bench.run arch=transformer size=cpu-s ctx=2k
    python -m bench.run --multirun arch=transformer size=cpu-xs,cpu-s ctx=2048
    torchrun --standalone --nproc_per_node 8 -m bench.run arch=transformer size=760m profile=paper  (ranks:
        bench/distributed.py; make sweep ... NPROC=8, or LAUNCHER=slurm for a SLURM job per run)

Writes RESULTS/runs/<sweep_id>/<run_name>/: config.yaml, metrics.jsonl, checkpoint.pt (one process) or
checkpoint.dcp/ (several), summary.json.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import architectures
from bench import distributed
from bench.config import UsageError, model_config, normalize
from bench.faults import crash_point
from bench.fingerprint import config_fingerprint
from bench.hardware import mfu
from bench.latency import latency_probe
from bench.results import (REPO_ROOT, atomic_write_json, atomic_write_text, device_name, git_commit,
                           headline_metric, package_versions, remove_stale_temporaries)
from bench.threads import ThreadGovernor, configure_compute_process
from bench.tracking import NullTracker, build_tracker
from bench.train import Diverged, autocast_for, pick_device, run_tokens, train
from tasks import build_task


FINAL = ("ok", "diverged")  # a rerun reuses these; failed runs are run again


def finished_summary(run_dir: Path, fingerprint: str) -> dict | None:
    """The run's summary.json when it finished (ok or diverged) with this config; else None."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("status") in FINAL and summary.get("config_hash") == fingerprint:
        return summary
    return None


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and evaluate one (arch, size, ctx, task, data) point; always leaves a whole summary.json.
    A run folder that already holds a finished summary of the same config is reused as it is; one with
    a checkpoint (an interrupted attempt) resumes from it.

    Under torchrun (or a submitit job of several tasks) every rank calls this (bench/distributed.py):
    all train, rank 0 decides what the ranks do together and writes the run's files."""
    distributed.init(str(cfg.trainer.get("parallel", "auto")), str(cfg.trainer.device))
    run_dir = Path(distributed.broadcast(str(run_dir)))  # rank 0's folder (`${now:}` may tick between ranks)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(cfg)
    if (done := distributed.broadcast(finished_summary(run_dir, fingerprint))) is not None:
        if distributed.is_main():
            print(f"[ttt-bench] run {run_dir.name}: reused ({done['status']}, finished earlier)", flush=True)
        return done
    with run_lock(run_dir):
        return _run(cfg, run_dir, fingerprint)


class RunBusy(RuntimeError):
    pass


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """RUN_DIR/.lock (flock, released when the process dies): one process (rank 0 of several) trains a
    run folder at a time."""
    import fcntl

    with open(run_dir / ".lock", "a+") as f:
        busy = False
        if distributed.is_main():
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = True
        if distributed.broadcast(busy):
            raise RunBusy(f"{run_dir} is being trained by another process (the same sweep started twice?); "
                          f"wait for it, or start a new sweep with FRESH=1")
        try:
            yield
        finally:
            if distributed.is_main():
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run(cfg: DictConfig, run_dir: Path, fingerprint: str) -> dict:
    main = distributed.is_main()  # rank 0 writes the run's files; one process is rank 0
    if main:
        remove_stale_temporaries(run_dir)
        (run_dir / "error.txt").unlink(missing_ok=True)
    ctx = int(cfg.ctx)
    summary: dict = {
        "arch": str(cfg.arch.name), "size": str(cfg.size.name), "ctx": ctx, "task": str(cfg.task.name),
        "data": str(cfg.data.name), "profile": str(cfg.profile), "seed": int(cfg.seed),
        "sweep": str(cfg.sweep_id), "run": run_dir.name, "run_dir": str(run_dir), "config_hash": fingerprint,
        "lr": float(cfg.trainer.lr), "variant": str(cfg.get("variant") or ""),
        "git_commit": git_commit(), "packages": package_versions(),
    }
    identity = {"arch": summary["arch"], "size": summary["size"], "ctx": ctx, "config_hash": fingerprint}
    tracker = NullTracker()
    t0 = time.perf_counter()
    try:
        architectures.get(summary["arch"])  # fail early, with the list of names
        torch.manual_seed(int(cfg.seed))
        task = build_task(cfg, ctx)
        for key, value in getattr(task, "budget", dict)().items():  # a protocol's budget (examples x epochs)
            if cfg.trainer.get(key) is None:  # where the config leaves it to the task
                cfg.trainer[key] = value
        for key in ("tokens", "batch_tokens"):
            if cfg.trainer.get(key) is None:
                raise ValueError(f"trainer.{key} is null and task {cfg.task.name} sets no budget for it "
                                 f"(task.train_examples, task.epochs, task.mqar_grid batch); give trainer.{key}=N")
        sized = model_config(cfg, task.vocab_size)
        mcfg = sized.cfg
        summary["recipe"] = mcfg.recipe.name  # native | shared (conf/recipe/)
        compute = cfg.trainer.get("compute")
        tokens, token_rule, min_steps = run_tokens(cfg, sized.reference.train_flops)
        cfg.trainer.tokens = tokens  # config.yaml records what is trained
        summary.update({"compute_budget": None if compute is None else float(compute), "token_rule": token_rule,
                        "min_steps": min_steps})
        if main:
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        model = task.build_model(mcfg)
        device = distributed.rank_device(pick_device(str(cfg.trainer.device)))  # cuda:LOCAL_RANK under torchrun
        governor = ThreadGovernor(cfg.trainer.get("threads"), enabled=bool(cfg.trainer.get("thread_governor", True))
                                  and device.type == "cpu")
        autocast, precision = autocast_for(device, str(cfg.trainer.precision))
        summary.update(task.info)
        summary.update(sized.row())  # resolved dimensions, analytic params/FLOPs/state, vs the reference
        summary.update({
            "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
            "flops_per_token": sized.counts.fwd_flops,
            "device": str(device), "device_name": device_name(device), "precision": precision,
        })
        backends = model.backends()
        summary["backends"] = backends
        summary["backend"] = ",".join(f"{k}={v}" for k, v in sorted(backends.items()))
        tracker = build_tracker(cfg.logger, str(run_dir), run_dir.name, str(cfg.sweep_id),
                                OmegaConf.to_container(cfg, resolve=True)) if main else NullTracker()
        summary["wandb_mode"] = tracker.mode
        trained = train(model, task, cfg.trainer, ctx, run_dir, tracker, device, autocast,
                        desc=f"{summary['arch']} {summary['size']} ctx={ctx} on {device}", governor=governor,
                        identity=identity,
                        parallel=distributed.resolve_mode(cfg.trainer.get("parallel", "auto"), summary["params"]),
                        precision=precision)
        summary.update(trained)
        summary["train_flops"] = summary["train_flops_per_token"] * trained["tokens"]
        summary["mfu"] = mfu(summary["train_flops_per_token"], trained["tokens_per_s"] and
                             trained["tokens_per_s"] / trained["world_size"], summary["device_name"])  # per device
        model = distributed.unsharded(model, trained["parallel"], lambda: task.build_model(mcfg).to(device))
        if model is None:  # the other ranks: rank 0 evaluates alone and writes the summary
            return summary
        governor.update(force=True)
        summary.update(task.evaluate(model, device, autocast))
        governor.update(force=True)
        summary.update(latency_probe(model, ctx, device, task.vocab_size))  # prefill/decode tokens/s at ctx
        summary.update(governor.summary())  # threads used and the machine's load while the run ran
        summary["status"] = "ok"
    except Diverged as e:  # recorded with its step; the last good checkpoint stays
        summary.update({"status": "diverged", "error": str(e), "diverged_step": e.step})
        if main:
            print(f"[ttt-bench] run {run_dir.name} {e}", flush=True)
    except Exception as e:  # a failed point is recorded, the sweep goes on (one process)
        if not main:
            raise  # rank 0 records the run (below), and ends the job too
        summary["status"] = "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        atomic_write_text(run_dir / "error.txt", traceback.format_exc())
        print(f"[ttt-bench] run {run_dir.name} failed: {summary['error']} (traceback in {run_dir / 'error.txt'})",
              flush=True)
    summary["wall_s"] = time.perf_counter() - t0
    if not main:
        return summary  # diverged: every rank saw it at the same step
    tracker.summary({k: v for k, v in summary.items() if k != "loss_by_position"})
    tracker.finish()
    summary["finished_at"] = time.time()
    atomic_write_json(run_dir / "summary.json", summary)
    crash_point("summary")
    if cfg.trainer.get("quiet", False) and summary["status"] == "ok":  # no progress bar: a line when it ends
        print(f"[ttt-bench] run {run_dir.name}: ok  {headline_metric(summary)} in {summary['wall_s']:.0f}s",
              flush=True)
    if summary["status"] == "failed" and distributed.world_size() > 1:  # the ranks cannot go on together
        raise RuntimeError(f"run {run_dir.name} failed ({summary['error']}); the same command continues the sweep")
    return summary


@hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    configure_compute_process()  # subnormals flushed, heap recycling, before any compute (bench/threads.py)
    try:
        normalize(cfg)  # ctx=2k -> 2048 (bench/config.py)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except RunBusy as e:  # another process owns this run folder: leave it alone, the sweep goes on
        print(f"[ttt-bench] error: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    # the app as bench.run, not __main__: a submitit job (LAUNCHER=slurm) then unpickles the task function
    # by reference (cloudpickle cannot copy this module by value: it names torch.backends)
    from bench.run import main as app

    app()
