"""Paired comparisons: is one architecture's validation loss (or accuracy) lower than another's beyond the noise of
the text (or examples) evaluated?

A run's validation loss moves by about 1.4% with the text it is evaluated on (the CPU profile's 32k run: val_bpb
2.424 ± 0.034), and the gaps the paper reports are 1-3%. Two runs that evaluated the same windows (same
`val_windows_hash`, tasks/lm/data.PackedWindows.fingerprint) are therefore compared window by window
(`val_window_loss`): each window's own difficulty, which dominates the spread of either run's loss alone, cancels.
The accuracy tasks (longqa, classification) keep each test example's score the same way (`val_example_acc`,
`val_examples_hash`: tasks/scores.py), and two runs' accuracies are compared example by example.

    gap        = mean over windows (examples) of (a - b)          nats per token, or accuracy (0-1)
    gap_sem    = stdev of the per-window differences / sqrt(n)
    half_width = t_{0.975, n - 1} x gap_sem                         the LEVEL interval, Student's t
    ci_low, ci_high = gap -/+ half_width, or for right/wrong examples Newcombe's score interval (asymmetric; the t
                 interval has zero width when every example differs alike: newcombe_interval)
    call       = 'lower' / 'higher' when the paired test's p < 1 - LEVEL, else 'within noise': the t test (the
                 interval excludes 0), or for right/wrong examples McNemar's exact test (mcnemar_exact_p)

The interval covers the evaluation's noise only: seed-to-seed noise of training is not in it, and adjacent windows
of one document are not quite independent, so for the loss it is a little narrow.

Users: bench/report.py (`make sweep`'s RESULTS/comparisons.md and .csv: every pair of architectures trained at
the same point) and bench/paper.py (`make paper`'s gaps.csv and its verdicts).
"""
from __future__ import annotations

import math
import statistics

import pandas as pd
from scipy.stats import binomtest, norm
from scipy.stats import t as student_t

from bench.plots import LABELS

LEVEL = 0.95  # the two-sided level of the interval a gap must leave to count as beyond noise
# the metric compared -> (the summary's per-item values, the hash of the items): windows of text, or test examples
PAIRED_BY = {"val_loss": ("val_window_loss", "val_windows_hash"), "val_acc": ("val_example_acc", "val_examples_hash")}
PAIR_FIELDS = ["arch", "versus", "gap", "gap_sem", "n", "half_width", "ci_low", "ci_high", "p_value", "test",
               "call"]  # a pair's columns
POINT = ["task", "data", "size", "ctx", "match", "recipe", "variant"]  # what two runs share to be compared
# point keys runs written before them lack, at what those runs did: before size matching they used the reference's
# dimensions (match=params), before recipes the shared one, before variants a sweep varied no other key
POINT_DEFAULTS = {"match": "params", "recipe": "shared", "variant": ""}
COMPARISON_COLUMNS = POINT + ["seed", "metric"] + PAIR_FIELDS + ["ppl_ratio", "ppl_half_width"]  # comparisons.csv


def paired_items(a, b, metric: str = "val_loss") -> tuple[list[float], list[float]] | None:
    """Runs a's and b's per-item values of `metric` (PAIRED_BY: windows, or examples), when both hold them for the
    same items (the same hash) and there are at least two; else None."""
    values, key = PAIRED_BY[metric]
    wa, wb = a.get(values), b.get(values)
    same_items = isinstance(a.get(key), str) and a.get(key) == b.get(key)
    if not (same_items and isinstance(wa, list) and isinstance(wb, list) and len(wa) == len(wb) >= 2):
        return None
    return wa, wb


def paired_gap(a, b, metric: str = "val_loss") -> tuple[float, float, int] | None:
    """Run a's metric minus run b's, its standard error and the number of items: the mean and the standard error
    of the per-item differences (paired_items; None without them)."""
    items = paired_items(a, b, metric)
    return None if items is None else _mean_and_sem([x - y for x, y in zip(*items)])


