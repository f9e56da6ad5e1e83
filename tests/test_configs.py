"""Every option of every config group composes, and every size makes a valid model config."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from architectures import ModelConfig
from bench.config import model_config

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["arch", "recipe", "size", "task", "data", "trainer", "logger", "profile"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_composes(group, option):
    cfg = compose_with(f"{group}={option}", "sweep_id=test", "results=/tmp/x")
    OmegaConf.resolve(cfg)  # every interpolation resolves
    path = CONF / group / f"{option}.yaml"
    raw = OmegaConf.load(path)
    is_global = "@package _global_" in path.read_text().split("\n", 1)[0]
    target = cfg if is_global else cfg[group]  # where the option's keys land
    missing = [k for k in raw if k != "defaults" and k not in target]
    assert not missing, f"{path.name}: {missing} not in the composed config"
    if "name" in raw and not is_global:
        assert target.name == raw.name, f"{group}={option} composed as {target.name}"
    if is_global and group == "profile":
        assert cfg.profile == option
    mc = model_config(cfg, vocab_size=257).cfg
    assert isinstance(mc, ModelConfig) and mc.head_dim * mc.n_heads == mc.d_model


def test_profiles_name_sizes_that_exist():
    sizes = {p.stem for p in (CONF / "size").glob("*.yaml")}
    for p in (CONF / "profile").glob("*.yaml"):
        ladder = OmegaConf.load(p).ladder
        assert 2 <= len(ladder) <= 4 and set(ladder) <= sizes, p.name


def test_paper_sizes_match_table_3():
    expect = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 32)}
    for name, (L, d, H) in expect.items():
        s = OmegaConf.load(CONF / "size" / f"{name}.yaml")
        assert (s.n_layers, s.d_model, s.n_heads, s.batch_tokens) == (L, d, H, 524288)


def test_options_added_at_their_defaults_leave_run_fingerprints_unchanged():
    """ffn, arch_options, arch.positions, trainer.early_stop and the long-QA protocol options came after runs were
    fingerprinted: at their defaults they hash as if absent (a rerun sweep still reuses those runs)."""
    from omegaconf import open_dict

    from bench.run import ADDED_WITH_DEFAULTS, config_fingerprint

    for task in ("lm", "mqar"):
        cfg = compose_with(f"task={task}", "sweep_id=t", "results=/tmp/x")
        before = OmegaConf.create(OmegaConf.to_container(cfg))
        with open_dict(before):
            for path, _ in ADDED_WITH_DEFAULTS:
                *parents, key = path.split(".")
                node = before
                for p in parents:
                    node = node[p]
                node.pop(key, None)
        assert config_fingerprint(cfg) == config_fingerprint(before)
        assert config_fingerprint(compose_with(f"task={task}", "sweep_id=t", "results=/tmp/x", "ffn=false")) \
            != config_fingerprint(cfg)


def test_ctx_is_parsed_by_the_config_path_the_app_and_the_tools_share():
    """`python -m bench.run ctx=2k` (bench.run's main normalizes as compose does) is the run ctx=2048 is: the
    same fingerprint, folder name and model."""
    from bench.config import UsageError, compose
    from bench.run import config_fingerprint

    short, long = compose(["ctx=2k", "sweep_id=t"]), compose(["ctx=2048", "sweep_id=t"])
    assert short.ctx == 2048 and short.run_name == long.run_name == "transformer-cpu-s-ctx2048"
    assert config_fingerprint(short) == config_fingerprint(long)
    with pytest.raises(UsageError, match="ctx=2q"):
        compose(["ctx=2q"])
    with pytest.raises(UsageError, match="arch=nope"):
        compose(["arch=nope"])


def test_arch_configs_that_build_on_a_base_write_only_their_differences():
    """conf/arch/base/: the TTT layer's options once; each TTT arch and Table 1 row composes them with its own
    changes (a row's change is the paper's: row 4 = row 3 + learnable W0, ...)."""
    def arch(name):
        return OmegaConf.to_container(compose_with(f"arch={name}").arch, resolve=True)

    base = OmegaConf.to_container(OmegaConf.load(CONF / "arch" / "base" / "ttt.yaml"))
    for name in ("ttt_linear", "ttt_mlp", "ttt_linear_base", "ttt_mlp_base", "table1_3_ttt_equivalence"):
        assert set(base) <= set(arch(name)), name

    def delta(a, b):
        a, b = arch(a), arch(b)
        return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"name"}

    assert delta("table1_3_ttt_equivalence", "table1_4_learnable_w0") == {"learnable_w0"}
    assert delta("table1_4_learnable_w0", "table1_5_ln_residual") == {"inner_ln", "inner_residual", "inner_bias"}
    assert delta("table1_5_ln_residual", "table1_6_mini_batch") == {"mini_batch"}
    assert delta("ttt_linear_base", "ttt_linear") == {"backbone"}


def test_every_task_config_names_a_registered_runner():
    """Tasks register like architectures (tasks/registry.py): each conf/task preset's runner exists, and an
    unknown one fails with the list."""
    import tasks

    for path in sorted((CONF / "task").glob("*.yaml")):
        raw = OmegaConf.load(path)
        assert str(raw.get("runner", raw.name)) in tasks.names(), path.name
    cfg = compose_with("task=lm")
    with open_dict(cfg):
        cfg.task.runner = "nope"
    with pytest.raises(ValueError, match="unknown task runner 'nope'; available: classification, lm, longqa"):
        tasks.build_task(cfg, 64)
