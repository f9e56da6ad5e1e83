"""The one model config every architecture is built from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from architectures.recipe import Recipe


@dataclass
class ModelConfig:
    """Dimensions shared by every architecture, plus architecture-specific `options`.

    `options` holds what only one family understands (attention backend, RoPE theta, TTT mini-batch
    size, Mamba state size, ...), so that adding an architecture never changes this class; one option
    the shell reads for any of them: `positions: learned` adds absolute position embeddings, max_seq_len
    of them, to the token embeddings (GPT-2's, Zoology's attention; the Transformer then drops RoPE). `recipe` is
    the training recipe (init scheme and std, norm eps, no-decay set, lr multipliers;
    architectures/recipe.py); `norm_eps` and `init_std` read it.
    """

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_seq_len: int = 2048
    tie_embeddings: bool = True  # the LM head is the embedding matrix (False: a head of its own)
    ffn: bool = True             # each block's FFN (SwiGLU, ffn_dim wide) and its norm; False: the FFN slot is
                                 #   the identity, no parameters (Zoology's MQAR models). Mamba blocks have none
    recipe: Recipe = field(default_factory=Recipe)  # the shared recipe unless given
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def opt(self, key: str) -> Any:
        """An architecture option: `options[key]` when given (and not None), else the architecture's default
        (its ArchSpec's `options`, architectures/registry.py: the one place defaults are written)."""
        value = self.options.get(key)
        if value is not None:
            return value
        from architectures.registry import get  # registry imports this module

        defaults = get(self.arch).options
        if key not in defaults:
            raise KeyError(f"architecture {self.arch!r} has no option {key!r}")
        return defaults[key]

    @property
    def norm_eps(self) -> float:
        return self.recipe.norm_eps

    @property
    def init_std(self) -> float:
        return self.recipe.init_std

    @property
    def learned_positions(self) -> bool:
        """options.positions == "learned": the shell adds a learned embedding of each position < max_seq_len."""
        return self.options.get("positions") == "learned"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
