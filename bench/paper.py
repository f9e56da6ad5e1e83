"""`make paper PROFILE=smoke|cpu|paper`: the paper's tables and figures from our runs, next to its published numbers.

    python -m bench.paper --profile smoke|cpu|paper [--results results] [--no-run] [-- hydra overrides ...]

1. Runs what is missing. PLANS names, per profile, the points (architecture, size, context) of the scaling
   figures and of the Table 1 ladder. A point counts as done when RESULTS holds a finished run of the same
   config (the fingerprint bench/run.py stores as summary.json's config_hash), whichever command made it. The
   others are trained by `python -m bench.sweep`: first the interrupted sweeps of an earlier `make paper`
   (`--resume <id>`: finished runs reused, the interrupted one resumed from its checkpoint), then one new sweep
   per context and set of sizes. Prefill/decode latency comes from RESULTS/throughput.csv (`make throughput`)
   when it has the profile's latency size, else `python -m bench.throughput` measures it.
2. Writes RESULTS/paper/ from those runs (--no-run: from whatever of them RESULTS holds):
     table1.csv           Table 1: our perplexity per row, the published one, both differences between
                          consecutive rows, whether each step goes the paper's way and is beyond noise, and both
                          rankings
     scaling.csv          perplexity vs training FLOPs at 2k and at the long context, every architecture (with the
                          standard errors over validation windows, val_loss_sem and val_bpb_sem)
     ppl_vs_flops.png     ... drawn beside the published points (their own axes: the scales differ)
     gaps.csv             every pair of architectures at one (size, context): the gap of their validation losses
                          from per-window differences on the same text, its 95% interval, and whether the gap is
                          beyond it (the verdicts count a gap within it as neither a win nor a loss)
     token_index.csv      loss by token position (each run's summary.json `loss_by_position`)
     loss_by_token_index.png   ... the largest model per architecture, beside the paper's Books 32k curves
     latency.csv          prefill and decode time per token vs context
     latency.png          ... beside the paper's forward-latency points (A100, 1.3B, batch 16)
     README.md            each table and figure, with one sentence on whether the paper's claim reproduces
Our perplexities are per byte (byte-level tokenizer, 257 symbols) at small scale; the paper's are per Llama-2
token on the Pile at 125M-1.3B parameters. Compare orderings, directions and trends, not values.
notebooks/paper.ipynb reads these files and redraws the figures with bench/plots.py (plot_paper_*).
"""
from __future__ import annotations

import argparse
import io
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from bench import published
from bench.gaps import LEVEL, pair_rows, paired_row
from bench.plots import (LABELS, by_arch, largest, plot_paper_latency, plot_paper_scaling, plot_paper_token_index,
                         save_figure, unit)
from bench.results import REPO_ROOT, atomic_write_text, read_summaries

SCALING_ARCHS = tuple(LABELS)  # the paper's six, in its legend order (bench/plots.py)
MAIN_ARCHS = ("transformer", "mamba", "ttt_linear")  # the latency figure's three
FINISHED = ("ok", "diverged")  # bench/run.py reuses these: a run that diverged is not run again


@dataclass(frozen=True)
class Plan:
    """What a profile runs for the paper's tables and figures."""
    archs: tuple[str, ...]        # the scaling and token-index figures
    sizes: tuple[str, ...]        # trained at both contexts (the figures also show the profile's other sizes
                                  #   when RESULTS has them, e.g. cpu-m from `make sweep`)
    ctxs: tuple[int, int]         # the paper's 2k and its long context
    table1_size: str              # every Table 1 row at this size, at ctxs[0]
    latency_size: str             # bench.throughput --size (prefill and decode, transformer/mamba/ttt_linear)
    latency_args: tuple[str, ...]  # its other arguments: the longest context, the batch


PLANS = {
    # about 2 minutes on 2 cores (128 s measured beside another job): 4 optimizer steps per run, 0.02M-0.1M parameters
    "smoke": Plan(SCALING_ARCHS, ("smoke-xs", "smoke-s"), (256, 1024), "smoke-xs", "smoke-xs", ("--ctx", "8k")),
    # about 75 minutes on 2 idle cores, estimated from run times (README "Reproducing the paper"): the three
    # main architectures, two sizes (cpu-m at 2k alone takes about 35 minutes for the three)
    "cpu": Plan(MAIN_ARCHS, ("cpu-xs", "cpu-s"), (2048, 8192), "cpu-xs", "cpu-xs", ("--ctx", "32k")),
    # the paper's sizes, on GPUs (Table 3 recipe; the Pile needs ARGS='data=hf ...', conf/profile/paper.yaml)
    "paper": Plan(SCALING_ARCHS, ("125m", "350m", "760m", "1.3b"), (2048, 8192), "125m", "1.3b",
                  ("--ctx", "32k", "--batch", "16")),
}


# -- what to run ---------------------------------------------------------------------------------------

def table1_archs() -> list[str]:
    from architectures.ttt import TABLE1

    return [name for _, _, name in TABLE1]


