"""SEEDS=0,1: every point trained once per seed, each run in a folder of its own; the report compares the
architectures seed by seed and says whether the seeds agree; the plots draw each point's mean over its seeds."""
import json
import math
import statistics

import pandas as pd
import pytest

from bench.config import UsageError, parse_seeds
from bench.gaps import comparison_lines, comparisons_frame, comparisons_markdown, seed_agreement
from bench.report import latest_ok, lr_sweeps, mean_over_seeds, report, seed_means

HARD = [3.0, 4.0, 2.0, 5.0, 3.5, 2.5]  # each window's difficulty: it moves every architecture's loss alike


def _run(arch, seed=0, shift=0.0, wobble=0.0, lr=1e-3, size="xs", sweep="s1", **extra) -> dict:
    windows = [h + shift + wobble * (-1) ** i for i, h in enumerate(HARD)]
    return {"arch": arch, "size": size, "ctx": 64, "task": "lm", "data": "shakespeare", "match": "params",
            "recipe": "native", "status": "ok", "sweep": sweep, "seed": seed, "lr": lr, "params": 1e5,
            "train_flops": 1e9, "val_loss": statistics.fmean(windows), "val_bpb": statistics.fmean(windows) / 0.693,
            "val_window_loss": windows, "val_windows_hash": "t", "run_dir": f"/runs/{arch}-seed{seed}-lr{lr}",
            "backend": "b", **extra}


# -- the sweep: one folder per run ---------------------------------------------------------------------------

def test_swept_keys_beyond_arch_size_and_ctx_name_the_run_folders():
    """Before, run_name named arch, size and ctx only: `ARGS="seed=0,1"` trained both seeds in one folder, the second
    stopped on the first's checkpoint and the sweep kept 0 of 2 runs. LRS keeps the folder names it always had."""
    from bench.sweep import RUN_NAME, folder_per_run

    assert folder_per_run(["seed=0,1"]) == [f"run_name={RUN_NAME}-seed${{seed}}"]
    assert folder_per_run(["trainer.lr=1e-3,1e-2"]) == ["run_name=${arch.name}-${size.name}-ctx${ctx}-lr${trainer.lr}"]
    assert folder_per_run(["seed=0,1", "recipe=native,shared", "task.mqar_pairs=4,8"]) == [
        f"run_name={RUN_NAME}-seed${{seed}}-recipe${{hydra:runtime.choices.recipe}}-mqar_pairs${{task.mqar_pairs}}"]
    assert folder_per_run(["seed=1", "arch=a,b", "ctx=64,128", "hydra.launcher.n_jobs=1,2"]) == []  # named, or one
    assert folder_per_run(["seed=0,1", "run_name=${arch.name}-mine"]) == []  # the user's own name is kept


def test_seeds_become_one_multirun_key(tmp_path, monkeypatch, capsys):
    from bench import sweep

    calls = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr("bench.report.report", lambda results: None)
    sweep.main(["--arch", "transformer", "--profile", "smoke", "--ctx", "64", "--seeds", "1, 0,1",
                "--results", str(tmp_path)])
    assert "seed=1,0" in calls[0] and f"run_name={sweep.RUN_NAME}-seed${{seed}}" in calls[0]
    calls.clear()  # an LRS sweep's command as before SEEDS (a sweep continues when its command is the same)
    sweep.main(["--arch", "transformer", "--profile", "smoke", "--ctx", "64", "--lrs", "1e-3,1e-2", "--match",
                "flops", "--results", str(tmp_path)])
    assert calls[0][-4:-1] == ["trainer.lr=1e-3,1e-2", "run_name=${arch.name}-${size.name}-ctx${ctx}-lr${trainer.lr}",
                               "match=flops"]
    assert sweep.main(["--seeds", "0,1", "--results", str(tmp_path / "x"), "seed=2"]) == 2
    assert "SEEDS and a seed= override both set the seed" in capsys.readouterr().err
    assert parse_seeds("0,2,2") == ["0", "2"]
    for bad in ("", "a", "-1", "1.5", "0;1"):
        with pytest.raises(UsageError, match="SEEDS must be a comma list of non-negative integers"):
            parse_seeds(bad)


