"""Every figure the suite draws, in one place; the tools compute the tables, these functions draw them.

  make sweep / make plots (bench/report.py), in RESULTS/plots/:
    plot_loss_vs_flops      validation loss vs training FLOPs per context (the paper's scaling figure)
    plot_loss_by_position   validation loss by token position, largest model per architecture
    plot_training_curves    training loss vs tokens, every run, a panel per task and context
    plot_longqa             long-context QA accuracy vs length; passkey depth x length heatmaps
    plot_classification     classification accuracy vs parameters
    plot_mqar_grid          MQAR accuracy vs width per (length, pairs) point (Zoology's figure 2)
    plot_metric_vs_lr       LRS= sweeps: the validation metric vs learning rate
  make throughput (bench/throughput.py): plot_speed_vs_context
  make paper (bench/paper.py; notebooks/paper.ipynb redraws with them): plot_paper_scaling,
    plot_paper_token_index, plot_paper_latency, ours beside the published points
  bench/ttt_kernel_speed.py: plot_kernel_speed

Every axis has its quantity and unit; save_figure writes the PNG whole and fits every label in it.
"""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from bench import published  # noqa: E402
from bench.results import atomic_write_bytes  # noqa: E402

# the paper's six architectures in its legend order, with its labels
LABELS = {"transformer": "Transformer", "mamba": "Mamba", "ttt_linear": "TTT-Linear (M)", "ttt_mlp": "TTT-MLP (M)",
          "ttt_linear_base": "TTT-Linear (T)", "ttt_mlp_base": "TTT-MLP (T)"}
COLORS = {arch: f"C{i}" for i, arch in enumerate(LABELS)}


def arch_colors(archs) -> dict[str, str]:
    """A colour per architecture, in name order (matplotlib's cycle, C0, C1, ...; it wraps past C9)."""
    return {arch: f"C{i}" for i, arch in enumerate(sorted(set(archs)))}


# -- helpers ---------------------------------------------------------------------------------------------

def save_figure(fig, path: Path) -> None:
    """PNG written whole (a kill mid-write leaves the previous plot); the canvas grows to hold every title,
    label and legend, so no text runs past the figure's edge."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    atomic_write_bytes(path, buf.getvalue())


def panel_row(n: int, width: float, height: float):
    """A figure of n panels side by side, each width x height inches; returns (figure, the n axes)."""
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def finish(fig, path: Path) -> None:
    """Lay the figure out, write it (save_figure) and free it."""
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# where a point's label may go, in order of preference: (dx, dy) offset in points, horizontal, vertical alignment
LABEL_SPOTS = [(4, 4, "left", "bottom"), (4, -4, "left", "top"), (-4, 4, "right", "bottom"),
               (-4, -4, "right", "top"), (0, 7, "center", "bottom"), (0, -7, "center", "top")]


def label_points(ax, points: list[tuple[float, float, str]], fontsize: int = 7) -> None:
    """Label each (x, y, text) point of ax beside it, at the first spot of LABEL_SPOTS where the label covers
    no label placed before and no point (a marker's 6-point square); the first spot if none is free. Call once
    the figure is laid out (the labels' offsets are in points, the points' places on the page are not)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_page = ax.transData.transform
    pt = fig.dpi / 72  # pixels per point
    taken = [(x - 3 * pt, y - 3 * pt, x + 3 * pt, y + 3 * pt) for x, y in (to_page((px, py)) for px, py, _ in points)]

    def free(box) -> bool:
        return all(box.x1 <= a or box.x0 >= c or box.y1 <= b or box.y0 >= d for a, b, c, d in taken)

    def put(x, y, text, spot):  # the label and the page box it covers
        dx, dy, ha, va = spot
        label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=fontsize)
        return label, label.get_window_extent(renderer)

    for x, y, text in points:
        for spot in LABEL_SPOTS:
            label, box = put(x, y, text, spot)
            if free(box):
                break
            label.remove()
        else:  # nowhere free: the first spot, as any plot would put it
            label, box = put(x, y, text, LABEL_SPOTS[0])
        taken.append((box.x0, box.y0, box.x1, box.y1))


def _axis_and_limits(ax, axis: str):
    """The matplotlib Axis ("x" or "y") of ax and its current limits."""
    return (ax.xaxis, ax.get_xlim()) if axis == "x" else (ax.yaxis, ax.get_ylim())


