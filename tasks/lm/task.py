"""Language modeling on packed text: next-token cross-entropy, evaluated by loss, perplexity,
bits per byte, and loss by token position."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.lm.data import PackedWindows, check_source, load_corpus, pack
from tasks.lm.evaluate import evaluate_lm, unigram_bits_per_byte
from tasks.lm.tokenizers import build_tokenizer
from tasks.registry import register


@register("lm")
class LMTask:
    name = "lm"

    def __init__(self, task_cfg, data_cfg, ctx: int, seed: int = 0):
        self.cfg, self.data_cfg, self.ctx, self.seed = task_cfg, data_cfg, ctx, seed
        self.tokenizer = build_tokenizer(str(data_cfg.tokenizer))
        corpus = load_corpus(data_cfg)
        self.train = PackedWindows(pack(corpus.train, self.tokenizer), ctx, "training")
        val = PackedWindows(pack(corpus.val, self.tokenizer), ctx, "validation")
        max_windows = max(1, int(task_cfg.eval_tokens) // ctx)
        val.n = min(val.n, max_windows)  # evaluate on the first eval_tokens of the validation stream
        self.val = val
        val_text = "".join(d.text for d in corpus.val).encode("utf-8")
        self.val_unigram_bpb = unigram_bits_per_byte(val_text)
        self.info = {
            "data": data_cfg.name,
            "tokenizer": self.tokenizer.name,
            "train_docs": len(corpus.train),
            "val_docs": len(corpus.val),
            "train_tokens_available": len(self.train.stream),
            "val_unigram_bpb": self.val_unigram_bpb,
        }

    @classmethod
    def check(cls, task_cfg, data_cfg, ctx: int) -> None:
        """Before any run (tasks/registry.check_task): the data source is known and its files exist."""
        check_source(data_cfg)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def build_model(self, model_cfg):
        from architectures import build_model

        return build_model(model_cfg)

    def batch(self, step: int, batch_size: int):
        """Inputs and targets (B, ctx) of optimizer step `step`."""
        return self.train.batch(self.train.train_indices(step, batch_size, self.seed))

    @staticmethod
    def loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def evaluate(self, model, device, autocast) -> dict:
        out = evaluate_lm(model, self.val, self.tokenizer.token_bytes(), int(self.cfg.eval_batch_size), device, autocast)
        out["val_unigram_bpb"] = self.val_unigram_bpb
        return out