# -- the report: seed by seed, and their mean -----------------------------------------------------------------

def test_the_report_keeps_every_seed_and_picks_the_lr_by_its_mean_over_seeds():
    """Seed 0 is best at lr 1e-2, seed 1 at 1e-3, and 1e-3 wins on the mean: both seeds' runs at 1e-3 are kept.
    Older sweeps of the point are not mixed in."""
    rows = [_run("mamba", seed=0, lr=1e-2, shift=-0.1), _run("mamba", seed=0, lr=1e-3, shift=0.0),
            _run("mamba", seed=1, lr=1e-2, shift=0.5), _run("mamba", seed=1, lr=1e-3, shift=0.1),
            _run("mamba", seed=2, lr=1e-3, sweep="s0", shift=-9.0)]
    best = latest_ok(pd.DataFrame(rows))
    assert sorted(zip(best["seed"], best["lr"])) == [(0, 1e-3), (1, 1e-3)]
    drawn = lr_sweeps(pd.DataFrame(rows))  # metric_vs_lr.png: one point per lr, the mean over the seeds
    assert sorted(drawn["lr"]) == [1e-3, 1e-2] and drawn.loc[drawn["best"], "lr"].tolist() == [1e-3]
    assert drawn.set_index("lr").loc[1e-2, "val_loss"] == pytest.approx(statistics.fmean(HARD) + 0.2)
    one = latest_ok(pd.DataFrame([{k: v for k, v in r.items() if k != "seed"} for r in rows[:2]]))  # no seed field
    assert len(one) == 1 and float(one.iloc[0]["lr"]) == 1e-2


def test_a_point_of_several_seeds_is_drawn_as_their_mean():
    best = latest_ok(pd.DataFrame([_run("mamba", seed=0, shift=0.1), _run("mamba", seed=1, shift=0.3),
                                   _run("transformer", seed=0)]))
    points = seed_means(best).set_index("arch")
    mamba = points.loc["mamba"]
    assert mamba["seeds"] == 2 and mamba["seed"] == "0,1" and mamba["ctx"] == 64 and mamba["size"] == "xs"
    assert mamba["val_loss"] == pytest.approx(statistics.fmean(HARD) + 0.2)
    assert (mamba["val_loss_seed_min"], mamba["val_loss_seed_max"]) == pytest.approx(
        (statistics.fmean(HARD) + 0.1, statistics.fmean(HARD) + 0.3))
    assert mamba["val_window_loss"] == pytest.approx([h + 0.2 for h in HARD])  # lists item by item
    assert mamba["seed_run_dirs"] == ["/runs/mamba-seed0-lr0.001", "/runs/mamba-seed1-lr0.001"]
    alone = points.loc["transformer"]
    assert alone["seeds"] == 1 and alone["seed"] == 0 and alone["val_loss"] == statistics.fmean(HARD)
    assert mean_over_seeds([{"a": 1, "s": "x"}, {"a": 3, "s": "x"}]) == {"a": 2.0, "s": "x"}  # dicts key by key
    assert mean_over_seeds([1.0, math.nan, 2.0]) == 1.5 and mean_over_seeds(["a", "b"]) == "a"
    assert mean_over_seeds([[1, 2], [1]]) == [1, 2]  # lists of other lengths: the first seed's


