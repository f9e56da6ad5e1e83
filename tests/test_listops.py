"""ListOps and the classification task: the generator is deterministic, lengths within bounds, labels
equal an independent evaluation; batches are padded expressions; TASK=classification runs end to end."""
import statistics

import pytest
import torch

from tasks.classification.listops import example


def evaluate_by_stack(text: str) -> int:
    """An evaluator independent of the generator: a stack machine over the tokens of the text."""
    ops = {"MIN": min, "MAX": max, "MED": lambda xs: int(statistics.median(xs)), "SM": lambda xs: sum(xs) % 10}
    stack = []
    for tok in text.split():
        if tok.startswith("["):
            stack.append([tok[1:]])
        elif tok == "]":
            op, *args = stack.pop()
            result = ops[op](args)
            if not stack:
                return result
            stack[-1].append(result)
        else:
            stack[-1].append(int(tok))
    raise ValueError("unbalanced expression")


@pytest.mark.parametrize("lo,hi", [(10, 60), (200, 400), (500, 2000)])
def test_listops_lengths_labels_and_determinism(lo, hi):
    labels = []
    for seed in range(20):
        text, label = example(seed, lo, hi)
        assert lo <= len(text) <= hi and (text, label) == example(seed, lo, hi)
        assert label == evaluate_by_stack(text) and 0 <= label <= 9
        assert text.startswith("[") and text.count("[") == text.count("]")
        labels.append(label)
    assert len(set(labels)) >= 3  # not a constant


def test_operator_semantics():
    assert evaluate_by_stack("[MED 1 2 ]") == 1 and evaluate_by_stack("[SM 9 8 ]") == 7
    assert evaluate_by_stack("[MAX 4 3 [MIN 2 3 ] 1 0 ]") == 4


def test_bad_lengths():
    with pytest.raises(ValueError):
        example(0, 100, 50)


def test_an_unknown_source_fails_clearly():
    from omegaconf import OmegaConf

    from tasks.classification.task import ClassificationTask

    with pytest.raises(ValueError, match="not available; available: listops, text_files, hf"):
        ClassificationTask(OmegaConf.create({"source": "imdb"}), None, 256)


def test_classification_batches_pad_after_the_expression():
    from omegaconf import OmegaConf

    from tasks.classification.task import PAD, ClassificationTask

    cfg = OmegaConf.create({"source": "listops", "min_len_frac": 0.25, "max_depth": 10, "max_args": 10,
                            "pooling": "last"})
    task = ClassificationTask(cfg, None, 128)
    x, y = task.batch(0, 4)
    assert x.shape == (4, 128) and y.shape == (4,)
    for row, label in zip(x, y):
        n = int((row != PAD).sum())
        assert 32 <= n <= 128 and (row[n:] == PAD).all()
        assert evaluate_by_stack(bytes(row[:n].tolist()).decode()) == int(label)
    assert torch.equal(task.batch(0, 4)[0], x)  # a pure function of the step


@pytest.mark.slow
def test_classification_smoke_sweep_end_to_end(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "bench.sweep", "--arch", "transformer,mamba", "--ctx", "128",
                          "--profile", "smoke", "--sizes", "smoke-xs", "--task", "classification",
                          "--results", str(tmp_path), "logger=none"], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/summary.json")]
    assert {r["arch"] for r in runs} == {"transformer", "mamba"}
    for s in runs:
        assert s["status"] == "ok" and s["task"] == "classification" and s["data"] == "listops"
        assert 0.0 <= s["val_acc"] <= 1.0 and s["val_loss"] > 0 and s["params"] > 0
        assert len(s["val_example_acc"]) == s["val_examples"]
    assert runs[0]["val_examples_hash"] == runs[1]["val_examples_hash"]  # the same examples: compared one by one
    assert "transformer vs mamba accuracy " in res.stdout and "examples)" in res.stdout
    assert (tmp_path / "plots" / "classification_accuracy.png").stat().st_size > 10_000


