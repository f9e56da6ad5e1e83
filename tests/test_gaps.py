"""bench/gaps.py's sweep comparisons: every pair of architectures trained at one point, compared window by window
(language modeling) or example by example (the accuracy tasks)."""
import json
import math
import statistics

import pandas as pd
import pytest
from scipy.stats import t as student_t

from bench.gaps import comparison_lines, comparisons_frame, comparisons_markdown, paired_proportion_interval
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
        _run("transformer", task="classification"), _run("mamba", task="classification")])  # no example scores
    df = comparisons_frame(best)
    accuracy = df[df["task"] == "classification"]
    assert list(accuracy["metric"]) == ["val_acc"] and accuracy["call"].iloc[0] == ""  # compared by the means
    df = df[df["task"] == "lm"]
    assert (df["metric"] == "val_loss").all()
    assert [(r.data, r.size, r.arch, r.versus) for r in df.itertuples()] == [
        ("pycode", "xs", "transformer", "ttt_linear"),
        ("shakespeare", "xs", "transformer", "mamba"), ("shakespeare", "xs", "transformer", "ttt_linear"),
        ("shakespeare", "xs", "mamba", "ttt_linear"),
        ("shakespeare", "s", "transformer", "mamba")]  # data, ctx, then the smaller model's point first
    row = df[(df["size"] == "xs") & (df["data"] == "shakespeare") & (df["versus"] == "mamba")].iloc[0]
    diffs = [0.02 + 0.001 * (-1) ** i for i in range(6)]
    sem = statistics.stdev(diffs) / math.sqrt(6)
    assert row["gap"] == pytest.approx(0.02) and row["gap_sem"] == pytest.approx(sem)
    assert row["half_width"] == pytest.approx(T95_5 * sem, rel=1e-5) and row["n"] == 6
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.02 - T95_5 * sem, 0.02 + T95_5 * sem), rel=1e-5)
    assert row["ppl_ratio"] == pytest.approx(math.expm1(0.02))
    assert row["ppl_half_width"] == pytest.approx(math.expm1(T95_5 * sem), rel=1e-5) and row["call"] == "higher"
    assert row["p_value"] == pytest.approx(2 * student_t.sf(0.02 / sem, 5)) and row["test"] == "paired t"
    wobbly = df[(df["size"] == "xs") & (df["data"] == "shakespeare") & (df["arch"] == "mamba")].iloc[0]
    assert wobbly["call"] == "within noise"
    for unpaired in df[df["size"].eq("s") | df["data"].eq("pycode")].itertuples():
        assert math.isnan(unpaired.half_width) and math.isnan(unpaired.ci_low) and unpaired.call == ""
    assert df.iloc[-1]["gap"] == pytest.approx(0.1)  # the gap of the means

    md = comparisons_markdown(df)
    assert "## task=lm data=pycode" in md and "## task=lm data=shakespeare" in md
    assert f"| xs | 64 | params | shared | transformer | mamba | {math.expm1(0.02):+.1%} | ±" in md
    assert "| s | 64 | params | shared | transformer | mamba | +10.5% | | | | not paired |" in md
    assert comparisons_frame(best[best["task"] == "lm"].iloc[:1]).empty  # one architecture: no pair
    assert comparisons_frame(pd.DataFrame()).empty


