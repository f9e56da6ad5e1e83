"""Training recipes (architectures/recipe.py): each architecture's native recipe (init, norm eps, no-decay
set) against its reference's rules, the shared recipe against the suite's behaviour before recipes, the
config plumbing (conf/recipe -> ModelConfig -> optimizer, summary), and Mamba-2's grouped gated norm
against mamba-ssm's rms_norm_ref."""
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from architectures import ModelConfig, build_model
from architectures import get as get_arch
from architectures import recipe as recipes
from architectures.layers import CausalConv, RMSNorm
from architectures.mamba.layers import GatedRMSNorm
from architectures.recipe import Recipe, no_decay_names
from bench.config import arch_config, model_config
from bench.train import make_optimizer, optimizer_name

sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # as in test_mamba.py
from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
ARCHS = sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))
TRAINER = OmegaConf.create({"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1})


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["sweep_id=test", "results=/tmp/x", *overrides])


def native(arch: str) -> Recipe:
    return Recipe(name="native", **arch_config(arch)["native"])


def tiny(arch: str, recipe: Recipe, d=32, L=2, **opts) -> ModelConfig:
    """A small model of `arch` with the options of conf/arch/<arch>.yaml, on PyTorch backends."""
    o = arch_config(arch)
    for key in ("name", "native", "layer_multiplier"):
        o.pop(key, None)
    o.update({k: v for k, v in {"backend": "sdpa" if arch.startswith("transformer") else "torch"}.items() if k in get_arch(arch).options})
    if arch == "mamba2":
        o.update(headdim=16, d_state=16)
    return ModelConfig(arch, 61, d, L, 2, 2 * d, 64, recipe=recipe, options={**o, **opts})


def built(arch, recipe, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny(arch, recipe, **kw))


# -- the norms ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_is_its_formula_forward_and_backward(dtype, tol):
    """RMSNorm (F.rms_norm) against x / sqrt(mean(x^2) + eps) * weight written out, both in fp32 whatever the
    input's dtype: the output and the gradients of x and the weight."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 48, generator=g) * 0.01).to(dtype).requires_grad_()  # mean(x^2) ~ 1e-4: eps counts
    norm = RMSNorm(48, eps=1e-5).to(torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    x32 = x.float()
    ref = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    dy = torch.randn(out.shape, generator=g).to(dtype)
    ours, theirs = (torch.autograd.grad(o, (x, norm.weight), dy) for o in (out, ref))
    for name, a, b in zip(("out", "dx", "dweight"), (out, *ours), (ref, *theirs)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= tol, name


# -- Mamba-2's grouped gated norm --------------------------------------------------------------

def test_gated_norm_normalises_per_group_as_rms_norm_ref():
    """ngroups 2: each half of d_inner normalised on its own (mamba2.py: group_size = d_ssm // ngroups)."""
    g = torch.Generator().manual_seed(0)
    y, z = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, 64, generator=g)
    y[..., 32:] *= 10  # groups of very different scale: a whole-width norm mixes them
    norm = GatedRMSNorm(64, group_size=32)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    ref = rms_norm_ref(y, norm.weight, None, z=z, eps=1e-5, group_size=32, norm_before_gate=False)
    assert (norm(y, z) - ref).abs().max() < 1e-5 * ref.abs().max()
    whole = rms_norm_ref(y, norm.weight, None, z=z, eps=1e-5, group_size=None, norm_before_gate=False)
    assert (whole - ref).abs().max() > 0.1  # the test tells the grouped norm from the old one


def test_mamba2_mixer_norms_by_its_groups():
    model = built("mamba2", Recipe(), ngroups=2)  # D = 64, 4 heads of 16, 2 groups
    norm = model.blocks[0].mixer.norm
    assert norm.group_size == 32 and norm.eps == 1e-5
    with pytest.raises(ValueError, match="does not divide"):
        GatedRMSNorm(64, group_size=24)


# -- init ---------------------------------------------------------------------------------------

def _std(t):
    return t.detach().float().std().item()


def test_native_mamba_init_is_mamba_ssms():
    """PyTorch's default Linear init, out_proj rescaled by 1/sqrt(n_layer), embedding N(0, 0.02)
    (mixer_seq_simple.py _init_weights); shared: N(0, 0.02) everywhere."""
    d, L = 96, 8
    D = 2 * d
    nat, shr = built("mamba", native("mamba"), d=d, L=L), built("mamba", Recipe(), d=d, L=L)
    out_bound = 1 / math.sqrt(D) / math.sqrt(L)  # U(+-1/sqrt(fan_in)) / sqrt(L)
    for block in nat.blocks:
        w = block.mixer.out_proj.weight
        assert w.abs().max() <= out_bound and _std(w) == pytest.approx(out_bound / math.sqrt(3), rel=0.05)
        w = block.mixer.in_proj.weight
        assert w.abs().max() <= 1 / math.sqrt(d) and _std(w) == pytest.approx(1 / math.sqrt(3 * d), rel=0.05)
    ratio = _std(torch.cat([b.mixer.out_proj.weight.flatten() for b in shr.blocks])) / \
        _std(torch.cat([b.mixer.out_proj.weight.flatten() for b in nat.blocks]))
    assert ratio == pytest.approx(0.02 / (out_bound / math.sqrt(3)), rel=0.05)  # 6.6x at 24 x 768
    for m in (nat, shr):
        assert _std(m.embed.weight) == pytest.approx(0.02, rel=0.05)
    assert _std(shr.blocks[0].mixer.in_proj.weight) == pytest.approx(0.02, rel=0.05)
    # what each mixer draws for itself is the same in both recipes
    assert torch.equal(nat.blocks[0].mixer.A_log, shr.blocks[0].mixer.A_log)
    assert torch.equal(nat.blocks[0].mixer.D, torch.ones_like(nat.blocks[0].mixer.D))


def test_native_mamba2_rescales_out_proj():
    L = 6
    m = built("mamba2", native("mamba2"), d=64, L=L)
    w = m.blocks[0].mixer.out_proj.weight  # (d, D)
    assert w.abs().max() <= 1 / math.sqrt(w.shape[1]) / math.sqrt(L)


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp"])
def test_native_ttt_init_is_ttt_lm_jaxs(arch):
    """Convs as flax nn.Conv (lecun_normal, zero bias), TTT-MLP's W2_0 ~ N(0, 0.02 / sqrt(2 L)), the rest
    N(0, 0.02) as in the shared recipe (ttt/models/ttt_layer.py, model.py)."""
    d, L = 64, 4
    nat, shr = built(arch, native(arch), d=d, L=L), built(arch, Recipe(), d=d, L=L)
    convs = [m for m in nat.modules() if isinstance(m, CausalConv)]
    assert len(convs) == 3 * L
    w = torch.cat([c.weight.flatten() for c in convs])
    assert _std(w) == pytest.approx(0.5, rel=0.08) and w.abs().max() <= 2 * 0.5 / recipes.TRUNCATED_STD
    assert all(torch.all(c.bias == 0) for c in convs)
    assert all(torch.any(m.bias != 0) for m in shr.modules() if isinstance(m, CausalConv))  # PyTorch's default
    for model in (nat, shr):
        layer = model.blocks[0].ttt
        assert _std(layer.wq.weight) == pytest.approx(0.02, rel=0.1)
        assert _std(layer.lr_gate.weight) == pytest.approx(0.02, rel=0.2) and torch.all(layer.lr_gate.bias == 0)
        assert _std(layer.W if arch == "ttt_linear" else layer.W1) == pytest.approx(0.02, rel=0.1)
    if arch == "ttt_mlp":
        assert _std(nat.blocks[0].ttt.W2) == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.1)
        assert _std(shr.blocks[0].ttt.W2) == pytest.approx(0.02, rel=0.1)