def _short(v: float, digits: int = 2) -> str:
    """A tick label in short scientific notation: 1.2e13, 5e9 (not 1.2 x 10^13 or 5e+09)."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{v:.{digits}g}")


NICE_MANTISSAS = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)  # round ticks of a log axis that spans under a decade


def round_log_ticks(lo: float, hi: float, most: int = 5) -> list[float]:
    """Round values (NICE_MANTISSAS x a power of ten) inside [lo, hi], every other one dropped until at most
    `most` are left; three log-spaced values to 2 digits where fewer than two round ones fit."""
    import numpy as np

    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
             for m in NICE_MANTISSAS if lo <= m * 10.0 ** k <= hi]
    while len(ticks) > most:
        ticks = ticks[::2]
    return ticks if len(ticks) >= 2 else [float(f"{t:.2g}") for t in np.geomspace(lo, hi, 5)[1:-1]]


def log_axis(ax, axis: str = "x", base: int = 10) -> None:
    """A log axis (call it after plotting) whose tick labels never pile up. Over less than one factor of
    `base` matplotlib falls back to linear ticks labelled in long scientific notation (1.2 x 10^13,
    1.4 x 10^13, ... on top of each other): there two to five round ticks with short labels (1.5e13) instead.
    Over one to three decades of base 10 it labels minor ticks as 2 x 10^9, 3 x 10^9, ... side by side: there
    short labels at the decades (1e10), and at 2 and 5 within them while the axis spans under two."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, NullFormatter

    getattr(ax, f"set_{axis}scale")("log", base=base)
    target, (lo, hi) = _axis_and_limits(ax, axis)
    if lo > 0 and hi / lo < base:
        ticks = round_log_ticks(lo, hi) if base == 10 else [float(f"{t:.2g}") for t in np.geomspace(lo, hi, 5)[1:-1]]
        target.set_ticks(ticks, [_short(t) for t in ticks])
        target.set_minor_formatter(NullFormatter())
    elif lo > 0 and base == 10 and hi / lo < 1e3:
        def minor(v, _):
            lead = round(v / 10 ** math.floor(math.log10(v)))
            return _short(v) if hi / lo < 1e2 and lead in (2, 5) else ""

        target.set_major_formatter(FuncFormatter(lambda v, _: _short(v)))
        target.set_minor_formatter(FuncFormatter(minor))


def tokens_label(n: float) -> str:
    """A token count as a tick label: 1024 -> 1k, 32768 -> 32k, 1536 -> 1.5k, 512 -> 512."""
    return f"{n / 1024:g}k" if n >= 1024 else f"{n:g}"


def log2_axis(ax, axis: str = "x", tokens: bool = True) -> None:
    """A log2 axis (call it after plotting) of token counts labelled 1k, 2k, ... 32k, or with tokens=False plain
    numbers (64, 128, 256: model widths), not matplotlib's 2^10, 2^11, ..."""
    from matplotlib.ticker import FuncFormatter

    log_axis(ax, axis, 2)
    target, (lo, hi) = _axis_and_limits(ax, axis)
    if lo > 0 and hi / lo >= 2:  # else log_axis's own short labels
        label = tokens_label if tokens else (lambda n: f"{n:g}")
        target.set_major_formatter(FuncFormatter(lambda v, _: label(v)))


def plain_log_labels(ax, axis: str = "y") -> None:
    """Tick labels of a log10 axis as plain numbers (0.5, 1, 2, 20) instead of 10^0 and 6 x 10^-1: every minor
    tick labelled over less than a decade, those at 2 and 5 over up to three, none beyond."""
    from matplotlib.ticker import FuncFormatter

    target, (lo, hi) = _axis_and_limits(ax, axis)
    decades = math.log10(hi / lo) if lo > 0 else math.inf

    def minor(v, _):
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if decades < 1 or (decades <= 3 and lead in (2, 5)) else ""

    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(minor))


def style_axes(ax, title: str, xlabel: str, ylabel: str, xbase: int = 10) -> None:
    """Log x axis (base 2: token counts, labelled 1k, 2k, ...), title, axis labels with units, grid, legend."""
    log2_axis(ax) if xbase == 2 else log_axis(ax, "x", xbase)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def run_label(row, multi_data: bool, multi_match: bool = False, with_seeds: bool = True) -> str:
    """The architecture, the backend that ran, the data / match rule when several are plotted, and (with_seeds)
    the seeds averaged when more than one."""
    label = f"{row['arch']} [{row['backend']}]"
    label = f"{label} ({row['data']})" if multi_data else label
    label = f"{label} match={row['match']}" if multi_match else label
    recipe = row.get("recipe")
    label = label if recipe in (None, "native") or pd.isna(recipe) else f"{label} recipe={recipe}"
    return label + seeds_note(row) if with_seeds else label


