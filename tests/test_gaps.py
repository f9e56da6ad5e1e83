"""bench/gaps.py's sweep comparisons: every pair of architectures trained at one point, compared window by window."""
import json
import math
import statistics

import pandas as pd
import pytest

from bench.gaps import comparison_lines, comparisons_frame, comparisons_markdown
from bench.report import report

HARD = [3.0, 4.0, 2.0, 5.0, 3.5, 2.5]  # each window's difficulty: it moves every architecture's loss alike
T95_5 = 2.570582  # Student's t, 5 degrees of freedom, 97.5th percentile


def _run(arch, size="xs", ctx=64, shift=0.0, wobble=0.0, text="t", task="lm", data="shakespeare", **extra) -> dict:
    windows = [h + shift + wobble * (-1) ** i for i, h in enumerate(HARD)]
    return {"arch": arch, "size": size, "ctx": ctx, "task": task, "data": data, "match": "params", "recipe": "shared",
            "status": "ok", "params": {"xs": 1e5, "s": 4e5}[size], "val_loss": statistics.fmean(windows),
            "val_window_loss": windows, "val_windows_hash": text, **extra}


def test_every_pair_at_a_point_is_compared_window_by_window():
    """Pairs form within a point only (size, ctx, task, data, match, recipe), in the paper's legend order, LM only;
    the gap of a steady 0.02 nats is beyond noise, a ±0.01 wobble around 0 is within it, and runs on other text
    or without window losses are compared by their means and marked as not paired."""
    best = pd.DataFrame([
        _run("transformer", shift=0.02, wobble=0.001), _run("mamba"), _run("ttt_linear", wobble=0.01),  # xs, 64
        _run("transformer", size="s", shift=0.1), _run("mamba", size="s", text="other"),  # other windows
        _run("mamba", ctx=256),  # alone at its point
        _run("transformer", data="pycode"), _run("ttt_linear", data="pycode", val_window_loss=math.nan),  # old run
        _run("transformer", task="classification"), _run("mamba", task="classification")])  # no window losses
    df = comparisons_frame(best)
    assert [(r.data, r.size, r.arch, r.versus) for r in df.itertuples()] == [
        ("pycode", "xs", "transformer", "ttt_linear"),
        ("shakespeare", "xs", "transformer", "mamba"), ("shakespeare", "xs", "transformer", "ttt_linear"),
        ("shakespeare", "xs", "mamba", "ttt_linear"),
        ("shakespeare", "s", "transformer", "mamba")]  # data, ctx, then the smaller model's point first
    row = df[(df["size"] == "xs") & (df["data"] == "shakespeare") & (df["versus"] == "mamba")].iloc[0]
    diffs = [0.02 + 0.001 * (-1) ** i for i in range(6)]
    sem = statistics.stdev(diffs) / math.sqrt(6)
    assert row["loss_gap"] == pytest.approx(0.02) and row["gap_sem"] == pytest.approx(sem)
    assert row["half_width"] == pytest.approx(T95_5 * sem, rel=1e-5) and row["windows"] == 6
    assert row["ppl_ratio"] == pytest.approx(math.expm1(0.02))
    assert row["ppl_half_width"] == pytest.approx(math.expm1(T95_5 * sem), rel=1e-5) and row["call"] == "higher"
    wobbly = df[(df["size"] == "xs") & (df["data"] == "shakespeare") & (df["arch"] == "mamba")].iloc[0]
    assert wobbly["call"] == "within noise"
    for unpaired in df[df["size"].eq("s") | df["data"].eq("pycode")].itertuples():
        assert math.isnan(unpaired.half_width) and unpaired.call == ""
    assert df.iloc[-1]["loss_gap"] == pytest.approx(0.1)  # the gap of the means

    md = comparisons_markdown(df)
    assert "## data=pycode" in md and "## data=shakespeare" in md
    assert f"| xs | 64 | params | shared | transformer | mamba | {math.expm1(0.02):+.1%} | ±" in md
    assert "| s | 64 | params | shared | transformer | mamba | +10.5% | | | not paired |" in md
    assert comparisons_frame(best[best["task"] == "classification"]).empty


def test_the_sweep_prints_the_pairs_its_runs_take_part_in():
    best = pd.DataFrame([_run("transformer", shift=0.02, wobble=0.001), _run("mamba"), _run("ttt_linear"),
                         _run("mamba", size="s"), _run("ttt_linear", size="s", text="other")])
    df = comparisons_frame(best)
    lines = comparison_lines(df, [_run("ttt_linear", size="s"), _run("mamba", size="s")])  # a sweep of size s only
    assert lines == ["s ctx 64: mamba vs ttt_linear perplexity +0.0% (means only: not evaluated on the same windows)"]
    lines = comparison_lines(df, [_run("transformer"), {**_run("mamba"), "status": "failed"}])
    assert [line.split(":")[1] for line in lines] == [" transformer vs mamba perplexity +2.0% ± 0.1% (higher beyond "
                                                      "noise, 6 windows)", " transformer vs ttt_linear perplexity "
                                                      "+2.0% ± 0.1% (higher beyond noise, 6 windows)"]
    many = comparison_lines(df, [_run(a) for a in ("transformer", "mamba", "ttt_linear")], limit=2)
    assert len(many) == 3 and many[-1] == "... and 1 more pairs in comparisons.md"


def test_the_report_writes_the_comparisons_beside_the_summary(tmp_path):
    for i, run in enumerate([_run("transformer", shift=0.02, wobble=0.001), _run("mamba")]):
        folder = tmp_path / "runs" / "s1" / f"{run['arch']}-xs-ctx64"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({**run, "sweep": "s1", "run": folder.name, "lr": 1e-3,
                                                         "train_flops": 1e9 * (i + 1), "tokens": 100, "backend": "b",
                                                         "device": "cpu", "val_bpb": 1.0}))
    report(tmp_path)
    back = pd.read_csv(tmp_path / "comparisons.csv")
    assert list(back[["arch", "versus", "call"]].itertuples(index=False, name=None)) == [("transformer", "mamba",
                                                                                           "higher")]
    assert "transformer | mamba | +2.0% | ±0.1% | 6 | higher |" in (tmp_path / "comparisons.md").read_text()
