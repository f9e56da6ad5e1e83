"""Long-context QA generators: deterministic for a seed, exact lengths, and they contain what they claim."""
from pathlib import Path

import pytest
import torch

from tasks.longqa.generators import BYTE_VOCAB, MQAR_KEYS, VOCAB, mqar, niah, passkey, variable_tracking


def text(ex, upto=None):
    return bytes(i for i in ex.ids[:upto] if i < 256).decode("utf-8")


@pytest.mark.parametrize("length", [200, 1024, 3001])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_at_its_depth_with_exact_length(length, depth):
    ex = passkey(length, depth, seed=7)
    assert len(ex.ids) == length and ex == passkey(length, depth, seed=7)
    key = ex.meta["key"]
    assert bytes(ex.answer).decode() == key and ex.answer_pos[-1] == length - 1
    prompt = text(ex, ex.answer_pos[0])
    at = prompt.index(f"The pass key is {key}.")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    filler = len(prompt) - len("What is the pass key? The pass key is ") - len(needle)
    assert abs(at - depth * filler) <= 1  # the needle starts at the requested depth of the filler
    assert prompt.endswith("The pass key is ") and key not in prompt[at + 60:]


def test_seeds_differ():
    assert passkey(512, 0.5, 0).meta["key"] != passkey(512, 0.5, 1).meta["key"]


@pytest.mark.parametrize("variant", ["single", "multikey", "multivalue", "multiquery"])
def test_niah_needles_answer_the_question(variant):
    ex = niah(2048, 0.3, seed=3, variant=variant)
    assert len(ex.ids) == 2048 and ex == niah(2048, 0.3, seed=3, variant=variant)
    prompt, answer = text(ex, ex.answer_pos[0]), bytes(ex.answer).decode()
    values = answer.rstrip(".").split(", ")
    for v in values:
        assert f"is: {v}." in prompt  # every answer value is a needle in the text
    if variant in ("single", "multikey"):
        assert len(values) == 1
    if variant == "multikey":
        assert prompt.count("special magic numbers for") >= 4  # the distractors
    if variant == "multivalue":
        assert [prompt.index(v) for v in values] == sorted(prompt.index(v) for v in values)  # in text order
    with pytest.raises(ValueError, match="unknown NIAH variant"):
        niah(512, 0.5, 0, variant="double")


def test_variable_tracking_chain():
    ex = variable_tracking(1500, seed=2, hops=4)
    assert len(ex.ids) == 1500
    prompt, names = text(ex, ex.answer_pos[0]), bytes(ex.answer).decode().rstrip(".").split(" ")
    value = prompt.split("assigned the value ")[1].split(" ")[0]
    assert f"VAR {names[0]} = {value}." in prompt
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in prompt
        assert prompt.index(f"VAR {a} =") < prompt.index(f"VAR {b} =")  # chain order


def test_mqar_queries_refer_to_keys_present_with_their_values():
    ex = mqar(256, 8, seed=5)
    assert len(ex.ids) == 256 and ex == mqar(256, 8, seed=5) and max(ex.ids) < VOCAB
    pairs = {ex.ids[2 * i]: ex.ids[2 * i + 1] for i in range(8)}
    assert all(BYTE_VOCAB <= k < BYTE_VOCAB + MQAR_KEYS for k in pairs)
    assert all(BYTE_VOCAB + MQAR_KEYS <= v < VOCAB for v in pairs.values())
    assert len(ex.answer_pos) == 8  # every key is queried once
    for p in ex.answer_pos:
        assert p >= 16 and pairs[ex.ids[p - 1]] == ex.ids[p]
    with pytest.raises(ValueError):
        mqar(20, 8, 0)


def test_mqar_alphabet_and_training_pair_counts():
    from omegaconf import OmegaConf

    from tasks.longqa.task import LongQATask

    ex = mqar(256, 8, seed=5, n_symbols=16)
    keys, values = ex.ids[0:16:2], ex.ids[1:16:2]
    assert all(BYTE_VOCAB <= k < BYTE_VOCAB + 16 for k in keys) and len(set(keys)) == 8
    assert all(BYTE_VOCAB + MQAR_KEYS <= v < BYTE_VOCAB + MQAR_KEYS + 16 for v in values)
    with pytest.raises(ValueError, match="pairs <= symbols"):
        mqar(256, 8, 0, n_symbols=4)
    cfg = OmegaConf.create({"mixture": {"mqar": 1.0}, "mqar_pairs": 8, "mqar_train_pairs": [8, 32, 64, 128],
                            "mqar_symbols": 256})
    task = LongQATask(cfg, None, 256)
    assert task.mqar_train_pairs == [8, 32, 64]  # 128 pairs need 512 tokens: dropped
    counts = {len(e.answer_pos) for e in task.examples(0, 64)}
    assert counts == {8, 32, 64}
    assert all(len(e.answer_pos) == 8 for e in task.eval_examples("mqar", 256, None, 4))  # evaluated at mqar_pairs
    cfg.mqar_train_pairs = [128]
    with pytest.raises(ValueError, match="none fits ctx=256"):
        LongQATask(cfg, None, 256)


