"""Task runners. Each task turns a config into data, a model head, a loss and an evaluation."""
from __future__ import annotations

TASKS = ("lm", "longqa", "classification")


def build_task(cfg, ctx: int):
    """cfg: the full run config (task, data, seed); returns a task object (see tasks/lm/__init__.py)."""
    name = cfg.task.get("runner", cfg.task.name)  # a preset (conf/task/mqar.yaml) names its runner
    if name == "lm":
        from tasks.lm import LMTask

        return LMTask(cfg.task, cfg.data, ctx, seed=int(cfg.seed))
    if name == "longqa":
        from tasks.longqa import LongQATask

        return LongQATask(cfg.task, cfg.data, ctx, seed=int(cfg.seed))
    if name == "classification":
        from tasks.classification import ClassificationTask

        return ClassificationTask(cfg.task, cfg.data, ctx, seed=int(cfg.seed))
    raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