def test_native_transformer_is_the_shared_recipe():
    """ttt-lm-jax's Transformer: N(0, 0.02) everywhere, eps 1e-6, decay on everything: the same model."""
    a, b = built("transformer", native("transformer"), seed=3), built("transformer", Recipe(), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert native("transformer").no_decay == () and native("transformer").norm_eps == 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_recipe_is_the_init_before_recipes(arch, monkeypatch):
    """recipe=shared reproduces the shell's init from before recipes exactly: N(0, 0.02) on every
    nn.Linear and nn.Embedding, Linear biases 0, in nn.Module.apply's order (so the same draws)."""
    def before(model, cfg):
        def rule(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        model.apply(rule)

    for tied in (True, False):
        cfg = replace(tiny(arch, Recipe()), tie_embeddings=tied)
        torch.manual_seed(0)
        new = build_model(cfg)
        with monkeypatch.context() as mp:
            mp.setattr(recipes, "init_weights", before)
            torch.manual_seed(0)
            old = build_model(cfg)
        assert new.state_dict().keys() == old.state_dict().keys()
        assert all(torch.equal(new.state_dict()[k], old.state_dict()[k]) for k in new.state_dict())


# -- norm eps -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("choice", ["native", "shared"])
def test_recipe_eps_reaches_every_norm(arch, choice):
    """From the composed config (conf/recipe/<choice>.yaml) to every RMSNorm of the model; the norms inside
    a layer keep their reference's eps (Mamba-2's gated norm 1e-5, TTT's LayerNorms 1e-6)."""
    cfg = compose_with(f"arch={arch}", f"recipe={choice}", "size=smoke-xs", "match=params")
    mcfg = model_config(cfg, vocab_size=61).cfg
    want = {"native": {"mamba": 1e-5, "mamba2": 1e-5}.get(arch, 1e-6), "shared": 1e-6}[choice]
    assert mcfg.recipe.name == choice and mcfg.norm_eps == want
    model = build_model(mcfg)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) >= mcfg.n_layers + 1 and {m.eps for m in norms} == {want}
    assert {m.eps for m in model.modules() if isinstance(m, GatedRMSNorm)} <= {1e-5}
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} <= {1e-6}