def planned_points(plan: Plan) -> list[tuple[str, str, int]]:
    """(arch, size, ctx) the profile trains: the scaling grid and the Table 1 ladder."""
    grid = [(a, s, c) for c in plan.ctxs for a in plan.archs for s in plan.sizes]
    ladder = [(a, plan.table1_size, plan.ctxs[0]) for a in table1_archs()]
    return list(dict.fromkeys(grid + ladder))


def shown_points(plan: Plan, profile: str) -> list[tuple[str, str, int]]:
    """The planned points and the rest of the profile's size ladder, shown when RESULTS has them."""
    from bench.config import default_ladder

    extra = [(a, s, c) for c in plan.ctxs for a in plan.archs for s in default_ladder("lm", profile)]
    return list(dict.fromkeys(planned_points(plan) + extra))


def fingerprints(points, profile: str, overrides: list[str]) -> dict[tuple, str]:
    """point -> the config fingerprint a run of it records (bench/fingerprint.py), composed the way
    bench.sweep's Hydra jobs are."""
    from bench.config import compose_all
    from bench.fingerprint import config_fingerprint

    points = list(points)
    configs = compose_all([f"arch={a}", f"size={s}", f"profile={profile}", "task=lm", f"ctx={c}", *overrides]
                          for a, s, c in points)
    return {point: config_fingerprint(cfg) for point, cfg in zip(points, configs)}


def finished_runs(results: Path, hashes: dict[tuple, str]) -> pd.DataFrame:
    """The newest finished summary of each point, found by its config fingerprint."""
    wanted = set(hashes.values())
    rows = [r for r in read_summaries(results) if r.get("config_hash") in wanted and r.get("status") in FINISHED]
    if not rows:
        return pd.DataFrame(columns=["arch", "size", "ctx", "status", "config_hash"])
    df = pd.DataFrame(rows).sort_values("finished_at")
    return df.drop_duplicates("config_hash", keep="last").reset_index(drop=True)


def sweep_commands(missing, profile: str, results: Path, overrides: list[str]) -> list[list[str]]:
    """One `bench.sweep` call per (context, sizes) group of the missing points."""
    sizes_of: dict[tuple, list[str]] = {}
    for arch, size, ctx in missing:
        sizes_of.setdefault((ctx, arch), []).append(size)
    groups: dict[tuple, list[str]] = {}
    for (ctx, arch), sizes in sizes_of.items():
        groups.setdefault((ctx, tuple(sizes)), []).append(arch)
    return [[sys.executable, "-m", "bench.sweep", "--arch", ",".join(archs), "--ctx", str(ctx), "--profile", profile,
             "--sizes", ",".join(sizes), "--results", str(results), "--", *overrides]
            for (ctx, sizes), archs in groups.items()]


def latency_rows(results: Path, plan: Plan) -> pd.DataFrame:
    """RESULTS/throughput.csv's ok prefill and decode points at the profile's latency size (newest device)."""
    path = results / "throughput.csv"
    if not path.exists():
        return pd.DataFrame(columns=["arch", "mode", "ctx", "time_per_token_s"])
    df = pd.read_csv(path)
    df = df[(df["status"] == "ok") & df["mode"].isin(["prefill", "decode"]) & (df["size"] == plan.latency_size)]
    batch = next((int(a) for k, a in zip(plan.latency_args, plan.latency_args[1:]) if k == "--batch"), 1)
    df = df[df["batch"] == batch]
    return df[df["device"] == df["device"].iloc[-1]] if len(df) else df


def latency_command(plan: Plan, results: Path) -> list[str] | None:
    """`bench.throughput` for the profile's latency points, or None when throughput.csv has them all."""
    have = latency_rows(results, plan)
    if {(a, m) for a in MAIN_ARCHS for m in ("prefill", "decode")} <= set(zip(have["arch"], have["mode"])):
        return None
    return [sys.executable, "-m", "bench.throughput", "--arch", ",".join(MAIN_ARCHS), "--size", plan.latency_size,
            "--modes", "prefill,decode", *plan.latency_args, "--results", str(results)]


POINT_KEYS = ("arch", "size", "ctx", "profile", "task", "results")  # a sweep manifest's overrides that name its points


def unfinished_sweeps(results: Path, profile: str, overrides: list[str]) -> dict[str, set[tuple]]:
    """Sweeps in RESULTS/sweeps/ of this profile and overrides whose last attempt did not exit 0 (interrupted or
    with failed runs), newest first: sweep id -> the (arch, size, ctx) points it trains."""
    from bench.sweep import commands_of, read_manifests

    out = {}
    for m in reversed(read_manifests(results)):
        if (m.get("attempts") or [{}])[-1].get("exit") == 0:
            continue
        points = [_sweep_points(command, profile, overrides) for command in commands_of(m["overrides"])]
        if points and None not in points:
            out[m["sweep_id"]] = set().union(*points)
    return out


