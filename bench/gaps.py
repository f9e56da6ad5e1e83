"""Paired comparisons of validation loss: is one architecture's loss lower than another's beyond the noise of
the text evaluated?

A run's validation loss moves by about 1.4% with the text it is evaluated on (the CPU profile's 32k run: val_bpb
2.424 ± 0.034), and the gaps the paper reports are 1-3%. Two runs that evaluated the same windows (same
`val_windows_hash`, tasks/lm/data.PackedWindows.fingerprint) are therefore compared window by window
(`val_window_loss`): each window's own difficulty, which dominates the spread of either run's loss alone, cancels.

    gap       = mean over windows of (loss_a - loss_b)            nats per token; a negative gap: a is lower
    gap_sem   = stdev of the per-window differences / sqrt(windows)
    half_width = t_{0.975, windows - 1} x gap_sem                 the LEVEL interval, Student's t
    call      = 'lower' / 'higher' when gap ± half_width excludes 0, else 'within noise'

The interval covers the evaluation's noise over windows only: seed-to-seed noise of training is not in it, and
adjacent windows of one document are not quite independent, so it is a little narrow.

Users: bench/report.py (`make sweep`'s RESULTS/comparisons.md and .csv: every pair of architectures trained at
the same point) and bench/paper.py (`make paper`'s gaps.csv and its verdicts).
"""
from __future__ import annotations

import math
import statistics

import pandas as pd
from scipy.stats import t as student_t

from bench.plots import LABELS

LEVEL = 0.95  # the two-sided level of the interval a gap must leave to count as beyond noise
GAP_FIELDS = ["arch", "versus", "loss_gap", "gap_sem", "windows", "half_width", "call"]  # a pair's columns
GAP_COLUMNS = ["ctx", "size"] + GAP_FIELDS  # make paper's gaps.csv
POINT = ["task", "data", "size", "ctx", "match", "recipe"]  # the point two runs of a sweep share to be compared
COMPARISON_COLUMNS = POINT + GAP_FIELDS + ["ppl_ratio", "ppl_half_width"]  # make sweep's comparisons.csv


def paired_gap(a, b) -> tuple[float, float, int] | None:
    """Run a's validation loss minus run b's (nats per token), its standard error and the number of windows: the
    mean and the standard error of the per-window differences. None unless both runs hold per-window losses
    (val_window_loss) of the same text (val_windows_hash) and at least two windows."""
    wa, wb = a.get("val_window_loss"), b.get("val_window_loss")
    same_text = isinstance(a.get("val_windows_hash"), str) and a.get("val_windows_hash") == b.get("val_windows_hash")
    if not (same_text and isinstance(wa, list) and isinstance(wb, list) and len(wa) == len(wb) >= 2):
        return None
    diff = [x - y for x, y in zip(wa, wb)]
    return statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(len(diff)), len(diff)


def gap_call(gap: float, half_width: float) -> str:
    """'lower' or 'higher' when the gap leaves its interval (gap ± half_width holds no 0), else 'within noise'."""
    return "lower" if gap < -half_width else "higher" if gap > half_width else "within noise"


def gap_row(a, b) -> dict:
    """paired_gap of runs a and b as a row of GAP_FIELDS' last five (NaN and '' without one: the gap of the means),
    with the half width of its LEVEL interval (Student's t, windows - 1 degrees of freedom) and the call it makes."""
    found = paired_gap(a, b)
    if found is None:
        return {"loss_gap": a.get("val_loss", math.nan) - b.get("val_loss", math.nan), "gap_sem": math.nan,
                "windows": pd.NA, "half_width": math.nan, "call": ""}
    gap, sem, n = found
    half = float(student_t.ppf((1 + LEVEL) / 2, n - 1)) * sem
    return {"loss_gap": gap, "gap_sem": sem, "windows": n, "half_width": half, "call": gap_call(gap, half)}


def legend_order(archs) -> list[str]:
    """The paper's legend order (bench/plots.LABELS) first, then any other architecture by name."""
    order = {a: i for i, a in enumerate(LABELS)}
    return sorted(set(archs), key=lambda a: (order.get(a, len(order)), a))


def pair_rows(runs) -> list[dict]:
    """Every pair of the runs (rows with an `arch`; one run per architecture), the earlier in legend order first,
    as {'arch', 'versus', **gap_row}: arch's loss minus versus's."""
    by_arch = {r["arch"]: r for r in runs}
    point = [by_arch[a] for a in legend_order(by_arch)]
    return [{"arch": a["arch"], "versus": b["arch"], **gap_row(a, b)}
            for i, a in enumerate(point) for b in point[i + 1:]]


def gap_between(gaps: pd.DataFrame, ctx: int, size: str, arch: str, versus: str) -> dict | None:
    """The gaps row of `arch` minus `versus` at (ctx, size), whichever order it was stored in; None if absent."""
    for x, y, sign in ((arch, versus, 1), (versus, arch, -1)):
        hit = gaps[(gaps["ctx"] == ctx) & (gaps["size"] == size) & (gaps["arch"] == x) & (gaps["versus"] == y)]
        if len(hit):
            r = hit.iloc[0]
            call = {"lower": "higher", "higher": "lower"}.get(r["call"], r["call"]) if sign < 0 else r["call"]
            return {**r.to_dict(), "arch": arch, "versus": versus, "loss_gap": sign * r["loss_gap"],
                    "call": "" if pd.isna(call) else call}
    return None