def test_configs_without_a_recipe_get_the_shared_one():
    """Run configs written before recipes existed (their config.yaml has no `recipe`) trained with the shared one."""
    written = OmegaConf.to_container(compose_with("arch=mamba", "size=smoke-xs", "match=params"), resolve=True)
    del written["recipe"], written["arch"]["native"]
    assert model_config(OmegaConf.create(written), vocab_size=61).cfg.recipe == Recipe()


# -- weight decay and lr multipliers ------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_native_mamba_no_decay_set(arch):
    model = built(arch, native(arch))
    own = ("A_log", "D", "dt_bias", "conv.bias")
    want = {"embed.weight"} | {f"blocks.{i}.mixer.{n}" for i in range(2) for n in own}
    assert set(no_decay_names(model, model.cfg.recipe)) == want
    opt = make_optimizer(model, TRAINER)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    named = dict(model.named_parameters())
    assert by_wd[0.0] == {id(named[n]) for n in want}
    assert by_wd[0.1] == {id(p) for n, p in named.items() if n not in want}


@pytest.mark.parametrize("arch", ["transformer", "ttt_linear", "ttt_mlp_base", "mamba", "mamba2"])
def test_shared_recipe_decays_every_parameter_in_one_group(arch):
    """As before recipes: AdamW(model.parameters(), weight_decay=0.1), the same parameters in the same order."""
    model = built(arch, Recipe())
    (group,) = make_optimizer(model, TRAINER).param_groups
    assert group["weight_decay"] == 0.1 and group["lr_mult"] == 1.0
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_native_ttt_decays_every_parameter():
    model = built("ttt_linear", native("ttt_linear"))
    (group,) = make_optimizer(model, TRAINER).param_groups
    assert group["weight_decay"] == 0.1 and len(group["params"]) == len(list(model.parameters()))


def _group_names(model, opt) -> list[list[str]]:
    """The names of each optimizer group's parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def test_the_fused_optimizer_steps_as_adamw_one_parameter_at_a_time():
    """make_optimizer's fused AdamW (the fast path) against PyTorch's per-parameter loop (the plain reference),
    with the native recipe's two weight decays and an lr multiplier, over three steps."""
    r = Recipe(no_decay=("D",), lr_mult={"A_log": 0.5})
    model = built("mamba", r)
    ref_model = built("mamba", r)
    ref_model.load_state_dict(model.state_dict())
    opt = make_optimizer(model, TRAINER)
    assert opt.defaults["fused"] and optimizer_name(opt) == "adamw (fused)"
    ref_params, names = dict(ref_model.named_parameters()), _group_names(model, opt)
    ref = torch.optim.AdamW([{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
                              "params": [ref_params[n] for n in group]} for g, group in zip(opt.param_groups, names)])
    assert optimizer_name(ref) == "adamw" and not any(g["fused"] or g["foreach"] for g in ref.param_groups)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m in (model, ref_model):
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.clone()
        opt.step()
        ref.step()
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, p_ref, rtol=1e-5, atol=1e-7), name


def test_lr_multipliers_get_groups_of_their_own():
    r = Recipe(no_decay=("D",), lr_mult={"A_log": 0.5})
    model = built("mamba", r)
    groups = make_optimizer(model, TRAINER).param_groups
    named = {id(p): n for n, p in model.named_parameters()}
    half = [g for g in groups if g["lr_mult"] == 0.5]
    assert len(half) == 1 and {named[id(p)].rsplit(".", 1)[1] for p in half[0]["params"]} == {"A_log"}
    assert sum(len(g["params"]) for g in groups) == len(named)
    with pytest.raises(ValueError, match="init must be one of"):
        Recipe(init="xavier")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        Recipe.from_dict({"init": "normal", "wd": 0})


# -- the run summary ----------------------------------------------------------------------------

def test_summary_records_the_recipe(tmp_path, monkeypatch):
    """A whole (tiny) run with recipe=shared over the native default: summary.json and config.yaml say so."""
    import bench.run

    choice = "shared"

    monkeypatch.setattr(bench.run, "latency_probe", lambda *a, **k: {})  # the prefill/decode timing: not needed here
    cfg = compose_with("arch=mamba", f"recipe={choice}", "profile=smoke", "size=smoke-xs", "logger=none",
                       "ctx=64", "trainer.tokens=512", "trainer.batch_tokens=256", "task.eval_tokens=256",
                       "trainer.quiet=true", "trainer.compile=none", "trainer.thread_governor=false")
    summary = bench.run.run(cfg, tmp_path / choice)
    assert summary["status"] == "ok", summary.get("error")
    assert summary["recipe"] == choice
    written = OmegaConf.load(tmp_path / choice / "config.yaml")
    assert written.recipe.name == choice and written.recipe.norm_eps == 1e-6 and written.arch.native.norm_eps == 1e-5
