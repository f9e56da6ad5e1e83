"""Maps `arch=` names to builders. A new architecture is a module that calls `register` plus a
file in conf/arch/; nothing else changes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from architectures.accounting import Counts
from architectures.config import ModelConfig


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

    return LanguageModel(cfg, get(cfg.arch).build_block)
