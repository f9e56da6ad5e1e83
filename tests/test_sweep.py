"""The `make sweep` entry point: bad input fails at once; the smoke profile runs end to end."""
import csv
import json
import platform
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import UsageError, parse_ctx

ROOT = Path(__file__).resolve().parent.parent


def sweep(*args, results):
    return subprocess.run([sys.executable, "-m", "bench.sweep", "--results", str(results), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_parse_ctx():
    assert parse_ctx("2k") == 2048 and parse_ctx("32K") == 32768 and parse_ctx("256") == 256
    for bad in ("2x", "-4", "0", "k", "2.5k", ""):
        with pytest.raises(UsageError):
            parse_ctx(bad)


@pytest.mark.parametrize("args,message", [
    (["--arch", "nonexistent"], "unknown ARCH 'nonexistent'; available: .*transformer"),
    (["--ctx", "2x"], "CTX must be"),
    (["--profile", "laptop"], "unknown PROFILE 'laptop'; available: cpu, paper, smoke"),
    (["--sizes", "huge"], "unknown SIZES 'huge'"),
    (["--data", "nope"], "unknown DATA 'nope'"),
    (["--match", "bytes"], "unknown MATCH 'bytes'; available: params, flops"),
    (["--profile", "smoke", "--ctx", "256", "trainer.lrr=3"], "Could not override 'trainer.lrr'"),
    (["--launcher", "slurm", "--nodes", "2", "--ctx", "256", "hydra.launcher.nodes_typo=3"], "nodes_typo"),
    # a context the task cannot run at fails before the first run, not in every one (bench/sweep.preflight)
    (["--task", "longqa", "--ctx", "256", "--profile", "smoke"],
     r"^error: TASK=longqa: long-QA sub-tasks niah_multikey, niah_multivalue do not fit ctx=256 .*"
     r"use a longer CTX or task.mixture.niah_multikey=0 task.mixture.niah_multivalue=0$"),
    (["--task", "mqar_zoology", "--ctx", "64,300", "--profile", "smoke"], "CTX=300 is not a point of its grid"),
    (["--task", "mqar", "--ctx", "16", "--profile", "smoke"], r"TASK=mqar: task.mqar_train_pairs=\[64\]: none fits"),
    # ... and so do data files that are not there (the runners' checks read no data: tasks/registry.check_task)
    (["--profile", "smoke", "--ctx", "64", "--data", "text_files", "data.paths=[/nonexistent/*.txt]"],
     r"TASK=lm: data.paths: no file matches '/nonexistent/\*.txt'"),
    (["--profile", "smoke", "--ctx", "64", "--task", "classification", "task.source=text_files",
      "task.paths=[/nonexistent/*.jsonl]"], r"TASK=classification: task.paths matched no files"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    """In-process (`make sweep` runs this main): a subprocess per case cost 4 s of imports each."""
    import re

    from bench.sweep import main

    assert main(["--results", str(tmp_path / "out"), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), captured.err
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_the_preflight_checks_each_context_and_data_under_the_users_overrides():
    """bench/sweep.preflight asks the task about each context (and task or data swept) of each multirun, under the
    overrides the runs get."""
    from bench.sweep import preflight, runs_to_check

    multirun = ["arch=transformer,mamba", "size=smoke-xs", "task=longqa", "ctx=256,512", "run_name=${arch.name}-x",
                "task.mixture.mqar=0,1"]
    assert runs_to_check(multirun) == [  # ctx's and task's values, every other sweep's first, the rest as written
        ["arch=transformer", "size=smoke-xs", "task=longqa", f"ctx={ctx}", "run_name=${arch.name}-x",
         f"task.mixture.mqar={w}"] for ctx in (256, 512) for w in (0, 1)]
    preflight([["task=longqa", "profile=smoke", "ctx=512,1024"]])
    with pytest.raises(UsageError, match="ctx=256"):  # the second multirun (a ladder of its own) is checked too
        preflight([["task=longqa", "profile=smoke", "ctx=512"], ["task=longqa", "profile=smoke", "ctx=256"]])
    preflight([["task=longqa", "profile=smoke", "ctx=256", "task.mixture.niah_multikey=0",
                "task.mixture.niah_multivalue=0"]])  # the user's fix is read
    preflight([["task=lm", "profile=smoke", "ctx=64"]])  # the embedded corpus: nothing to read first
    there = ROOT / "README.md"
    with pytest.raises(UsageError, match="no file matches '/nonexistent/b.txt'"):  # data swept: each is checked
        preflight([["profile=smoke", "ctx=64", "data=text_files", f"data.paths=[{there}],[/nonexistent/b.txt]"]])
    slurm = ["task=lm", "ctx=64", "hydra.launcher.cpus_per_task=16"]  # the README's LAUNCHER=slurm ARGS
    with pytest.raises(UsageError, match="hydra.launcher.cpus_per_task"):
        preflight([slurm])  # without its launcher the key does not exist ...
    preflight([slurm], launcher=["hydra/launcher=slurm", "hydra.launcher.nodes=2"])  # ... as the runs have it


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    res = sweep("--arch", "transformer", "--ctx", "256", "--profile", "smoke", results=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["size"] for r in rows) == ["smoke-s", "smoke-xs"]
    for r in rows:
        assert (r["arch"], r["ctx"], r["task"], r["data"], r["status"]) == ("transformer", "256", "lm", "shakespeare", "ok")
        assert r["backend"] == "attention=sdpa"
        for col in ("params", "flops_per_token", "train_flops", "tokens", "val_loss", "val_ppl", "val_bpb",
                    "tokens_per_s", "wall_s"):
            assert float(r[col]) > 0, col
        assert float(r["val_bpb"]) < 8.0  # better than uniform bytes after a few steps
        # the smoke profile sizes by parameters; the Transformer is its own reference
        assert r["match"] == "params" and float(r["flops_vs_ref"]) == 1.0
        assert int(r["state_size"]) == 2 * int(r["layers"]) * 256 * int(r["d_model"])  # the KV cache
        # the trained model's speed at the run's context (bench/latency.py latency_probe)
        assert r["throughput_status"] == "ok" and float(r["prefill_tokens_per_s"]) > 0
        assert float(r["decode_tokens_per_s"]) > 0
        run_dir = Path(r["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["packages"]["torch"] and summary["git_commit"]
        assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
        assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
        curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert curve[-1]["loss"] < curve[0]["loss"]
    for plot in ("loss_vs_flops.png", "loss_by_position.png", "training_curves.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 10_000, plot
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_flop_matched_sweep_records_the_resolved_size(tmp_path):
    """MATCH=flops: TTT-Linear is widened to the smoke-s Transformer's training FLOPs at ctx 256; Mamba-2
    cannot be matched at that size and its run fails with the reason and the remedy."""
    import architectures
    from architectures.sizing import FLOPS_TOLERANCE

    res = sweep("--arch", "ttt_linear,mamba2", "--ctx", "256", "--profile", "smoke", "--sizes", "smoke-s",
                "--match", "flops", "logger=none", results=tmp_path)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    runs = {json.loads(p.read_text())["arch"]: json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/summary.json")}
    ttt, mamba2 = runs["ttt_linear"], runs["mamba2"]
    assert ttt["status"] == "ok" and ttt["match"] == "flops" and abs(ttt["flops_vs_ref"] - 1) < FLOPS_TOLERANCE
    assert ttt["d_model"] > 48  # smoke-s is 48 wide; TTT has no attention term to pay for
    cfg = architectures.ModelConfig("ttt_linear", ttt["vocab"], ttt["d_model"], ttt["layers"], ttt["heads"],
                                    ttt["ffn_dim"], 256, options={"inner": "linear", "backbone": "mamba"})
    assert ttt["params"] == architectures.get("ttt_linear").count(cfg, 256).params  # measured == analytic
    assert mamba2["status"] == "failed" and "match=params" in mamba2["error"]


@pytest.mark.slow
def test_compute_budget_gives_every_architecture_the_same_tokens(tmp_path):
    """trainer.compute caps the tokens at compute / the reference's training FLOPs per token, for every
    architecture alike; the summary says which rule set them and the config records the tokens trained."""
    res = sweep("--arch", "transformer,ttt_linear", "--ctx", "256", "--profile", "smoke", "--sizes", "smoke-xs",
                "logger=none", "trainer.compute=1e9", results=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/summary.json")]
    ref = next(r for r in runs if r["arch"] == "transformer")
    expected = math.ceil(int(1e9 / ref["ref_train_flops_per_token"]) / 4096) * 4096  # whole steps of 4096 tokens
    assert expected < 16384  # smoke-xs's own token budget
    for r in runs:
        assert (r["token_rule"], r["compute_budget"], r["tokens"]) == ("compute", 1e9, expected)
        assert r["threads"] >= 1 and r["cpu_cores"] >= 1 and "omp_wait" in r
        assert r["optimizer"] == "adamw (fused)"
        trained = (Path(r["run_dir"]) / "config.yaml").read_text()
        assert f"tokens: {int(1e9 / ref['ref_train_flops_per_token'])}" in trained


def test_failed_run_is_recorded_and_fails_the_sweep(tmp_path):
    """A run that fails once it reads its data (a corpus shorter than one window: what the sweep's checks, which
    read no data, cannot know) is recorded as failed, and the sweep exits 1."""
    (tmp_path / "tiny.txt").write_text("hello world\n")
    res = sweep("--ctx", "64", "--profile", "smoke", "--sizes", "smoke-xs", "--data", "text_files",
                f"data.paths=[{tmp_path / 'tiny.txt'}]", "logger=none", results=tmp_path / "out")
    assert res.returncode == 1
    summary = json.loads(next((tmp_path / "out").glob("runs/*/*/summary.json")).read_text())
    assert summary["status"] == "failed" and "fewer than one window of CTX + 1 = 65" in summary["error"]
    assert "fewer than one window" in res.stdout


def test_smoke_sweep_every_architecture_learns(tmp_path):
    """ARCH=all through the same entry point: every main architecture trains, and its loss falls."""
    import architectures

    res = sweep("--arch", "all", "--ctx", "64", "--profile", "smoke", "--sizes", "smoke-xs", "logger=none",
                results=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    ladder_rows = {name for _, _, name in architectures.ttt.TABLE1[:-2]}  # ARCH=table1 runs those
    assert sorted({r["arch"] for r in rows}) == [a for a in architectures.names() if a not in ladder_rows]
    for r in rows:
        assert r["status"] == "ok" and float(r["val_bpb"]) < 8.0, r
        curve = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert curve[-1]["loss"] < curve[0]["loss"], r["run"]
        if sys.platform.startswith("linux"):  # glibc: the run recycled large blocks (bench/heap.py)
            summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
            assert summary["heap"] == "recycle", r["run"]
            if platform.machine() == "x86_64":  # subnormals flushed in every worker (bench/denormals.py)
                assert summary["denormals"] == "flush", r["run"]
        if r["arch"].startswith("ttt"):  # on CPU: both inner models' loops in C++ (cpu_scan.py)
            assert r["backend"] == "ttt=cpp", r["run"]
    # every pair compared window by window on the same text (bench/gaps.py), and the sweep prints them
    pairs = list(csv.DictReader(open(tmp_path / "comparisons.csv")))
    n = len(rows)
    assert len(pairs) == n * (n - 1) // 2 and all(float(p["n"]) >= 2 and p["call"] for p in pairs)
    assert res.stdout.count(" perplexity ") == min(len(pairs), 12) and "windows)" in res.stdout
    assert f"see {tmp_path / 'summary.csv'}, {tmp_path / 'comparisons.md'} and" in res.stdout


@pytest.mark.slow
def test_lr_sweep_trains_each_lr_and_the_report_keeps_the_best(tmp_path):
    """LRS=: every size at each lr, one folder per lr, lr in every summary; the plots and the report's
    best-run table take each point's best lr by validation loss; metric_vs_lr.png draws them all. JOBS=2:
    both runs at once, each a process of Hydra's joblib launcher. (20 s on 2 cores: the slow tier; the fast one
    keeps the best-lr choice, test_best_lr_is_chosen_on_the_dev_split_not_the_reported_one, and the JOBS=2
    command, tests/test_distributed.py.)"""
    import pandas as pd

    from bench.report import latest_ok, lr_sweeps, summary_table

    res = sweep("--arch", "transformer", "--ctx", "128", "--profile", "smoke", "--sizes", "smoke-xs",
                "--lrs", "1e-5,1e-2", "--jobs", "2", "--", "logger=none", "trainer.quiet=true", results=tmp_path)
    assert re.search(r"Joblib.Parallel\(.*n_jobs=2", res.stdout + res.stderr)  # Hydra's log line
    assert all(f"run {name}: ok  val_bpb=" in res.stdout for name in ("transformer-smoke-xs-ctx128-lr0.01",
                                                                     "transformer-smoke-xs-ctx128-lr1e-05"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = summary_table(tmp_path)
    assert sorted(table["lr"]) == [1e-5, 1e-2]
    folders = sorted(p.parent.name for p in tmp_path.glob("runs/*/*/summary.json"))
    assert folders == ["transformer-smoke-xs-ctx128-lr0.01", "transformer-smoke-xs-ctx128-lr1e-05"]
    best = latest_ok(table)
    assert len(best) == 1 and float(best.iloc[0]["val_loss"]) == table["val_loss"].min()
    assert float(best.iloc[0]["lr"]) == 1e-2  # 1e-5 barely moves in a few steps
    assert (tmp_path / "plots" / "metric_vs_lr.png").exists()
    drawn = lr_sweeps(table)  # what metric_vs_lr.png draws: both lrs, the ring on latest_ok's pick
    assert sorted(drawn["lr"]) == [1e-5, 1e-2] and drawn.loc[drawn["best"], "lr"].tolist() == [1e-2]


@pytest.mark.slow
def test_seed_sweep_keeps_a_folder_per_run_and_compares_seed_by_seed(tmp_path):
    """SEEDS=0,1 with a config group swept too (recipe=native,shared): 8 runs, 8 folders, all ok (before, the
    runs that differed only in swept keys beyond arch/size/ctx shared one folder, and the later failed on the
    earlier's checkpoint); comparisons.csv pairs each seed, comparisons.md sets the seeds side by side. (25 s on
    2 cores: the slow tier; the fast one keeps tests/test_seeds.py.)"""
    res = sweep("--arch", "transformer,ttt_linear", "--ctx", "64", "--profile", "smoke", "--sizes", "smoke-xs",
                "--seeds", "0,1", "--", "recipe=native,shared", "logger=none", "trainer.quiet=true", results=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folders = sorted(p.parent.name for p in tmp_path.glob("runs/*/*/summary.json"))
    assert folders == sorted(f"{a}-smoke-xs-ctx64-seed{s}-recipe{r}" for a in ("transformer", "ttt_linear")
                             for s in (0, 1) for r in ("native", "shared"))
    runs = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert sorted((r["arch"], r["seed"], r["recipe"], r["status"]) for r in runs) == sorted(
        (a, str(s), r, "ok") for a in ("transformer", "ttt_linear") for s in (0, 1) for r in ("native", "shared"))
    pairs = list(csv.DictReader(open(tmp_path / "comparisons.csv")))
    assert sorted((p["recipe"], p["seed"]) for p in pairs) == [("native", "0"), ("native", "1"), ("shared", "0"),
                                                               ("shared", "1")]
    assert "### Across seeds" in (tmp_path / "comparisons.md").read_text()
    assert re.search(r"transformer vs ttt_linear perplexity at seeds 0,1: [-+]\d", res.stdout)


@pytest.mark.slow
def test_a_key_swept_through_args_is_kept_apart_end_to_end(tmp_path):
    """ARGS="trainer.weight_decay=0.0,0.1": 4 runs in 4 folders, each summary records its value (`variant`), the
    report compares the architectures at each value and the terminal says which. Before, the report kept one run
    per architecture, the better of the two values, and could pair one architecture's 0.0 with another's 0.1.
    (15 s on 2 cores.)"""
    res = sweep("--arch", "transformer,ttt_linear", "--ctx", "64", "--profile", "smoke", "--sizes", "smoke-xs", "--",
                "trainer.weight_decay=0.0,0.1", "logger=none", "trainer.quiet=true", results=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert sorted((r["arch"], r["variant"], r["status"]) for r in runs) == sorted(
        (a, f"trainer.weight_decay={wd}", "ok") for a in ("transformer", "ttt_linear") for wd in ("0.0", "0.1"))
    pairs = list(csv.DictReader(open(tmp_path / "comparisons.csv")))
    assert sorted(p["variant"] for p in pairs) == ["trainer.weight_decay=0.0", "trainer.weight_decay=0.1"]
    for wd in ("0.0", "0.1"):
        assert f"smoke-xs ctx 64 trainer.weight_decay={wd}: transformer vs ttt_linear perplexity" in res.stdout


def test_a_bad_lrs_list_exits_2_with_the_reason(tmp_path):
    bad = sweep("--lrs", "1e-3,fast", results=tmp_path / "bad")  # one subprocess: the real exit status
    assert bad.returncode == 2 and "LRS must be a comma list" in bad.stderr


def test_arch_all_and_table1():
    """`all`: the main architectures; `table1`: the paper's Table 1 ladder, rows 1-8 in order."""
    from architectures.ttt import TABLE1
    from bench.config import parse_archs

    assert parse_archs("table1") == [name for _, _, name in TABLE1]
    main = parse_archs("all")
    assert {"transformer", "ttt_linear", "ttt_linear_base", "mamba", "mamba2", "ttt_mlp"} <= set(main)
    assert not any(a.startswith("table1_") for a in main)


def test_ctx_lists_and_the_task_budgets_default_contexts():
    from bench.config import default_ctxs, parse_ctxs

    assert parse_ctxs("64,128") == [64, 128] and parse_ctxs("2k") == [2048] and parse_ctxs("64,64") == [64]
    with pytest.raises(UsageError):
        parse_ctxs("64,x")
    assert default_ctxs("lm", "cpu") == [2048] and default_ctxs("mqar_zoology", "cpu") == [64, 128]
    assert default_ctxs("mqar_zoology", "paper") == [64, 128, 256, 512]


def test_short_and_long_contexts_run_one_multirun_per_ladder(tmp_path, monkeypatch, capsys):
    """The CPU profile's ladder is cpu-xs alone from 16k (conf/profile/cpu.yaml `long_context`): CTX=2k,32k
    runs two multiruns in one sweep, and the same command continues it; SIZES= runs the whole grid; a sweep
    of one ladder is recorded as sweeps were before (a flat list of overrides), so it still continues."""
    import json
    from bench import sweep

    calls = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr("bench.report.report", lambda results: None)

    def grids(argv):
        calls.clear()
        sweep.main(["--arch", "transformer,ttt_linear", "--results", str(tmp_path), *argv])
        assert len({c[-1] for c in calls}) == 1  # one sweep id
        return [tuple(o for o in c if o.startswith(("size=", "ctx="))) for c in calls]

    assert grids(["--ctx", "2k,32k"]) == [("size=cpu-xs,cpu-s,cpu-m", "ctx=2048"), ("size=cpu-xs", "ctx=32768")]
    first = calls[0][-1]
    assert grids(["--ctx", "2k,32k"]) == [("size=cpu-xs,cpu-s,cpu-m", "ctx=2048"), ("size=cpu-xs", "ctx=32768")]
    assert calls[0][-1] == first and f"continued sweep {first.split('=')[1]}" in capsys.readouterr().out
    assert grids(["--ctx", "2k,32k", "--sizes", "cpu-m"]) == [("size=cpu-m", "ctx=2048,32768")]
    assert grids(["--ctx", "8k,16k,32k"]) == [("size=cpu-xs,cpu-s,cpu-m", "ctx=8192"),
                                              ("size=cpu-xs", "ctx=16384,32768")]
    grids(["--ctx", "2k"])
    manifest = json.loads(next(m for m in (tmp_path / "sweeps").glob("*.json") if "ctx2048-" in m.name
                               and "32768" not in m.name).read_text())
    assert manifest["overrides"] == ["arch=transformer,ttt_linear", "size=cpu-xs,cpu-s,cpu-m", "profile=cpu",
                                     "task=lm", "ctx=2048", f"results={tmp_path.resolve()}"]


def test_best_lr_is_chosen_on_the_dev_split_not_the_reported_one():
    import pandas as pd

    from bench.report import latest_ok

    rows = [{"arch": "transformer", "size": "s", "ctx": 64, "task": "mqar_zoology", "data": "generated",
             "match": "params", "recipe": "native", "status": "ok", "sweep": "a", "lr": lr, "val_loss": 1.0,
             "val_acc": val, "dev_acc": dev} for lr, val, dev in [(1e-3, 0.9, 0.5), (1e-2, 0.6, 0.8)]]
    assert float(latest_ok(pd.DataFrame(rows)).iloc[0]["lr"]) == 1e-2  # dev 0.8 wins; its test accuracy is reported
    for r in rows:
        r["dev_acc"] = None  # runs without a dev split: the validation accuracy, as before
    assert float(latest_ok(pd.DataFrame(rows)).iloc[0]["lr"]) == 1e-3


@pytest.mark.slow
def test_mqar_zoology_smoke_sweep_end_to_end(tmp_path):
    """make sweep TASK=mqar_zoology PROFILE=smoke LRS=...: without CTX, its grid points (64, 4) and (128, 8), one
    run each per lr; dev_acc (early stopping's split) next to the reported val_acc; recall.md and the grid plot."""
    res = sweep("--arch", "transformer", "--profile", "smoke", "--task", "mqar_zoology", "--lrs", "1e-3,1e-2",
                "--", "logger=none", "trainer.quiet=true", results=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/summary.json")]
    assert sorted((r["ctx"], r["lr"]) for r in runs) == [(64, 1e-3), (64, 1e-2), (128, 1e-3), (128, 1e-2)]
    for r in runs:
        assert r["status"] == "ok" and r["vocab"] == 8192 and r["ffn_dim"] is None and r["tokenizer"] == "mqar_zoology8192"
        assert r["mqar_pairs"] == {64: 4, 128: 8}[r["ctx"]] and 0 <= r["dev_acc"] <= 1 and 0 <= r["val_acc"] <= 1
        assert r["planned_steps"] == 16 and r["steps"] == (r["early_stop_step"] or 16)
        rows = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        dev_steps = [row["step"] for row in rows if "dev_acc" in row]  # checked every 8 steps
        assert dev_steps and set(dev_steps) <= {8, 16}
    table = (tmp_path / "recall.md").read_text()
    assert "| transformer |" in table and "(64, 4)" in table and "(128, 8)" in table
    assert (tmp_path / "plots" / "mqar_grid.png").exists()


def test_the_paper_profile_on_a_machine_without_a_gpu_says_what_it_is_in_for(tmp_path, monkeypatch, capsys):
    """PROFILE=paper on a CPU started 125M training with a progress bar of 4,769 steps and no word of days."""
    from bench import sweep

    monkeypatch.setattr(sweep.subprocess, "call", lambda cmd, **kw: 0)
    monkeypatch.setattr("bench.report.report", lambda results: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    sweep.main(["--arch", "transformer", "--profile", "paper", "--results", str(tmp_path / "p")])
    assert "PROFILE=paper trains the paper's 125M-1.3B models" in capsys.readouterr().out
    sweep.main(["--arch", "transformer", "--profile", "smoke", "--ctx", "64", "--results", str(tmp_path / "s")])
    assert "note:" not in capsys.readouterr().out


def test_metric_vs_lr_draws_accuracy_on_its_whole_range(tmp_path, monkeypatch):
    """bench/plots.plot_metric_vs_lr: a smoke MQAR sweep at 0% accuracy was drawn on -0.04..0.04 (matplotlib's
    margin around a flat line): accuracies now span 0..1; bits per byte keep their own range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from bench import plots

    sweeps = pd.DataFrame([{"task": task, "arch": arch, "size": "s", "ctx": 64, "lr": lr, "val_acc": 0.0,
                            "val_bpb": 3.0 + lr, "best": lr == 1e-3}
                           for task in ("lm", "mqar_zoology") for arch in ("mamba", "transformer") for lr in (1e-3, 1e-2)])
    drawn = []
    monkeypatch.setattr(plots, "finish", lambda fig, path: drawn.append(fig))
    plots.plot_metric_vs_lr(sweeps, tmp_path / "m.png")
    lm, mqar = drawn[0].axes
    assert mqar.get_ylim() == (-0.03, 1.03) and lm.get_ylim()[1] < 3.1
    sizes = [ln.get_markersize() for ln in mqar.get_lines() if ln.get_markerfacecolor() != "none"]
    assert sizes[0] > sizes[1]  # the second line, on top of the first, leaves it visible
    plt.close(drawn[0])
