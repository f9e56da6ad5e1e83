"""Model sizes matched to a reference Transformer, by parameters or by training FLOPs.

A size (conf/size/*.yaml) names the reference: the Transformer++ with its (layers, d_model, heads,
ffn). Every architecture is sized against it by one of two rules:

  match=params   the papers' protocol: the same dimensions (TTT adds ~0.3% for its gates and convs),
                 and Mamba / Mamba-2 with twice the layers (`layer_multiplier` in conf/arch), which
                 brings a block without FFN to about the Transformer's parameters.
  match=flops    equal compute: keep the layer count of `match=params` and solve the width so that the
                 training FLOPs per token at the run's context T equal the reference's within 2%
                 (architectures/accounting.py has the counts). Head dims stay valid: Transformer and
                 TTT keep the reference's head count with an even head dim, and the FFN width (kept
                 near the reference's ffn/d ratio) takes up the remainder; without FFNs (ffn=false) the
                 head dim alone, which may miss 2% at small sizes (then a SizingError says so); Mamba's
                 width is any integer; Mamba-2 keeps whole heads of the reference's head size (d_inner
                 near expand x d).

The reference has the run's head (tied or not) and FFN setting (ffn=false: every block without one).

At long context the Transformer's attention dominates its FLOPs, so FLOP-matched recurrent models
are wider than the reference: that is the comparison "at equal compute" means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from architectures.accounting import Counts
from architectures.config import ModelConfig
from architectures.recipe import Recipe
from architectures.registry import get

MATCH_RULES = ("params", "flops")
FLOPS_TOLERANCE = 0.02  # match=flops: |train FLOPs / reference's - 1| must be below this
REFERENCE_ARCH = "transformer"


class SizingError(ValueError):
    pass


@dataclass(frozen=True)
class SizeSpec:
    """The reference Transformer of a size, as conf/size/*.yaml gives it."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    ffn_dim: int

    @classmethod
    def from_dict(cls, s) -> "SizeSpec":
        return cls(str(s["name"]), int(s["n_layers"]), int(s["d_model"]), int(s["n_heads"]), int(s["ffn_dim"]))


@dataclass(frozen=True)
class Sized:
    """An architecture's resolved model config at a size, with its counts and the reference's."""

    cfg: ModelConfig
    counts: Counts
    reference: Counts
    match: str

    @property
    def flops_ratio(self) -> float:
        return self.counts.train_flops / self.reference.train_flops

    @property
    def heads(self) -> int | None:
        """Attention / TTT heads, Mamba-2's SSM heads, None for Mamba (no heads)."""
        rule = _family(self.cfg.arch)
        if rule != "mamba2":
            return None if rule == "mamba" else self.cfg.n_heads
        from architectures.mamba.layers import head_dim_for

        return self.d_inner // head_dim_for(self.d_inner, int(self.cfg.opt("headdim")))

    @property
    def d_inner(self) -> int | None:
        """The Mamba / Mamba-2 mixer's inner width D; None for the others."""
        family = _family(self.cfg.arch)
        if family == "heads_ffn":
            return None
        if family == "mamba2":
            from architectures.mamba.layers import mamba2_inner_width

            return mamba2_inner_width(self.cfg)
        return int(self.cfg.opt("expand")) * self.cfg.d_model

    def row(self) -> dict:
        """The resolved dimensions and counts, as written to summaries and sizes.csv."""
        c = self.cfg
        return {"arch": c.arch, "match": self.match, "vocab": c.vocab_size, "layers": c.n_layers,
                "d_model": c.d_model, "heads": self.heads,
                "ffn_dim": c.ffn_dim if _family(c.arch) == "heads_ffn" and c.ffn else None,
                "d_inner": self.d_inner,
                **self.counts.row(),
                "ref_train_flops_per_token": self.reference.train_flops, "flops_vs_ref": self.flops_ratio,
                "params_vs_ref": self.counts.params / self.reference.params}


def _family(arch: str) -> str:
    """How an architecture's width scales (its ArchSpec's width_rule): heads x head dim plus an FFN, or a
    Mamba / Mamba-2 mixer."""
    return get(arch).width_rule


def reference_config(size: SizeSpec, ctx: int, vocab: int, tie_embeddings: bool = True,
                     ffn: bool = True) -> ModelConfig:
    return ModelConfig(arch=REFERENCE_ARCH, vocab_size=vocab, d_model=size.d_model, n_layers=size.n_layers,
                       n_heads=size.n_heads, ffn_dim=size.ffn_dim, max_seq_len=ctx, tie_embeddings=tie_embeddings,
                       ffn=ffn)


def size_model(arch: str, options: dict, size: SizeSpec, ctx: int, vocab: int, match: str,
               tie_embeddings: bool = True, recipe: Recipe | None = None, ffn: bool = True) -> Sized:
    """The model config of `arch` (with its conf/arch options) at `size`, matched by `match`; the LM
    head tied to the embedding or not and every block with or without its FFN (the same for the
    reference); trained by `recipe` (None: the shared one; architectures/recipe.py), which changes no count."""
    if match not in MATCH_RULES:
        raise SizingError(f"match must be one of {', '.join(MATCH_RULES)}; got {match!r}")
    spec = get(arch)  # raises UnknownArchitecture with the list of names
    options = dict(options)
    options.pop("native", None)  # the arch's native training recipe (conf/recipe/native.yaml reads it), not an option
    n_layers = size.n_layers * int(options.pop("layer_multiplier", 1) or 1)
    spec.check_options(options)
    ref_cfg = reference_config(size, ctx, vocab, tie_embeddings, ffn)
    reference = get(REFERENCE_ARCH).count(ref_cfg, ctx)
    same = replace(ref_cfg, arch=arch, n_layers=n_layers, options=options, recipe=recipe or Recipe())
    if match == "params" or arch == REFERENCE_ARCH:
        return Sized(same, spec.count(same, ctx), reference, match)
    target = reference.train_flops
    candidates = {"heads_ffn": _heads_ffn_candidates, "mamba": _mamba_candidates,
                  "mamba2": _mamba2_candidates}[_family(arch)](same, size, target, ctx)
    best = _pick(candidates, target, ctx)
    if best is None or abs(spec.count(best, ctx).train_flops / target - 1) > FLOPS_TOLERANCE:
        raise SizingError(f"no {arch} width at size {size.name} matches the reference's {target:.4g} training "
                          f"FLOPs/token at ctx={ctx} within {FLOPS_TOLERANCE:.0%} (at this size its fixed costs, "
                          f"e.g. Mamba-2's d_state 128, exceed the Transformer's); use match=params (MATCH=params)")
    return Sized(best, spec.count(best, ctx), reference, match)


def _pick(candidates: list[tuple[ModelConfig, float]], target: float, ctx: int) -> ModelConfig | None:
    """Among the configs within a quarter of the tolerance, the one whose shape is closest to the
    reference's (penalty 0 = same ratios); otherwise the closest in FLOPs."""
    scored = []
    for cfg, penalty in candidates:
        err = abs(get(cfg.arch).count(cfg, ctx).train_flops / target - 1)
        scored.append((err > FLOPS_TOLERANCE / 4, penalty if err <= FLOPS_TOLERANCE / 4 else err, err, cfg))
    if not scored:
        return None
    return min(scored, key=lambda s: s[:3])[3]


def _width_range(d_ref: int) -> range:
    return range(8, 16 * d_ref + 1)


def _heads_ffn_candidates(same: ModelConfig, size: SizeSpec, target: float, ctx: int):
    """d = heads x head dim: a multiple of 8 from head dim 64 up (kernel-friendly), else even (RoPE
    rotates pairs; finer steps for the small sizes); the FFN width (a multiple of 8, within 4x of the
    reference's ffn/d ratio, the closest such) solved from the FLOPs, which are linear in it."""
    count, H, ratio = get(same.arch).count, size.n_heads, size.ffn_dim / size.d_model
    f_ref = size.d_model // H
    step = 8 if f_ref >= 64 and f_ref % 8 == 0 else 2
    out = []
    for f in range(step, 16 * f_ref + 1, step):
        d = H * f
        if not same.ffn:  # the width alone; `_pick` takes the closest in FLOPs
            out.append((replace(same, d_model=d), 0.0))
            continue
        lo, hi = (count(replace(same, d_model=d, ffn_dim=w), ctx).train_flops for w in (8, 16))
        ffn = 8 + (target - lo) / ((hi - lo) / 8)
        ffn = max(8, 8 * round(ffn / 8))
        if ratio * d / 4 <= ffn <= 4 * ratio * d:
            out.append((replace(same, d_model=d, ffn_dim=ffn), abs(math.log(ffn / (ratio * d)))))
    return out


def _mamba_candidates(same: ModelConfig, size: SizeSpec, target: float, ctx: int):
    """Any integer width; no heads (n_heads 1 keeps ModelConfig's divisibility check trivially true)."""
    return [(replace(same, d_model=d, n_heads=1), 0.0) for d in _width_range(size.d_model)]


def _mamba2_candidates(same: ModelConfig, size: SizeSpec, target: float, ctx: int):
    """d_inner = whole heads of the reference's head size; for each, the width d solved from the FLOPs
    (linear in d at fixed d_inner), kept within 2x of d_inner / expand."""
    from architectures.mamba.layers import head_dim_for

    count = get(same.arch).count
    expand = int(same.opt("expand"))
    P = head_dim_for(expand * size.d_model, int(same.opt("headdim")))
    out = []
    for D in range(P, 16 * expand * size.d_model + 1, P):
        at = lambda d: count(replace(same, d_model=d, n_heads=1, options={**same.options, "d_inner": D}), ctx).train_flops
        lo, hi = at(P), at(2 * P)
        d = round(P + (target - lo) / ((hi - lo) / P))
        if D / (2 * expand) <= d <= 2 * D / expand:
            out.append((replace(same, d_model=d, n_heads=1, options={**same.options, "d_inner": D}),
                        abs(math.log(D / (expand * d)))))
    return out
