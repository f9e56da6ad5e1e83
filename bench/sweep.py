"""`make sweep`: check the user's choices, run the Hydra multirun, then write the report.

    python -m bench.sweep --arch transformer [--ctx 2k|64,128] [--profile cpu] [--sizes a,b] [--task lm]
                          [--data shakespeare] [--match flops|params] [--results results]
                          [--lrs 1e-4,1e-3] [--seeds 0,1] [--resume last|<sweep id>] [--fresh]
                          [--jobs N | --nproc N | --launcher slurm [--nodes N] [--gpus-per-node G]
                          [--partition P] [--account A] [--timeout-min M]] [-- hydra overrides ...]

The same command run again continues its sweep (finished runs reused, interrupted ones resumed from
their checkpoints, failed ones run again); --fresh starts a new one.

Bad input fails at once, with one line, before anything is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


from bench.config import (UsageError, default_ctxs, default_ladder, group_options, parse_archs, parse_choice,
                          parse_ctxs, parse_list, parse_lrs, parse_seeds)
from bench.results import REPO_ROOT, atomic_write_json, headline_metric, read_summaries
from bench.threads import cpu_cores

RUN_NAME = "${arch.name}-${size.name}-ctx${ctx}"  # conf/config.yaml's run_name: the keys every sweep names
NAMED = ("arch", "size", "ctx")  # ... those keys
FOLDER_LABELS = {"trainer.lr": "lr"}  # a swept key's label in the folder name, where not its last part (seed)
# swept keys the report keeps apart or chooses between by columns of its own (bench/report.KEY, seed, lr), so no
# run's variant names them
REPORTED = ("task", "data", "match", "recipe", "seed", "trainer.lr")


def build_overrides(args) -> tuple[list[list[str]], str, Path]:
    """(commands, label, results): the Hydra overrides of each multirun the sweep runs. One multirun over
    sizes x contexts, unless the profile's default ladder differs between the contexts (conf/profile/cpu.yaml
    `long_context`: cpu-xs alone from 16k): then one per ladder, in context order."""
    archs = parse_archs(args.arch)
    profile = parse_choice("PROFILE", args.profile, group_options("profile"))
    task = parse_choice("TASK", args.task, group_options("task"))
    ctxs = parse_ctxs(args.ctx) if str(args.ctx).strip() else default_ctxs(task, profile)
    sizes = parse_list("SIZES", args.sizes, group_options("size")) if args.sizes else None
    grids: dict[tuple[str, ...], list[int]] = {}  # sizes: the contexts they run at
    for ctx in ctxs:
        grids.setdefault(tuple(sizes or default_ladder(task, profile, ctx)), []).append(ctx)
    results = Path(args.results).expanduser().resolve()
    rest = [f"results={results}"]  # after ctx=, in the order sweeps have always recorded
    if args.data:
        rest.append(f"data={parse_choice('DATA', args.data, group_options('data'))}")
    if args.lrs:
        rest.append(f"trainer.lr={','.join(parse_lrs(args.lrs))}")
    if args.seeds:
        if any(key == "seed" for key, _ in _keys(args.overrides)):
            raise UsageError("SEEDS and a seed= override both set the seed; give one of them")
        rest.append(f"seed={','.join(parse_seeds(args.seeds))}")
    rest += folder_per_run([*rest, *args.overrides])  # where LRS put its run_name: earlier sweeps still continue
    rest += variant_per_run([*rest, *args.overrides])
    if args.match:
        from architectures.sizing import MATCH_RULES

        rest.append(f"match={parse_choice('MATCH', args.match, list(MATCH_RULES))}")
    commands = [[f"arch={','.join(archs)}", f"size={','.join(grid)}", f"profile={profile}", f"task={task}",
                 f"ctx={','.join(map(str, grid_ctxs))}", *rest, *args.overrides]
                for grid, grid_ctxs in grids.items()]
    return commands, f"{task}-ctx{'-'.join(map(str, ctxs))}", results


def folder_per_run(overrides: list[str]) -> list[str]:
    """[run_name=...] that names every key the overrides sweep beyond arch, size and ctx, so that each run of the
    multirun gets a folder of its own: seed=0,1 -> transformer-cpu-s-ctx2048-seed0 and ...-seed1, LRS -> ...-lr0.001
    (two runs in one folder: the second stops on the first's checkpoint, and the sweep keeps neither). [] when none
    is swept, or when the overrides name the run themselves."""
    if any(key == "run_name" for key, _ in _keys(overrides)):
        return []
    labels = [f"-{FOLDER_LABELS.get(key, key.split('.')[-1].split('/')[-1])}{value}"
              for key, value in _swept(overrides)]
    return [f"run_name={RUN_NAME}{''.join(labels)}"] if labels else []


def variant_per_run(overrides: list[str]) -> list[str]:
    """[variant='task.mqar_pairs=${task.mqar_pairs}'] for the keys the overrides sweep that the report has no column
    of its own for (beyond NAMED and REPORTED): each run records its values (summary.json `variant`:
    'task.mqar_pairs=4'), and the report keeps them apart, a line each in the plots and pairs of their own in
    comparisons.md (else it would keep the best run per point, as it does for lrs). [] when there are none, or when
    the overrides set the variant."""
    if any(key == "variant" for key, _ in _keys(overrides)):
        return []
    values = [f"{key}={value}" for key, value in _swept(overrides) if key not in REPORTED]
    return [f"variant='{' '.join(values)}'"] if values else []


def _keys(overrides: list[str]) -> list[tuple[str, object]]:
    """(key without +/~, parsed override) of each override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [(o.get_key_element().lstrip("+~"), o) for o in OverridesParser.create().parse_overrides(overrides)]


def _swept(overrides: list[str]) -> list[tuple[str, str]]:
    """(key, its value as an interpolation each run resolves) of every key swept beyond NAMED (and hydra's own):
    a config group's choice (recipe -> ${hydra:runtime.choices.recipe}), else the key's value (${seed})."""
    return [(key, f"${{hydra:runtime.choices.{key}}}" if group_options(key) else f"${{{key}}}")
            for key, o in _keys(overrides)
            if o.is_sweep_override() and key not in NAMED and not key.startswith("hydra")]


CHECKED = ("ctx", "task", "data")  # the config a task's check reads (tasks/registry.check_task)


def runs_to_check(overrides: list[str]) -> list[list[str]]:
    """A multirun's overrides as those of the runs whose task checks differ: every combination of the values
    swept of ctx, task and data (their groups and keys), and the first value of every other sweep
    (arch=a,b -> arch=a: what the checks read does not depend on it). The rest as written."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser

    checked = lambda key: key.lstrip("+~").split(".")[0].split("/")[0] in CHECKED
    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() \
            else [o.input_line]
        choices.append(values if checked(o.get_key_element()) else values[:1])
    return [list(run) for run in product(*choices)]


def preflight(commands: list[list[str]], launcher: list[str] = ()) -> None:
    """Each run of the sweep whose checks differ (runs_to_check), composed as it will be (the launcher's
    overrides, the profile's task budget and the user's overrides included), is checked by its task's runner
    where the runner can tell without reading data (tasks/registry.check_task: a long-QA sub-task longer than
    CTX, a CTX off the MQAR grid, data files that are not there), so that such a sweep fails here, in one line,
    before anything is written, instead of in every one of its runs."""
    from bench.config import compose_all

    runs = [[*launcher, *run] for overrides in commands for run in runs_to_check(overrides)]
    configs = compose_all(runs)
    import tasks  # noqa: F401  (torch and the runners: after the checks that need neither)
    from tasks.registry import check_task

    for cfg in configs:
        try:
            check_task(cfg, int(cfg.ctx))
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"TASK={cfg.task.name}: {e}") from None


def warn_if_no_gpu_for(commands: list[list[str]]) -> None:
    """PROFILE=paper trains the paper's 125M-1.3B models on billions of tokens: on a machine without a GPU,
    say so before its first run (it goes on: the user may mean it)."""
    import torch

    profiles = {o.split("=", 1)[1] for c in commands for o in c if o.startswith("profile=")}
    if "paper" in profiles and not torch.cuda.is_available():
        print("[ttt-bench] note: PROFILE=paper trains the paper's 125M-1.3B models on billions of tokens, sized "
              "for GPUs, and this machine has none: each run takes days here (PROFILE=cpu is sized for a CPU)",
              flush=True)


def stored_form(commands: list[list[str]]) -> list:
    """A sweep's commands as its manifest records them: one multirun's overrides as a flat list (the form of
    sweeps from before per-context ladders), several as a list of lists."""
    return commands[0] if len(commands) == 1 else commands


def commands_of(stored: list) -> list[list[str]]:
    return [list(c) for c in stored] if stored and isinstance(stored[0], list) else [list(stored)]


LAUNCHERS = ("local", "slurm")
SLURM_OPTIONS = {"nodes": "NODES", "gpus_per_node": "GPUS_PER_NODE", "timeout_min": "TIMEOUT_MIN",
                 "partition": "PARTITION", "account": "ACCOUNT"}  # conf/hydra/launcher/slurm.yaml key: make variable


def parse_positive(kind: str, text: str) -> int:
    if not re.fullmatch(r"\s*[1-9]\d*\s*", str(text)):
        raise UsageError(f"{kind} must be a positive integer; got {text!r}")
    return int(text)


def run_command(args) -> list[str]:
    """How the Hydra multirun starts: `python -m bench.run` (LAUNCHER=local, one run at a time); JOBS runs
    at once on this machine, each a process of its own (JOBS>1: Hydra's joblib launcher; each run's threads
    fit the cores the others leave, bench/threads.py); torchrun over NPROC processes of this machine, one
    per GPU (NPROC>1); or Hydra's submitit launcher, one SLURM job of NODES x GPUS_PER_NODE ranks per run
    (LAUNCHER=slurm; conf/hydra/launcher/slurm.yaml). Not part of the sweep's identity: a sweep started
    under one launcher continues under another."""
    launcher = parse_choice("LAUNCHER", args.launcher, list(LAUNCHERS))
    nproc = parse_positive("NPROC", args.nproc)
    jobs = parse_positive("JOBS", args.jobs)
    slurm = {key: str(getattr(args, key)).strip() for key in SLURM_OPTIONS if str(getattr(args, key)).strip()}
    if launcher == "local":
        if slurm:
            raise UsageError(f"{', '.join(SLURM_OPTIONS[k] + '=' for k in slurm)} need LAUNCHER=slurm")
        if jobs > 1 and nproc > 1:
            raise UsageError("JOBS runs several one-process runs at once, NPROC one run over several processes "
                             "(GPUs); give one of them")
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        parallel = [] if jobs == 1 else [  # the cores shared out; a line per finished run, not JOBS bars on one
            "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"trainer.threads={max(1, cpu_cores() // jobs)}",
            "trainer.quiet=true"]
        return [sys.executable, *torchrun, "-m", "bench.run", "--multirun", *parallel]
    if nproc > 1 or jobs > 1:
        raise UsageError("NPROC and JOBS are for one machine (LAUNCHER=local); LAUNCHER=slurm runs one job per "
                         "run and takes NODES and GPUS_PER_NODE")
    for key in ("nodes", "gpus_per_node", "timeout_min"):
        if key in slurm:
            parse_positive(SLURM_OPTIONS[key], slurm[key])
    return [sys.executable, "-m", "bench.run", "--multirun", "hydra/launcher=slurm",
            *(f"hydra.launcher.{key}={value}" for key, value in slurm.items())]


# RESULTS/sweeps/<sweep_id>.json records the command (its Hydra overrides) that made each sweep, so the
# same command run again continues that sweep: finished runs are reused, interrupted ones resume from
# their checkpoints, failed ones run again (bench/run.py).
MANIFESTS = "sweeps"


def read_manifests(results: Path) -> list[dict]:
    """Every sweep's manifest, oldest first."""
    out = []
    for path in sorted((results / MANIFESTS).glob("*.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda m: m.get("created", ""))


def choose_sweep(results: Path, commands: list[list[str]], label: str, resume: str,
                 fresh: bool) -> tuple[str, list[list[str]], str]:
    """(sweep id, commands, how): a new sweep (FRESH=1, or no earlier sweep of these commands), the newest
    sweep made by the same commands, or the one RESUME names (`last` or an id), run with its own commands."""
    if fresh and resume:
        raise UsageError("FRESH=1 and RESUME= contradict each other; give one")
    manifests = read_manifests(results)
    if resume:
        if resume == "last":
            if not manifests:
                raise UsageError(f"RESUME=last: no sweep recorded in {results / MANIFESTS}")
            chosen = manifests[-1]
        else:
            chosen = next((m for m in manifests if m["sweep_id"] == resume), None)
            if chosen is None:
                known = ", ".join(m["sweep_id"] for m in manifests[-5:]) or "none"
                raise UsageError(f"RESUME={resume}: no such sweep in {results / MANIFESTS} (latest: {known})")
        return chosen["sweep_id"], commands_of(chosen["overrides"]), "resumed"
    if not fresh:
        same = [m for m in manifests if m.get("overrides") == stored_form(commands)]
        if same:
            return same[-1]["sweep_id"], commands, "continued"
    digest = hashlib.sha256(json.dumps(stored_form(commands)).encode()).hexdigest()[:6]  # two started in one second
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{digest}", commands, "new"


def write_manifest(results: Path, sweep_id: str, commands: list[list[str]], attempt: dict) -> None:
    path = results / MANIFESTS / f"{sweep_id}.json"
    manifest = {"sweep_id": sweep_id, "overrides": stored_form(commands), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "attempts": []}
    if path.exists():
        manifest = json.loads(path.read_text(encoding="utf-8"))
    attempts = [a for a in manifest["attempts"] if a.get("started") != attempt["started"]]
    manifest["attempts"] = attempts + [attempt]
    atomic_write_json(path, manifest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make sweep", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="transformer", help="a name, a comma list, or 'all'")
    p.add_argument("--ctx", default="", help="2k, 8k, 32k or a number of tokens; a comma list runs each (default: "
                   "the task budget's sweep_ctx, else 2k)")
    p.add_argument("--profile", default="cpu", help="cpu | smoke | paper")
    p.add_argument("--sizes", default="", help="comma list of conf/size names (default: the profile's ladder)")
    p.add_argument("--task", default="lm")
    p.add_argument("--data", default="", help="conf/data name (default: shakespeare)")
    p.add_argument("--match", default="", help="flops | params (default: the profile's; flops except paper)")
    p.add_argument("--results", default="results", help="output root")
    p.add_argument("--lrs", default="", help="a learning-rate sweep: every (architecture, size) at each lr, e.g. "
                   "1e-4,4.6e-4,2.15e-3; the report keeps each one's best lr by its validation metric")
    p.add_argument("--seeds", default="", help="train every point once per seed, e.g. 0,1,2; the report compares "
                   "architectures at each seed and says where the seeds disagree")
    p.add_argument("--resume", default="", help="continue a sweep: 'last' or a sweep id (default: the newest "
                   "sweep made by the same command, if any)")
    p.add_argument("--fresh", action="store_true", help="start a new sweep even if this command ran before")
    p.add_argument("--launcher", default="local", help="local (this machine) | slurm (one job per run)")
    p.add_argument("--nproc", default="1", help="local: torchrun over this many processes (one per GPU)")
    p.add_argument("--jobs", default="1", help="local: this many runs at once, a process each (CPU sweeps of "
                   "small models)")
    for key, var in SLURM_OPTIONS.items():
        p.add_argument(f"--{key.replace('_', '-')}", default="", help=f"slurm: hydra.launcher.{key} (make {var}=)")
    p.add_argument("overrides", nargs="*", help="free Hydra overrides, e.g. trainer.lr=1e-3")
    args = p.parse_args(argv)
    try:
        commands, label, results = build_overrides(args)
        head = run_command(args)
        sweep_id, commands, how = choose_sweep(results, commands, label, args.resume.strip(), args.fresh)
        preflight(commands, launcher=head[head.index("--multirun") + 1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warn_if_no_gpu_for(commands)
    if how != "new":
        print(f"[ttt-bench] {how} sweep {sweep_id}: finished runs are reused, interrupted ones resume "
              f"(FRESH=1 starts a new sweep)", flush=True)
    t0, started = time.perf_counter(), time.time()
    attempt = {"started": started, "how": how}
    write_manifest(results, sweep_id, commands, attempt)
    env = {**os.environ, "HYDRA_FULL_ERROR": os.environ.get("HYDRA_FULL_ERROR", "1")}
    code = 0
    for overrides in commands:  # one multirun per ladder (build_overrides)
        cmd = [*head, *overrides, f"sweep_id={sweep_id}"]
        print("[ttt-bench] " + " ".join(cmd[1:]), flush=True)
        code = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        if code != 0:
            break
    write_manifest(results, sweep_id, commands, {**attempt, "ended": time.time(), "exit": code})
    if code != 0:
        print(f"error: the Hydra multirun exited with status {code}; run the same command again to continue "
              f"sweep {sweep_id}", file=sys.stderr)
        return code
    runs = [r for r in read_summaries(results) if r.get("sweep") == sweep_id]
    failed = [r for r in runs if r.get("status") != "ok"]
    for r in runs:
        reused = " (reused)" if float(r.get("finished_at", started)) < started else ""
        print(f"[ttt-bench] {r['run']}: {r.get('status')}{reused}"
              + (f"  {headline_metric(r)} val_loss={r['val_loss']:.3f} "
                 f"{r['layers']}x{r['d_model']} params={r['params'] / 1e6:.2f}M "
                 f"train FLOPs/token={r['train_flops_per_token']:.3g} ({r['flops_vs_ref']:.3f}x ref, match={r['match']}) "
                 f"tokens={r['tokens']:,} "
                 f"tok/s={r['tokens_per_s']:,.0f} wall={r['wall_s']:.0f}s" if r.get("status") == "ok"
                 else f"  {r.get('error')}"))
    from bench.report import report

    report(results)
    print_comparisons(results, runs)
    tables = [results / name for name in ("summary.csv", "comparisons.md") if (results / name).exists()]
    print(f"[ttt-bench] sweep {sweep_id}: {len(runs) - len(failed)}/{len(runs)} runs ok in "
          f"{time.perf_counter() - t0:.0f}s; see {', '.join(map(str, tables))} and {results / 'plots'}")
    return 1 if failed or not runs else 0


def print_comparisons(results: Path, runs: list[dict]) -> None:
    """The pairs the sweep's runs take part in, from RESULTS/comparisons.csv (the report's, bench/gaps.py): each
    architecture's perplexity over another's (or accuracy minus another's) at the same point, with the interval
    of the text or examples evaluated."""
    path = results / "comparisons.csv"
    if not path.exists():
        return
    import pandas as pd

    from bench.gaps import comparison_lines

    for line in comparison_lines(pd.read_csv(path), runs):
        print(f"[ttt-bench] {line}")


if __name__ == "__main__":
    sys.exit(main())
