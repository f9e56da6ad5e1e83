"""Experiment tracking: W&B (offline by default, WANDB_MODE respected) or nothing (logger=none)."""
from __future__ import annotations

import os


class NullTracker:
    mode = "none"

    def log(self, row: dict, step: int | None = None) -> None:
        pass

    def summary(self, row: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, logger_cfg, run_dir: str, name: str, group: str, config: dict):
        import wandb

        self.mode = os.environ.get("WANDB_MODE") or str(logger_cfg.mode)
        self.run = wandb.init(project=str(logger_cfg.project), entity=logger_cfg.get("entity"), name=name,
                              group=group, dir=run_dir, mode=self.mode, config=config)

    def log(self, row: dict, step: int | None = None) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, row: dict) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


def build_tracker(logger_cfg, run_dir: str, name: str, group: str, config: dict):
    if logger_cfg.name == "none":
        return NullTracker()
    if logger_cfg.name == "wandb":
        return WandbTracker(logger_cfg, run_dir, name, group, config)
    raise ValueError(f"unknown logger {logger_cfg.name!r}; available: wandb, none")
