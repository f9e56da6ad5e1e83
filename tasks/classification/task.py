"""Sequence classification (LRA-style) for every architecture through the shared shell's
SequenceClassifier (pooling the hidden state at the last real token, natural for causal and recurrent
models). Byte-level inputs, padded with EOS (256) to the run's context (longer texts keep their first
ctx bytes, as LRA's byte-level IMDb does). Sources (task.source):

    listops      generated offline (listops.py), 10 classes
    text_files   your JSONL ({"text": ..., "label": ...} per line) or CSV (header with text,label) files,
                 task.paths (globs); labels are any strings, numbered in sorted order; a deterministic
                 task.val_fraction of the rows is held out
    hf           a Hugging Face dataset (needs the network): task.hf_name, task.hf_text / hf_label
                 fields, its train and test splits (e.g. imdb, as LRA uses it)
"""
from __future__ import annotations

import csv
import glob
import json
import os
import random
import zlib

import torch
import torch.nn.functional as F

from tasks.cache import cached
from tasks.classification import listops
from tasks.registry import register
from tasks.scores import ExampleDigest

PAD = 256  # EOS of the byte tokenizer; never inside a ListOps expression
VOCAB = 257


SOURCES = ("listops", "text_files", "hf")


def matching_files(patterns) -> list[str]:
    """The files the globs of task.paths match (~ expanded), sorted; at least one."""
    paths = sorted({p for pat in patterns for p in glob.glob(os.path.expanduser(str(pat)))})
    if not paths:
        raise FileNotFoundError(f"task.paths matched no files: {list(patterns)}")
    return paths


def read_text_files(patterns) -> list[tuple[str, str]]:
    """(text, label) rows of every JSONL / CSV file matching the globs, in file order."""
    rows = []
    for path in matching_files(patterns):
        with open(path, newline="", encoding="utf-8") as f:
            if path.endswith((".jsonl", ".json")):
                recs = [json.loads(line) for line in f if line.strip()]
            elif path.endswith(".csv"):
                recs = list(csv.DictReader(f))
            else:
                raise ValueError(f"{path}: classification files must be .jsonl or .csv")
        for i, r in enumerate(recs):
            if "text" not in r or "label" not in r:
                raise ValueError(f"{path} row {i + 1}: needs the fields text and label, got {sorted(r)}")
            rows.append((str(r["text"]), str(r["label"])))
    return rows


def read_hf(name: str, text_field: str, label_field: str) -> tuple[list, list]:
    from datasets import load_dataset  # needs the network (or a local HF cache)

    ds = load_dataset(name)
    pick = lambda split: [(str(r[text_field]), str(r[label_field])) for r in ds[split]]
    return pick("train"), pick("test" if "test" in ds else "validation")


