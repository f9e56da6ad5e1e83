"""Aggregate every run summary under RESULTS into summary.csv and draw the plots.

    python -m bench.report [--results results]      (`make plots`)

Plots (RESULTS/plots/):
  loss_vs_flops.png      validation loss vs training FLOPs, one line per architecture (log x),
                         one panel per context length: the paper's scaling figure.
  loss_by_position.png   validation loss at each token position (log2-spaced buckets) of the largest
                         model per architecture: does the model use long context?
  training_curves.png    training loss vs tokens seen, every run.
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
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.results import atomic_write_bytes, atomic_write_text, read_summaries, results_lock  # noqa: E402

COLUMNS = ["arch", "size", "ctx", "task", "data", "match", "recipe", "lr", "params", "non_embedding_params", "flops_per_token",
           "train_flops_per_token", "flops_vs_ref", "train_flops", "state_size", "tokens", "token_rule", "val_loss",
           "val_ppl", "val_bpb", "val_unigram_bpb", "tokens_per_s", "wall_s", "train_wall_s", "backend", "device",
           "device_name", "threads", "threads_min", "cpu_busy_others_max", "precision", "layers", "d_model", "heads",
           "ffn_dim", "d_inner", "vocab", "profile", "status", "error", "sweep", "run", "git_commit", "run_dir"]
KEY = ["arch", "size", "ctx", "task", "data", "match", "recipe"]
FLOPS_NOTE = "training FLOPs\n(architectures/accounting.py: 3 x forward, attention causal-halved)"


def _with_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """Keys older runs lack: before size matching runs used the reference's dimensions (match=params), and
    before recipes every architecture trained with the shared one."""
    df = df.copy()
    df["match"] = df["match"].fillna("params") if "match" in df else "params"
    df["recipe"] = df["recipe"].fillna("shared") if "recipe" in df else "shared"  # runs from before recipes
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
    """One run per (arch, size, ctx, task, data, match): from the newest sweep that has it, and when that
    sweep tried several learning rates (LRS=), the one with the best validation metric."""
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return ok
    newest = ok.groupby(KEY)["sweep"].transform("max")
    ok = ok[ok["sweep"] == newest]
    picked = []
    for _, g in ok.groupby(KEY):
        col, higher = selection_metric(str(g.iloc[0]["task"]), g)
        col = col if col in g and g[col].notna().any() else "val_loss"
        picked.append(g.sort_values(col, ascending=not higher).iloc[0])
    return pd.DataFrame(picked)


def _label(row, multi_data: bool, multi_match: bool = False) -> str:
    """The architecture, the backend that ran, and the data / match rule when several are plotted."""
    label = f"{row['arch']} [{row['backend']}]"
    label = f"{label} ({row['data']})" if multi_data else label
    label = f"{label} match={row['match']}" if multi_match else label
    recipe = row.get("recipe")
    return label if recipe in (None, "native") or pd.isna(recipe) else f"{label} recipe={recipe}"


def plot_loss_vs_flops(df: pd.DataFrame, path: Path) -> None:
    lm = df[df["task"] == "lm"]
    if lm.empty:  # task runs only: no language-modeling plot
        return
    ctxs = sorted(lm["ctx"].unique())
    multi, multi_match = lm["data"].nunique() > 1, lm["match"].nunique() > 1
    fig, axes = plt.subplots(1, max(1, len(ctxs)), figsize=(6 * max(1, len(ctxs)), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        sub = lm[lm["ctx"] == ctx]
        for (arch, data, match), g in sub.groupby(["arch", "data", "match"]):
            g = g.sort_values("train_flops")
            ax.plot(g["train_flops"], g["val_loss"], marker="o", label=_label(g.iloc[0], multi, multi_match))
            for _, r in g.iterrows():
                ax.annotate(r["size"], (r["train_flops"], r["val_loss"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        log_axis(ax)
        ax.set_xlabel(FLOPS_NOTE)
        ax.set_ylabel("validation loss (nats / token)")
        rules = "/".join(sorted(sub["match"].unique()))
        ax.set_title(f"Loss vs training compute, context {ctx:,} tokens\n(sizes matched by {rules})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="architecture", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_loss_by_position(df: pd.DataFrame, path: Path) -> None:
    lm = df[(df["task"] == "lm") & df["loss_by_position"].notna()] if "loss_by_position" in df else df.iloc[:0]
    if lm.empty:
        return
    ctxs = sorted(lm["ctx"].unique())
    multi = lm["data"].nunique() > 1
    fig, axes = plt.subplots(1, max(1, len(ctxs)), figsize=(6 * max(1, len(ctxs)), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        sub = lm[lm["ctx"] == ctx]
        for (arch, data), g in sub.groupby(["arch", "data"]):
            r = g.sort_values("params").iloc[-1]  # the largest model of the architecture
            buckets = r["loss_by_position"]
            mids = [(b["start"] * b["end"]) ** 0.5 for b in buckets]
            ax.plot(mids, [b["loss"] for b in buckets], marker=".", label=f"{_label(r, multi)} {r['size']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token position in the sequence (log2 buckets)")
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(f"Loss by token position, context {ctx:,} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="architecture, size")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_training_curves(df: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, r in df.sort_values(["arch", "params"]).iterrows():
        metrics = Path(r["run_dir"]) / "metrics.jsonl"
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            ax.plot([m["tokens"] for m in rows], [m["loss"] for m in rows],
                    label=f"{r['arch']} [{r['backend']}] {r['size']} {r['task']} ctx={r['ctx']}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (nats per scored token)")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _largest(g: pd.DataFrame):
    return g.sort_values("params").iloc[-1]


def plot_longqa(df: pd.DataFrame, plots: Path) -> None:
    """Accuracy vs evaluation length per sub-task, and the passkey depth x length heatmaps."""
    qa = df[df.get("longqa_cells", pd.Series(index=df.index, dtype=object)).notna()]  # longqa and its presets
    if qa.empty:
        return
    runs = [(f"{arch} [{g.iloc[0]['backend']}] {_largest(g)['size']} {task} ctx={ctx}", _largest(g))
            for (task, arch, ctx), g in qa.groupby(["task", "arch", "ctx"])]
    cells = pd.DataFrame([{**c, "label": label, "ctx": r["ctx"]} for label, r in runs for c in r["longqa_cells"]])
    subtasks = sorted(cells["subtask"].unique())
    cols = min(4, len(subtasks))
    rows = -(-len(subtasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(subtasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, subtasks):
        for label, g in cells[cells["subtask"] == task].groupby("label"):
            acc = g.groupby("length")["acc"].mean()
            ax.plot(acc.index, acc.values, marker="o", label=label)
            ax.axvline(g["ctx"].iloc[0], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("evaluation length (tokens; dotted: trained)")
        ax.set_ylabel("accuracy (exact match; MQAR per value)")
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, plots / "longqa_accuracy.png")
    plt.close(fig)
    pk = cells[cells["subtask"] == "passkey"]
    if pk.empty:
        return
    labels = sorted(pk["label"].unique())
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.8), squeeze=False)
    for ax, label in zip(axes[0], labels):
        grid = pk[pk["label"] == label].pivot_table(index="depth", columns="length", values="acc")
        im = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{d:.2f}" for d in grid.index])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("needle depth (0 = start)")
        ax.set_title(label, fontsize=8)
        fig.colorbar(im, ax=ax, label="passkey accuracy")
    fig.tight_layout()
    save_figure(fig, plots / "passkey_heatmap.png")
    plt.close(fig)


def plot_classification(df: pd.DataFrame, plots: Path) -> None:
    cl = df[df["task"] == "classification"]
    if cl.empty:
        return
    ctxs = sorted(cl["ctx"].unique())
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        sub = cl[cl["ctx"] == ctx]
        for arch, g in sub.groupby("arch"):
            g = g.sort_values("params")
            ax.plot(g["params"], g["val_acc"], marker="o", label=f"{arch} [{g.iloc[0]['backend']}]")
        if "val_majority_acc" in sub:
            ax.axhline(sub["val_majority_acc"].max(), color="grey", linestyle="--", label="majority class")
        log_axis(ax)
        ax.set_xlabel("parameters")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{sub['data'].iloc[0]} classification, context {ctx:,} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, plots / "classification_accuracy.png")
    plt.close(fig)


def _grid_runs(best: pd.DataFrame) -> pd.DataFrame:
    """The runs of tasks with a (sequence length, pairs) grid: their summaries carry mqar_pairs."""
    if "mqar_pairs" not in best:
        return best.iloc[0:0]
    return best[best["mqar_pairs"].notna()]


def plot_mqar_grid(best: pd.DataFrame, path: Path) -> None:
    """Zoology's figure 2: accuracy vs model width, one panel per (sequence length, pairs), one line per
    architecture, each point at its best lr."""
    runs = _grid_runs(best)
    if runs.empty:
        return
    points = sorted({(int(r["ctx"]), int(r["mqar_pairs"])) for _, r in runs.iterrows()})
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.8), squeeze=False)
    for ax, (ctx, pairs) in zip(axes[0], points):
        sub = runs[(runs["ctx"] == ctx) & (runs["mqar_pairs"] == pairs)]
        for (task, arch), g in sub.groupby(["task", "arch"]):
            g = g.sort_values("d_model")
            ax.plot(g["d_model"], g["val_acc"], marker="o", label=f"{arch} ({task})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("model dimension")
        ax.set_ylabel("MQAR accuracy (best lr)")
        ax.set_title(f"sequence length {ctx}, {pairs} key-value pairs", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_recall_table(best: pd.DataFrame, path: Path) -> None:
    """RESULTS/recall.md: per (task, architecture, size) the test accuracy at each (sequence length, pairs)
    point, at the lr chosen on the dev split, with that lr and the step of an early stop."""
    runs = _grid_runs(best)
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


def save_figure(fig, path: Path) -> None:
    """PNG written whole (a kill mid-write leaves the previous plot); the canvas grows to hold every title,
    label and legend, so no text runs past the figure's edge."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    atomic_write_bytes(path, buf.getvalue())