def test_pairs_are_compared_at_each_seed_and_the_seeds_set_side_by_side():
    """Transformer vs mamba: 0.02 nats above at both seeds (agree); transformer vs ttt_linear: above at seed 0,
    within a wobble at seed 1 (disagree); mamba vs ttt_linear: equal at seed 0, below at seed 1 (disagree)."""
    best = pd.DataFrame([_run("transformer", seed=s, shift=0.02, wobble=0.001) for s in (0, 1)]
                        + [_run("mamba", seed=s) for s in (0, 1)]
                        + [_run("ttt_linear", seed=0), _run("ttt_linear", seed=1, shift=0.02, wobble=0.01)])
    df = comparisons_frame(best)
    assert list(zip(df["seed"], df["arch"], df["versus"], df["call"])) == [
        (0, "transformer", "mamba", "higher"), (0, "transformer", "ttt_linear", "higher"),
        (0, "mamba", "ttt_linear", "within noise"),
        (1, "transformer", "mamba", "higher"), (1, "transformer", "ttt_linear", "within noise"),
        (1, "mamba", "ttt_linear", "lower")]
    agree = seed_agreement(df).set_index(["arch", "versus"])
    assert agree.loc[("transformer", "mamba"), "verdict"] == "higher (every seed)"
    assert agree.loc[("transformer", "mamba"), "gaps"] == pytest.approx([0.02, 0.02])
    assert agree.loc[("transformer", "ttt_linear"), "verdict"] == "the seeds disagree"
    assert agree["apart"].tolist() == [False, True, True]  # +0.02 at both seeds: the intervals overlap
    assert agree.loc[("mamba", "ttt_linear"), ["lower", "within_noise", "verdict"]].tolist() == [
        1, 1, "the seeds disagree"]
    md = comparisons_markdown(df)
    assert "| size | ctx | match | recipe | seed | architecture |" in md and "### Across seeds" in md
    assert ("| xs | 64 | params | native | transformer | ttt_linear | 0,1 | +2.0%, -0.0% | +1.0% | the seeds disagree; "
            "intervals apart |" in md)
    lines = comparison_lines(df, [_run("transformer")], limit=3)  # whether the seeds agree first, then each seed
    assert lines == [
        "xs ctx 64: transformer vs mamba perplexity at seeds 0,1: +2.0%, +2.0% (higher beyond noise at 2 of 2 seeds)",
        "xs ctx 64: transformer vs ttt_linear perplexity at seeds 0,1: +2.0%, -0.0% (the seeds disagree: higher "
        "beyond noise at 1 of 2, within noise at 1 of 2; their intervals do not overlap: the size moves with the seed)",
        "xs ctx 64 seed 0: transformer vs mamba perplexity +2.0% ± 0.1% (higher beyond noise, 6 windows)",
        "... and 3 more pairs in comparisons.md"]
    other_text = comparisons_frame(pd.DataFrame([_run("transformer", seed=0), _run("transformer", seed=1),
                                                 _run("mamba", seed=0), _run("mamba", seed=1, val_windows_hash="u")]))
    assert seed_agreement(other_text)["verdict"].tolist() == ["not paired"]  # seed 1: means only
    single = comparisons_frame(best[best["seed"] == 0])  # one seed: the tables and lines as before
    assert "seed" not in comparisons_markdown(single).split("| architecture")[0].splitlines()[-1]
    assert "### Across seeds" not in comparisons_markdown(single) and seed_agreement(single).empty
    assert all(" seed " not in line for line in comparison_lines(single, [_run("transformer")]))