def test_too_short_for_its_content_fails_clearly():
    with pytest.raises(ValueError, match="too short"):
        passkey(40, 0.5, 0)


def test_targets_are_the_answer_tokens_only():
    from tasks.longqa.task import IGNORE, to_tensors

    exs = [passkey(300, 0.5, 0), mqar(300, 8, 1)]
    x, y = to_tensors(exs)
    assert x.shape == y.shape == (2, 299)
    for b, e in enumerate(exs):
        scored = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert [p + 1 for p in scored] == e.answer_pos  # logits at p predict the token at p + 1
        assert y[b, scored].tolist() == e.answer


def test_a_subtask_that_does_not_fit_the_context_fails_clearly():
    from omegaconf import OmegaConf

    from tasks.longqa.task import LongQATask

    cfg = OmegaConf.create({"mixture": {"niah_multikey": 1.0}, "mqar_pairs": 8})
    with pytest.raises(ValueError, match="does not fit ctx=256"):
        LongQATask(cfg, None, 256)
    cfg = OmegaConf.create({"mixture": {"passkey": 1.0, "niah_multikey": 1.0, "niah_multivalue": 1.0}, "mqar_pairs": 8})
    with pytest.raises(ValueError) as e:  # every one that does not fit, in one message: one fix, not two tries
        LongQATask.check(cfg, None, 256)
    assert "sub-tasks niah_multikey, niah_multivalue do not fit ctx=256" in str(e.value)
    assert "needs at least 387" in str(e.value) and "needs at least 266" in str(e.value)
    assert str(e.value).endswith("task.mixture.niah_multikey=0 task.mixture.niah_multivalue=0")
    LongQATask.check(OmegaConf.create({"mixture": {"passkey": 1.0}, "mqar_pairs": 8}), None, 256)