# -- make sweep's comparisons --------------------------------------------------------------------------------

def comparisons_frame(best: pd.DataFrame) -> pd.DataFrame:
    """Every pair of architectures trained at the same point (POINT: task, data, size, ctx, match, recipe), from
    the report's best run per point (bench/report.latest_ok), language modeling only (the other tasks keep no
    per-window losses). ppl_ratio = exp(loss_gap) - 1 (a's perplexity over b's, minus 1) and ppl_half_width =
    exp(half_width) - 1, NaN where the pair could not be paired (runs written before per-window losses, or
    evaluated on different text)."""
    lm = best[best["task"] == "lm"] if "task" in best else best.iloc[0:0]
    groups = sorted(lm.groupby(POINT, dropna=False),  # by data and ctx, then the smaller models' points first
                    key=lambda pg: (str(pg[0][1]), pg[0][3], _scale(pg[1]), str(pg[0])))
    rows = []
    for point, g in groups:
        rows += [{**dict(zip(POINT, point)), **pair} for pair in pair_rows(r for _, r in g.iterrows())]
    df = pd.DataFrame(rows, columns=COMPARISON_COLUMNS[:-2])
    df["ppl_ratio"] = [math.expm1(g) for g in df["loss_gap"]]
    df["ppl_half_width"] = [math.expm1(h) if pd.notna(h) else math.nan for h in df["half_width"]]
    return df.reindex(columns=COMPARISON_COLUMNS)


def _scale(runs: pd.DataFrame) -> float:
    """A point's largest parameter count (0 where unknown): smaller models' points come first."""
    params = pd.to_numeric(runs["params"], errors="coerce").max() if "params" in runs else math.nan
    return 0.0 if pd.isna(params) else float(params)


def comparison_phrase(r) -> str:
    """'+3.1% ± 0.7% (higher beyond noise, 32 windows)': a's perplexity over b's, its interval, and the call."""
    if pd.isna(r["ppl_half_width"]):
        return f"{r['ppl_ratio']:+.1%} (means only: not evaluated on the same windows)"
    call = "within noise" if r["call"] == "within noise" else f"{r['call']} beyond noise"
    return f"{r['ppl_ratio']:+.1%} ± {r['ppl_half_width']:.1%} ({call}, {r['windows']:.0f} windows)"


def comparison_lines(df: pd.DataFrame, runs: list[dict], limit: int = 12) -> list[str]:
    """The pairs a sweep's ok runs (summaries) take part in, one line each, for the terminal: at most `limit`, then
    how many more are in comparisons.md."""
    ours = {(r.get("task"), r.get("data"), r.get("size"), r.get("ctx"), r.get("match", "params"),
             r.get("recipe", "shared"), r.get("arch")) for r in runs if r.get("status") == "ok"}
    lines = [f"{r['size']} ctx {r['ctx']}{'' if r['data'] == 'shakespeare' else ' data=' + str(r['data'])}: "
             f"{r['arch']} vs {r['versus']} perplexity {comparison_phrase(r)}" for _, r in df.iterrows()
             if any(tuple(r[k] for k in POINT) + (arch,) in ours for arch in (r["arch"], r["versus"]))]
    more = len(lines) - limit
    return lines[:limit] + ([f"... and {more} more pairs in comparisons.md"] if more > 0 else [])


def comparisons_markdown(df: pd.DataFrame) -> str:
    """RESULTS/comparisons.md: the pairs as perplexity ratios with their LEVEL intervals, one table per data set."""
    lines = ["# Paired comparisons of validation loss", "",
             "Each pair of architectures trained at the same point (size, context, data, match, recipe; each at its "
             "best lr), compared window by window on the same validation text, where each window's own difficulty "
             f"cancels. `perplexity` is the first's perplexity over the second's, minus 1; `{LEVEL:.0%} interval` "
             "covers the noise of the text evaluated (Student's t over the per-window differences), not the "
             "seed-to-seed noise of training; `call` says whether the first is lower or higher beyond it. More "
             "validation text (`task.eval_tokens`) narrows the interval. The same numbers, in nats per token, are "
             "in comparisons.csv.", ""]
    for data, g in df.groupby("data", sort=True):
        lines += [f"## data={data}", "", f"| size | ctx | match | recipe | architecture | versus | perplexity | "
                  f"{LEVEL:.0%} interval | windows | call |", "|" + "---|" * 10]
        for _, r in g.iterrows():
            paired = pd.notna(r["ppl_half_width"])
            lines.append(f"| {r['size']} | {r['ctx']} | {r['match']} | {r['recipe']} | {r['arch']} | {r['versus']} | "
                         f"{r['ppl_ratio']:+.1%} | " + (f"±{r['ppl_half_width']:.1%} | {r['windows']:.0f} | "
                                                       f"{r['call']} |" if paired else "| | not paired |"))
        lines.append("")
    return "\n".join(lines)
