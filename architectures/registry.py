"""Maps `arch=` names to builders. A new architecture is a module that calls `register` plus a
file in conf/arch/; nothing else changes.

An ArchSpec owns its architecture: the blocks it builds, its counts, every option its code reads with the
option's default (conf/arch/<name>.yaml overrides them; ModelConfig.opt reads them), and how its width
scales when sizes are FLOP-matched (architectures/sizing.py). `ModelConfig(arch="transformer_conv")` is a
Transformer with its short conv whether or not the YAML was read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn

from architectures.accounting import Counts
from architectures.config import ModelConfig

SHELL_OPTIONS = frozenset({"positions"})  # read by the shell for any architecture (ModelConfig.learned_positions)
WIDTH_RULES = ("heads_ffn", "mamba", "mamba2")  # architectures/sizing.py: how match=flops widens a model
RENAMED_OPTIONS = {  # options that were renamed: a config that still says the old name is told the new one
    "attn_backend": "`backend` (auto | flash_attn | sdpa)",
    "impl": "part of `backend` (TTT: auto | triton | torch | scan | dual | reference)",
}


class UnknownArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    name: str
    description: str
    # (config, layer index) -> block module following the interface in architectures/shell.py
    build_block: Callable[[ModelConfig, int], nn.Module]
    # (config, context T) -> parameters, FLOPs per token by term, decode-state size (accounting.py)
    count: Callable[[ModelConfig, int], Counts]
    # every option the architecture's code reads, at its default (None: computed, see the module)
    options: Mapping[str, Any] = field(default_factory=dict)
    # heads_ffn: heads x head dim plus an FFN (Transformer, TTT, linear attention); mamba: any width;
    # mamba2: whole SSM heads (sizing.py)
    width_rule: str = "heads_ffn"

    def __post_init__(self):
        if self.width_rule not in WIDTH_RULES:
            raise ValueError(f"{self.name}: width_rule must be one of {WIDTH_RULES}, got {self.width_rule!r}")

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Every given option is one this architecture reads (a misspelt one is an error, not ignored)."""
        for old, new in RENAMED_OPTIONS.items():
            if old in options:
                raise ValueError(f"architecture {self.name!r}: option {old!r} is now {new}")
        unknown = sorted(set(options) - set(self.options) - SHELL_OPTIONS)
        if unknown:
            raise ValueError(f"architecture {self.name!r} has no option(s) {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(set(self.options) | SHELL_OPTIONS))}")


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitecture(f"unknown architecture {name!r}; available: {', '.join(names())}") from None


def build_model(cfg: ModelConfig):
    from architectures.shell import LanguageModel

    spec = get(cfg.arch)
    spec.check_options(cfg.options)
    return LanguageModel(cfg, spec.build_block)
