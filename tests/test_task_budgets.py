"""Task presets and budgets (conf/task/mqar.yaml, conf/budget/<task>_<profile>.yaml) and the disk cache of
generated evaluation sets (tasks/cache.py)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import default_ladder
from tasks import build_task
from tasks.cache import cached, config_hash

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["sweep_id=t", "results=/tmp/x", *overrides])


@pytest.mark.parametrize("budget", sorted(p.stem for p in (CONF / "budget").glob("*.yaml")))
def test_a_budget_applies_to_its_task_under_its_profile_only(budget):
    task, profile = budget.rsplit("_", 1)
    spec = OmegaConf.load(CONF / "budget" / f"{budget}.yaml")
    cfg = compose_with(f"task={task}", f"profile={profile}", "size=cpu-s")
    OmegaConf.resolve(cfg)
    for key in ("tokens", "lr", "batch_tokens"):
        if key in spec.get("trainer", {}):
            assert cfg.trainer[key] == spec.trainer[key], key
    assert default_ladder(task, profile) == list(spec.get("ladder", OmegaConf.load(CONF / "profile" / f"{profile}.yaml").ladder))
    assert set(default_ladder(task, profile)) <= {p.stem for p in (CONF / "size").glob("*.yaml")}
    assert (CONF / "task" / f"{task}.yaml").exists() and (CONF / "profile" / f"{profile}.yaml").exists()
    for key, value in spec.get("task", {}).items():  # the task settings it overrides
        if not OmegaConf.is_dict(value):
            assert cfg.task[key] == value, key
    if (CONF / "budget" / f"{task}_smoke.yaml").exists():  # the task has a smoke budget of its own
        return
    other = compose_with(f"task={task}", "profile=smoke", "size=cpu-s")  # no smoke budget: the size's
    OmegaConf.resolve(other)
    assert other.trainer.tokens == OmegaConf.load(CONF / "size" / "cpu-s.yaml").tokens
    plain = compose_with("task=lm", f"profile={profile}", "size=cpu-s")
    for key in set(spec) - {"trainer", "ladder", "defaults", "task"}:  # run-level settings (tie_embeddings)
        assert cfg[key] == spec[key] and other[key] == plain[key], key
    # the command line still wins over a budget
    assert compose_with(f"task={task}", f"profile={profile}", "trainer.tokens=1234").trainer.tokens == 1234


def test_untied_head_reaches_the_model_from_the_config():
    from bench.run import model_config

    tied = model_config(compose_with("size=cpu-xs", "ctx=256"), 769)
    untied = model_config(compose_with("size=cpu-xs", "ctx=256", "tie_embeddings=false"), 769)
    assert tied.cfg.tie_embeddings and not untied.cfg.tie_embeddings
    assert untied.counts.params - tied.counts.params == 769 * tied.cfg.d_model
    assert untied.flops_ratio == tied.flops_ratio == 1.0


def test_lm_keeps_the_profile_ladder():
    assert default_ladder("lm", "cpu") == list(OmegaConf.load(CONF / "profile" / "cpu.yaml").ladder)


@pytest.mark.parametrize("preset,subtask", [("mqar", "mqar"), ("passkey", "passkey")])
def test_presets_run_the_longqa_runner_on_one_subtask(preset, subtask):
    cfg = compose_with(f"task={preset}", "ctx=256")
    task = build_task(cfg, 256)
    assert cfg.task.name == preset and type(task).__name__ == "LongQATask"
    assert list(task.mixture) == [subtask]
    assert {e.task for e in task.examples(0, 8)} == {subtask}


def test_cached_builds_once_per_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path))
    calls = []
    build = lambda: calls.append(1) or {"ids": [[1, 2, 3]], "t": torch.arange(3)}
    a = cached("kind", {"n": 1, "seed": 0}, build)
    b = cached("kind", {"seed": 0, "n": 1}, build)  # same config, other key order: loaded
    assert len(calls) == 1 and a["ids"] == b["ids"] and torch.equal(a["t"], b["t"])
    cached("kind", {"n": 2, "seed": 0}, build)
    assert len(calls) == 2
    path = tmp_path / "generated" / "kind" / f"{config_hash({'n': 1, 'seed': 0})}.pt"
    path.write_bytes(b"torn")  # a damaged file is rebuilt
    assert cached("kind", {"n": 1, "seed": 0}, build)["ids"] == [[1, 2, 3]] and len(calls) == 3
    monkeypatch.setenv("TTT_BENCH_CACHE", "off")
    cached("kind", {"n": 1, "seed": 0}, build)
    assert len(calls) == 4


def test_cached_evaluation_sets_equal_fresh_ones(tmp_path, monkeypatch):
    cfg = compose_with("task=longqa", "ctx=512")
    monkeypatch.setenv("TTT_BENCH_CACHE", "off")
    fresh = build_task(cfg, 512).eval_examples("niah_multikey", 512, 0.25, 3)
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path))
    first = build_task(cfg, 512).eval_examples("niah_multikey", 512, 0.25, 3)
    again = build_task(cfg, 512).eval_examples("niah_multikey", 512, 0.25, 3)
    assert [(e.ids, e.answer_pos) for e in fresh] == [(e.ids, e.answer_pos) for e in first] \
        == [(e.ids, e.answer_pos) for e in again]
    assert len(list((tmp_path / "generated" / "longqa").glob("*.pt"))) == 1
    cl = compose_with("task=classification", "ctx=256", "task.eval_examples=4")
    monkeypatch.setenv("TTT_BENCH_CACHE", "off")
    x0, y0 = build_task(cl, 256)._examples("val-0", 4, 256)
    monkeypatch.setenv("TTT_BENCH_CACHE", str(tmp_path))
    x1, y1 = build_task(cl, 256)._examples("val-0", 4, 256)
    x2, y2 = build_task(cl, 256)._examples("val-0", 4, 256)
    assert torch.equal(x0, x1) and torch.equal(x1, x2) and torch.equal(y0, y2)
    assert len(list((tmp_path / "generated" / "listops").glob("*.pt"))) == 1


ZOOLOGY_ARCHS = ["transformer", "ttt_linear", "mamba", "mamba2"]


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_mqar_zoology_composes_for_every_profile_and_grid_point(profile):
    """TASK=mqar_zoology: Zoology's figure-2 models at each profile's grid points (sweep_ctx): 2 layers for
    every architecture, no FFN, the head tied, one attention head with learned positions (the Transformer only),
    vocab 8192; the budget N x epochs sequences at the grid's batch, the dev split for early stopping."""
    from bench.run import model_config
    from bench.config import default_ctxs

    spec = OmegaConf.load(CONF / "budget" / f"mqar_zoology_{profile}.yaml")
    ctxs = default_ctxs("mqar_zoology", profile)
    assert ctxs == list(spec.sweep_ctx) and {64, 128} <= set(ctxs)
    for ctx in ctxs:
        for arch in ZOOLOGY_ARCHS:
            cfg = compose_with("task=mqar_zoology", f"profile={profile}", f"arch={arch}", f"ctx={ctx}",
                               f"size={spec.ladder[0]}")
            OmegaConf.resolve(cfg)
            task = build_task(cfg, ctx)
            budget = task.budget()
            assert cfg.trainer.tokens is None and cfg.trainer.batch_tokens is None  # the task's budget
            assert budget["tokens"] == cfg.task.train_examples * cfg.task.epochs * ctx
            assert budget["batch_tokens"] == cfg.task.mqar_grid[ctx].batch * ctx
            assert task.vocab_size == 8192 and task.mqar_pairs == {64: 4, 128: 8, 256: 16, 512: 64}[ctx]
            assert task.dev_examples > 0 and cfg.trainer.early_stop.metric == "dev_acc"
            assert cfg.trainer.early_stop.threshold == 0.99 and cfg.trainer.warmup_frac == 0
            assert cfg.trainer.weight_decay == 0.1 and cfg.trainer.grad_clip == float("inf")
            m = model_config(cfg, task.vocab_size).cfg
            assert (m.n_layers, m.ffn, m.tie_embeddings, m.vocab_size) == (2 if profile != "smoke" else 1, False,
                                                                            True, 8192)
            assert m.learned_positions == (arch == "transformer") and m.max_seq_len == ctx
            if arch == "transformer" and profile != "smoke":
                assert m.n_heads == 1
    if profile == "paper":
        assert ctxs == [64, 128, 256, 512] and list(spec.ladder) == [f"zoology-d{d}" for d in (64, 128, 256, 512)]
        cfg = compose_with("task=mqar_zoology", "profile=paper", "ctx=256")
        assert (cfg.task.train_examples, cfg.task.epochs, cfg.task.mqar_grid[256].batch) == (100000, 64, 256)
    if profile == "cpu":
        assert list(spec.ladder) == ["zoology-d64"] and ctxs == [64, 128]
        cfg = compose_with("task=mqar_zoology", "profile=cpu", "ctx=128")  # Zoology's examples seen once (README)
        assert (cfg.task.train_examples, cfg.task.epochs, cfg.task.mqar_grid[128].batch) == (100000, 1, 64)
