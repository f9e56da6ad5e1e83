"""A run's config fingerprint: which finished runs a rerun sweep reuses (bench/run.py), which runs
`make paper` finds (bench/paper.py), which checkpoint a run may resume (bench/train.py).

The fingerprint is the sha256 of the resolved config, less what changes how a run is carried out but not
what it computes, and written so that edits which leave the computation alone leave it alone too:
  - settings added after runs were fingerprinted are left out at their old behaviour (ADDED_WITH_DEFAULTS);
  - the profile's long-context rule counts only at the contexts it applies to (`long_context.from_ctx` on);
  - an architecture's options count at their values whether its YAML writes them or leaves them at the
    architecture's default (architectures/registry.py ArchSpec.options), in the layout the YAMLs had when
    fingerprints began (V1_ARCH_KEYS), with renamed options under their first names (`_first_names`).
"""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

import architectures
from bench.config import long_context_at

# settings that change how a run is carried out, not what it computes: a run that differs only in
# these is the same run (a rerun sweep reuses or resumes it)
NOT_IN_FINGERPRINT = {"sweep_id", "results", "logger", "variant"}  # variant: a label of values that count
TRAINER_NOT_IN_FINGERPRINT = {"quiet", "resume", "ckpt_every", "ckpt_every_s", "log_every", "threads",
                              "thread_governor", "parallel"}

# settings added after runs were fingerprinted: at these values (what every run before them did) they are
# left out, so finished runs of an earlier sweep are still reused. (dotted path, value)
ADDED_WITH_DEFAULTS = (("ffn", True), ("arch_options", {}), ("arch.positions", "rope"), ("trainer.early_stop", None),
                       ("task.mqar_format", "suite"), ("task.mqar_grid", None), ("task.train_examples", None),
                       ("task.epochs", None), ("task.dev_examples", 0))

# The option keys each architecture's conf/arch YAML wrote when fingerprints began, every default included.
# They count at their values (the YAML's, else the default); an option outside them counts where it is off
# its default. An architecture not listed counts all its options.
_TTT_KEYS = ("inner", "backbone", "mini_batch", "base_lr", "conv_width", "rope_theta", "backend", "impl",
             "checkpoint_group")
_TTT_ROW_KEYS = (*_TTT_KEYS, "learnable_lr", "learnable_w0", "inner_ln", "inner_residual", "inner_bias")
_LINEAR_ATTENTION_KEYS = ("feature_map", "normalizer", "chunk_size", "rope_theta")
V1_ARCH_KEYS = {
    "mamba": ("d_state", "expand", "d_conv", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "dt_scale", "chunk_size",
              "backend", "layer_multiplier"),
    "mamba2": ("d_state", "expand", "d_inner", "headdim", "ngroups", "d_conv", "chunk_size", "dt_min", "dt_max",
               "dt_init_floor", "A_init_range", "backend", "layer_multiplier"),
    "table1_1_linear_attention": _LINEAR_ATTENTION_KEYS,
    "table1_2_linear_attention_improved": _LINEAR_ATTENTION_KEYS,
    "table1_3_ttt_equivalence": _TTT_ROW_KEYS,
    "table1_4_learnable_w0": _TTT_ROW_KEYS,
    "table1_5_ln_residual": _TTT_ROW_KEYS,
    "table1_6_mini_batch": _TTT_ROW_KEYS,
    "transformer": ("attn_backend", "rope_theta", "positions"),
    "transformer_conv": ("attn_backend", "rope_theta", "positions", "short_conv"),
    "ttt_linear": _TTT_KEYS,
    "ttt_linear_base": _TTT_KEYS,
    "ttt_mlp": (*_TTT_KEYS, "base_lr_init"),
    "ttt_mlp_base": (*_TTT_KEYS, "base_lr_init"),
}
_TTT_TORCH_BACKENDS = ("scan", "dual", "reference")  # first written backend=torch, impl=<name>


def config_fingerprint(cfg: DictConfig) -> str:
    """sha256 (16 hex digits) of the resolved config as the module docstring says."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IN_FINGERPRINT:
        plain.pop(key, None)
    for key in TRAINER_NOT_IN_FINGERPRINT:
        plain.get("trainer", {}).pop(key, None)
    if "long_context" in plain and long_context_at(plain["long_context"], int(plain["ctx"])) is None:
        del plain["long_context"]  # below its from_ctx it changes nothing
    if isinstance(plain.get("arch"), dict):
        plain["arch"] = arch_view(plain["arch"])
    for path, default in ADDED_WITH_DEFAULTS:
        *parents, key = path.split(".")
        node = plain
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] == default:
            del node[key]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arch_view(arch: dict) -> dict:
    """The arch section as the fingerprint counts it: `name`, `native` and any key the architecture does not
    read as written; its options at their values (the config's, else the default) in V1_ARCH_KEYS' layout."""
    name = str(arch.get("name"))
    try:
        defaults = dict(architectures.get(name).options)
    except architectures.UnknownArchitecture:
        return arch  # the run fails at its start, with the list of names
    view = {k: v for k, v in arch.items() if k not in defaults}
    options = {**defaults, **{k: v for k, v in arch.items() if k in defaults}}
    keys = V1_ARCH_KEYS.get(name)
    if keys is None:
        return {**view, **options}
    options, defaults = _first_names(options, keys), _first_names(defaults, keys)
    return {**view, **{k: v for k, v in options.items() if k in keys or v != defaults.get(k)}}


def _first_names(options: dict, keys: tuple) -> dict:
    """Options renamed since fingerprints began, under their first names: TTT's backend was split in two
    (backend auto | triton | torch, impl auto | scan | dual | reference), attention's was attn_backend."""
    options = dict(options)
    if "impl" in keys and "backend" in options:
        backend = options.pop("backend")
        options["backend"], options["impl"] = ("torch", backend) if backend in _TTT_TORCH_BACKENDS else (backend, "auto")
    if "attn_backend" in keys and "backend" in options:
        options["attn_backend"] = options.pop("backend")
    return options