def test_text_files_source_reads_jsonl_and_csv(tmp_path):
    import json

    from omegaconf import OmegaConf

    from tasks.classification.task import PAD, ClassificationTask

    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"review {i} " + ("good " if i % 2 else "bad ") * 5, "label": "pos" if i % 2
                                else "neg"}) + "\n")
    (tmp_path / "b.csv").write_text("text,label\n" + "".join(f"csv row {i},neutral\n" for i in range(20)))
    cfg = OmegaConf.create({"source": "text_files", "paths": [str(tmp_path / "*.jsonl"), str(tmp_path / "*.csv")],
                            "val_fraction": 0.2, "pooling": "last", "eval_examples": 512})
    task = ClassificationTask(cfg, None, 16)
    assert task.labels == ["neg", "neutral", "pos"] and task.n_classes == 3
    assert len(task.train_rows) + len(task.val_rows) == 80 and 5 <= len(task.val_rows) <= 30
    assert not set(task.train_rows) & set(task.val_rows)  # held-out rows never train
    x, y = task.batch(3, 8)
    assert x.shape == (8, 16) and torch.equal(task.batch(3, 8)[0], x)  # texts cut to ctx bytes
    assert ((x != PAD).sum(-1) == 16).any() and set(y.tolist()) <= {0, 1, 2}
    with pytest.raises(FileNotFoundError, match="matched no files"):
        ClassificationTask(OmegaConf.create({**cfg, "paths": [str(tmp_path / "none*.jsonl")]}), None, 16)


def test_evaluation_counts_its_held_out_examples_and_the_plot_says_how_many(tmp_path, monkeypatch):
    """val_examples is recorded, so a majority-class line at 0.5 over the smoke profile's 2 examples reads as
    what it is; classification_accuracy.png puts the count in its title."""
    import contextlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from omegaconf import OmegaConf

    from bench import plots
    from tasks.classification.task import ClassificationTask

    class Constant(torch.nn.Module):  # always class 0
        def forward(self, x, lengths):
            return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([0]), 1.0)

    cfg = OmegaConf.create({"source": "listops", "min_len_frac": 0.25, "max_depth": 10, "max_args": 10,
                            "pooling": "last", "eval_examples": 6, "eval_batch_size": 4})
    out = ClassificationTask(cfg, None, 64).evaluate(Constant(), torch.device("cpu"), contextlib.nullcontext)
    assert out["val_examples"] == 6 and 0 <= out["val_acc"] <= out["val_majority_acc"] <= 1
    # each example's score (bench/gaps.py compares two runs example by example) and a hash of the examples
    _, y = ClassificationTask(cfg, None, 64)._examples("val-0", 6, 64)
    assert out["val_example_acc"] == (y == 0).int().tolist() and sum(out["val_example_acc"]) / 6 == out["val_acc"]
    again = ClassificationTask(OmegaConf.merge(cfg, {"eval_batch_size": 6}), None, 64)
    assert again.evaluate(Constant(), torch.device("cpu"), contextlib.nullcontext)["val_examples_hash"] == \
        out["val_examples_hash"]
    for other in (ClassificationTask(OmegaConf.merge(cfg, {"eval_examples": 5}), None, 64),
                  ClassificationTask(cfg, None, 64, seed=1), ClassificationTask(cfg, None, 96)):
        assert other.evaluate(Constant(), torch.device("cpu"), contextlib.nullcontext)["val_examples_hash"] != \
            out["val_examples_hash"]
    drawn = []
    monkeypatch.setattr(plots, "finish", lambda fig, path: drawn.append(fig))
    runs = pd.DataFrame([{"task": "classification", "arch": "mamba", "ctx": 64, "params": p, "backend": "b",
                          "data": "listops", "val_acc": 0.2, "val_majority_acc": 0.5, "val_examples": 6}
                         for p in (1e4, 2e4)])
    plots.plot_classification(runs, tmp_path)
    assert drawn[0].axes[0].get_title() == "listops classification, context 64 tokens; 6 held-out examples"
    plt.close(drawn[0])