def test_the_report_of_a_seed_sweep(tmp_path):
    """summary.csv keeps every run; comparisons.csv each seed's pairs; the plots and the training curve the means."""
    from bench.plots import _training_curve

    for arch, seed, shift in [("transformer", 0, 0.02), ("transformer", 1, 0.03), ("mamba", 0, 0.0), ("mamba", 1, 0.0)]:
        folder = tmp_path / "runs" / "s1" / f"{arch}-xs-ctx64-seed{seed}"
        folder.mkdir(parents=True)
        run = _run(arch, seed=seed, shift=shift, wobble=0.001, run=folder.name, run_dir=str(folder), tokens=100,
                   device="cpu")
        (folder / "summary.json").write_text(json.dumps(run))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"tokens": t, "loss": 5.0 - t / 100 + seed})
                                                      + "\n" for t in (50, 100)))
    table = report(tmp_path)
    assert len(table) == 4 and sorted(table["seed"]) == [0, 0, 1, 1]
    back = pd.read_csv(tmp_path / "comparisons.csv")
    assert list(zip(back["seed"], back["call"])) == [(0, "higher"), (1, "higher")]
    assert "higher (every seed)" in (tmp_path / "comparisons.md").read_text()
    for plot in ("loss_vs_flops.png", "training_curves.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 5_000
    points = seed_means(latest_ok(table))
    mamba = points[points["arch"] == "mamba"].iloc[0]
    assert _training_curve(mamba) == ([50, 100], pytest.approx([5.0, 4.5]))  # seeds 0 and 1: losses +0 and +1


def test_the_qa_plot_shades_each_lengths_range_over_seeds(tmp_path):
    """plot_longqa draws a QA point of two seeds as the mean per length, with a bar from the lower seed's accuracy
    (averaged over the needle depths) to the higher's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.plots import _seed_range_by_length, plot_longqa

    def qa(seed, accs):
        cells = [{"subtask": "passkey", "length": length, "depth": depth, "acc": acc}
                 for (length, depth), acc in zip([(256, 0.0), (256, 1.0), (512, 0.0), (512, 1.0)], accs)]
        return {**_run("mamba", seed=seed), "task": "passkey", "data": "generated", "longqa_cells": cells,
                "val_acc": statistics.fmean(accs[:2])}

    points = seed_means(latest_ok(pd.DataFrame([qa(0, [1.0, 0.5, 0.0, 0.0]), qa(1, [1.0, 1.0, 0.5, 0.0])])))
    assert points.iloc[0]["longqa_cells"][1]["acc"] == 0.75 and len(points.iloc[0]["seed_longqa_cells"]) == 2
    plot_longqa(points, tmp_path)
    assert (tmp_path / "longqa_accuracy.png").stat().st_size > 5_000
    assert (tmp_path / "passkey_heatmap.png").exists()
    fig, ax = plt.subplots()
    by_seed = pd.DataFrame([{**c, "label": "m", "seed": i}
                            for i, cells in enumerate(points.iloc[0]["seed_longqa_cells"]) for c in cells])
    assert _seed_range_by_length(ax, by_seed, "m", "passkey", "C0")
    (bars,) = ax.collections
    assert [seg.tolist() for seg in bars.get_segments()] == [[[256, 0.75], [256, 1.0]], [[512, 0.0], [512, 0.25]]]
    plt.close(fig)


def test_the_accuracy_plots_shade_the_range_over_seeds(tmp_path):
    """classification_accuracy.png and mqar_grid.png draw a point of two seeds at their mean, with a bar from the
    lower seed's accuracy to the higher's (draw_seed_range); a point of one seed gets none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.plots import draw_seed_range, plot_classification, plot_mqar_grid

    def clf(arch, seed, acc, **extra):
        return {**_run(arch, seed=seed), "task": "classification", "data": "listops", "val_acc": acc,
                "d_model": 64, **extra}

    runs = [clf("mamba", 0, 0.6), clf("mamba", 1, 0.8), clf("transformer", 0, 0.5)]
    points = seed_means(latest_ok(pd.DataFrame(runs)))
    fig, ax = plt.subplots()
    mamba = points[points["arch"] == "mamba"]
    assert draw_seed_range(ax, mamba["params"], mamba, "val_acc", "C0")
    assert [seg.tolist() for seg in ax.collections[0].get_segments()] == [[[1e5, 0.6], [1e5, 0.8]]]
    alone = points[points["arch"] == "transformer"]
    assert not draw_seed_range(ax, alone["params"], alone, "val_acc", "C1") and len(ax.collections) == 1
    plt.close(fig)
    plot_classification(points, tmp_path)
    assert (tmp_path / "classification_accuracy.png").stat().st_size > 5_000
    grid = seed_means(latest_ok(pd.DataFrame([{**r, "task": "mqar_zoology", "mqar_pairs": 4} for r in runs])))
    plot_mqar_grid(grid, tmp_path / "mqar_grid.png")
    assert (tmp_path / "mqar_grid.png").stat().st_size > 5_000