def _mean_and_sem(diff: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(len(diff)), len(diff)


def paired_t_p(gap: float, sem: float, n: int) -> float:
    """Two-sided p-value of "a and b have the same mean" from n per-item differences a - b, their mean and standard
    error: the paired t test (its p < 1 - LEVEL exactly when the LEVEL t interval excludes 0)."""
    if sem == 0:
        return 1.0 if gap == 0 else 0.0
    return float(2 * student_t.sf(abs(gap) / sem, n - 1))


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided p-value of "a and b are right as often" for right/wrong scores, from the examples only a got right
    and only b got right: McNemar's exact test (the binomial test of those examples), which stays honest when they
    are few (the t test calls 4 to 0 of 200 beyond noise at 95%, the exact test gives p = 0.125)."""
    return binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0


def right_or_wrong_cells(a: list[float], b: list[float]) -> tuple[int, int, int, int]:
    """(both right, only a right, only b right, neither) over the examples of two runs' 0/1 scores."""
    a_only = sum(1 for x, y in zip(a, b) if x > y)
    b_only = sum(1 for x, y in zip(a, b) if y > x)
    both = sum(1 for x, y in zip(a, b) if x == y == 1)
    return both, a_only, b_only, len(a) - both - a_only - b_only


def _wilson(right: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion, right of n, at the normal quantile z."""
    center = (right + z * z / 2) / (n + z * z)
    half = z * math.sqrt(right * (n - right) / n + z * z / 4) / (n + z * z)
    return center - half, center + half


def paired_proportion_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """The LEVEL interval of mean(a) - mean(b) for two runs' right/wrong scores (0 or 1) on the same examples:
    newcombe_interval of their right_or_wrong_cells."""
    return newcombe_interval(*right_or_wrong_cells(a, b))


def newcombe_interval(both: int, a_only: int, b_only: int, neither: int) -> tuple[float, float]:
    """The LEVEL interval of a's accuracy minus b's from the paired 2 x 2 table of right/wrong examples (both
    right, only a, only b, neither): Newcombe's hybrid score interval (Statist. Med. 17:2635-2650, 1998, method
    10). With p1, p2 the two accuracies, [l1, u1] and [l2, u2] their Wilson intervals and phi their correlation
    (Newcombe's continuity-corrected numerator):

        low  = p1 - p2 - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        high = p1 - p2 + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

    Unlike Student's t over the differences it never has zero width: 0 of 80 right against 80 of 80 is
    [-100, -93.5] points, not -100 ± 0. Near the edge of noise it can exclude 0 where McNemar's exact test, which
    makes the call, still gives p > 1 - LEVEL (59 / 6 / 16 / 80 examples: [-11.9, -0.5] points, p = 0.052)."""
    n = both + a_only + b_only + neither
    z = float(norm.ppf((1 + LEVEL) / 2))
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    (l1, u1), (l2, u2) = _wilson(both + a_only, n, z), _wilson(both + b_only, n, z)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    cross = both * neither - a_only * b_only
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)  # Newcombe's correction of phi's numerator
    phi = cross / math.sqrt(margins) if margins else 0.0
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = p1 - p2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def paired_row(a, b, metric: str = "val_loss") -> dict:
    """Runs a and b compared on `metric` as PAIR_FIELDS' last nine: the gap (a - b), its standard error, the
    items, the half width of its LEVEL interval (Student's t, n - 1 degrees of freedom; NaN for right/wrong
    examples), the interval's ends (gap -/+ half width, or newcombe_interval for right/wrong examples), the
    p-value and its test (paired_t_p, or mcnemar_exact_p for right/wrong examples), and the call: 'lower' /
    'higher' when p < 1 - LEVEL, else 'within noise'. Without a pairing, the gap of the means, NaN and ''."""
    items = paired_items(a, b, metric)
    if items is None:
        return {"gap": a.get(metric, math.nan) - b.get(metric, math.nan), "gap_sem": math.nan, "n": pd.NA,
                "half_width": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "test": "",
                "call": ""}
    diff = [x - y for x, y in zip(*items)]
    gap, sem, n = _mean_and_sem(diff)
    if metric == "val_acc" and all(v in (0, 1) for values in items for v in values):  # right/wrong examples
        cells = right_or_wrong_cells(*items)
        p, test, half = mcnemar_exact_p(*cells[1:3]), "McNemar exact", math.nan
        low, high = newcombe_interval(*cells)
    else:
        p, test = paired_t_p(gap, sem, n), "paired t"
        half = float(student_t.ppf((1 + LEVEL) / 2, n - 1)) * sem
        low, high = gap - half, gap + half
    call = "within noise" if p >= 1 - LEVEL else ("lower" if gap < 0 else "higher")
    return {"gap": gap, "gap_sem": sem, "n": n, "half_width": half, "ci_low": low, "ci_high": high, "p_value": p,
            "test": test, "call": call}


def legend_order(archs) -> list[str]:
    """The paper's legend order (bench/plots.LABELS) first, then any other architecture by name."""
    order = {a: i for i, a in enumerate(LABELS)}
    return sorted(set(archs), key=lambda a: (order.get(a, len(order)), a))


def pair_rows(runs, metric: str = "val_loss") -> list[dict]:
    """Every pair of the runs (rows with an `arch`; one run per architecture), the earlier in legend order first,
    as {'arch', 'versus', **paired_row}: arch's metric minus versus's."""
    by_arch = {r["arch"]: r for r in runs}
    point = [by_arch[a] for a in legend_order(by_arch)]
    return [{"arch": a["arch"], "versus": b["arch"], **paired_row(a, b, metric)}
            for i, a in enumerate(point) for b in point[i + 1:]]


# -- make sweep's comparisons --------------------------------------------------------------------------------

def compared_metric(task: str) -> str:
    """What a task's runs are compared on: language modeling's validation loss, the others' test accuracy."""
    return "val_loss" if task == "lm" else "val_acc"


def comparisons_frame(best: pd.DataFrame) -> pd.DataFrame:
    """Every pair of architectures trained at the same point (POINT: task, data, size, ctx, match, recipe, variant)
    with the same seed, from the report's best run per point and seed (bench/report.latest_ok), on compared_metric.
    For the loss, ppl_ratio = exp(gap) - 1 (a's perplexity over b's, minus 1) and ppl_half_width =
    exp(half_width) - 1. The interval (ci_low, ci_high) is NaN where the pair could not be paired: runs written before
    per-item values were kept, or evaluated on other text or examples. seed_agreement() sets the seeds of a pair
    side by side."""
    if best.empty or not set(POINT) - {"variant"} <= set(best.columns):
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    best = best.assign(seed=best["seed"].fillna(0).astype(int) if "seed" in best else 0,
                       variant=best["variant"].fillna("") if "variant" in best else "")
    groups = sorted(best.groupby(POINT + ["seed"], dropna=False),  # by task, data, ctx; smaller models first; seed
                    key=lambda pg: (str(pg[0][0]), str(pg[0][1]), pg[0][3], _scale(pg[1]), str(pg[0])))
    rows = []
    for point, g in groups:
        metric = compared_metric(str(point[0]))
        rows += [{**dict(zip(POINT + ["seed"], point)), "metric": metric, **pair}
                 for pair in pair_rows((r for _, r in g.iterrows()), metric)]
    df = pd.DataFrame(rows, columns=COMPARISON_COLUMNS[:-2])
    loss = df["metric"] == "val_loss"
    df["ppl_ratio"] = [math.expm1(g) if is_loss else math.nan for g, is_loss in zip(df["gap"], loss)]
    df["ppl_half_width"] = [math.expm1(h) if is_loss and pd.notna(h) else math.nan
                            for h, is_loss in zip(df["half_width"], loss)]
    return df.reindex(columns=COMPARISON_COLUMNS)


def seed_agreement(df: pd.DataFrame) -> pd.DataFrame:
    """The pairs of comparisons_frame compared at two or more seeds, one row per (point, pair): `seeds` ('0,1'),
    the gap at each seed (`gaps`, in the metric's units) and their mean, how many seeds call it lower / higher
    beyond noise / within noise, and `verdict`: 'lower (every seed)', 'higher (every seed)', 'within noise (every
    seed)', 'the seeds disagree' (the difference moves with the training seed by more than the evaluation's interval
    at one seed allows), or 'not paired' where a seed's runs were not evaluated on the same items; `apart`: two seeds'
    intervals do not overlap (whatever the calls, the size of the difference moves with the seed beyond the
    evaluation's noise)."""
    cols = POINT + ["metric", "arch", "versus", "seeds", "gaps", "gap_mean", "lower", "higher", "within_noise",
                    "verdict", "apart"]
    rows = []
    for key, g in df.groupby(POINT + ["metric", "arch", "versus"], dropna=False, sort=False):
        if g["seed"].nunique() < 2:
            continue
        g = g.sort_values("seed")
        calls = g["call"].fillna("").tolist()
        if "" in calls:
            verdict = "not paired"
        else:
            verdict = f"{calls[0]} (every seed)" if len(set(calls)) == 1 else "the seeds disagree"
        rows.append({**dict(zip(POINT + ["metric", "arch", "versus"], key)),
                     "seeds": ",".join(str(s) for s in g["seed"]), "gaps": [float(x) for x in g["gap"]],
                     "gap_mean": float(g["gap"].mean()), "lower": calls.count("lower"), "higher": calls.count("higher"),
                     "within_noise": calls.count("within noise"), "verdict": verdict,
                     "apart": verdict != "not paired" and bool(g["ci_low"].max() > g["ci_high"].min())})
    return pd.DataFrame(rows, columns=cols)


def _gap_text(metric: str, gap: float) -> str:
    """A gap as shown: the perplexity ratio - 1 for the loss ('+3.1%'), the accuracy difference in points ('+8.8')."""
    return f"{math.expm1(gap):+.1%}" if metric == "val_loss" else f"{100 * gap:+.1f}"


def agreement_phrase(r) -> str:
    """'accuracy at seeds 0,1: +79.3, +98.6 points (higher beyond noise at 2 of 2 seeds)', or '(the seeds disagree:
    higher beyond noise at 1 of 2, within noise at 1 of 2)', for a seed_agreement row."""
    what, unit = ("perplexity", "") if r["metric"] == "val_loss" else ("accuracy", " points")
    n = len(r["gaps"])
    names = {"lower": "lower beyond noise", "higher": "higher beyond noise", "within_noise": "within noise"}
    calls = ", ".join(f"{names[k]} at {r[k]} of {n}" for k in names if r[k])
    gaps = ", ".join(_gap_text(r["metric"], g) for g in r["gaps"])
    verdict = {"the seeds disagree": f"the seeds disagree: {calls}",
               "not paired": "means only at some seeds: not evaluated on the same items"}.get(r["verdict"],
                                                                                           f"{calls} seeds")
    apart = "; their intervals do not overlap: the size moves with the seed" if r["apart"] else ""
    return f"{what} at seeds {r['seeds']}: {gaps}{unit} ({verdict}{apart})"


def _scale(runs: pd.DataFrame) -> float:
    """A point's largest parameter count (0 where unknown): smaller models' points come first."""
    params = pd.to_numeric(runs["params"], errors="coerce").max() if "params" in runs else math.nan
    return 0.0 if pd.isna(params) else float(params)


def difference(r) -> tuple[str, str]:
    """(the difference, its interval) as shown: the perplexity ratio - 1 for the loss ('+3.1%', '±0.7%'), the
    accuracy difference in points for the others ('+8.8 points', '[+5.2, +12.3]'); '' for the interval of an
    unpaired gap."""
    if pd.isna(r["ci_low"]):
        interval = ""
    elif r["metric"] == "val_loss":
        interval = f"±{r['ppl_half_width']:.1%}"
    else:
        interval = f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
    return _gap_text(r["metric"], r["gap"]) + ("" if r["metric"] == "val_loss" else " points"), interval


def comparison_phrase(r) -> str:
    """'perplexity +3.1% ± 0.7% (higher beyond noise, 32 windows)', 'accuracy +8.8 points [+5.2, +12.3] (higher
    beyond noise, 1000 examples)': a's metric against b's, its interval, and the call."""
    shown, interval = difference(r)
    what, items = ("perplexity", "windows") if r["metric"] == "val_loss" else ("accuracy", "examples")
    if not interval:
        return f"{what} {shown} (means only: not evaluated on the same {items})"
    call = "within noise" if r["call"] == "within noise" else f"{r['call']} beyond noise"
    return f"{what} {shown} {interval.replace('±', '± ')} ({call}, {r['n']:.0f} {items})"


def comparison_lines(df: pd.DataFrame, runs: list[dict], limit: int = 12) -> list[str]:
    """The pairs a sweep's ok runs (summaries) take part in, for the terminal: where a point was trained at several
    seeds, first a line per pair on whether the seeds agree; then a line per pair (and seed). At most `limit`, then
    how many more are in comparisons.md."""
    df = df.assign(variant=df["variant"].fillna("") if "variant" in df else "")  # comparisons.csv reads "" as NaN
    ours = {tuple(r.get(k, POINT_DEFAULTS.get(k)) for k in POINT) + (r.get("arch"),)
            for r in runs if r.get("status") == "ok"}
    mine = lambda r: any(tuple(r[k] for k in POINT) + (arch,) in ours for arch in (r["arch"], r["versus"]))
    several = df.groupby(POINT, dropna=False)["seed"].transform("nunique") > 1
    lines = [f"{r['size']} ctx {r['ctx']}{_where(r)}: {r['arch']} vs {r['versus']} {agreement_phrase(r)}"
             for _, r in seed_agreement(df).iterrows() if mine(r)]
    lines += [f"{r['size']} ctx {r['ctx']}{_where(r)}{_seed_tag(r, many)}: {r['arch']} vs {r['versus']} "
              f"{comparison_phrase(r)}" for (_, r), many in zip(df.iterrows(), several) if mine(r)]
    more = len(lines) - limit
    return lines[:limit] + ([f"... and {more} more pairs in comparisons.md"] if more > 0 else [])


def _seed_tag(r, several: bool) -> str:
    """' seed 1' where the pair's point was trained at several seeds, else ''."""
    return f" seed {r['seed']}" if several else ""


def _where(r) -> str:
    """' task=classification data=listops' where the point is not language modeling on the default text, and its
    variant where a sweep varied more (' task.mqar_pairs=4')."""
    task = "" if r["task"] == "lm" else f" task={r['task']}"
    variant = r.get("variant") or ""
    return task + ("" if r["data"] == "shakespeare" else f" data={r['data']}") + (f" {variant}" if variant else "")


METRIC_NOTES = {
    "val_loss": "validation loss, compared window by window on the same text; `difference` is the first's perplexity "
                "over the second's, minus 1; `n` the windows",
    "val_acc": "test accuracy, compared example by example on the same examples; `difference` is the first's "
               "accuracy minus the second's, in percentage points, with its interval in points; `n` the examples; "
               "where every example is right or wrong, the interval is Newcombe's score interval for paired "
               "proportions and `p` McNemar's exact test (the examples only one of the two got right), which with "
               "few such examples is the stricter of the two: an interval just clear of 0 can still be within noise",
}


def comparisons_markdown(df: pd.DataFrame) -> str:
    """RESULTS/comparisons.md: the pairs with their LEVEL intervals, one table per (task, data)."""
    lines = ["# Paired comparisons", "",
             "Each pair of architectures trained at the same point (size, context, data, match, recipe, and the "
             "values of any other key the sweep varied, `variant`; each at its "
             "best lr), compared item by item, where each item's own difficulty cancels. The "
             f"{LEVEL:.0%} interval covers the noise of the text or examples evaluated (Student's t over the per-item "
             "differences; for right/wrong examples Newcombe's score interval), not the seed-to-seed noise of "
             "training (a sweep with SEEDS=0,1 compares each seed and adds an 'Across seeds' table); `p` is the "
             f"paired test's two-sided p-value, and `call` says whether the first's metric is lower or higher beyond "
             f"the noise (p < {1 - LEVEL:.2g}). More evaluation (`task.eval_tokens`, `task.eval_examples`) narrows "
             "the interval. comparisons.csv has the same pairs, the gap and its interval's ends (`ci_low`, "
             "`ci_high`) in nats per token or accuracy (0-1).", ""]
    for (task, data), g in df.groupby(["task", "data"], sort=False):
        seeded = g["seed"].nunique() > 1  # a seed column where the runs have several
        varied = _varied(g)
        lines += [f"## task={task} data={data}", "", f"Metric: {METRIC_NOTES[g['metric'].iloc[0]]}.", "",
                  f"| {_point_head(varied)}{' seed |' if seeded else ''} architecture | versus | difference | "
                  f"{LEVEL:.0%} interval | n | p | call |", "|" + "---|" * (11 + seeded + varied)]
        for _, r in g.iterrows():
            shown, interval = difference(r)
            tail = (f"{interval} | {r['n']:.0f} | {r['p_value']:.2g} | {r['call']} |" if interval
                    else "| | | not paired |")
            seed = f" {r['seed']} |" if seeded else ""
            lines.append(f"| {_point_cells(r, varied)}{seed} {r['arch']} | {r['versus']} | {shown} | {tail}")
        lines += [""] + (across_seeds_markdown(seed_agreement(g), varied) if seeded else [])
    return "\n".join(lines)


def _varied(pairs: pd.DataFrame) -> bool:
    """Whether any pair's point has a variant (a sweep varied a key beyond the point's): a column for it."""
    return "variant" in pairs and bool((pairs["variant"].fillna("") != "").any())


def _point_head(varied: bool) -> str:
    """A markdown table's point columns: 'size | ctx | match | recipe |' (and 'variant |')."""
    return "size | ctx | match | recipe |" + (" variant |" if varied else "")


def _point_cells(r, varied: bool) -> str:
    """One pair's point cells under _point_head."""
    return f"{r['size']} | {r['ctx']} | {r['match']} | {r['recipe']} |" + (f" {r['variant']} |" if varied else "")


def across_seeds_markdown(agree: pd.DataFrame, varied: bool = False) -> list[str]:
    """The lines of one (task, data)'s 'Across seeds' table: each pair's difference at each seed and the verdict."""
    if agree.empty:
        return []
    unit = " (points)" if agree["metric"].iloc[0] == "val_acc" else ""
    lines = ["### Across seeds", "",
             "The same pairs at each training seed (SEEDS=). The interval above covers the evaluation at one seed; "
             "where the seeds disagree, the difference moves with the training seed by more than that, and one seed's "
             "call does not settle the comparison. 'intervals apart': two seeds' intervals do not overlap, so even "
             "where the calls agree, one seed does not settle the size of the difference.", "",
             f"| {_point_head(varied)} architecture | versus | seeds | difference at each seed{unit} | "
             "mean | verdict |", "|" + "---|" * (10 + varied)]
    for _, r in agree.iterrows():
        gaps = ", ".join(_gap_text(r["metric"], g) for g in r["gaps"])
        lines.append(f"| {_point_cells(r, varied)} {r['arch']} | {r['versus']} | "
                     f"{r['seeds']} | {gaps} | {_gap_text(r['metric'], r['gap_mean'])} | {r['verdict']}"
                     f"{'; intervals apart' if r['apart'] else ''} |")
    return lines + [""]
