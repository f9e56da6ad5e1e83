"""Training recipes: how a model is initialised, which eps its norms use, which parameters AdamW decays,
and any per-parameter lr multipliers.

`recipe=native` (the default; conf/recipe/native.yaml) trains each architecture as its reference code
does, from the `native:` block of conf/arch/<arch>.yaml, which names the reference files it follows:
Transformer++ and TTT the TTT paper's JAX code (test-time-training/ttt-lm-jax), Mamba and Mamba-2
mamba-ssm (state-spaces/mamba). `recipe=shared` (conf/recipe/shared.yaml) trains every architecture
with one recipe: N(0, 0.02) for every linear and embedding, eps 1e-6, weight decay on every parameter
(the TTT paper's, applied to all: what the suite did before recipes). The optimizer itself (AdamW
0.9/0.95, wd 0.1, clip 1.0, warmup + cosine) is the same under both (conf/trainer, bench/train.py).

Fields of a recipe:
  init       the init scheme (below), applied by `init_weights` once the model is built
  init_std   the std of its normal draws
  norm_eps   eps of every RMSNorm on the residual stream (each block's pre-norms, TTT's conv norm, the
             final norm). Norms inside a layer keep their reference's eps in both recipes: Mamba-2's
             gated RMSNorm 1e-5 (mamba_ssm/modules/mamba2.py), TTT's inner and post LayerNorms 1e-6
             (flax nn.LayerNorm's default, ttt/models/ttt_layer.py).
  no_decay   parameter names AdamW does not decay: a name matches a parameter whose dotted name equals it
             or ends with "." + it ("D" matches blocks.3.mixer.D, "conv.bias" every Mamba conv bias)
  lr_mult    {name: m}: parameters matching name (the same rule) train at m x the scheduled lr

Init schemes. Every scheme keeps what the modules draw for themselves at construction: Mamba's dt_proj,
dt_bias, A_log and D (mamba_simple.py / mamba2.py's inits), norm weights 1, TTT's LN scales 1 and
biases 0, token offset 0, W0 ~ N(0, init_std).
  normal     every nn.Linear and nn.Embedding weight ~ N(0, init_std), Linear biases 0; depthwise convs
             keep PyTorch's default (weight and bias U(+-1/sqrt(k))). The shared recipe.
  ttt_jax    ttt-lm-jax's initialisers: every Dense and the embedding N(0, initializer_range) as in
             `normal`; the depthwise convs of architectures/layers.py as flax nn.Conv's default
             (lecun_normal: truncated normal with std 1/sqrt(fan_in), fan_in = k for a depthwise kernel;
             bias 0); TTT-MLP's W2_0 ~ N(0, init_std / sqrt(2 L)) (ttt/models/ttt_layer.py, TTTMLPBase;
             drawn by TTTLayer itself).
  mamba_ssm  mamba-ssm's `_init_weights` (mamba_ssm/models/mixer_seq_simple.py): nn.Linear weights keep
             PyTorch's default (kaiming_uniform(a=sqrt 5): U(+-1/sqrt(fan_in))), Linear biases 0, the
             embedding N(0, initializer_range); every `out_proj` weight is drawn the same way again and
             divided by sqrt(n_residuals_per_layer x n_layer), with one residual branch per block (no MLP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable

import torch
import torch.nn as nn

from architectures.layers import CausalConv

INIT_SCHEMES = ("normal", "ttt_jax", "mamba_ssm")
RECIPE_FIELDS = ("name", "init", "init_std", "norm_eps", "no_decay", "lr_mult")


@dataclass(frozen=True)
class Recipe:
    """A training recipe (module docstring). The defaults are the shared one."""

    name: str = "shared"
    init: str = "normal"
    init_std: float = 0.02
    norm_eps: float = 1e-6
    no_decay: tuple[str, ...] = ()
    lr_mult: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"recipe init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if not (float(self.init_std) > 0 and float(self.norm_eps) > 0):
            raise ValueError(f"recipe init_std and norm_eps must be positive, got {self.init_std}, {self.norm_eps}")
        if any(float(m) <= 0 for m in self.lr_mult.values()):
            raise ValueError(f"recipe lr_mult values must be positive, got {self.lr_mult}")
        object.__setattr__(self, "init_std", float(self.init_std))
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        object.__setattr__(self, "no_decay", tuple(str(n) for n in self.no_decay))
        object.__setattr__(self, "lr_mult", {str(k): float(v) for k, v in self.lr_mult.items()})

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        unknown = set(d) - set(RECIPE_FIELDS)
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}; a recipe has {RECIPE_FIELDS}")
        return cls(**{k: (v if v is not None else getattr(cls(), k)) for k, v in d.items()})


# -- init ---------------------------------------------------------------------------------------

def init_weights(model: nn.Module, cfg) -> None:
    """Apply cfg.recipe's init scheme to a freshly built model (post-order over modules, as nn.Module.apply)."""
    model.apply(partial(_init_module, recipe=cfg.recipe, n_layers=cfg.n_layers))


def _init_module(m: nn.Module, recipe: Recipe, n_layers: int) -> None:
    std, scheme = recipe.init_std, recipe.init
    if isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=std)
    elif isinstance(m, nn.Linear):
        if scheme != "mamba_ssm":  # mamba_ssm: PyTorch's default, drawn at construction
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, CausalConv) and scheme == "ttt_jax":
        lecun_normal_(m.weight, fan_in=m.width)
        nn.init.zeros_(m.bias)
    if scheme == "mamba_ssm" and isinstance(getattr(m, "out_proj", None), nn.Linear):
        w = m.out_proj.weight
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        with torch.no_grad():
            w /= math.sqrt(1 * n_layers)  # n_residuals_per_layer = 1: a Mamba block has no MLP


TRUNCATED_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2] (jax.nn.initializers)


def lecun_normal_(w: torch.Tensor, fan_in: int) -> torch.Tensor:
    """jax.nn.initializers.lecun_normal: a normal truncated at 2 of its stds, rescaled so that the result
    has std sqrt(1 / fan_in)."""
    s = math.sqrt(1.0 / fan_in) / TRUNCATED_STD
    return nn.init.trunc_normal_(w, mean=0.0, std=s, a=-2 * s, b=2 * s)


# -- optimizer groups ---------------------------------------------------------------------------

def matches(name: str, patterns: Iterable[str]) -> bool:
    """`name` (dotted) equals a pattern or ends with "." + pattern."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def param_groups(model: nn.Module, recipe: Recipe, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of `model` under `recipe`: weight decay 0 for `no_decay`, and `lr_mult` on
    each group (the training loop sets a group's lr to lr_mult x the scheduled lr). Parameters keep the
    order of model.parameters() within a group; under the shared recipe there is one group of them all."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if matches(name, recipe.no_decay) else float(weight_decay)
        mult = next((m for pat, m in recipe.lr_mult.items() if matches(name, (pat,))), 1.0)
        groups.setdefault((wd, mult), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_mult": mult} for (wd, mult), ps in groups.items()]


def no_decay_names(model: nn.Module, recipe: Recipe) -> list[str]:
    """The names of the parameters `recipe` leaves undecayed (for tests and inspection)."""
    return [n for n, _ in model.named_parameters() if matches(n, recipe.no_decay)]
