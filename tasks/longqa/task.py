"""Long-context QA (passkey, RULER-style needles, variable tracking, MQAR), generated offline.

Models train from scratch on a mixture of the sub-tasks at the sweep's context (next-token loss on the
answer tokens only) and are evaluated at several lengths (shorter, equal and longer than trained) and
needle depths. Exact match: every answer token is the model's argmax given the true prefix, which is
what greedy decoding would produce. MQAR is scored per queried value (Zoology's accuracy).
generators.py has the pure example generators; evaluation sets are cached by their config (tasks/cache.py).
Presets of this runner: conf/task/mqar.yaml (MQAR alone), conf/task/passkey.yaml (passkey alone),
conf/task/mqar_zoology.yaml (Zoology's figure-2 protocol).

Options for recall protocols (conf/task/longqa.yaml has them all):
    mqar_format      suite (gen.mqar: the byte tokens' vocabulary, 769) | zoology (gen.mqar_zoology: a
                     vocabulary of mqar_vocab, keys and values its halves; MQAR alone)
    mqar_grid        {ctx: {pairs, batch}}: the pairs trained and evaluated at each CTX (one run per grid
                     point, as Zoology's table) and the sequences per step of the budget below
    train_examples   N: a fixed training set, the same N examples in the same order every epoch (Zoology's
                     loader); null: fresh examples every step
    epochs           with train_examples and the grid's batch: the budget, N x epochs sequences (`budget`)
    dev_examples     a held-out dev split at ctx (its own seeds: neither trained on nor the reported test
                     examples): `dev_acc`, which early stopping (trainer.early_stop) and LRS= best-lr
                     selection read; the reported `val_acc` stays on the test examples
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tasks.cache import cached
from tasks.longqa import generators as gen
from tasks.registry import register
from tasks.scores import ExampleDigest

IGNORE = -100
DEPTH_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
SUBTASKS = DEPTH_TASKS + ("variable_tracking", "mqar")
MQAR_FORMATS = ("suite", "zoology")


@dataclass(frozen=True)
class MQARFormat:
    """How MQAR examples are made (task.mqar_format and its options)."""

    name: str = "suite"             # suite: gen.mqar, in the byte tokens' vocabulary | zoology: gen.mqar_zoology
    symbols: int = gen.MQAR_KEYS    # suite: keys and values each from this many symbols (task.mqar_symbols)
    vocab: int = gen.ZOOLOGY_VOCAB  # zoology: the vocabulary; keys and values are its halves (task.mqar_vocab)
    power_a: float = 0.01           # zoology: query slot i drawn with weight a i^(a - 1) (task.mqar_power_a)

    def __post_init__(self):
        if self.name not in MQAR_FORMATS:
            raise ValueError(f"task.mqar_format must be one of {MQAR_FORMATS}, got {self.name!r}")

    def example(self, length: int, pairs: int, seed) -> gen.Example:
        if self.name == "zoology":
            return gen.mqar_zoology(length, pairs, seed, vocab=self.vocab, power_a=self.power_a)
        return gen.mqar(length, pairs, seed, n_symbols=self.symbols)

    def fits(self, pairs: int, ctx: int) -> bool:
        """`pairs` fit a training sequence of ctx tokens (4 x pairs of them) and the alphabet."""
        if self.name == "zoology":
            return 4 * pairs <= ctx and pairs < self.vocab // 2
        return 4 * pairs <= ctx + 1 and pairs <= self.symbols

    @property
    def vocab_size(self) -> int:
        return self.vocab if self.name == "zoology" else gen.VOCAB

    def cache_key(self) -> dict:
        """What an example set depends on (the suite's keys as they were before formats existed)."""
        if self.name == "zoology":
            return {"mqar_format": "zoology", "mqar_vocab": self.vocab, "mqar_power_a": self.power_a}
        return {"mqar_symbols": self.symbols}


def make_example(task: str, length: int, depth: float, seed, mqar_pairs: int,
                 mqar: MQARFormat = MQARFormat()) -> gen.Example:
    if task == "passkey":
        return gen.passkey(length, depth, seed)
    if task.startswith("niah_"):
        return gen.niah(length, depth, seed, variant=task.split("_", 1)[1])
    if task == "variable_tracking":
        return gen.variable_tracking(length, seed)
    if task == "mqar":
        return mqar.example(length, mqar_pairs, seed)
    raise ValueError(f"unknown long-QA sub-task {task!r}; available: {', '.join(SUBTASKS)}")


def to_tensors(examples: list[gen.Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, L-1) and targets (B, L-1): the answer token at each answer position - 1, IGNORE elsewhere."""
    ids = torch.tensor([e.ids for e in examples])  # (B, L)
    y = torch.full_like(ids[:, 1:], IGNORE)
    for b, e in enumerate(examples):
        y[b, torch.tensor(e.answer_pos) - 1] = torch.tensor(e.answer)
    return ids[:, :-1], y


@register("longqa")
class LongQATask:
    name = "longqa"

    def __init__(self, task_cfg, data_cfg, ctx: int, seed: int = 0):
        self.cfg, self.ctx, self.seed = task_cfg, ctx, seed
        self.mixture = {str(k): float(v) for k, v in task_cfg.mixture.items() if float(v) > 0}
        for name in self.mixture:
            if name not in SUBTASKS:
                raise ValueError(f"task.mixture names unknown sub-task {name!r}; available: {', '.join(SUBTASKS)}")
        self.mqar = MQARFormat(str(task_cfg.get("mqar_format", "suite")), int(task_cfg.get("mqar_symbols", gen.MQAR_KEYS)),
                               int(task_cfg.get("mqar_vocab", gen.ZOOLOGY_VOCAB)), float(task_cfg.get("mqar_power_a", 0.01)))
        if self.mqar.name == "zoology" and set(self.mixture) != {"mqar"}:
            raise ValueError(f"task.mqar_format=zoology has a vocabulary of its own: MQAR alone (task.mixture "
                             f"names {', '.join(self.mixture)})")
        self.grid = {int(k): v for k, v in (task_cfg.get("mqar_grid") or {}).items()}
        if self.grid and ctx not in self.grid:
            raise ValueError(f"task {task_cfg.name}: CTX={ctx} is not a point of its grid (task.mqar_grid); "
                             f"CTX={','.join(map(str, sorted(self.grid)))}")
        # evaluated; trained: a mix of pair counts, as Zoology trains; more pairs = more answers per sequence
        self.mqar_pairs = int(self.grid[ctx]["pairs"]) if self.grid else int(task_cfg.mqar_pairs)
        train_pairs = [self.mqar_pairs] if self.grid else (task_cfg.get("mqar_train_pairs") or [self.mqar_pairs])
        self.mqar_train_pairs = [int(p) for p in train_pairs if self.mqar.fits(int(p), ctx)]
        if "mqar" in self.mixture and not self.mqar_train_pairs:
            raise ValueError(f"task.mqar_train_pairs={list(train_pairs)}: none fits ctx={ctx} (4 x pairs <= ctx)")
        too_long = {}  # every sub-task must fit the training context; those that do not, all in one message
        for name in self.mixture:
            try:
                make_example(name, ctx + 1, 0.5, "check", self.mqar_pairs, self.mqar)
            except ValueError as e:
                too_long[name] = str(e)
        if too_long:
            raise ValueError(f"long-QA sub-task{'s' * (len(too_long) > 1)} {', '.join(too_long)} do"
                             f"{'es' * (len(too_long) == 1)} not fit ctx={ctx} ({'; '.join(too_long.values())}); "
                             f"use a longer CTX or {' '.join(f'task.mixture.{n}=0' for n in too_long)}")
        self.train_examples = int(task_cfg.get("train_examples") or 0)  # 0: fresh examples every step
        self.epochs = task_cfg.get("epochs")
        self.dev_examples = int(task_cfg.get("dev_examples") or 0)
        tokenizer = f"mqar_zoology{self.mqar.vocab}" if self.mqar.name == "zoology" else "bytes+mqar"
        self.info = {"data": "generated", "tokenizer": tokenizer, "subtasks": ",".join(self.mixture)}
        if self.grid:
            self.info["mqar_pairs"] = self.mqar_pairs
        self._train_set = None

    @classmethod
    def check(cls, task_cfg, data_cfg, ctx: int) -> None:
        """The constructor's checks of ctx (every sub-task fits it; the MQAR grid has it; some pair count fits it):
        building the runner reads no data and draws no example set (tasks/registry.check_task)."""
        cls(task_cfg, data_cfg, ctx)

    @property
    def vocab_size(self) -> int:
        return self.mqar.vocab_size

    def budget(self) -> dict:
        """The trainer settings this task's protocol sets (bench/run.py fills those the config leaves null):
        tokens = train_examples x epochs x ctx, batch_tokens = the grid's batch (sequences) x ctx."""
        out = {}
        if self.train_examples and self.epochs:
            out["tokens"] = self.train_examples * int(self.epochs) * self.ctx
        if self.grid and "batch" in self.grid[self.ctx]:
            out["batch_tokens"] = int(self.grid[self.ctx]["batch"]) * self.ctx
        return out

    def build_model(self, model_cfg):
        from architectures import build_model

        return build_model(model_cfg)

    def _draw(self, rng: random.Random, seed: str) -> gen.Example:
        names, weights = list(self.mixture), list(self.mixture.values())
        task = rng.choices(names, weights)[0]
        pairs = rng.choice(self.mqar_train_pairs) if task == "mqar" else self.mqar_pairs
        return make_example(task, self.ctx + 1, rng.random(), seed, pairs, self.mqar)

    def train_example(self, i: int) -> gen.Example:
        """Example i of the fixed training set (task.train_examples): a pure function of (seed, i)."""
        return self._draw(random.Random(f"longqa-train-{self.seed}-ex{i}"), f"train-{self.seed}-ex{i}")

    def examples(self, step: int, n: int) -> list[gen.Example]:
        """The n training examples of optimizer step `step`: a pure function of (seed, step). With a fixed
        training set, its examples step x n .. step x n + n - 1, modulo its size (epoch after epoch)."""
        if self.train_examples:
            return [self.train_example((step * n + i) % self.train_examples) for i in range(n)]
        rng = random.Random(f"longqa-train-{self.seed}-{step}")
        return [self._draw(rng, f"train-{self.seed}-{step}-{i}") for i in range(n)]

    def training_set(self) -> dict:
        """The fixed training set as tensors x, y (N, ctx), generated once and cached (tasks/cache.py)."""
        if self._train_set is None:
            config = {"generator": gen.VERSION, "split": "train", "n": self.train_examples, "ctx": self.ctx,
                      "seed": self.seed, "mixture": self.mixture, "mqar_train_pairs": self.mqar_train_pairs,
                      "mqar_pairs": self.mqar_pairs, **self.mqar.cache_key()}

            def build() -> dict:
                x, y = to_tensors([self.train_example(i) for i in range(self.train_examples)])
                small = torch.int16 if self.vocab_size < 2 ** 15 else torch.int32
                return {"x": x.to(small), "y": y.to(small)}

            self._train_set = cached("longqa-train", config, build)
        return self._train_set

    def batch(self, step: int, batch_size: int):
        if not self.train_examples:
            return to_tensors(self.examples(step, batch_size))
        data = self.training_set()
        idx = (step * batch_size + torch.arange(batch_size)) % self.train_examples
        return data["x"][idx].long(), data["y"][idx].long()

    @staticmethod
    def loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the answer tokens; the head's logits are computed there only."""
        at = y != IGNORE
        logits = model(x, at=at)  # (N, V): the answer positions, row-major
        return F.cross_entropy(logits.float(), y[at])

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
        return self._held_out("eval", task, length, depth, n)

    def _held_out(self, split: str, task: str, length: int, depth: float | None, n: int) -> list[gen.Example]:
        """n examples of a held-out split ("eval": the reported test examples; "dev": early stopping and
        lr selection), each from seeds of its own, cached on disk by their config."""
        config = {"generator": gen.VERSION, "task": task, "length": length, "depth": depth, "n": n,
                  "seed": self.seed, "mqar_pairs": self.mqar_pairs, **self.mqar.cache_key()}
        if split != "eval":  # the test sets' keys as they were before dev splits existed
            config["split"] = split

        def build() -> list[dict]:
            out = []
            for i in range(n):
                d = depth if depth is not None else random.Random(f"{split}-depth-{i}").random()
                try:
                    e = make_example(task, length + 1, d, f"{split}-{self.seed}-{i}", self.mqar_pairs, self.mqar)
                except ValueError:  # a shorter eval length than this sub-task needs: no cell
                    break
                out.append({"ids": e.ids, "answer_pos": e.answer_pos, "targets": e.targets})
            return out

        return [gen.Example(task, r["ids"], r["answer_pos"], targets=r.get("targets"))
                for r in cached("longqa", config, build)]

    def _score(self, model, task: str, exs: list[gen.Example], device, autocast,
               digest: ExampleDigest | None = None) -> tuple[list[float], list[float]]:
        """(each example's score, in order; the answer-token losses of each batch). MQAR: the fraction of queried
        values recalled (Zoology's accuracy); the others: exact match, 1 when every answer token is right, else 0.
        `digest` takes each batch's inputs and targets (tasks/scores.py)."""
        bs, scores, losses = int(self.cfg.eval_batch_size), [], []
        for lo in range(0, len(exs), bs):
            x, y = to_tensors(exs[lo:lo + bs])  # (B, L-1) each
            if digest is not None:
                digest.add(x, y)
            x, y = x.to(device), y.to(device)
            at = y != IGNORE
            with autocast():
                logits = model(x, at=at).float()  # (N, V): the answer positions, row-major
            hit = (logits.argmax(-1) == y[at]).float()
            row = at.nonzero()[:, 0]  # the example of each answer
            hits = torch.zeros(len(x), device=device).index_add_(0, row, hit)  # (B,)
            answers = at.sum(-1)
            scores += (hits / answers if task == "mqar" else (hits == answers).float()).tolist()
            losses.append(F.cross_entropy(logits, y[at]).item())
        return scores, losses

    @torch.no_grad()
    def validate(self, model, device, autocast) -> dict:
        """The dev split (task.dev_examples per sub-task, at ctx): dev_acc and dev_loss. What early stopping
        and best-lr selection read: never the reported test examples."""
        if not self.dev_examples:
            raise ValueError("task.dev_examples is 0: no dev split to validate on (early stopping needs one)")
        was_training = model.training
        model.eval()
        right, n, losses = 0.0, 0, []
        for task in self.mixture:
            exs = self._held_out("dev", task, self.ctx, None, self.dev_examples)
            scores, ls = self._score(model, task, exs, device, autocast)
            right, n, losses = right + sum(scores), n + len(exs), losses + ls
        model.train(was_training)
        return {"dev_acc": right / n, "dev_loss": sum(losses) / len(losses)}

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict:
        model.eval()
        n = int(self.cfg.eval_examples)
        cells, losses, at_ctx_scores = [], [], []
        digest = ExampleDigest("longqa", self.ctx)  # the examples at ctx: what val_acc reads
        for task, length, depth in self.eval_cells():
            exs = self.eval_examples(task, length, depth, n)
            if not exs:
                continue
            trained_length = length == self.ctx
            scores, ls = self._score(model, task, exs, device, autocast, digest if trained_length else None)
            if trained_length:
                losses += ls
                at_ctx_scores += scores
            cells.append({"subtask": task, "length": length, "depth": depth, "n": len(exs),
                          "acc": sum(scores) / len(exs)})
        model.train()
        out = {"longqa_cells": cells,
               "val_acc": sum(at_ctx_scores) / max(1, len(at_ctx_scores)),
               "val_loss": sum(losses) / max(1, len(losses)),
               "val_example_acc": at_ctx_scores, "val_examples_hash": digest.hexdigest()}
        at_ctx = [c for c in cells if c["length"] == self.ctx]
        for task in self.mixture:
            mine = [c for c in at_ctx if c["subtask"] == task]
            if mine:
                out[f"acc_{task}"] = sum(c["acc"] * c["n"] for c in mine) / sum(c["n"] for c in mine)
        if self.dev_examples:
            out.update(self.validate(model, device, autocast))
        return out