def seeds(row) -> int:
    """How many seeds a plotted point averages (bench/report.seed_means; 1 for a run of its own)."""
    n = row.get("seeds")
    return 1 if n is None or pd.isna(n) else int(n)


def seeds_note(row) -> str:
    """', mean of 3 seeds' for a point of several seeds, else ''."""
    return f", mean of {seeds(row)} seeds" if seeds(row) > 1 else ""


SEED_RANGE_NOTE = "shaded bars: the range over seeds"


def draw_seed_range(ax, x, g: pd.DataFrame, metric: str, color) -> bool:
    """A shaded bar from the lowest to the highest seed's `metric` at each of g's points of several seeds
    (seed_means' <metric>_seed_min / _seed_max); whether any was drawn."""
    lo, hi = f"{metric}_seed_min", f"{metric}_seed_max"
    if lo not in g or "seeds" not in g:
        return False
    several = (g["seeds"].fillna(1) > 1) & g[lo].notna()
    if several.any():
        ax.vlines(pd.Series(x, index=g.index)[several], g.loc[several, lo], g.loc[several, hi], color=color,
                  linewidth=6, alpha=0.25)
    return bool(several.any())


def largest_row(g: pd.DataFrame):
    return g.sort_values("params").iloc[-1]


def grid_runs(best: pd.DataFrame) -> pd.DataFrame:
    """The runs of tasks with a (sequence length, pairs) grid: their summaries carry mqar_pairs."""
    if "mqar_pairs" not in best:
        return best.iloc[0:0]
    return best[best["mqar_pairs"].notna()]


def unit(scaling: pd.DataFrame) -> str:
    """'byte' for the byte-level tokenizer, else 'token'."""
    return "byte" if (scaling["tokenizer"].fillna("byte") == "byte").all() else "token"  # the default data: bytes


def by_arch(df: pd.DataFrame):
    """(arch, rows) in the paper's legend order."""
    order = {a: i for i, a in enumerate(LABELS)}
    return sorted(df.groupby("arch"), key=lambda item: order.get(item[0], len(order)))


def largest(tokens: pd.DataFrame) -> pd.DataFrame:
    """The rows of the largest model (by parameters) of each architecture."""
    if tokens.empty:
        return tokens
    return tokens[tokens["params"] == tokens.groupby("arch")["params"].transform("max")]


# -- make sweep / make plots ----------------------------------------------------------------------------

FLOPS_NOTE = "training FLOPs\n(architectures/accounting.py: 3 x forward, attention causal-halved)"


