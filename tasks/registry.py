"""Maps a task config's runner (`task.runner`, else `task.name`) to its class, as architectures/registry.py
maps `arch=` names. A new task is a module with a runner class decorated `@register("name")`, imported in
tasks/__init__.py, plus conf/task/<name>.yaml (presets of a runner set `runner:`).

A runner is built as Runner(task_cfg, data_cfg, ctx, seed=...) and provides (tasks/lm/task.py is the
simplest): `vocab_size`, `info` (what the run summary records about the data), `build_model(model_cfg)`,
`batch(step, ...)` / `loss(...)` for training, `evaluate(model, device, autocast)`, and optionally
`budget()` (a protocol's tokens in examples x epochs), `validate(...)` (a dev split for early stopping) and
`check(task_cfg, data_cfg, ctx)` (a classmethod: the checks that read no data, run by `make sweep` before it starts).
"""
from __future__ import annotations

_RUNNERS: dict[str, type] = {}


def register(name: str):
    """Class decorator: the runner of `task.runner: <name>`."""
    def add(cls: type) -> type:
        if name in _RUNNERS:
            raise ValueError(f"task runner {name!r} registered twice")
        _RUNNERS[name] = cls
        return cls
    return add


def names() -> list[str]:
    return sorted(_RUNNERS)


def runner_of(task_cfg) -> type:
    """The runner class a task config names (`runner:`, else `name:`)."""
    name = str(task_cfg.get("runner", task_cfg.name))  # a preset (conf/task/mqar.yaml) names its runner
    if name not in _RUNNERS:
        raise ValueError(f"unknown task runner {name!r}; available: {', '.join(names())}")
    return _RUNNERS[name]


def build_task(cfg, ctx: int):
    """cfg: the full run config (task, data, seed); the runner its task config names, at context ctx."""
    return runner_of(cfg.task)(cfg.task, cfg.data, ctx, seed=int(cfg.seed))


def check_task(cfg, ctx: int) -> None:
    """What can be told before any run starts: a runner with a classmethod `check(task_cfg, data_cfg, ctx)` (one
    that reads no data) raises ValueError (or FileNotFoundError) when the task, its data or context ctx will not
    run. `make sweep` asks this of each context it is about to run (bench/sweep.py), so that such a sweep fails
    once, at once, instead of in every run."""
    check = getattr(runner_of(cfg.task), "check", None)
    if check is not None:
        check(cfg.task, cfg.data, ctx)
