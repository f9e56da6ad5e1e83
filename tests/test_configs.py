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

    from bench.fingerprint import ADDED_WITH_DEFAULTS, config_fingerprint

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
    from bench.fingerprint import config_fingerprint

    short, long = compose(["ctx=2k", "sweep_id=t"]), compose(["ctx=2048", "sweep_id=t"])
    assert short.ctx == 2048 and short.run_name == long.run_name == "transformer-cpu-s-ctx2048"
    assert config_fingerprint(short) == config_fingerprint(long)
    with pytest.raises(UsageError, match="ctx=2q"):
        compose(["ctx=2q"])
    with pytest.raises(UsageError, match="arch=nope"):
        compose(["arch=nope"])


def test_arch_configs_compose_every_option_and_write_only_their_differences():
    """Each default is written once, in the ArchSpec: conf/arch/<name>.yaml starts from arch/options/<name>
    (bench/config.py) and writes no option at its default; the composed config has every option, so any can
    be overridden without `+`; the Table 1 rows differ by the paper's one change per row."""
    import architectures

    def arch(name, *over):
        return OmegaConf.to_container(compose_with(f"arch={name}", *over).arch, resolve=True)

    for path in sorted((CONF / "arch").glob("*.yaml")):
        spec = architectures.get(path.stem)
        written = OmegaConf.to_container(OmegaConf.load(path))
        at_default = {k for k, v in written.items() if k in spec.options and v == spec.options[k]}
        assert not at_default, f"{path.name} repeats the defaults of {sorted(at_default)}"
        composed = arch(path.stem)
        assert set(spec.options) <= set(composed), path.name
    assert arch("ttt_linear", "arch.mini_batch=32", "arch.backend=dual")["mini_batch"] == 32

    def delta(a, b):
        a, b = arch(a), arch(b)
        return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"name"}

    assert delta("table1_3_ttt_equivalence", "table1_4_learnable_w0") == {"learnable_w0"}
    assert delta("table1_4_learnable_w0", "table1_5_ln_residual") == {"inner_ln", "inner_residual", "inner_bias"}
    assert delta("table1_5_ln_residual", "table1_6_mini_batch") == {"mini_batch"}
    assert delta("table1_6_mini_batch", "ttt_linear_base") == {"learnable_lr"}
    assert delta("ttt_linear_base", "ttt_linear") == {"backbone"}


# fingerprints that runs stored before the options moved from the YAMLs into the ArchSpecs and TTT's impl
# and attention's attn_backend became `backend` (computed at commit 2f5ca6f; overrides in their old spelling)
STORED_BEFORE = [
    (["arch=ttt_linear"], "cf601d53cd1f677e"),
    (["arch=ttt_linear", "arch.backend=scan"], "480518dfa7fdd9bc"),  # then backend=torch, impl=scan
    (["arch=ttt_linear", "arch.backend=torch"], "c2167f6933dd67cd"),
    (["arch=ttt_mlp"], "c4fca4281d96d1df"),
    (["arch=transformer", "arch.backend=sdpa"], "abeddd210895ecab"),  # then attn_backend=sdpa
    (["arch=transformer", "task=mqar_zoology", "task.train_examples=10000", "task.epochs=4",  # the CPU budget then
      "task.mqar_grid={64:{batch:16},128:{batch:16},256:{batch:16},512:{batch:16}}", "trainer.early_stop.every=625"],
     "d532b81704181f29"),
    (["arch=transformer_conv"], "7d65d27a85b90470"),
    (["arch=mamba2"], "00ffacaeda88887e"),
    (["arch=mamba", "profile=smoke", "size=smoke-xs"], "d25ea4fb5ac042f7"),
    (["arch=table1_3_ttt_equivalence"], "c62953f33ba3ccc5"),
]


@pytest.mark.parametrize("overrides,stored", STORED_BEFORE, ids=[" ".join(o) for o, _ in STORED_BEFORE])
def test_fingerprints_survive_defaults_leaving_the_yaml_and_renamed_options(overrides, stored):
    """A rerun sweep reuses runs made before this layout (bench/fingerprint.py): same fingerprint."""
    from bench.config import compose
    from bench.fingerprint import config_fingerprint

    assert config_fingerprint(compose([overrides[0], "size=cpu-xs", "ctx=2048", *overrides[1:]])) == stored


def test_the_long_context_rule_counts_in_the_fingerprint_only_where_it_applies():
    """conf/profile/cpu.yaml `long_context` (from 16k): a 2k or 8k run's fingerprint is what it was before the
    rule (the 2k ones are pinned in STORED_BEFORE), a 32k run's changes with the floor it trains under."""
    from bench.config import compose
    from bench.fingerprint import config_fingerprint

    for ctx, applies in ((2048, False), (8192, False), (16384, True), (32768, True)):
        base = compose([f"ctx={ctx}", "sweep_id=t"])
        other = compose([f"ctx={ctx}", "sweep_id=t", "long_context.min_steps=30"])
        assert (config_fingerprint(base) != config_fingerprint(other)) == applies


def test_fingerprint_counts_options_at_their_values_however_written():
    """An option left at its default counts as written out; a changed option changes the fingerprint; an
    option off its default that the first layout did not have still counts."""
    from bench.fingerprint import arch_view

    import architectures

    full = {"name": "mamba", "layer_multiplier": 2, **architectures.get("mamba").options}
    assert arch_view({"name": "mamba", "layer_multiplier": 2}) == arch_view(full)
    assert arch_view({**full, "d_state": 32}) != arch_view(full)
    row = arch_view({"name": "table1_3_ttt_equivalence"})
    assert row["impl"] == "auto" and row["backend"] == "auto" and "base_lr_init" not in row
    assert arch_view({"name": "ttt_linear", "base_lr_init": 0.5})["base_lr_init"] == 0.5
    assert arch_view({"name": "ttt_linear", "backend": "dual"})["impl"] == "dual"
    assert arch_view({"name": "transformer", "backend": "sdpa"})["attn_backend"] == "sdpa"


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


def test_run_configs_written_before_the_renames_still_build_their_models():
    """A run folder's config.yaml from before `backend` replaced attn_backend and TTT's impl (make eval,
    a resumed run) builds the model it trained."""
    from bench.config import with_current_names

    assert with_current_names({"name": "transformer", "attn_backend": "sdpa"}) == {"name": "transformer",
                                                                                    "backend": "sdpa"}
    assert with_current_names({"backend": "torch", "impl": "scan"})["backend"] == "scan"
    assert with_current_names({"backend": "auto", "impl": "dual"})["backend"] == "dual"
    assert with_current_names({"backend": "triton", "impl": "auto"})["backend"] == "triton"
    old = compose_with("arch=ttt_linear", "size=smoke-xs", "ctx=64")
    with open_dict(old):
        old.arch.pop("backend")
        old.arch.impl, old.arch.backend = "dual", "torch"
    assert model_config(old, 257).cfg.options["backend"] == "dual"
