"""Each evaluated example's score and a hash of the examples: what a run keeps to be compared example by example.

The accuracy tasks (longqa, classification) write two fields into a run's summary beside val_acc:

    val_example_acc    each reported test example's score, in evaluation order: 1 right, 0 wrong (MQAR: the
                       fraction of its queried values recalled); their mean is val_acc
    val_examples_hash  a hash of those examples' inputs and answers (ExampleDigest)

Two runs with the same hash scored the same examples, so their accuracies are compared example by example
(bench/gaps.py: make sweep's RESULTS/comparisons.md), as the language-modeling runs' losses are window by window
(tasks/lm/evaluate.py: val_window_loss, val_windows_hash).
"""
from __future__ import annotations

import hashlib

import torch


class ExampleDigest:
    """A hash of the examples an evaluation scores, one by one (so it does not depend on the batch size): each
    example's inputs and answers, their shapes, dtypes and values, in order."""

    def __init__(self, *context):
        self._sha = hashlib.sha1(repr(context).encode())  # e.g. the task and the context length

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A batch of examples: inputs x (B, ...) and answers y (B, ...)."""
        for xi, yi in zip(x.detach().cpu(), y.detach().cpu()):
            for t in (xi, yi):
                self._sha.update(f"{tuple(t.shape)}:{t.dtype}:".encode())
                self._sha.update(t.contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()[:16]
