"""Long-context QA (passkey, RULER-style needles, variable tracking, MQAR), generated offline.

Models train from scratch on a mixture of the sub-tasks at the sweep's context (next-token loss on the
answer tokens only) and are evaluated at several lengths (shorter, equal and longer than trained) and
needle depths. Exact match: every answer token is the model's argmax given the true prefix, which is
what greedy decoding would produce. MQAR is scored per queried value (Zoology's accuracy).
generators.py has the pure example generators. (In progress: plots, the classification task.)
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from tasks.longqa import generators as gen

IGNORE = -100
DEPTH_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
SUBTASKS = DEPTH_TASKS + ("variable_tracking", "mqar")


def make_example(task: str, length: int, depth: float, seed, mqar_pairs: int) -> gen.Example:
    if task == "passkey":
        return gen.passkey(length, depth, seed)
    if task.startswith("niah_"):
        return gen.niah(length, depth, seed, variant=task.split("_", 1)[1])
    if task == "variable_tracking":
        return gen.variable_tracking(length, seed)
    if task == "mqar":
        return gen.mqar(length, mqar_pairs, seed)
    raise ValueError(f"unknown long-QA sub-task {task!r}; available: {', '.join(SUBTASKS)}")


def to_tensors(examples: list[gen.Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, L-1) and targets (B, L-1): the next token at answer positions, IGNORE elsewhere."""
    ids = torch.tensor([e.ids for e in examples])  # (B, L)
    y = torch.full_like(ids[:, 1:], IGNORE)
    for b, e in enumerate(examples):
        pos = torch.tensor(e.answer_pos)
        y[b, pos - 1] = ids[b, pos]
    return ids[:, :-1], y


class LongQATask:
    name = "longqa"

    def __init__(self, task_cfg, data_cfg, ctx: int, seed: int = 0):
        self.cfg, self.ctx, self.seed = task_cfg, ctx, seed
        self.mixture = {str(k): float(v) for k, v in task_cfg.mixture.items() if float(v) > 0}
        for name in self.mixture:
            if name not in SUBTASKS:
                raise ValueError(f"task.mixture names unknown sub-task {name!r}; available: {', '.join(SUBTASKS)}")
        self.mqar_pairs = int(task_cfg.mqar_pairs)
        for name in self.mixture:  # every sub-task must fit the training context
            try:
                make_example(name, ctx + 1, 0.5, "check", self.mqar_pairs)
            except ValueError as e:
                raise ValueError(f"long-QA sub-task {name} does not fit ctx={ctx} ({e}); use a longer CTX or "
                                 f"task.mixture.{name}=0") from None
        self.info = {"data": "generated", "tokenizer": "bytes+mqar", "subtasks": ",".join(self.mixture)}

    @property
    def vocab_size(self) -> int:
        return gen.VOCAB

    def build_model(self, model_cfg):
        from architectures import build_model

        return build_model(model_cfg)

    def examples(self, step: int, n: int) -> list[gen.Example]:
        """The n training examples of optimizer step `step`: a pure function of (seed, step)."""
        rng = random.Random(f"longqa-train-{self.seed}-{step}")
        names, weights = list(self.mixture), list(self.mixture.values())
        out = []
        for i in range(n):
            task = rng.choices(names, weights)[0]
            out.append(make_example(task, self.ctx + 1, rng.random(), f"train-{self.seed}-{step}-{i}", self.mqar_pairs))
        return out

    def batch(self, step: int, batch_size: int):
        return to_tensors(self.examples(step, batch_size))

    @staticmethod
    def loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    def eval_cells(self):
        """(sub-task, length, depth) cells: lengths are fractions of ctx, depths only for needle tasks."""
        for task in self.mixture:
            for frac in self.cfg.eval_lengths:
                length = max(64, int(float(frac) * self.ctx))
                depths = [float(d) for d in self.cfg.eval_depths] if task in DEPTH_TASKS else [None]
                for depth in depths:
                    yield task, length, depth

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict:
        model.eval()
        n, bs = int(self.cfg.eval_examples), int(self.cfg.eval_batch_size)
        cells, losses = [], []
        for task, length, depth in self.eval_cells():
            correct = 0
            exs = []
            for i in range(n):
                d = depth if depth is not None else random.Random(f"eval-depth-{i}").random()
                try:
                    exs.append(make_example(task, length + 1, d, f"eval-{self.seed}-{i}", self.mqar_pairs))
                except ValueError:  # a shorter eval length than this sub-task needs: no cell
                    break
            if not exs:
                continue
            for lo in range(0, len(exs), bs):
                x, y = (t.to(device) for t in to_tensors(exs[lo:lo + bs]))
                with autocast():
                    logits = model(x).float()
                mask = y != IGNORE
                hit = (logits.argmax(-1) == y) | ~mask
                if task == "mqar":  # Zoology's metric: accuracy over the queried values
                    correct += float(((hit & mask).sum(-1) / mask.sum(-1)).sum())
                else:  # exact match: every answer token right
                    correct += int(hit.all(-1).sum())
                if length == self.ctx:
                    losses.append(F.cross_entropy(logits[mask], y[mask]).item())
            cells.append({"subtask": task, "length": length, "depth": depth, "n": len(exs),
                          "acc": correct / len(exs)})
        model.train()
        at_ctx = [c for c in cells if c["length"] == self.ctx]
        out = {"longqa_cells": cells,
               "val_acc": sum(c["acc"] * c["n"] for c in at_ctx) / max(1, sum(c["n"] for c in at_ctx)),
               "val_loss": sum(losses) / max(1, len(losses))}
        for task in self.mixture:
            mine = [c for c in at_ctx if c["subtask"] == task]
            if mine:
                out[f"acc_{task}"] = sum(c["acc"] * c["n"] for c in mine) / sum(c["n"] for c in mine)
        return out
