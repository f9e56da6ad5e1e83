"""Run directories and result files: atomic writes, run metadata, reading summaries back."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from bench.faults import crash_point

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "mamba-ssm", "flash-attn", "hydra-core", "wandb", "lm-eval", "pandas", "numpy")


def atomic_write_bytes(path: str | Path, data: bytes, crash_at: str | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: readers (and a
    rerun after kill -9 or a power cut) see the old file or the new one, never half of one.
    crash_at: a bench.faults point reached half-way through the bytes (the kill -9 tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if crash_at:
                f.flush()
                crash_point(crash_at)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Temporary files a killed writer left behind (`.<name>.*.tmp`)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, crash_at: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), crash_at)


@contextlib.contextmanager
def results_lock(results_root: str | Path):
    """An exclusive lock on RESULTS (RESULTS/.lock, flock): two sweeps writing into one folder take
    turns at summary.csv and the plots, so each report reads every finished run and writes whole files."""
    import fcntl

    root = Path(results_root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_summaries(results_root: str | Path) -> list[dict]:
    """Every runs/**/summary.json under the results folder (`loss_by_position` in today's buckets)."""
    rows = []
    for path in sorted(Path(results_root).glob("runs/**/summary.json")):
        with open(path, encoding="utf-8") as f:
            row = json.load(f)
        row.setdefault("run_dir", str(path.parent))
        if row.get("loss_by_position"):
            row["loss_by_position"] = fold_last_position(row["loss_by_position"])
        rows.append(row)
    return rows


def fold_last_position(buckets: list[dict]) -> list[dict]:
    """A run's `loss_by_position` in the buckets tasks.lm.evaluate.position_buckets makes now, from a summary
    written before, whose last bucket held the last position alone (one token per window): that bucket folded
    into the one before it, the two losses weighted by their positions. Today's buckets come back unchanged."""
    if len(buckets) < 2 or buckets[-1]["start"] != buckets[-1]["end"] or buckets[-2]["end"] != buckets[-1]["start"] - 1:
        return buckets
    before, last = buckets[-2], buckets[-1]
    n = before["end"] - before["start"] + 1  # positions in the bucket before
    return buckets[:-2] + [{**before, "end": last["end"], "loss": (n * before["loss"] + last["loss"]) / (n + 1)}]


def headline_metric(summary: dict) -> str:
    """A run's headline metric as its log lines print it: bits per byte for language modeling, accuracy
    otherwise."""
    if summary.get("val_bpb") is not None:
        sem = summary.get("val_bpb_sem")
        return f"val_bpb={summary['val_bpb']:.3f}" + (f"±{sem:.3f}" if sem is not None else "")
    return f"val_acc={summary.get('val_acc', float('nan')):.3f}"