def test_accuracy_tasks_are_compared_example_by_example():
    """Two classifiers scored on the same 200 examples: b right wherever a is, and on 20 more (+10 points): beyond
    noise. On 4 more only, Student's t interval would call it, but McNemar's exact test (p = 0.125) does not, and
    Newcombe's interval, shown instead of t's for right/wrong examples, holds 0."""
    a = [1] * 100 + [0] * 100
    better, slightly = a[:100] + [1] * 20 + [0] * 80, a[:100] + [1] * 4 + [0] * 96

    def clf(arch, right, text="e"):
        return _run(arch, task="classification", data="listops", val_acc=sum(right) / len(right),
                    val_example_acc=right, val_examples_hash=text)

    df = comparisons_frame(pd.DataFrame([clf("transformer", a), clf("mamba", better), clf("ttt_linear", slightly)]))
    row = df.set_index(["arch", "versus"]).loc[("transformer", "mamba")]
    assert row["metric"] == "val_acc" and row["gap"] == pytest.approx(-0.1) and row["n"] == 200
    low, high = paired_proportion_interval(a, better)
    assert (row["ci_low"], row["ci_high"]) == (low, high) and -0.15 < low < -0.1 < high < -0.05
    assert math.isnan(row["half_width"]) and row["call"] == "lower" and math.isnan(row["ppl_ratio"])
    few = df.set_index(["arch", "versus"]).loc[("transformer", "ttt_linear")]  # 4 to 0
    t_half = 1.971957 * statistics.stdev([x - y for x, y in zip(a, slightly)]) / math.sqrt(200)  # 199 d.o.f.
    assert t_half < 0.02 == -few["gap"]  # Student's t interval would exclude 0 ...
    assert few["p_value"] == pytest.approx(0.125) and few["call"] == "within noise"  # ... the exact test does not
    assert few["ci_low"] < 0 < few["ci_high"]
    md = comparisons_markdown(df)
    assert "## task=classification data=listops" in md and "in percentage points" in md
    p = 2 * 0.5 ** 20  # McNemar's exact test: 20 examples only mamba got right, none only the transformer
    assert row["p_value"] == pytest.approx(p) and row["test"] == "McNemar exact"
    interval = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
    assert f"| transformer | mamba | -10.0 points | {interval} | 200 | {p:.2g} | lower |" in md
    line = comparison_lines(df, [clf("mamba", better)])[0]
    assert line.startswith("xs ctx 64 task=classification data=listops: transformer vs mamba accuracy -10.0 points")
    assert line.endswith(f"points {interval} (lower beyond noise, 200 examples)")
    other = comparisons_frame(pd.DataFrame([clf("transformer", a), clf("mamba", better, text="f")]))
    assert other["call"].iloc[0] == "" and "not scored on the same examples" not in comparison_lines(other, [])
    assert "(means only: not evaluated on the same examples)" in comparison_lines(other, [clf("mamba", better)])[0]


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
    p = 2 * student_t.sf(0.02 / (0.001 * math.sqrt(6 / 5) / math.sqrt(6)), 5)  # the paired t test, by hand
    assert f"transformer | mamba | +2.0% | ±0.1% | 6 | {p:.2g} | higher |" in (tmp_path / "comparisons.md").read_text()


def test_the_interval_of_paired_right_or_wrong_scores_is_newcombes():
    """Newcombe's hybrid score interval against a published example: 161 patients, 59 responding at both times, 6
    at the first only, 16 at the second only, 80 at neither (Cavo et al. 2012; Fagerland, Lydersen and Laake,
    Statistical Analysis of Contingency Tables, 2017, chapter 8: -0.0621, 95% interval -0.1186 to -0.0046).
    Where every example differs alike, Student's t interval has zero width; Newcombe's does not."""
    first = [1] * 59 + [1] * 6 + [0] * 16 + [0] * 80
    second = [1] * 59 + [0] * 6 + [1] * 16 + [0] * 80
    assert paired_proportion_interval(first, second) == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    low, high = paired_proportion_interval([0] * 80, [1] * 80)  # 0 of 80 right against 80 of 80
    assert low == -1.0 and -0.96 < high < -0.9
    low, high = paired_proportion_interval([1] * 80, [1] * 80)  # the same 80 right: no difference seen
    assert low == pytest.approx(-high) and 0.03 < high < 0.06
    swapped = paired_proportion_interval(second, first)
    assert swapped == pytest.approx((0.0046, 0.1186), abs=5e-5)  # a - b is -(b - a)
