"""Generated example sets cached on disk by the hash of their generator config.

Generators are pure functions of (config, seed), so a set is rebuilt only when its config changes (or
the generator's VERSION does): evaluation sets at 32k tokens are generated once per machine, and every
architecture of a sweep is scored on the same stored examples. Training batches are not cached: they
are a pure function of the optimizer step, generated as they are needed.

    TTT_BENCH_CACHE=dir   where the sets live (default ~/.cache/ttt-bench); TTT_BENCH_CACHE=off: no cache
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch


def cache_dir() -> Path | None:
    where = os.environ.get("TTT_BENCH_CACHE", "~/.cache/ttt-bench")
    return None if where == "off" else Path(where).expanduser() / "generated"


def config_hash(config: dict) -> str:
    """A stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached(kind: str, config: dict, build: Callable[[], Any]) -> Any:
    """build() once per config: later calls load it from CACHE/generated/<kind>/<hash>.pt. `build` must
    return plain data (lists, dicts, numbers, tensors)."""
    root = cache_dir()
    if root is None:
        return build()
    path = root / kind / f"{config_hash(config)}.pt"
    plain = json.loads(json.dumps(config, default=str))  # the config as it reads back from the file
    if path.exists():
        try:
            stored = torch.load(path, weights_only=True)
            if stored["config"] == plain:
                return stored["value"]
        except Exception:  # a torn or foreign file: rebuild it
            pass
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"config": plain, "value": value}, tmp)
    os.replace(tmp, path)
    return value