def _sweep_points(command: list[str], profile: str, overrides: list[str]) -> set[tuple] | None:
    """The (arch, size, ctx) points of one multirun of a sweep, None if it is not this profile's and overrides'."""
    named = dict(o.split("=", 1) for o in command if o.split("=", 1)[0] in POINT_KEYS)
    if [o for o in command if o.split("=", 1)[0] not in POINT_KEYS] != overrides \
            or named.get("profile") != profile or named.get("task") != "lm":
        return None
    return {(a, s, int(c)) for a in named["arch"].split(",") for s in named["size"].split(",")
            for c in named["ctx"].split(",")}


def resumable(missing: list[tuple], runs: pd.DataFrame, unfinished: dict[str, set[tuple]]) -> dict[str, set[tuple]]:
    """The unfinished sweeps to continue (their interrupted runs resume from checkpoints): each trains missing
    points, and nothing that is finished elsewhere or that another chosen sweep trains."""
    done_in = {sid: set(zip(g["arch"], g["size"], g["ctx"])) for sid, g in runs.groupby("sweep")} if len(runs) else {}
    chosen, taken = {}, set()
    for sid, points in unfinished.items():
        if points & set(missing) and points <= set(missing) | done_in.get(sid, set()) and not points & taken:
            chosen[sid], taken = points, taken | points
    return chosen


def run_missing(plan: Plan, profile: str, results: Path, overrides: list[str], hashes: dict[tuple, str]) -> list[int]:
    """Train the planned points without a finished run (continuing this command's interrupted sweeps first),
    then measure latency if throughput.csv lacks it; the exit codes."""
    runs = finished_runs(results, hashes)
    planned = planned_points(plan)
    missing = [p for p in planned if hashes[p] not in set(runs["config_hash"])]
    print(f"[ttt-bench] paper ({profile}): {len(planned) - len(missing)} of {len(planned)} runs already in "
          f"{results}; {len(missing)} to run", flush=True)
    cont = resumable(missing, runs, unfinished_sweeps(results, profile, overrides))
    fresh = [p for p in missing if not any(p in points for points in cont.values())]
    commands = [[sys.executable, "-m", "bench.sweep", "--resume", sid, "--results", str(results)] for sid in cont]
    commands += sweep_commands(fresh, profile, results, overrides) + [c for c in [latency_command(plan, results)] if c]
    codes = []
    for cmd in commands:
        print("[ttt-bench] " + " ".join(cmd[1:]), flush=True)
        codes.append(subprocess.call(cmd, cwd=REPO_ROOT))
    return codes


# -- the tables ----------------------------------------------------------------------------------------

def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "ok"] if len(runs) else runs