@register("classification")
class ClassificationTask:
    name = "classification"

    @classmethod
    def check(cls, task_cfg, data_cfg, ctx: int) -> str:
        """Before any run (tasks/registry.check_task; the constructor too): a known source, and for text_files,
        files that task.paths matches. Returns the source."""
        source = str(task_cfg.source)
        if source not in SOURCES:
            raise ValueError(f"classification source {source!r} is not available; available: {', '.join(SOURCES)}")
        if source == "text_files":
            matching_files(task_cfg.paths)
        return source

    def __init__(self, task_cfg, data_cfg, ctx: int, seed: int = 0):
        source = self.check(task_cfg, data_cfg, ctx)
        self.cfg, self.ctx, self.seed, self.source = task_cfg, ctx, seed, source
        if source == "listops":
            self.min_len = max(5, int(float(task_cfg.min_len_frac) * ctx))
            self.n_classes = 10
            self.info = {"data": "listops", "tokenizer": "bytes", "classes": self.n_classes}
            return
        if source == "text_files":
            rows = read_text_files(task_cfg.paths)
            held = lambda i: zlib.crc32(f"{seed}-{i}".encode()) % 1000 < 1000 * float(task_cfg.val_fraction)
            self.train_rows = [r for i, r in enumerate(rows) if not held(i)]
            self.val_rows = [r for i, r in enumerate(rows) if held(i)]
            name = ",".join(str(p) for p in task_cfg.paths)
        else:
            self.train_rows, self.val_rows = read_hf(str(task_cfg.hf_name), str(task_cfg.hf_text),
                                                     str(task_cfg.hf_label))
            name = str(task_cfg.hf_name)
        if not self.train_rows or not self.val_rows:
            raise ValueError(f"classification data {name}: {len(self.train_rows)} training and {len(self.val_rows)} "
                             f"held-out rows; need both")
        self.labels = sorted({label for _, label in self.train_rows + self.val_rows})
        self.n_classes = len(self.labels)
        self.info = {"data": source, "tokenizer": "bytes", "classes": self.n_classes,
                     "train_rows": len(self.train_rows), "val_rows": len(self.val_rows)}

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def build_model(self, model_cfg):
        from architectures import build_model
        from architectures.shell import SequenceClassifier

        return SequenceClassifier(build_model(model_cfg), self.n_classes, pooling=str(self.cfg.pooling))

    def _encode(self, rows: list[tuple[str, int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, max_len) bytes padded with PAD (texts keep their first max_len bytes), labels (n,)."""
        x = torch.full((len(rows), max_len), PAD, dtype=torch.long)
        y = torch.empty(len(rows), dtype=torch.long)
        for i, (text, label) in enumerate(rows):
            ids = list(text.encode("utf-8"))[:max_len] or [PAD]
            x[i, : len(ids)], y[i] = torch.tensor(ids), label
        return x, y

    def _examples(self, tag: str, n: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source == "listops":
            lo, depth, args = min(self.min_len, max_len), int(self.cfg.max_depth), int(self.cfg.max_args)

            def build() -> list[tuple[str, int]]:
                return [listops.example(f"{tag}-{i}", lo, max_len, depth, args) for i in range(n)]

            if not tag.startswith("val"):
                return self._encode(build(), max_len)
            config = {"generator": listops.VERSION, "tag": tag, "n": n, "min_len": lo, "max_len": max_len,
                      "max_depth": depth, "max_args": args}  # the held-out set: generated once per machine
            return self._encode([tuple(r) for r in cached("listops", config, build)], max_len)
        if tag.startswith("val"):
            rows = self.val_rows[:n]
        else:  # a pure function of the step: resumed runs see the same rows
            rng = random.Random(tag)
            rows = [self.train_rows[rng.randrange(len(self.train_rows))] for _ in range(n)]
        index = {label: i for i, label in enumerate(self.labels)}
        return self._encode([(t, index[label]) for t, label in rows], max_len)

    def batch(self, step: int, batch_size: int):
        return self._examples(f"train-{self.seed}-{step}", batch_size, self.ctx)

    @staticmethod
    def loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lengths = (x != PAD).sum(-1)
        return F.cross_entropy(model(x, lengths).float(), y)

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict:
        model.eval()
        x, y = self._examples(f"val-{self.seed}", int(self.cfg.eval_examples), self.ctx)  # (n, ctx), (n,)
        digest = ExampleDigest("classification", self.ctx)
        digest.add(x, y)
        bs, losses, right = int(self.cfg.eval_batch_size), [], []
        for lo in range(0, len(y), bs):
            xb, yb = x[lo:lo + bs].to(device), y[lo:lo + bs].to(device)
            with autocast():
                logits = model(xb, (xb != PAD).sum(-1)).float()
            losses.append(F.cross_entropy(logits, yb, reduction="sum").item())
            right += (logits.argmax(-1) == yb).int().tolist()  # (B,) 1 right, 0 wrong
        model.train()
        majority = int(torch.bincount(y, minlength=self.n_classes).max()) / len(y)
        return {"val_loss": sum(losses) / len(y), "val_acc": sum(right) / len(y), "val_majority_acc": majority,
                "val_examples": len(y), "val_example_acc": right, "val_examples_hash": digest.hexdigest()}
