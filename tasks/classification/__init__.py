"""Sequence classification (LRA-style) for every architecture through the shared shell's
SequenceClassifier (pooling the hidden state at the last real token, natural for causal and recurrent
models). Source: ListOps generated offline (listops.py), byte-level, padded with EOS (256) to the run's
context. In progress: local JSONL/CSV text files and Hugging Face datasets as sources, plots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.classification import listops

PAD = 256  # EOS of the byte tokenizer; never inside a ListOps expression
VOCAB = 257


class ClassificationTask:
    name = "classification"

    def __init__(self, task_cfg, data_cfg, ctx: int, seed: int = 0):
        if str(task_cfg.source) != "listops":
            raise ValueError(f"classification source {task_cfg.source!r} is not available yet; available: listops")
        self.cfg, self.ctx, self.seed = task_cfg, ctx, seed
        self.min_len = max(5, int(float(task_cfg.min_len_frac) * ctx))
        self.n_classes = 10
        self.info = {"data": "listops", "tokenizer": "bytes", "classes": self.n_classes}

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def build_model(self, model_cfg):
        from architectures import build_model
        from architectures.shell import SequenceClassifier

        return SequenceClassifier(build_model(model_cfg), self.n_classes, pooling=str(self.cfg.pooling))

    def _examples(self, tag: str, n: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, max_len) bytes padded with PAD, labels (n,)."""
        x = torch.full((n, max_len), PAD, dtype=torch.long)
        y = torch.empty(n, dtype=torch.long)
        lo = min(self.min_len, max_len)
        for i in range(n):
            text, label = listops.example(f"{tag}-{i}", lo, max_len, int(self.cfg.max_depth), int(self.cfg.max_args))
            ids = list(text.encode())
            x[i, : len(ids)], y[i] = torch.tensor(ids), label
        return x, y

    def batch(self, step: int, batch_size: int):
        return self._examples(f"train-{self.seed}-{step}", batch_size, self.ctx)

    @staticmethod
    def loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lengths = (x != PAD).sum(-1)
        return F.cross_entropy(model(x, lengths).float(), y)

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict:
        model.eval()
        x, y = self._examples(f"val-{self.seed}", int(self.cfg.eval_examples), self.ctx)
        bs, losses, correct = int(self.cfg.eval_batch_size), [], 0
        for lo in range(0, len(y), bs):
            xb, yb = x[lo:lo + bs].to(device), y[lo:lo + bs].to(device)
            with autocast():
                logits = model(xb, (xb != PAD).sum(-1)).float()
            losses.append(F.cross_entropy(logits, yb, reduction="sum").item())
            correct += int((logits.argmax(-1) == yb).sum())
        model.train()
        majority = int(torch.bincount(y, minlength=10).max()) / len(y)
        return {"val_loss": sum(losses) / len(y), "val_acc": correct / len(y), "val_majority_acc": majority}