def plot_loss_vs_flops(df: pd.DataFrame, path: Path) -> None:
    lm = df[df["task"] == "lm"]
    if lm.empty:  # task runs only: no language-modeling plot
        return
    ctxs = sorted(lm["ctx"].unique())
    multi, multi_match = lm["data"].nunique() > 1, lm["match"].nunique() > 1
    fig, axes = panel_row(max(1, len(ctxs)), 6, 4.5)
    sizes = {}  # axes: its points' size labels, placed once the figure is laid out
    for ax, ctx in zip(axes, ctxs):
        sub = lm[lm["ctx"] == ctx]
        ranged = False
        for (arch, data, match), g in sub.groupby(["arch", "data", "match"]):
            g = g.sort_values("train_flops")
            sem = g["val_loss_sem"].astype(float) if "val_loss_sem" in g else None  # NaN: one window, or older runs
            line = ax.errorbar(g["train_flops"], g["val_loss"], yerr=sem, marker="o", capsize=3,
                               label=run_label(g.iloc[0], multi, multi_match))
            ranged |= draw_seed_range(ax, g["train_flops"], g, "val_loss", line.lines[0].get_color())
        sizes[ax] = list(zip(sub["train_flops"], sub["val_loss"], sub["size"]))
        log_axis(ax)
        ax.set_xlabel(FLOPS_NOTE)
        ax.set_ylabel("validation loss (nats / token)")
        rules = "/".join(sorted(sub["match"].unique()))
        ax.set_title(f"Loss vs training compute, context {ctx:,} tokens\n(sizes matched by {rules}; bars: standard "
                     f"error over validation windows{'; ' + SEED_RANGE_NOTE if ranged else ''})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="architecture", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    for ax, points in sizes.items():
        label_points(ax, points)
    finish(fig, path)


FEW_TOKENS = 100  # a loss-by-position bucket averaged over fewer tokens (windows x positions) is drawn hollow


def plot_loss_by_position(df: pd.DataFrame, path: Path) -> None:
    """Validation loss by token position (log2 buckets), the largest model per architecture, one panel per context.
    Each point is the mean over every validation window's positions in its bucket; with few windows (a long
    context on a small validation text) the first buckets hold few tokens, drawn hollow."""
    lm = df[(df["task"] == "lm") & df["loss_by_position"].notna()] if "loss_by_position" in df else df.iloc[:0]
    if lm.empty:
        return
    ctxs = sorted(lm["ctx"].unique())
    multi = lm["data"].nunique() > 1
    fig, axes = panel_row(max(1, len(ctxs)), 6, 4.5)
    for ax, ctx in zip(axes, ctxs):
        sub = lm[lm["ctx"] == ctx]
        for (arch, data), g in sub.groupby(["arch", "data"]):
            r = g.sort_values("params").iloc[-1]  # the largest model of the architecture
            buckets = r["loss_by_position"]
            windows = int(r["val_tokens"]) // int(ctx) if pd.notna(r.get("val_tokens")) else None
            mids = [(b["start"] * b["end"]) ** 0.5 for b in buckets]
            losses = [b["loss"] for b in buckets]
            label = (f"{run_label(r, multi, with_seeds=False)} {r['size']}"
                     + (f", {windows:,} windows" if windows else "") + seeds_note(r))
            line, = ax.plot(mids, losses, label=label)
            few = [bool(windows) and windows * (b["end"] - b["start"] + 1) < FEW_TOKENS for b in buckets]
            for hollow in (False, True):
                pts = [(m, v) for m, v, f in zip(mids, losses, few) if f == hollow]
                if pts:
                    ax.plot(*zip(*pts), "o", color=line.get_color(), markerfacecolor="none" if hollow else None,
                            markersize=6 if hollow else 3.5)
        log2_axis(ax)
        ax.set_xlabel("token position in the sequence (log2 buckets)")
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(f"Loss by token position, context {ctx:,} tokens")
        ax.text(0.01, 0.01, f"hollow: a bucket of fewer than {FEW_TOKENS} tokens (windows x positions)",
                transform=ax.transAxes, fontsize=7, alpha=0.7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="architecture, size")
    finish(fig, path)


SIZE_STYLES = (":", "-.", "--", "-")  # an architecture's sizes, smallest to largest (the largest solid)


def _training_curve(run) -> tuple[list[float], list[float]]:
    """(tokens seen, training loss) at every logged step of a run (its metrics.jsonl; empty when missing). A point
    of several seeds (bench/report.seed_means: seed_run_dirs): the mean of the seeds' losses at each step, where
    they logged the same steps (the same config), else the first seed's curve."""
    dirs = run.get("seed_run_dirs")
    curves = [_logged_curve(d) for d in (dirs if isinstance(dirs, list) and dirs else [run["run_dir"]])]
    tokens = curves[0][0]
    if len(curves) > 1 and tokens and all(c[0] == tokens for c in curves):
        return tokens, [sum(losses) / len(curves) for losses in zip(*(c[1] for c in curves))]
    return curves[0]


def _logged_curve(run_dir) -> tuple[list[float], list[float]]:
    metrics = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return [m["tokens"] for m in rows], [m["loss"] for m in rows]


def plot_training_curves(df: pd.DataFrame, path: Path) -> None:
    """Training loss vs tokens seen, one panel per (task, context): one colour per architecture, its sizes from
    dotted (smallest) to solid (largest)."""
    panels = sorted({(r["task"], int(r["ctx"])) for _, r in df.iterrows()})
    colors = arch_colors(df["arch"])
    fig, axes = panel_row(max(1, len(panels)), 6.5, 4.5)
    for ax, (task, ctx) in zip(axes, panels):
        for arch, g in df[(df["task"] == task) & (df["ctx"] == ctx)].groupby("arch"):
            g = g.sort_values("params")
            styles = [SIZE_STYLES[max(0, len(SIZE_STYLES) - len(g) + i)] for i in range(len(g))]
            for style, (_, r) in zip(styles, g.iterrows()):
                tokens, loss = _training_curve(r)
                if tokens:
                    ax.plot(tokens, loss, style, color=colors[arch],
                            label=f"{arch} [{r['backend']}] {r['size']}{seeds_note(r)}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss (nats per scored token)")
        ax.set_title(f"Training curves: {task}, context {ctx:,} tokens", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    finish(fig, path)


CTX_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # line and marker of each trained context


def plot_longqa(df: pd.DataFrame, plots: Path) -> None:
    """Accuracy vs evaluation length per sub-task (one colour per architecture, a line style per trained
    context, one legend: in the grid's empty panel, else beside the last), and the passkey depth x length
    heatmaps."""
    qa = df[df.get("longqa_cells", pd.Series(index=df.index, dtype=object)).notna()]  # longqa and its presets
    if qa.empty:
        return
    colors = arch_colors(qa["arch"])
    styles = {ctx: CTX_STYLES[i % len(CTX_STYLES)] for i, ctx in enumerate(sorted(qa["ctx"].unique()))}
    runs = [(f"{arch} [{g.iloc[0]['backend']}] {largest_row(g)['size']} {task} ctx={ctx}{seeds_note(largest_row(g))}",
             largest_row(g)) for (task, arch, ctx), g in qa.groupby(["task", "arch", "ctx"])]
    cells = pd.DataFrame([{**c, "label": label, "arch": r["arch"], "ctx": r["ctx"]}
                          for label, r in runs for c in r["longqa_cells"]])
    by_seed = pd.DataFrame([{**c, "label": label, "seed": i} for label, r in runs if seeds(r) > 1
                            for i, seed_cells in enumerate(r["seed_longqa_cells"]) for c in seed_cells])
    ranged = False
    subtasks = sorted(cells["subtask"].unique())
    cols = min(4, len(subtasks))
    rows = -(-len(subtasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(subtasks):]:
        ax.set_axis_off()
    legend = {}  # label: how its run is drawn
    for ax, task in zip(axes.flat, subtasks):
        for i, (label, g) in enumerate(cells[cells["subtask"] == task].groupby("label", sort=False)):
            acc = g.groupby("length")["acc"].mean()
            legend[label] = dict(linestyle=styles[g["ctx"].iloc[0]][0], marker=styles[g["ctx"].iloc[0]][1],
                                 color=colors[g["arch"].iloc[0]])
            # markers shrink in drawing order: runs at the same accuracy (all at 0 early on) stay visible as rings
            ax.plot(acc.index, acc.values, markersize=max(3.0, 9.0 - 2.0 * i), **legend[label])
            ax.axvline(g["ctx"].iloc[0], color="grey", linestyle=":", linewidth=0.8)
            ranged |= _seed_range_by_length(ax, by_seed, label, task, legend[label]["color"])
        log2_axis(ax)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("evaluation length (tokens; dotted: trained" + ("; " + SEED_RANGE_NOTE if ranged else "") + ")")
        ax.set_ylabel("accuracy (exact match; MQAR per value)")
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], markersize=6, **how) for how in legend.values()]
    keys = dict(fontsize=7, title="largest size per architecture and context", title_fontsize=8, loc="upper left")
    if len(subtasks) < axes.size:  # in an empty panel's place
        axes.flat[len(subtasks)].legend(handles, list(legend), **keys)
        finish(fig, plots / "longqa_accuracy.png")
    else:  # beside the panels, once they are laid out (tight_layout cannot make room for it)
        fig.tight_layout()
        fig.legend(handles, list(legend), bbox_to_anchor=(1.0, 0.98), **keys)
        save_figure(fig, plots / "longqa_accuracy.png")
        plt.close(fig)
    pk = cells[cells["subtask"] == "passkey"]
    if pk.empty:
        return
    labels = sorted(pk["label"].unique())
    fig, axes = panel_row(len(labels), 4.5, 3.8)
    for ax, label in zip(axes, labels):
        run = pk[pk["label"] == label]
        grid = run.pivot_table(index="depth", columns="length", values="acc")
        im = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for (row, col), acc in np.ndenumerate(grid.values):  # each cell's accuracy, legible on its colour
            if not np.isnan(acc):
                ax.text(col, row, f"{acc:.0%}", ha="center", va="center", fontsize=7,
                        color="black" if acc > 0.6 else "white")
        trained = int(run["ctx"].iloc[0])
        ax.set_xticks(range(len(grid.columns)), [f"{c}\n(trained)" if c == trained else str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{d:.2f}" for d in grid.index])
        ax.set(xlabel="length (tokens)", ylabel="needle depth (0 = start)")
        ax.set_title(label, fontsize=8)
        fig.colorbar(im, ax=ax, label="passkey accuracy")
    finish(fig, plots / "passkey_heatmap.png")


def _seed_range_by_length(ax, by_seed: pd.DataFrame, label: str, subtask: str, color) -> bool:
    """A shaded bar from the lowest to the highest seed's accuracy at each evaluation length of one sub-task of one
    plotted run of several seeds (by_seed: each seed's cells); whether it drew one."""
    if by_seed.empty:
        return False
    mine = by_seed[(by_seed["label"] == label) & (by_seed["subtask"] == subtask)]
    if mine.empty:
        return False
    span = mine.groupby(["seed", "length"])["acc"].mean().groupby("length").agg(["min", "max"])
    ax.vlines(span.index, span["min"], span["max"], color=color, linewidth=6, alpha=0.25)
    return True


def plot_classification(df: pd.DataFrame, plots: Path) -> None:
    cl = df[df["task"] == "classification"]
    if cl.empty:
        return
    ctxs = sorted(cl["ctx"].unique())
    fig, axes = panel_row(len(ctxs), 6, 4.5)
    for ax, ctx in zip(axes, ctxs):
        sub = cl[cl["ctx"] == ctx]
        ranged = False
        for arch, g in sub.groupby("arch"):
            g = g.sort_values("params")
            line, = ax.plot(g["params"], g["val_acc"], marker="o", label=f"{arch} [{g.iloc[0]['backend']}]"
                            + seeds_note(g.iloc[-1]))
            ranged |= draw_seed_range(ax, g["params"], g, "val_acc", line.get_color())
        if ranged:
            ax.text(0.01, 0.01, SEED_RANGE_NOTE, transform=ax.transAxes, fontsize=7, alpha=0.7)
        if "val_majority_acc" in sub:
            ax.axhline(sub["val_majority_acc"].max(), color="grey", linestyle="--", label="majority class")
        log_axis(ax)
        ax.set_xlabel("parameters")
        ax.set_ylabel("validation accuracy")
        held_out = f"; {int(sub['val_examples'].max()):,} held-out examples" if "val_examples" in sub and \
            sub["val_examples"].notna().any() else ""  # runs from before it was recorded: not said
        ax.set_title(f"{sub['data'].iloc[0]} classification, context {ctx:,} tokens{held_out}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    finish(fig, plots / "classification_accuracy.png")


def plot_mqar_grid(best: pd.DataFrame, path: Path) -> None:
    """Zoology's figure 2: accuracy vs model width, one panel per (sequence length, pairs), one line per
    architecture, each point at its best lr."""
    runs = grid_runs(best)
    if runs.empty:
        return
    points = sorted({(int(r["ctx"]), int(r["mqar_pairs"])) for _, r in runs.iterrows()})
    fig, axes = panel_row(len(points), 4.2, 3.8)
    for ax, (ctx, pairs) in zip(axes, points):
        sub = runs[(runs["ctx"] == ctx) & (runs["mqar_pairs"] == pairs)]
        ranged = False
        for (task, arch), g in sub.groupby(["task", "arch"]):
            g = g.sort_values("d_model")
            line, = ax.plot(g["d_model"], g["val_acc"], marker="o", label=f"{arch} ({task}){seeds_note(g.iloc[-1])}")
            ranged |= draw_seed_range(ax, g["d_model"], g, "val_acc", line.get_color())
        if ranged:
            ax.text(0.01, 0.01, SEED_RANGE_NOTE, transform=ax.transAxes, fontsize=7, alpha=0.7)
        log2_axis(ax, tokens=False)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("model dimension")
        ax.set_ylabel("MQAR accuracy (best lr)")
        ax.set_title(f"sequence length {ctx}, {pairs} key-value pairs", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    finish(fig, path)


def plot_metric_vs_lr(sweeps: pd.DataFrame, path: Path) -> None:
    """LRS sweeps (bench/report.py lr_sweeps): the validation metric vs learning rate, one line per (arch,
    size, ctx), one panel per task; the best lr (the one the other plots use, `best`) ringed."""
    if sweeps.empty:
        return
    tasks = sorted(sweeps["task"].unique())
    fig, axes = panel_row(len(tasks), 6.5, 4.5)
    for ax, task in zip(axes, tasks):
        shown = "val_bpb" if task == "lm" else "val_acc"
        for i, ((arch, size, ctx), g) in enumerate(sweeps[sweeps["task"] == task].groupby(["arch", "size", "ctx"])):
            g = g.sort_values("lr")  # markers shrink in drawing order: lines at the same values stay visible
            line, = ax.plot(g["lr"], g[shown], marker="o", markersize=max(3.0, 8.0 - 1.5 * i),
                            label=f"{arch} {size} ctx={ctx}")
            best = g[g["best"]]
            ax.plot(best["lr"], best[shown], "o", markersize=12, markerfacecolor="none", color=line.get_color())
        log_axis(ax)
        if shown == "val_acc":  # a fraction: the whole range, not matplotlib's +-0.05 around a flat 0
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation bits per byte" if shown == "val_bpb" else "validation accuracy")
        ax.set_title(f"{task}: metric vs learning rate (ringed: best)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    finish(fig, path)


# -- make throughput, the kernel benchmark --------------------------------------------------------------

def _speed_series(sub: pd.DataFrame, mode: str):
    """`make throughput`'s lines: (label, rows by context) per (architecture, size, backend, device) and batch. A
    training line takes each context's micro-batch as `make sweep` trains there (cpu-xs: 8 x 1k, 4 x 2k, 2 x 4k,
    ...), so its batch changes along the line; one line per batch only where a context was measured at several."""
    for (arch, size, backend, dev), g in sub.groupby(["arch", "size", "backend", "device"]):
        one_line = mode == "train" and not g["ctx"].duplicated().any()
        for _, line in ([(None, g)] if one_line else g.groupby("batch")):
            line = line.sort_values("ctx")
            batches = [int(b) for b in line["batch"]]
            shown = f"B={batches[0]}" if len(set(batches)) == 1 else f"B={batches[0]}..{batches[-1]} (as make sweep)"
            yield f"{arch} [{backend}] {size} {shown}", line


def plot_speed_vs_context(df: pd.DataFrame, mode: str, path: Path) -> None:
    """`make throughput`: time per token (prefill, decode) or training tokens/s vs context, one line per
    (architecture, backend, size, batch, device), a colour per architecture; hollow points were noisy after a
    re-measurement."""
    sub = df[(df["mode"] == mode) & (df["status"] == "ok")]
    colors = arch_colors(sub["arch"])
    lines_of = {}  # an architecture's lines so far: its second and later (other sizes, backends, batches) dashed, ...
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, g in _speed_series(sub, mode):
        arch = g["arch"].iloc[0]
        lines_of[arch] = lines_of.get(arch, 0) + 1
        style = ("-", "--", ":", "-.")[min(lines_of[arch], 4) - 1]
        y = g["time_per_token_s"] * 1e3 if mode != "train" else g["tokens_per_s"]
        noisy = g["noisy"].astype(str).str.lower().eq("true") if "noisy" in g else pd.Series(False, index=g.index)
        line, = ax.plot(g["ctx"], y, style, color=colors[arch], label=label)
        ax.plot(g["ctx"][~noisy], y[~noisy], "o", color=line.get_color())
        ax.plot(g["ctx"][noisy], y[noisy], "o", color=line.get_color(), markerfacecolor="none")  # spread > 50% twice
    log2_axis(ax)
    ax.set_xlabel("context length (tokens)" if mode != "decode" else "tokens already in context")
    if mode == "train":
        ax.set_ylabel("training tokens / s (forward + backward)")
        ax.set_title("Training throughput vs context")
    else:
        ax.set_yscale("log")
        plain_log_labels(ax)
        ax.set_ylabel("time per token (ms)")
        ax.set_title("Prefill: time per token vs prompt length" if mode == "prefill"
                     else "Decode: time per generated token vs context")
    devices = ", ".join(sorted(sub["device"].unique())) if not sub.empty else "no successful points"
    devices += "; hollow: noisy (spread > 50% after a re-measurement)"
    ax.text(0.01, 0.01, devices, transform=ax.transAxes, fontsize=7, alpha=0.7)
    ax.grid(True, which="both", alpha=0.3)
    if not sub.empty:
        ax.legend(fontsize=7)
    finish(fig, path)


def plot_kernel_speed(rows: list[dict], path: Path, title: str) -> None:
    """bench/ttt_kernel_speed.py: time per call vs T of each contender, forward and forward+backward."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["T"], r["ms"]) for r in rows if r["impl"] == name and r["mode"] == mode and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        log2_axis(ax)
        ax.set_yscale("log")
        plain_log_labels(ax)
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel("time per call (ms, median)")
        batch = next((r["batch"] for r in rows if r["mode"] == mode), "?")
        ax.set_title(f"{mode}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # --modes left it out, or nothing ran
            ax.text(0.5, 0.5, "no timed points", transform=ax.transAxes, ha="center", alpha=0.7)
    fig.suptitle(title)
    finish(fig, path)


# -- make paper ------------------------------------------------------------------------------------------

def plot_paper_scaling(scaling: pd.DataFrame) -> plt.Figure:
    """Rows: 2k and the long context; columns: ours (perplexity per byte) | published (per Llama-2 token)."""
    ctxs = sorted(scaling["ctx"].unique()) or [2048, 8192]
    pub = published.load("scaling")
    fig, axes = plt.subplots(len(ctxs), 2, figsize=(12, 4.3 * len(ctxs)), squeeze=False)
    sizes = {}  # our axes: the size labels, placed once the figure is laid out
    for (ours_ax, pub_ax), ctx, pctx in zip(axes, ctxs, (2048, 8192)):  # ours may be shorter (smoke)
        ours = scaling[scaling["ctx"] == ctx]
        for arch, g in by_arch(ours):
            g = g.sort_values("train_flops")
            ours_ax.plot(g["train_flops"], g["val_ppl"], marker="o", color=COLORS.get(arch),
                         label=LABELS.get(arch, arch))
        sizes[ours_ax] = list(zip(ours["train_flops"], ours["val_ppl"], ours["size"]))
        style_axes(ours_ax, f"Ours: context {ctx:,}", "training FLOPs (3 x forward)", f"perplexity per {unit(scaling)}")
        for arch, g in by_arch(pub[pub["ctx"] == pctx]):
            g = g.sort_values("train_flops")
            pub_ax.plot(g["train_flops"], g["ppl"], marker="s", color=COLORS.get(arch), label=g["label"].iloc[0])
        style_axes(pub_ax, f"Published: Pile, context {pctx:,}", "training FLOPs", "perplexity per Llama-2 token")
    fig.tight_layout()
    for ax, points in sizes.items():
        label_points(ax, points)
    return fig


def plot_paper_token_index(tokens: pd.DataFrame, scaling: pd.DataFrame) -> plt.Figure:
    """Perplexity by token position of the largest model per architecture, one panel per context, and the
    paper's Books 32k curves (v1 Fig 2 right)."""
    ctxs = sorted(tokens["ctx"].unique())
    fig, axes = panel_row(len(ctxs) + 1, 5.2, 4.3)
    for ax, ctx in zip(axes, ctxs):
        sub = tokens[tokens["ctx"] == ctx]
        for arch, g in by_arch(largest(sub)):
            mids = (g["start"] * g["end"]) ** 0.5
            ax.plot(mids, g["loss"].map(math.exp), marker=".", color=COLORS.get(arch),
                    label=f"{LABELS.get(arch, arch)} {g['size'].iloc[0]}")
        style_axes(ax, f"Ours: context {ctx:,}, largest size", "token position (log2 buckets)",
              f"perplexity per {unit(scaling)}", xbase=2)
    ax = axes[-1]
    for arch, g in by_arch(published.load("token_index")):
        ax.plot(g["position"], g["ppl"], marker="s", color=COLORS.get(arch), label=g["label"].iloc[0])
    style_axes(ax, "Published: Books, context 32,768, ~1.3B", "token position", "perplexity per Llama-2 token", xbase=2)
    fig.tight_layout()
    return fig


def plot_paper_latency(latency: pd.DataFrame) -> plt.Figure:
    """Ours: prefill and decode time per token vs context; published: forward time per token (A100). Times in
    microseconds on log axes labelled as plain numbers."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    where = f"{latency['size'].iloc[0]}, batch {latency['batch'].iloc[0]}" if len(latency) else "no points"
    for ax, mode in zip(axes, ("prefill", "decode")):
        for arch, g in by_arch(latency[latency["mode"] == mode]):
            ax.plot(g["ctx"], g["time_per_token_s"] * 1e6, marker="o", color=COLORS.get(arch),
                    label=LABELS.get(arch, arch))
        style_axes(ax, f"Ours: {mode} ({where})", "context (tokens)", "time per token (µs)", xbase=2)
    for arch, g in by_arch(published.load("latency")):
        axes[2].plot(g["ctx"], g["seconds_per_token"] * 1e6, marker="s", color=COLORS.get(arch),
                     label=g["label"].iloc[0])
    style_axes(axes[2], "Published: forward, 1.3B, batch 16, A100", "context (tokens)", "time per token (µs)",
               xbase=2)
    for ax in axes:  # log like the paper's figure (and no offset label over the title)
        ax.set_yscale("log")
        plain_log_labels(ax)
    fig.tight_layout()
    return fig
