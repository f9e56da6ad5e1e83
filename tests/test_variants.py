"""A key swept beyond the report's own (ARGS="task.mqar_pairs=4,8"): each run records its values (summary.json
`variant`), and the report keeps the values apart, a line each in the plots and pairs of their own in
comparisons.md. Before, the report kept the best run of each point and did not say which value it was."""
import pandas as pd
from omegaconf import OmegaConf, open_dict

from bench.gaps import comparison_lines, comparisons_frame, comparisons_markdown
from bench.report import latest_ok, lr_sweeps, named_by_variant, report, seed_means
from tests.test_seeds import _run


def test_a_sweep_names_the_keys_it_varies_beyond_the_reports_own():
    """Seeds, lrs and the point's keys (task, data, match, recipe) have report columns of their own: no variant."""
    from bench.sweep import variant_per_run

    assert variant_per_run(["task.mqar_pairs=4,8", "seed=0,1", "trainer.lr=1e-3,1e-2", "arch=a,b", "ctx=64,128"]) == [
        "variant='task.mqar_pairs=${task.mqar_pairs}'"]
    assert variant_per_run(["arch.mini_batch=8,16", "profile=smoke,cpu", "logger=none"]) == [
        "variant='arch.mini_batch=${arch.mini_batch} profile=${hydra:runtime.choices.profile}'"]
    assert variant_per_run(["seed=0,1", "trainer.lr=1e-3,1e-2", "recipe=native,shared", "data=a,b"]) == []
    assert variant_per_run(["task.mqar_pairs=4,8", "variant=mine"]) == []  # the user's own is kept


def test_the_sweep_command_sets_the_variant_and_lrs_and_seeds_commands_are_unchanged(tmp_path, monkeypatch):
    from bench import sweep

    calls = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr("bench.report.report", lambda results: None)
    sweep.main(["--arch", "transformer", "--profile", "smoke", "--ctx", "64", "--seeds", "0,1", "--lrs", "1e-3,1e-2",
                "--results", str(tmp_path), "trainer.weight_decay=0.0,0.1"])
    assert "variant='trainer.weight_decay=${trainer.weight_decay}'" in calls[0]
    named = f"run_name={sweep.RUN_NAME}-lr${{trainer.lr}}-seed${{seed}}-weight_decay${{trainer.weight_decay}}"
    assert named in calls[0]
    calls.clear()
    sweep.main(["--arch", "transformer", "--profile", "smoke", "--ctx", "64", "--seeds", "0,1", "--lrs", "1e-3,1e-2",
                "--results", str(tmp_path)])
    assert not any(o.startswith("variant=") for o in calls[0])


def test_the_variant_is_a_label_not_part_of_the_runs_fingerprint():
    """It names values the config already holds: a rerun sweep still reuses the runs, and runs fingerprinted before
    variants existed are the same runs."""
    from bench.config import compose
    from bench.fingerprint import config_fingerprint

    plain = compose(["sweep_id=t", "results=/tmp/x"])
    labelled = compose(["sweep_id=t", "results=/tmp/x", "variant='trainer.weight_decay=0.1'"])
    assert plain.variant == "" and labelled.variant == "trainer.weight_decay=0.1"
    before = OmegaConf.create(OmegaConf.to_container(plain))
    with open_dict(before):
        before.pop("variant")
    assert config_fingerprint(labelled) == config_fingerprint(plain) == config_fingerprint(before)


def _variants() -> list[dict]:
    """Two architectures at one point, each trained at task.mqar_pairs=4 and 8; mamba's 8-pair run is its better."""
    return [_run("mamba", shift=0.3, variant="task.mqar_pairs=4", run_dir="/r/m4"),
            _run("mamba", shift=0.1, variant="task.mqar_pairs=8", run_dir="/r/m8"),
            _run("transformer", shift=0.0, variant="task.mqar_pairs=4", run_dir="/r/t4"),
            _run("transformer", shift=0.4, variant="task.mqar_pairs=8", run_dir="/r/t8")]


def test_the_report_keeps_each_variant_and_compares_within_it():
    best = latest_ok(pd.DataFrame(_variants()))
    assert sorted(best["run_dir"]) == ["/r/m4", "/r/m8", "/r/t4", "/r/t8"]  # before: /r/m8 and /r/t4, unsaid
    drawn = named_by_variant(seed_means(best))
    assert sorted(drawn["arch"]) == ["mamba task.mqar_pairs=4", "mamba task.mqar_pairs=8",
                                     "transformer task.mqar_pairs=4", "transformer task.mqar_pairs=8"]
    pairs = comparisons_frame(best).set_index("variant")
    assert sorted(pairs.index) == ["task.mqar_pairs=4", "task.mqar_pairs=8"]
    assert pairs.loc["task.mqar_pairs=4", "gap"] < 0 < pairs.loc["task.mqar_pairs=8", "gap"]  # transformer - mamba
    md = comparisons_markdown(comparisons_frame(best))
    assert "| size | ctx | match | recipe | variant | architecture |" in md
    assert "| xs | 64 | params | native | task.mqar_pairs=8 | transformer | mamba | +" in md
    read_back = pd.read_csv(pd.io.common.StringIO(comparisons_frame(best).to_csv(index=False)))  # as the sweep does
    lines = comparison_lines(read_back, _variants())
    assert lines[0].startswith("xs ctx 64 task.mqar_pairs=4: transformer vs mamba perplexity -")
    assert lines[1].startswith("xs ctx 64 task.mqar_pairs=8: transformer vs mamba perplexity +")


def test_without_variants_nothing_changes():
    """Runs from before variants (no field) and sweeps that vary nothing more: one run per point, no variant column,
    the architectures' names as they are."""
    rows = [{k: v for k, v in r.items() if k != "variant"} for r in _variants()[::2]]
    best = latest_ok(pd.DataFrame(rows))
    assert named_by_variant(seed_means(best))["arch"].tolist() == ["mamba", "transformer"]
    assert "variant" not in comparisons_markdown(comparisons_frame(best)).split("## task=lm")[1]
    assert lr_sweeps(pd.DataFrame(rows)).empty


def test_a_report_of_a_varied_sweep_draws_a_line_per_value(tmp_path):
    import json

    for r in _variants():
        folder = tmp_path / "runs" / "s1" / r["run_dir"].split("/")[-1]
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({**r, "run_dir": str(folder)}))
    table = report(tmp_path)
    assert sorted(table["variant"]) == ["task.mqar_pairs=4", "task.mqar_pairs=4", "task.mqar_pairs=8",
                                        "task.mqar_pairs=8"]
    assert (tmp_path / "plots" / "loss_vs_flops.png").exists()
    assert (tmp_path / "comparisons.md").read_text().count("| task.mqar_pairs=") == 2
