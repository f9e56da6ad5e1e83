"""Aggregate every run summary under RESULTS into summary.csv and draw the plots.

    python -m bench.report [--results results]      (`make plots`)

Tables: summary.csv (one row per run); comparisons.md and .csv (bench/gaps.py: every pair of architectures
trained at the same point, compared window by window on the same text, or example by example on the same test
examples; seed by seed when the points have several, SEEDS=); recall.md; eval.md.

A point is (arch, size, ctx, task, data, match, recipe) and, where a sweep varied another key (ARGS="arch.mini_batch=
8,16"), its value (each run's `variant`): each value is a line of its own in the plots ('ttt_linear arch.mini_batch=8'),
and its pairs are compared at that value.

A point trained at several seeds is drawn, and written in recall.md and eval.md, as the mean over its seeds
(seed_means), the range of its headline metric shaded in loss_vs_flops, classification_accuracy and mqar_grid.

Plots (RESULTS/plots/):
  loss_vs_flops.png      validation loss vs training FLOPs, one line per architecture (log x),
                         one panel per context length: the paper's scaling figure.
  loss_by_position.png   validation loss at each token position (log2-spaced buckets) of the largest
                         model per architecture: does the model use long context?
  training_curves.png    training loss vs tokens seen, every run, a panel per task and context.
  longqa_accuracy.png    TASK=longqa (and its presets mqar, passkey): accuracy vs evaluation length, one
                         panel per sub-task, one line per (task, architecture, ctx) at its largest model;
                         the trained length is marked.
  passkey_heatmap.png    passkey accuracy by needle depth x length, one panel per (architecture, task, ctx).
  classification_accuracy.png  TASK=classification: accuracy vs parameters, one line per architecture,
                         one panel per context length, with the majority-class baseline.
  mqar_grid.png          tasks with a (sequence length, pairs) grid (TASK=mqar_zoology): accuracy vs d_model,
                         one panel per grid point, one line per architecture (Zoology's figure 2); the
                         same numbers in RESULTS/recall.md.
  metric_vs_lr.png       LRS= sweeps: validation bits per byte (or accuracy) vs learning rate; every other
                         plot uses each point's best lr (lowest validation loss, highest accuracy: on the
                         dev split where the task has one, task.dev_examples, not on the reported one).
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import pandas as pd

from bench.gaps import POINT_DEFAULTS, comparisons_frame, comparisons_markdown
from bench.plots import (grid_runs, plot_classification, plot_longqa, plot_loss_by_position, plot_loss_vs_flops,
                         plot_metric_vs_lr, plot_mqar_grid, plot_training_curves)
from bench.results import atomic_write_text, read_summaries, results_lock

COLUMNS = ["arch", "size", "ctx", "task", "data", "match", "recipe", "variant", "lr", "params", "non_embedding_params",
           "flops_per_token", "train_flops_per_token", "flops_vs_ref", "train_flops", "state_size", "tokens",
           "token_rule", "min_steps", "val_loss", "val_loss_sem", "val_ppl", "val_bpb", "val_bpb_sem",
           "val_unigram_bpb", "tokens_per_s", "wall_s", "train_wall_s", "backend", "device", "device_name", "threads",
           "threads_min", "cpu_busy_others_max", "precision", "layers", "d_model", "heads", "ffn_dim", "d_inner",
           "vocab", "profile", "status", "error", "sweep", "run", "git_commit", "run_dir"]
KEY = ["arch", "size", "ctx", "task", "data", "match", "recipe", "variant"]  # a point; variant: what ARGS= swept


def _with_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """The point keys older runs lack, at what those runs did (POINT_DEFAULTS)."""
    df = df.copy()
    for key, value in POINT_DEFAULTS.items():
        df[key] = df[key].fillna(value) if key in df else value
    return df


def summary_table(results: Path, rows: list[dict] | None = None) -> pd.DataFrame:
    """summary.csv's table from the runs' summaries (`rows`: already read from RESULTS)."""
    rows = read_summaries(results) if rows is None else rows
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    df = _with_defaults(df)
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    # other scalar fields follow (nested ones such as loss_by_position stay in summary.json)
    extra = [c for c in df.columns if c not in COLUMNS and not df[c].map(lambda v: isinstance(v, (list, dict))).any()]
    return df[COLUMNS + sorted(extra)]


def selection_metric(task: str, runs: pd.DataFrame | None = None) -> tuple[str, bool]:
    """(column, higher is better) that picks a point's best learning rate: the validation loss for
    language modeling; for the QA and classification tasks the dev split's accuracy where the runs have
    one (task.dev_examples: held out from the reported test examples), else the validation accuracy."""
    if task == "lm":
        return "val_loss", False
    if runs is not None and "dev_acc" in runs and runs["dev_acc"].notna().all():
        return "dev_acc", True
    return "val_acc", True


def latest_ok(df: pd.DataFrame) -> pd.DataFrame:
    """One run per point (KEY: arch, size, ctx, task, data, match, recipe, variant) and seed, from the newest sweep
    that has the point. When that sweep tried several learning rates (LRS=), the runs of the lr whose validation
    metric is best on average over the seeds (one seed: its best run)."""
    ok = _with_defaults(df[df["status"] == "ok"])
    if ok.empty:
        return ok
    ok["seed"] = ok["seed"].fillna(0).astype(int) if "seed" in ok else 0  # runs record it; tests' rows may not
    newest = ok.groupby(KEY)["sweep"].transform("max")
    ok = ok[ok["sweep"] == newest]
    picked = []
    for _, g in ok.groupby(KEY):
        col, higher = _selection_column(g)
        lr = best_lr(g)
        g = g if lr is None else g[g["lr"] == lr]
        picked += [s.sort_values(col, ascending=not higher).iloc[0] for _, s in g.groupby("seed")]
    return pd.DataFrame(picked)


def _selection_column(runs: pd.DataFrame) -> tuple[str, bool]:
    """selection_metric of one point's runs, falling back to the validation loss where they lack that column."""
    col, higher = selection_metric(str(runs.iloc[0]["task"]), runs)
    return (col, higher) if col in runs and runs[col].notna().any() else ("val_loss", False)