@pytest.mark.slow
def test_longqa_smoke_sweep_end_to_end(tmp_path):
    """TASK=longqa through make sweep's entry point: runs train, evaluate every cell, write summaries."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "bench.sweep", "--arch", "transformer,mamba", "--ctx", "512",
                          "--profile", "smoke", "--sizes", "smoke-xs", "--task", "longqa", "--results", str(tmp_path),
                          "logger=none"], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for p in tmp_path.glob("runs/*/*/summary.json"):
        s = json.loads(p.read_text())
        assert s["status"] == "ok" and s["task"] == "longqa" and s["data"] == "generated"
        assert 0.0 <= s["val_acc"] <= 1.0 and s["val_loss"] > 0
        cells = s["longqa_cells"]
        assert {c["subtask"] for c in cells} >= {"passkey", "mqar", "variable_tracking"}
        assert {c["length"] for c in cells} == {256, 512, 1024}
        assert {c["depth"] for c in cells if c["subtask"] == "passkey"} == {0.0, 0.25, 0.5, 0.75, 1.0}
        scores = s["val_example_acc"]  # each test example at ctx, compared example by example (bench/gaps.py)
        assert len(scores) == sum(c["n"] for c in cells if c["length"] == 512)
        assert sum(scores) / len(scores) == pytest.approx(s["val_acc"])
    pairs = (tmp_path / "comparisons.csv").read_text().splitlines()
    assert len(pairs) == 2  # seed 0's pair; the variant column empty (no key varied)
    assert pairs[1].startswith("longqa,generated,smoke-xs,512,params,native,,0,val_acc,transformer,mamba,")
    for plot in ("longqa_accuracy.png", "passkey_heatmap.png", "training_curves.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 10_000, plot
    assert not (tmp_path / "plots" / "loss_vs_flops.png").exists()  # no language-modeling runs: no LM plots


def test_attention_maps_reproduce_each_layers_attention_output():
    from architectures import ModelConfig, build_model
    from bench.attention_heads import attention_maps

    torch.manual_seed(0)
    cfg = ModelConfig("transformer", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=48,
                      max_seq_len=64, options={"backend": "sdpa"})
    model = build_model(cfg).double().eval()
    outputs, inputs = [], []

    def keep(_module, args, out):  # returns None: the output is left as it is
        inputs.append(args[0])
        outputs.append(out)

    for block in model.blocks:
        block.attn.register_forward_hook(keep)
    x = torch.tensor([mqar(40, 4, s).ids[:-1] for s in range(3)])
    maps = attention_maps(model, x)
    for block, p, a, out in zip(model.blocks, maps, inputs[-2:], outputs[-2:]):
        attn = block.attn
        B, T, _ = a.shape
        v = attn.wv(a).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, f)
        y = (p @ v).transpose(1, 2).reshape(B, T, -1)
        torch.testing.assert_close(attn.wo(y), out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]))


def test_head_report_reads_the_recall_circuit_at_the_right_positions():
    from bench.attention_heads import head_report

    examples = [mqar(41, 4, s) for s in range(2)]
    T = 40
    previous = torch.zeros(2, 1, T, T)  # every position attends to the one before it
    previous[:, :, 0, 0] = 1
    previous[:, :, torch.arange(1, T), torch.arange(T - 1)] = 1
    induction = torch.zeros(2, 1, T, T)  # each query attends to the value of its key
    for b, e in enumerate(examples):
        for answer in e.answer_pos:
            key_pos = e.ids[:8].index(e.ids[answer - 1])
            induction[b, 0, answer - 1, key_pos + 1] = 1
    prev_row, ind_row = head_report([previous, induction], examples)
    assert (prev_row["prev@values"], prev_row["match@query"]) == (1.0, 0.0)
    assert (ind_row["prev@values"], ind_row["match@query"], ind_row["values@query"]) == (0.0, 1.0, 1.0)
    assert "window@query" not in ind_row
    # with a width-4 conv, a query may read its answer two positions past the value (the next pair's value,
    # whose conv window still holds the key and value): window@query sees it, match@query does not
    shifted = torch.zeros(2, 1, T, T)
    for b, e in enumerate(examples):
        for answer in e.answer_pos:
            shifted[b, 0, answer - 1, e.ids[:8].index(e.ids[answer - 1]) + 3] = 1
    (row,) = head_report([shifted], examples, conv_width=4)
    assert (row["match@query"], row["window@query"]) == (0.0, 1.0)
    assert head_report([shifted], examples, conv_width=3)[0]["window@query"] == 0.0


@pytest.mark.parametrize("length,pairs", [(64, 4), (128, 8), (256, 16), (512, 64)])
def test_mqar_zoology_keys_and_values_from_disjoint_halves(length, pairs):
    """Zoology's layout (zoology/data/multiquery_ar.py, figure 2): k1 v1 .. kn vn, then zeros with each key once
    at a query slot; keys from 1 .. 4095 and values from 4096 .. 8191, each distinct; the value is a label only."""
    from tasks.longqa.generators import mqar_zoology

    ex = mqar_zoology(length + 1, pairs, seed=3)
    assert len(ex.ids) == length + 1 and ex == mqar_zoology(length + 1, pairs, seed=3)
    keys, values = ex.ids[0:2 * pairs:2], ex.ids[1:2 * pairs:2]
    assert all(1 <= k < 4096 for k in keys) and all(4096 <= v < 8192 for v in values)
    assert len(set(keys)) == len(set(values)) == pairs
    value_of = dict(zip(keys, values))
    assert len(ex.answer_pos) == pairs and ex.answer_pos == sorted(ex.answer_pos)
    queried = [ex.ids[p - 1] for p in ex.answer_pos]
    assert sorted(queried) == sorted(keys)  # every key asked once
    assert ex.answer == [value_of[k] for k in queried]
    assert all(ex.ids[p] == 0 for p in ex.answer_pos)  # the input after a query stays 0
    assert sum(t != 0 for t in ex.ids[2 * pairs:]) == pairs  # zeros everywhere else
    assert all((p - 1 - 2 * pairs) % 2 == 0 for p in ex.answer_pos)  # queries at even slots of the query region
    with pytest.raises(ValueError, match="4 x pairs"):
        mqar_zoology(length, length // 2, 0)


def test_mqar_zoology_queries_prefer_early_slots():
    """power_a 0.01: slot i drawn with weight ~1/i; key j takes the j-th slot drawn, so early keys tend to come first."""
    from tasks.longqa.generators import mqar_zoology

    slots = [(p - 1 - 16) // 2 for i in range(400) for p in mqar_zoology(129, 8, i).answer_pos]
    first = sum(s < 8 for s in slots) / len(slots)
    assert first > 0.35  # uniform over the 56 slots would give 8/56 = 0.14


def zoology_task(ctx=128, **kw):
    from omegaconf import OmegaConf

    from tasks.longqa.task import LongQATask

    base = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "task" / "mqar_zoology.yaml")
    base.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "task" / "longqa.yaml"),
                          base, OmegaConf.create(kw))
    return LongQATask(cfg, None, ctx)


def test_mqar_zoology_task_grid_vocab_training_set_and_splits():
    from tasks.longqa.task import IGNORE

    task = zoology_task(128, train_examples=50, epochs=3, dev_examples=4, eval_examples=4)
    assert task.vocab_size == 8192 and task.mqar_pairs == 8 and task.mqar_train_pairs == [8]
    assert task.budget() == {"tokens": 50 * 3 * 128, "batch_tokens": 512 * 128}
    assert zoology_task(64).mqar_pairs == 4 and zoology_task(512).mqar_pairs == 64
    with pytest.raises(ValueError, match="CTX=100 is not a point of its grid"):
        zoology_task(100)
    x, y = task.batch(0, 8)
    assert x.shape == y.shape == (8, 128) and x.dtype == torch.long
    for b in range(8):  # the logits at each queried key are trained on that key's value
        pos = (y[b] != IGNORE).nonzero().flatten().tolist()
        pairs = dict(zip(x[b, 0:16:2].tolist(), x[b, 1:16:2].tolist()))
        assert len(pos) == 8 and all(y[b, p].item() == pairs[x[b, p].item()] for p in pos)
    # a fixed set of 50: step 6's batch of 8 holds examples 48, 49, 0 .. 5 (the second epoch begins)
    x6, _ = task.batch(6, 8)
    assert torch.equal(x6[2:], x[:6]) and torch.equal(x6[:2], task.batch(0, 50)[0][48:])
    # the dev split, the reported test examples and the training set are drawn from different seeds
    dev = task._held_out("dev", "mqar", 128, None, 4)
    test = task.eval_examples("mqar", 128, None, 4)
    assert not {tuple(e.ids) for e in dev} & {tuple(e.ids) for e in test}
    train_set = {tuple(task.train_example(i).ids[:-1]) for i in range(50)}
    assert not train_set & {tuple(e.ids[:-1]) for e in dev + test}
    with pytest.raises(ValueError, match="MQAR alone"):
        zoology_task(128, mixture={"passkey": 1.0, "mqar": 1.0})


def test_longqa_accuracy_plot_gives_each_architecture_one_colour_and_each_context_a_line_style(monkeypatch, tmp_path):
    """bench/plots.plot_longqa: two architectures trained at two contexts are two colours (not four, recycled
    from the other plots' order) with a line style per context, in one legend in the grid's empty panel;
    runs at the same accuracy stay visible (markers shrink in drawing order). The passkey heatmaps write each
    cell's accuracy in it and mark the trained length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import warnings

    from matplotlib.colors import to_hex

    from bench import plots

    def cells(ctx, acc):
        return [{"subtask": s, "length": n, "depth": 0.5, "n": 8, "acc": acc}
                for s in ("mqar", "niah_multikey", "niah_single", "passkey", "variable_tracking") for n in (ctx // 2, ctx, 2 * ctx)]

    runs = pd.DataFrame([{"task": "longqa", "arch": arch, "ctx": ctx, "size": "smoke-s", "params": 1e5,
                          "backend": "b", "longqa_cells": cells(ctx, acc)}
                         for arch, acc in (("mamba", 0.0), ("transformer", 0.5)) for ctx in (256, 512)])
    drawn = []
    monkeypatch.setattr(plots, "finish", lambda fig, path: drawn.append(fig))
    plots.plot_longqa(runs, tmp_path)
    fig = drawn[0]
    panel = fig.axes[0]
    lines = [ln for ln in panel.get_lines() if ln.get_marker() not in ("None", None, "")]
    assert len(lines) == 4
    colour = {(arch, ctx): to_hex(ln.get_color()) for ln, (arch, ctx) in
              zip(lines, [("mamba", 256), ("mamba", 512), ("transformer", 256), ("transformer", 512)])}
    assert colour["mamba", 256] == colour["mamba", 512] != colour["transformer", 256] == colour["transformer", 512]
    assert lines[0].get_linestyle() == lines[2].get_linestyle() != lines[1].get_linestyle()
    assert [ln.get_markersize() for ln in lines] == sorted((ln.get_markersize() for ln in lines), reverse=True)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1 and legends[0].axes is fig.axes[5] and not fig.axes[5].axison  # 4 x 2 panels, 5 used
    assert [t.get_text() for t in legends[0].get_texts()] == [
        f"{arch} [b] smoke-s longqa ctx={ctx}" for arch in ("mamba", "transformer") for ctx in (256, 512)]
    heat = drawn[1].axes[2]  # transformer at 256: the passkey depth x length map, each cell's accuracy written in it
    assert sorted(t.get_text() for t in heat.texts) == ["50%"] * 3  # one depth (0.5) x three lengths
    assert [t.get_text() for t in heat.get_xticklabels()] == ["128", "256\n(trained)", "512"]
    for fig in drawn:
        plt.close(fig)
    one = runs.assign(longqa_cells=[[c for c in cells if c["subtask"] == "mqar"] for cells in runs["longqa_cells"]],
                      task="mqar_zoology", backend="attention=sdpa")  # labels as long as a real sweep's
    monkeypatch.undo()  # drawn and written as make sweep does
    with warnings.catch_warnings():  # one panel, no empty one: the legend beside it, and no layout warning
        warnings.simplefilter("error")
        plots.plot_longqa(one, tmp_path)
    assert (tmp_path / "longqa_accuracy.png").stat().st_size > 10_000


def test_evaluation_keeps_each_test_examples_score_and_a_hash_of_the_examples():
    """val_example_acc: each example at the trained length scored as val_acc counts it (exact match, 1 or 0; MQAR
    the fraction of its queries recalled), in order, their mean val_acc; val_examples_hash names those examples,
    whatever the batch size, and changes with them (bench/gaps.py pairs two runs by it)."""
    import contextlib

    from omegaconf import OmegaConf

    from tasks.longqa.task import IGNORE, LongQATask, to_tensors

    def task(seed=0, **kw):
        cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "task" / "longqa.yaml")
        cfg = OmegaConf.merge(cfg, {"eval_examples": 3, "eval_lengths": [0.5, 1.0], "eval_batch_size": 2, **kw})
        return LongQATask(cfg, None, 512, seed=seed)

    qa = task()
    answers, expected = {}, []  # each example's input -> its answer tokens; the scores of those at ctx 512
    for sub, length, depth in qa.eval_cells():
        exs = qa.eval_examples(sub, length, depth, 3)
        x, y = to_tensors(exs) if exs else (torch.empty(0), torch.empty(0))
        for xi, yi in zip(x, y):
            answers[xi.numpy().tobytes()] = ans = yi[yi != IGNORE]
            right = (len(ans) + 1) // 2  # the half oracle below: the 1st, 3rd, ... answer of each example
            if length == 512:
                expected.append(right / len(ans) if sub == "mqar" else float(right == len(ans)))
    assert 0 < sum(expected) < len(expected) and any(0 < s < 1 for s in expected)  # fractions, 1s and 0s

    class HalfOracle(torch.nn.Module):  # right on every other answer of each example, wrong on the rest
        def forward(self, x, at):
            rows = []
            for xi in x:
                for k, a in enumerate(answers[xi.numpy().tobytes()].tolist()):
                    rows.append(torch.nn.functional.one_hot(torch.tensor(a if k % 2 == 0 else (a + 1) % qa.vocab_size),
                                                            qa.vocab_size).float())
            return torch.stack(rows)  # (N, V)

    out = qa.evaluate(HalfOracle(), torch.device("cpu"), contextlib.nullcontext)
    assert out["val_example_acc"] == pytest.approx(expected, abs=1e-6)
    assert out["val_acc"] == pytest.approx(sum(expected) / len(expected))

    class Zeros(torch.nn.Module):
        def forward(self, x, at):
            return torch.zeros(int(at.sum()), qa.vocab_size)

    def examples_hash(t):
        return t.evaluate(Zeros(), torch.device("cpu"), contextlib.nullcontext)["val_examples_hash"]

    assert out["val_examples_hash"] == examples_hash(task(eval_batch_size=3)) == examples_hash(qa)
    assert examples_hash(task(seed=1)) != out["val_examples_hash"]
    assert examples_hash(task(eval_examples=2)) != out["val_examples_hash"]