def log_axis(ax, axis: str = "x", base: int = 10) -> None:
    """A log axis (call it after plotting) whose tick labels never pile up: over less than one factor of
    `base` matplotlib falls back to linear ticks labelled in long scientific notation (1.2 x 10^13,
    1.4 x 10^13, ... on top of each other); there three log-spaced ticks with short labels (1.2e13) instead."""
    import numpy as np
    from matplotlib.ticker import NullFormatter

    getattr(ax, f"set_{axis}scale")("log", base=base)
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    if lo > 0 and hi / lo < base:
        ticks = [float(f"{t:.2g}") for t in np.geomspace(lo, hi, 5)[1:-1]]
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_ticks(ticks, [f"{t:.2g}".replace("e+", "e") for t in ticks])
        target.set_minor_formatter(NullFormatter())


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
        full = _with_defaults(pd.DataFrame(rows)) if rows else pd.DataFrame()
        if not full.empty and (full.get("status") == "ok").any():
            best = latest_ok(full)
            plot_loss_vs_flops(best, plots / "loss_vs_flops.png")
            plot_loss_by_position(best, plots / "loss_by_position.png")
            plot_training_curves(best, plots / "training_curves.png")
            plot_longqa(best, plots)
            plot_classification(best, plots)
            plot_mqar_grid(best, plots / "mqar_grid.png")
            write_recall_table(best, results / "recall.md")
            write_eval_table(best, results / "eval.md")
            plot_metric_vs_lr(full, plots / "metric_vs_lr.png")
    return table