def best_lr(runs: pd.DataFrame) -> float | None:
    """The lr of one point's runs whose selection metric is best on average over the runs at it (its seeds); None
    when fewer than two lrs were tried."""
    col, higher = _selection_column(runs)
    by_lr = runs.groupby("lr")[col].mean() if "lr" in runs else pd.Series(dtype=float)
    if by_lr.notna().sum() < 2:
        return None
    return by_lr.idxmax() if higher else by_lr.idxmin()


SEED_SPREAD = ("val_loss", "val_bpb", "val_acc")  # headline metrics whose range over seeds the plots draw


def seed_means(runs: pd.DataFrame, by: list[str] = KEY) -> pd.DataFrame:
    """One row per point (`by`) of latest_ok's runs: a point trained at several seeds (SEEDS=) becomes the mean of
    its seeds' runs (mean_over_seeds, field by field), with `seeds` (how many), `seed` ('0,1'), `seed_run_dirs`,
    `seed_longqa_cells` (QA tasks) and, for SEED_SPREAD, `<metric>_seed_min` / `_seed_max`; a point of one seed
    stays its run (seeds 1)."""
    if runs.empty:
        return runs
    rows = []
    for _, g in runs.groupby(by, dropna=False, sort=False):
        row = {c: mean_over_seeds(g[c].tolist()) for c in g.columns}
        row.update({"seeds": len(g), "seed_run_dirs": g["run_dir"].tolist() if "run_dir" in g else []})
        if len(g) > 1:
            row["seed"] = ",".join(str(s) for s in sorted(g["seed"]))
            if "longqa_cells" in g:  # each seed's accuracy per (sub-task, length, depth): the QA plot's ranges
                row["seed_longqa_cells"] = g["longqa_cells"].tolist()
        for m in SEED_SPREAD:
            if m in g and g[m].notna().any():
                row[f"{m}_seed_min"], row[f"{m}_seed_max"] = g[m].min(), g[m].max()
        rows.append(row)
    return pd.DataFrame(rows)


