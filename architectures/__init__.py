"""Pluggable model backends. Importing this package registers every architecture."""
from architectures.config import ModelConfig
from architectures.registry import ArchSpec, UnknownArchitecture, build_model, get, names, register
from architectures import linear_attention, mamba, transformer, ttt  # noqa: F401  (each registers its names)

__all__ = ["ArchSpec", "ModelConfig", "UnknownArchitecture", "build_model", "get", "names", "register"]
