"""Long-context QA (passkey, RULER-style needles, variable tracking, MQAR), generated offline.

Models train from scratch on a mixture of the sub-tasks at the sweep's context (next-token loss on the
answer tokens only) and are evaluated at several lengths (shorter, equal and longer than trained) and
needle depths. Exact match: every answer token is the model's argmax given the true prefix, which is
what greedy decoding would produce. MQAR is scored per queried value (Zoology's accuracy).
generators.py has the pure example generators; evaluation sets are cached by their config (tasks/cache.py).
Presets of this runner: conf/task/mqar.yaml (MQAR alone), conf/task/passkey.yaml (passkey alone).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from tasks.cache import cached
from tasks.longqa import generators as gen

IGNORE = -100
DEPTH_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
SUBTASKS = DEPTH_TASKS + ("variable_tracking", "mqar")


def make_example(task: str, length: int, depth: float, seed, mqar_pairs: int,
                 mqar_symbols: int = gen.MQAR_KEYS) -> gen.Example:
    if task == "passkey":
        return gen.passkey(length, depth, seed)
    if task.startswith("niah_"):
        return gen.niah(length, depth, seed, variant=task.split("_", 1)[1])
    if task == "variable_tracking":
        return gen.variable_tracking(length, seed)
    if task == "mqar":
        return gen.mqar(length, mqar_pairs, seed, n_symbols=mqar_symbols)
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
        self.mqar_pairs = int(task_cfg.mqar_pairs)  # evaluated
        # trained: a mix of pair counts, as Zoology trains; more pairs = more answers per sequence
        self.mqar_symbols = int(task_cfg.get("mqar_symbols", gen.MQAR_KEYS))
        fits = lambda p: 4 * p <= ctx + 1 and p <= self.mqar_symbols
        self.mqar_train_pairs = [int(p) for p in (task_cfg.get("mqar_train_pairs") or [self.mqar_pairs]) if fits(int(p))]
        if "mqar" in self.mixture and not self.mqar_train_pairs:
            raise ValueError(f"task.mqar_train_pairs={list(task_cfg.mqar_train_pairs)}: none fits ctx={ctx} "
                             f"(4 x pairs <= ctx + 1)")
        for name in self.mixture:  # every sub-task must fit the training context
            try:
                make_example(name, ctx + 1, 0.5, "check", self.mqar_pairs, self.mqar_symbols)
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
            pairs = rng.choice(self.mqar_train_pairs) if task == "mqar" else self.mqar_pairs
            out.append(make_example(task, self.ctx + 1, rng.random(), f"train-{self.seed}-{step}-{i}", pairs,
                                    self.mqar_symbols))
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

    def eval_examples(self, task: str, length: int, depth: float | None, n: int) -> list[gen.Example]:
        """The n held-out examples of one cell (cached on disk by their config, tasks/cache.py); none
        when the sub-task does not fit the length. Depth None: drawn per example."""
        config = {"generator": gen.VERSION, "task": task, "length": length, "depth": depth, "n": n,
                  "seed": self.seed, "mqar_pairs": self.mqar_pairs, "mqar_symbols": self.mqar_symbols}

        def build() -> list[dict]:
            out = []
            for i in range(n):
                d = depth if depth is not None else random.Random(f"eval-depth-{i}").random()
                try:
                    e = make_example(task, length + 1, d, f"eval-{self.seed}-{i}", self.mqar_pairs, self.mqar_symbols)
                except ValueError:  # a shorter eval length than this sub-task needs: no cell
                    break
                out.append({"ids": e.ids, "answer_pos": e.answer_pos})
            return out

        return [gen.Example(task, r["ids"], r["answer_pos"]) for r in cached("longqa", config, build)]

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict:
        model.eval()
        n, bs = int(self.cfg.eval_examples), int(self.cfg.eval_batch_size)
        cells, losses = [], []
        for task, length, depth in self.eval_cells():
            correct = 0
            exs = self.eval_examples(task, length, depth, n)
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