def mean_over_seeds(values: list):
    """One field of several seeds' runs: the value where they agree; else numbers averaged (NaN left out), lists
    of equal length and dicts of the same keys averaged item by item (loss by position, per-example scores,
    accuracy per length); anything else, the first seed's."""
    first = values[0]
    if all(_same(v, first) for v in values[1:]):
        return first
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        kept = [float(v) for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan
    if all(isinstance(v, list) and len(v) == len(first) for v in values):
        return [mean_over_seeds(list(items)) for items in zip(*values)]
    if all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
        return {k: mean_over_seeds([v[k] for v in values]) for k in first}
    return first


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    except (TypeError, ValueError):  # arrays and the like
        return False


def write_comparisons(best: pd.DataFrame, results: Path) -> None:
    """RESULTS/comparisons.csv and comparisons.md (bench/gaps.py): every pair of architectures trained at the same
    point, their perplexity ratio (LM) or accuracy difference (QA, classification) with its interval and p-value
    over the text or examples evaluated; none when no point has two architectures."""
    pairs = comparisons_frame(best)
    if not pairs.empty:
        buf = io.StringIO()
        pairs.to_csv(buf, index=False)
        atomic_write_text(results / "comparisons.csv", buf.getvalue())
        atomic_write_text(results / "comparisons.md", comparisons_markdown(pairs))


def write_recall_table(best: pd.DataFrame, path: Path) -> None:
    """RESULTS/recall.md: per (task, architecture, size) the test accuracy at each (sequence length, pairs)
    point, at the lr chosen on the dev split, with that lr and the step of an early stop."""
    runs = grid_runs(best)
    if runs.empty:
        return
    points = sorted({(int(r["ctx"]), int(r["mqar_pairs"])) for _, r in runs.iterrows()})
    lines = ["# MQAR recall at each (sequence length, key-value pairs) point", "",
             "Accuracy on the reported test examples (the fraction of queried values recalled), each point at its "
             "best lr chosen on the dev split; in brackets that lr, and the step of an early stop (0.99 on the dev "
             "split).", "",
             "| task | architecture | size | " + " | ".join(f"({c}, {p})" for c, p in points) + " |",
             "|" + "---|" * (3 + len(points))]
    for (task, arch, size), g in runs.groupby(["task", "arch", "size"]):
        cells = []
        for ctx, pairs in points:
            r = g[(g["ctx"] == ctx) & (g["mqar_pairs"] == pairs)]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            stop = r.get("early_stop_step")
            stop = "" if stop is None or pd.isna(stop) else f", stopped at step {int(stop)}"
            cells.append(f"{r['val_acc']:.3f} (lr {r['lr']:.3g}{stop})")
        lines.append(f"| {task} | {arch} | {size} | " + " | ".join(cells) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def report(results: str | Path) -> pd.DataFrame:
    """Write RESULTS/summary.csv and RESULTS/plots/*.png from every summary.json; returns the table.
    Holds RESULTS/.lock meanwhile: concurrent sweeps into one folder report in turn."""
    results = Path(results)
    with results_lock(results):
        rows = read_summaries(results)  # every summary.json, read once
        table = summary_table(results, rows)
        buf = io.StringIO()
        table.to_csv(buf, index=False)
        atomic_write_text(results / "summary.csv", buf.getvalue(), crash_at="report")
        plots = results / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        full = pd.DataFrame(rows)  # latest_ok and lr_sweeps fill the keys older runs lack
        if not full.empty and (full.get("status") == "ok").any():
            best = latest_ok(full)  # one run per point and seed
            points = named_by_variant(seed_means(best))  # one row per point: the mean over its seeds
            plot_loss_vs_flops(points, plots / "loss_vs_flops.png")
            plot_loss_by_position(points, plots / "loss_by_position.png")
            plot_training_curves(points, plots / "training_curves.png")
            plot_longqa(points, plots)
            plot_classification(points, plots)
            plot_mqar_grid(points, plots / "mqar_grid.png")
            write_comparisons(best, results)  # seed by seed, and whether the seeds agree
            write_recall_table(points, results / "recall.md")
            write_eval_table(points, results / "eval.md")
            plot_metric_vs_lr(named_by_variant(lr_sweeps(full)), plots / "metric_vs_lr.png")
    return table


def named_by_variant(points: pd.DataFrame) -> pd.DataFrame:
    """points with each one's variant in its architecture's name ('ttt_linear task.mqar_pairs=4'), for the plots
    and tables, which draw and list a line per architecture: the values a sweep varied (ARGS="key=a,b") stay
    lines of their own."""
    if points.empty or "variant" not in points or not (points["variant"].fillna("") != "").any():
        return points
    named = points["variant"].fillna("").map(lambda v: f" {v}" if v else "")
    return points.assign(arch=points["arch"] + named)


def lr_sweeps(df: pd.DataFrame) -> pd.DataFrame:
    """The runs of LRS sweeps: per point (KEY) the newest sweep's runs when it
    tried several learning rates, one row per lr (the mean over seeds: seed_means), with `best` marking the lr
    latest_ok picks (the selection metric)."""
    ok = _with_defaults(df[(df["status"] == "ok") & df["lr"].notna()] if "lr" in df else df.iloc[0:0])
    if ok.empty:
        return ok.assign(best=pd.Series(dtype=bool))
    ok = ok[ok["sweep"] == ok.groupby(KEY)["sweep"].transform("max")]
    ok = ok[ok.groupby(KEY)["lr"].transform("nunique") > 1]
    if ok.empty:
        return ok.assign(best=pd.Series(dtype=bool))
    ok = seed_means(ok, by=KEY + ["lr"]).reset_index(drop=True)
    ok["best"] = False
    for _, g in ok.groupby(KEY):
        ok.loc[g.index[g["lr"] == best_lr(g)], "best"] = True
    return ok


EVAL_BOOKKEEPING = ("eval_wall_s", "eval_limit")


def write_eval_table(best: pd.DataFrame, path: Path) -> None:
    """RESULTS/eval.md: the lm-eval metrics (`make eval`) of the newest run of each point, when any."""
    cols = sorted(c for c in best.columns if c.startswith("eval_") and not c.endswith("_stderr")
                  and c not in EVAL_BOOKKEEPING)
    rows = best.dropna(subset=cols, how="all") if cols else best.iloc[0:0]
    if rows.empty:
        return
    rows = rows.sort_values(["task", "ctx", "arch", "params"])
    head = ["arch [backend]", "size", "ctx", "params (M)"] + [c[5:].removeprefix("ttt_") for c in cols]
    lines = ["# Zero-shot evaluation (lm-evaluation-harness, `make eval`)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in rows.iterrows():
        vals = ["" if pd.isna(r[c]) else f"{r[c]:.4g}" for c in cols]
        lines.append(f"| {r['arch']} [{r['backend']}] | {r['size']} | {r['ctx']} | {r['params'] / 1e6:.2f} | "
                     + " | ".join(vals) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make plots", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    runs = Path(args.results).expanduser() / "runs"
    if not runs.is_dir():  # a mistyped RESULTS: say so, and make no folder of that name
        print(f"error: no runs under {runs} (make sweep writes them there; RESULTS= names the folder, "
              f"default results)", file=sys.stderr)
        return 2
    table = report(args.results)
    print(f"[ttt-bench] {len(table)} runs -> {Path(args.results) / 'summary.csv'}, plots in {Path(args.results) / 'plots'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