def scaling_runs(runs: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """The ok runs of the scaling figure's architectures and contexts."""
    ok = _ok(runs)
    return ok[ok["arch"].isin(plan.archs) & ok["ctx"].isin(plan.ctxs)] if len(ok) else ok


def scaling_frame(runs: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """Our perplexity vs training FLOPs: one row per (arch, size, ctx) of the scaling figure."""
    cols = ["arch", "label", "size", "ctx", "params", "tokens", "train_flops", "val_loss", "val_loss_sem", "val_bpb",
            "val_bpb_sem", "val_ppl", "data", "tokenizer", "device_name"]
    ok = scaling_runs(runs, plan)
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok = ok.assign(label=ok["arch"].map(LABELS))
    return ok.reindex(columns=cols).sort_values(["ctx", "arch", "params"]).reset_index(drop=True)


def token_index_frame(runs: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """Validation loss by token position (log2 buckets, positions counted from 1) of every scaling run."""
    rows = [{"arch": r["arch"], "label": LABELS.get(r["arch"], r["arch"]), "size": r["size"], "params": r["params"],
             "ctx": r["ctx"], "start": b["start"], "end": b["end"], "loss": b["loss"]}
            for _, r in scaling_runs(runs, plan).iterrows() for b in (r.get("loss_by_position") or [])]
    return pd.DataFrame(rows, columns=["arch", "label", "size", "params", "ctx", "start", "end", "loss"])


def direction(diff: float, before: float, tol: float = 1e-3) -> str:
    """'↓' (perplexity falls), '↑' or '=' (within tol of the previous row's perplexity); '' when unknown."""
    if pd.isna(diff) or pd.isna(before):
        return ""
    return "=" if abs(diff) <= tol * before else ("↓" if diff < 0 else "↑")


def table1_frame(runs: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """Table 1: our perplexity per row (at the profile's Table 1 size, ctxs[0]), the published one, each row's
    step from the previous row, whether the steps go the same way, whether our step is beyond the noise of the
    text evaluated (its paired gap, bench/gaps.py; '' without per-window losses), and each column's ranking (1 =
    best)."""
    from architectures.ttt import TABLE1

    pub = published.load("table1").set_index("row")
    at = runs[(runs["size"] == plan.table1_size) & (runs["ctx"] == plan.ctxs[0])] if len(runs) else runs
    ours = {r["arch"]: r for _, r in at.iterrows()}
    df = pd.DataFrame([{"row": row, "configuration": label, "arch": name, "size": plan.table1_size,
                        "ctx": plan.ctxs[0], "status": ours[name]["status"] if name in ours else "missing",
                        "ours_ppl": ours[name].get("val_ppl", math.nan) if name in ours else math.nan,
                        "ours_bpb": ours[name].get("val_bpb", math.nan) if name in ours else math.nan,
                        "published_ppl": pub.loc[row, "ppl"]} for row, label, name in TABLE1])
    df.loc[df["status"] != "ok", ["ours_ppl", "ours_bpb"]] = math.nan
    steps = [paired_row(ours[b], ours[a])["call"] if df.loc[i, "status"] == df.loc[i - 1, "status"] == "ok" else ""
             for i, (a, b) in enumerate(zip(df["arch"], df["arch"][1:]), start=1)]
    df["beyond_noise"] = [""] + [{"": "", "within noise": "no"}.get(c, "yes") for c in steps]
    for who in ("ours", "published"):
        df[f"{who}_diff"] = df[f"{who}_ppl"].diff()
        df[f"{who}_step"] = [direction(d, b) for d, b in zip(df[f"{who}_diff"], df[f"{who}_ppl"].shift())]
        df[f"{who}_rank"] = df[f"{who}_ppl"].rank(method="min").astype("Int64")
    df["agrees"] = [("yes" if o == p else "no") if o and p else ""
                    for o, p in zip(df["ours_step"], df["published_step"])]
    return df


# -- paired gaps: two runs' losses apart, against the noise of the text evaluated (bench/gaps.py) ----------------

GAP_COLUMNS = ["ctx", "size", "arch", "versus", "loss_gap", "gap_sem", "windows", "half_width", "call"]  # gaps.csv


def gaps_frame(runs: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """Every pair of scaling architectures at the same (size, ctx), the earlier in the paper's legend order first:
    its paired gap in validation loss (bench/gaps.py; call: whether `arch` is lower or higher than `versus`
    beyond noise)."""
    rows = [{"ctx": ctx, "size": size, **pair} for (ctx, size), g in scaling_runs(runs, plan).groupby(["ctx", "size"])
            for pair in pair_rows(r for _, r in g.iterrows())]
    return pd.DataFrame(rows).rename(columns={"gap": "loss_gap", "n": "windows"}).reindex(columns=GAP_COLUMNS)


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


def latency_frame(rows: pd.DataFrame) -> pd.DataFrame:
    cols = ["arch", "label", "mode", "ctx", "time_per_token_s", "batch", "size", "params", "device", "noisy"]
    df = rows[rows["arch"].isin(MAIN_ARCHS)].copy() if len(rows) else pd.DataFrame(columns=cols)
    df["label"] = df["arch"].map(LABELS)
    return df.reindex(columns=cols).sort_values(["mode", "arch", "ctx"]).reset_index(drop=True)


def frames(runs: pd.DataFrame, latency: pd.DataFrame, plan: Plan) -> dict[str, pd.DataFrame]:
    """Everything RESULTS/paper/ shows, as tables (the CSVs written; the notebook reads them back)."""
    return {"table1": table1_frame(runs, plan), "scaling": scaling_frame(runs, plan), "gaps": gaps_frame(runs, plan),
            "token_index": token_index_frame(runs, plan), "latency": latency_frame(latency)}


def read_frames(folder: Path) -> dict[str, pd.DataFrame]:
    """RESULTS/paper/*.csv back as frames (those present)."""
    names = ("table1", "scaling", "gaps", "token_index", "latency")
    return {name: pd.read_csv(folder / f"{name}.csv") for name in names if (folder / f"{name}.csv").exists()}


# -- the figures ---------------------------------------------------------------------------------------

# -- one sentence per claim ------------------------------------------------------------------------------

def scale_note(scaling: pd.DataFrame) -> str:
    """What our runs are: parameters, training tokens, data and unit, machine."""
    if scaling.empty:
        return "no runs"
    lo, hi = scaling["tokens"].min(), scaling["tokens"].max()
    tokens = f"{lo:,.0f}" if lo == hi else f"{lo:,.0f}-{hi:,.0f}"
    return (f"{scaling['params'].min() / 1e6:.2f}M-{scaling['params'].max() / 1e6:.2f}M parameters, {tokens} "
            f"training tokens of {scaling['data'].iloc[0]} ({unit(scaling)}-level), "
            f"on {scaling['device_name'].iloc[0]}")


UNRESOLVED = "unresolved"  # every gap the claim rests on is within the noise of the text evaluated


def claim(name: str, ok: bool | None | str, evidence: str, why_not: str) -> str:
    """'<claim> reproduces: <evidence>.' or '... does not reproduce: <evidence>; <why it may not>.' ('partly
    reproduces' for None; 'is not resolved by these runs' for UNRESOLVED: the gaps are within noise)."""
    verdict = {True: "reproduces", False: "does not reproduce", None: "partly reproduces",
               UNRESOLVED: "is not resolved by these runs"}[ok]
    if ok == UNRESOLVED:
        why_not += "; more validation text (task.eval_tokens) narrows the intervals"
    return f"{name} {verdict}: {evidence}" + ("." if ok is True else f"; {why_not}.")


def tally(calls: list[str], point_wins: list[bool]) -> bool | None | str:
    """The verdict of a claim that each of several gaps goes its way: calls[i] 'lower' (its way, beyond noise),
    'higher' (the other way, beyond noise), 'within noise', or '' (untested: point_wins[i] decides). True when
    all go its way, UNRESOLVED when all are within noise, False when none goes its way, else None."""
    way = [c == "lower" or (c == "" and w) for c, w in zip(calls, point_wins)]
    if all(way):
        return True
    if all(c == "within noise" for c in calls):
        return UNRESOLVED
    return None if any(way) else False


def noise_note(calls: list[str], way: str, other: str) -> str:
    """', K beyond the noise of the text evaluated (...) and L <other> beyond it[, U untested ...]'."""
    tested = [c for c in calls if c]
    note = (f", {calls.count('lower')} {way} and {calls.count('higher')} {other} beyond the noise of the text "
            f"evaluated ({LEVEL:.0%} interval of the per-window gap; {calls.count('within noise')} within it)"
            if tested else "")
    untested = len(calls) - len(tested)
    return note + (f", {untested} not tested against noise (runs without per-window losses)" if untested else "")


def table1_call(agrees: str, beyond_noise: str, published_step: str) -> str:
    """A Table 1 step as tally reads it: 'lower' (the paper's way), 'higher' (against it), 'within noise', or ''
    (untested). A flat step of the paper (=) goes its way when ours is within noise, against it when beyond."""
    if beyond_noise not in ("yes", "no"):
        return ""
    if published_step == "=":
        return "lower" if beyond_noise == "no" else "higher"
    return "within noise" if beyond_noise == "no" else "lower" if agrees == "yes" else "higher"


def seed_gauge(t1: pd.DataFrame) -> str:
    """'; rows 2 and 3 ... their gap, +2.6%, ...: K of the other N steps are larger' (empty without both rows).
    Rows 2 and 3 are one function (Theorem 1: tests/test_table1.py) whose layers draw their initial weights in
    another order, so their gap is a one-sample gauge of the seed-to-seed noise of training, which the
    evaluation's interval leaves out."""
    ppl = t1.set_index("row")["ours_ppl"]
    if not (pd.notna(ppl.get(2)) and pd.notna(ppl.get(3))):
        return ""
    gauge = ppl[3] / ppl[2] - 1
    others = (ppl / ppl.shift() - 1).drop(index=[1, 3]).dropna()
    return (f"; rows 2 and 3 compute the same function (Theorem 1) from differently drawn initial weights, so "
            f"their gap, {gauge:+.1%}, gauges the seed-to-seed noise of training that the interval leaves out: "
            f"{int((others.abs() > abs(gauge)).sum())} of the other {len(others)} steps are larger")


def verdict_table1(t1: pd.DataFrame) -> str:
    steps = t1[t1["agrees"].isin(["yes", "no"])]
    if steps.empty:
        return "Not measured: no Table 1 runs."
    agree = steps[steps["agrees"] == "yes"]["row"].tolist()
    beyond = steps["beyond_noise"].fillna("") if "beyond_noise" in steps else pd.Series("", index=steps.index)
    calls = [table1_call(*step) for step in zip(steps["agrees"], beyond, steps["published_step"])]
    tested = [c for c in calls if c]
    noise = (f"; against the noise of the text evaluated (the {LEVEL:.0%} interval of the per-window gap; a flat "
             f"step of the paper's counts when ours is within it): {calls.count('lower')} the paper's way, "
             f"{calls.count('higher')} against it, {calls.count('within noise')} within noise" if tested else "")
    untested = len(calls) - len(tested)
    noise += f"; {untested} not tested against noise (runs without per-window losses)" if untested else ""
    rho = t1["ours_rank"].astype(float).corr(t1["published_rank"].astype(float))
    return claim("The paper's Table 1 ordering", tally(calls, [a == "yes" for a in steps["agrees"]]),
                 f"{len(agree)} of {len(steps)} steps move perplexity the paper's way (rows "
                 f"{', '.join(map(str, agree)) or 'none'}){noise}{seed_gauge(t1)}; rank correlation with the "
                 f"paper's {rho:+.2f}",
                 "the paper's steps are 0.04-1.70 perplexity (0.3-12%) at 125M parameters and 2.5B tokens, the "
                 "smaller ones within our seed-to-seed noise, and mini-batch TTT and a learnable η need long "
                 "training to pay off")


def _at_largest(scaling: pd.DataFrame, ctx: int) -> pd.Series:
    """val_ppl per arch at the largest size every architecture at that context has (named by the size)."""
    sub = scaling[scaling["ctx"] == ctx]
    common = set.intersection(*(set(g["size"]) for _, g in sub.groupby("arch"))) if len(sub) else set()
    if not common:
        return pd.Series(dtype=float)
    size = max(common, key=lambda s: sub[sub["size"] == s]["params"].max())
    return sub[sub["size"] == size].set_index("arch")["val_ppl"].rename(size)


def _listing(values: pd.Series, fmt: str = "{:.3f}") -> str:
    """'Transformer 2.345, Mamba 2.456, ...' in the paper's legend order."""
    order = {a: i for i, a in enumerate(SCALING_ARCHS)}
    return ", ".join(f"{LABELS.get(a, a)} {fmt.format(v)}" for a, v in
                     sorted(values.items(), key=lambda item: order.get(item[0], len(order))))


def verdict_scaling_short(scaling: pd.DataFrame, gaps: pd.DataFrame, ctx: int) -> str:
    """The paper at 2k: Transformer, Mamba and TTT-Linear (M) comparable (within 3% at every size). Ours: within
    5% at the largest common size; a wider spread whose gap is within noise leaves the claim unresolved."""
    ppl = _at_largest(scaling, ctx).reindex(list(MAIN_ARCHS)).dropna()
    if len(ppl) < 2:
        return f"Not measured: fewer than two of {', '.join(MAIN_ARCHS)} at context {ctx}."
    spread = ppl.max() / ppl.min() - 1
    gap = gap_between(gaps, ctx, ppl.name, ppl.idxmax(), ppl.idxmin())
    call = gap["call"] if gap else ""
    widest = (f"; the widest gap ({LABELS.get(ppl.idxmax())} over {LABELS.get(ppl.idxmin())}) is "
              + (f"{'within' if call == 'within noise' else 'beyond'} the noise of the text evaluated (±"
                 f"{math.expm1(gap['half_width']):.1%}, the {LEVEL:.0%} interval of the per-window gap over "
                 f"{int(gap['windows'])} windows)" if call else "not tested against noise (runs without "
                                                                  "per-window losses)"))
    falling = [LABELS.get(a, a) for a, g in by_arch(scaling[scaling["ctx"] == ctx])
               if len(g) > 1 and g.sort_values("train_flops")["val_ppl"].is_monotonic_decreasing]
    ok = spread <= 0.05 or (UNRESOLVED if call == "within noise" else False)
    return claim(f"The paper's claim that Transformer, Mamba and TTT-Linear (M) are comparable at 2k", ok,
                 f"at context {ctx:,}, {ppl.name}, perplexity per {unit(scaling)} is {_listing(ppl)}, "
                 f"a {spread:.1%} spread (paper: within 3%){widest}; curves that fall with compute: "
                 f"{', '.join(falling) or 'none'}",
                 "small models trained on few tokens differ in how fast they learn, which the paper's "
                 "Chinchilla-scale budgets average out")


def verdict_scaling_long(scaling: pd.DataFrame, gaps: pd.DataFrame, ctx: int) -> str:
    """The paper at 8k: TTT-Linear (M) and TTT-MLP (M) better than Mamba."""
    sub = scaling[scaling["ctx"] == ctx].pivot_table(index="size", columns="arch", values="val_ppl")
    ttt = [a for a in ("ttt_linear", "ttt_mlp") if a in sub]
    if "mamba" not in sub or not ttt:
        return f"Not measured: Mamba and a TTT (M) model at context {ctx} are needed."
    pairs = [(a, s) for a in ttt for s in sub.index if pd.notna(sub.loc[s, a]) and pd.notna(sub.loc[s, "mamba"])]
    if not pairs:
        return f"Not measured: no size at context {ctx} has both Mamba and a TTT (M) model."
    wins = [sub.loc[s, a] < sub.loc[s, "mamba"] for a, s in pairs]
    calls = [(gap_between(gaps, ctx, s, a, "mamba") or {"call": ""})["call"] for a, s in pairs]
    return claim("The paper's claim that TTT (M) beats Mamba at long context", tally(calls, wins),
                 f"at context {ctx:,} TTT has the lower perplexity in {sum(wins)} of {len(pairs)} (architecture, "
                 f"size) pairs ({_listing(_at_largest(scaling, ctx))} at the largest size)"
                 f"{noise_note(calls, 'TTT lower', 'Mamba lower')}",
                 "the paper's gap is 1-3% at 8k with 125M-1.3B models; a small byte-level model gets little from "
                 "context beyond a few hundred bytes, so a better long-context state has little to act on")


def late_gain(tokens: pd.DataFrame, ctx: int) -> pd.Series:
    """Per arch (largest model): loss over positions [ctx/4, ctx/2) minus over [ctx/2, ctx] (nats): how much
    the second half of the context still lowers the loss."""
    sub = largest(tokens[tokens["ctx"] == ctx])
    mid = sub[(sub["start"] >= ctx // 4) & (sub["end"] < ctx // 2)].groupby("arch")["loss"].mean()
    late = sub[(sub["start"] >= ctx // 2) & (sub["end"] <= ctx)].groupby("arch")["loss"].mean()
    return (mid - late).dropna()


def verdict_token_index(tokens: pd.DataFrame) -> str:
    """The paper (Books, 32k): TTT-Linear keeps improving with context, Mamba stops after 16k."""
    if tokens.empty:
        return "Not measured: no loss by position in the runs."
    ctx = int(tokens["ctx"].max())
    gain = late_gain(tokens, ctx)
    if not {"ttt_linear", "mamba"} <= set(gain.index):
        return f"Not measured: TTT-Linear and Mamba at context {ctx} are needed."
    return claim("The paper's claim that TTT-Linear keeps improving with context while Mamba plateaus",
                 bool(gain["ttt_linear"] > 0 and gain["ttt_linear"] > gain["mamba"]),
                 f"at context {ctx:,} the second half of the sequence lowers the loss (positions [{ctx // 4:,}, "
                 f"{ctx // 2:,}) minus [{ctx // 2:,}, {ctx:,}], nats) by {_listing(gain, '{:+.3f}')}",
                 "the paper's Mamba stops improving only after 16k tokens of books, longer than our contexts, and a "
                 "small byte-level model gets most of what context gives it from the first hundred bytes")


def verdict_latency(lat: pd.DataFrame) -> str:
    """The paper: per-token prefill time grows with context for the Transformer, stays flat for TTT-Linear and
    Mamba; TTT-Linear is faster than the Transformer from 8k (v1)."""
    pre = lat[lat["mode"] == "prefill"].pivot_table(index="ctx", columns="arch", values="time_per_token_s")
    if not {"transformer", "ttt_linear"} <= set(pre.columns) or len(pre) < 2:
        return "Not measured: prefill points of the Transformer and TTT-Linear at two lengths are needed."
    growth = (pre.iloc[-1] / pre.iloc[0]).dropna()
    faster = pre.index[pre["ttt_linear"] <= pre["transformer"]]
    grows = growth["transformer"] > growth["ttt_linear"]
    return claim("The paper's latency claim (the Transformer's prefill time per token grows with context while "
                 "TTT-Linear's stays flat, and TTT-Linear is the faster one from about 8k)",
                 bool(grows and len(faster)) or (None if grows or len(faster) else False),
                 f"from {pre.index[0]:,} to {pre.index[-1]:,} tokens the time per token changes "
                 f"{_listing(growth, 'x{:.2f}')}, and TTT-Linear is faster than the Transformer "
                 + (f"from {faster[0]:,} tokens" if len(faster) else "at no measured length"),
                 "the paper times 1.3B models at batch 16 with fused kernels on an A100; a small model on a CPU spends "
                 "its time in per-token work, where attention's quadratic term stays small and TTT's inner loop runs "
                 "as unfused PyTorch")


# -- RESULTS/paper/ ---------------------------------------------------------------------------------------

TABLE1_COLUMNS = {"row": "row", "configuration": "configuration", "arch": "config", "status": "run",
                  "ours_bpb": "ours bpb", "ours_ppl": "ours ppl", "ours_diff": "ours diff",
                  "published_ppl": "paper ppl",
                  "published_diff": "paper diff", "ours_step": "ours", "published_step": "paper", "agrees": "agrees",
                  "beyond_noise": "beyond noise", "ours_rank": "ours rank", "published_rank": "paper rank"}


def markdown(df: pd.DataFrame, columns: dict[str, str], digits: int = 3) -> str:
    """A GitHub markdown table of df's `columns` (name -> header); floats to `digits` places, NaN empty."""
    def cell(v):
        if pd.isna(v):
            return ""
        if isinstance(v, float):
            return f"{v:.{digits}g}" if abs(v) >= 1e4 or 0 < abs(v) < 1e-3 else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for _, r in df.iterrows()]
    return "\n".join(lines)


def scaling_markdown(scaling: pd.DataFrame) -> str:
    """Perplexity per (size, ctx) x architecture."""
    if scaling.empty:
        return "(no runs)"
    wide = scaling.pivot_table(index=["ctx", "size"], columns="arch", values="val_ppl").reset_index()
    wide = wide.sort_values(["ctx", "size"])
    return markdown(wide, {"ctx": "ctx", "size": "size", **{a: LABELS.get(a, a) for a in SCALING_ARCHS if a in wide}})


GAPS_SHOWN = ("transformer", "mamba", "ttt_linear", "ttt_mlp")  # the pairs the claims compare


def gaps_markdown(gaps: pd.DataFrame) -> str:
    """The paired gaps between the claims' architectures, as perplexity ratios (%) with their intervals."""
    shown = gaps[gaps["arch"].isin(GAPS_SHOWN) & gaps["versus"].isin(GAPS_SHOWN)]
    if shown.empty:
        return "(no pairs)"
    table = shown.assign(arch=shown["arch"].map(LABELS), versus=shown["versus"].map(LABELS),
                         ratio=[f"{math.expm1(g):+.1%}" for g in shown["loss_gap"]],
                         interval=[f"±{math.expm1(h):.1%}" if pd.notna(h) else "" for h in shown["half_width"]],
                         windows=[f"{w:.0f}" if pd.notna(w) else "" for w in shown["windows"]])
    return markdown(table.sort_values(["ctx", "size"]), {"ctx": "ctx", "size": "size", "arch": "arch",
                                                          "versus": "versus", "ratio": "perplexity ratio - 1",
                                                          "interval": f"{LEVEL:.0%} interval", "windows": "windows",
                                                          "call": "call"})


def verdicts(fr: dict[str, pd.DataFrame]) -> dict[str, list[str]]:
    """One sentence per claim of the paper, by section (README.md and the notebook print them)."""
    sc, gaps = fr["scaling"], fr.get("gaps", pd.DataFrame(columns=GAP_COLUMNS))  # no gaps.csv: written before them
    ctxs = sorted(sc["ctx"].unique())
    scaling = ([verdict_scaling_short(sc, gaps, ctxs[0])] + [verdict_scaling_long(sc, gaps, c) for c in ctxs[1:]]
               if ctxs else ["Not measured: no scaling runs."])
    return {"table1": [verdict_table1(fr["table1"])], "scaling": scaling,
            "token_index": [verdict_token_index(fr["token_index"])], "latency": [verdict_latency(fr["latency"])]}


def readme(fr: dict[str, pd.DataFrame], profile: str) -> str:
    sc, t1, said = fr["scaling"], fr["table1"], verdicts(fr)
    u = unit(sc)
    return "\n\n".join([
        f"# The paper's tables and figures, reproduced (`make paper PROFILE={profile}`)",
        f"Scale: {scale_note(sc)}. The paper: 125M-1.3B parameters, 2.5B-26B Llama-2 tokens of the Pile. Our "
        f"perplexities are per {u} (exp of the validation loss in nats per {u}); the paper's per Llama-2 token. "
        "Compare orderings, directions and trends, not values. Written by bench/paper.py; notebooks/paper.ipynb "
        "redraws it.",
        f"## Table 1: from linear attention to TTT-Linear ({t1['size'].iloc[0]}, context {t1['ctx'].iloc[0]:,})",
        markdown(t1, TABLE1_COLUMNS),
        f"ours ppl: our perplexity per {u}; bpb: bits per byte. Diffs: perplexity minus the previous row's. Steps: ↓ "
        "lower perplexity than the previous row, ↑ higher, = within 0.1%. Beyond noise: the step's per-window gap "
        f"leaves its {LEVEL:.0%} interval (see the pairs below). Ranks: 1 = best.",
        *said["table1"],
        f"## Perplexity vs training FLOPs (ours: perplexity per {u})", scaling_markdown(sc),
        "![perplexity vs training FLOPs](ppl_vs_flops.png)",
        gaps_markdown(fr["gaps"]),
        f"Each pair at one (context, size): arch's perplexity over versus's, minus 1, from the per-window differences "
        f"of their validation losses on the same text (each window's difficulty cancels), and the {LEVEL:.0%} "
        "interval of that mean (Student's t over the windows); the call says whether arch is lower or higher "
        "beyond it. The interval is the evaluation's noise only: seed-to-seed noise of training is not in it "
        "(Table 1's rows 2 and 3 gauge it: see the sentence under Table 1).",
        *said["scaling"],
        "## Loss by token index", "![loss by token index](loss_by_token_index.png)", *said["token_index"],
        "## Prefill and decode latency vs context", "![latency](latency.png)", *said["latency"]]) + "\n"


def write(folder: Path, fr: dict[str, pd.DataFrame], profile: str) -> list[Path]:
    """RESULTS/paper/: the CSVs, the figures and README.md; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in fr.items():
        buf = io.StringIO()
        df.to_csv(buf, index=False)
        atomic_write_text(folder / f"{name}.csv", buf.getvalue())
        paths.append(folder / f"{name}.csv")
    for name, fig in (("ppl_vs_flops.png", plot_paper_scaling(fr["scaling"])),
                      ("loss_by_token_index.png", plot_paper_token_index(fr["token_index"], fr["scaling"])),
                      ("latency.png", plot_paper_latency(fr["latency"]))):
        save_figure(fig, folder / name)
        plt.close(fig)
        paths.append(folder / name)
    atomic_write_text(folder / "README.md", readme(fr, profile))
    return paths + [folder / "README.md"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make paper", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="cpu", choices=sorted(PLANS))
    p.add_argument("--results", default="results", help="output root")
    p.add_argument("--no-run", action="store_true", help="write RESULTS/paper/ from the runs RESULTS has; run nothing")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data=hf data.name=...")
    args = p.parse_args(argv)
    t0, plan, results = time.perf_counter(), PLANS[args.profile], Path(args.results).expanduser().resolve()
    try:
        hashes = fingerprints(shown_points(plan, args.profile), args.profile, list(args.overrides))
    except Exception as e:  # a Hydra override that does not compose: one line, nothing run or written
        print(f"error: the overrides {args.overrides} do not compose: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    codes = [] if args.no_run else run_missing(plan, args.profile, results, list(args.overrides), hashes)
    fr = frames(finished_runs(results, hashes), latency_rows(results, plan), plan)
    write(results / "paper", fr, args.profile)
    print(f"[ttt-bench] paper ({args.profile}): {len(fr['scaling'])} scaling points, "
          f"{fr['table1']['ours_ppl'].notna().sum()}/8 Table 1 rows, {len(fr['latency'])} latency points in "
          f"{time.perf_counter() - t0:.0f}s; see {results / 'paper' / 'README.md'}")
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