def plot_metric_vs_lr(df: pd.DataFrame, path: Path) -> None:
    """LRS sweeps: the validation metric vs learning rate, one line per (arch, size, ctx) of the newest
    sweep that tried several lrs, one panel per task; the best lr (the one the other plots use) ringed."""
    ok = df[(df["status"] == "ok") & df["lr"].notna()] if "lr" in df else df.iloc[0:0]
    if ok.empty:
        return
    ok = ok[ok["sweep"] == ok.groupby(KEY)["sweep"].transform("max")]
    swept = ok.groupby(KEY)["lr"].transform("nunique") > 1
    ok = ok[swept]
    if ok.empty:
        return
    tasks = sorted(ok["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        shown = "val_bpb" if task == "lm" else "val_acc"
        for (arch, size, ctx), g in ok[ok["task"] == task].groupby(["arch", "size", "ctx"]):
            col, higher = selection_metric(task, g)
            g = g.sort_values("lr")
            line, = ax.plot(g["lr"], g[shown], marker="o", label=f"{arch} {size} ctx={ctx}")
            best = g.sort_values(col, ascending=not higher).iloc[0]
            ax.plot([best["lr"]], [best[shown]], "o", markersize=12, markerfacecolor="none", color=line.get_color())
        log_axis(ax)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation bits per byte" if shown == "val_bpb" else "validation accuracy")
        ax.set_title(f"{task}: metric vs learning rate (ringed: best)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


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
    table = report(args.results)
    print(f"[ttt-bench] {len(table)} runs -> {Path(args.results) / 'summary.csv'}, plots in {Path(args.results) / 'plots'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
