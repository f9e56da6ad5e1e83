"""The LM shell every architecture shares: embedding [+ learned positions] -> blocks -> final RMSNorm ->
head (tied to the embedding unless ModelConfig.tie_embeddings is False). Learned absolute positions
(options.positions: learned, GPT-2's and Zoology's) cover max_seq_len tokens.

Block interface (what an architecture provides through the registry):

    class Block(nn.Module):
        def forward(self, h: Tensor, cache: Any | None = None) -> Tensor
            # h: (B, T, d) residual stream in, (B, T, d) out. With a cache, the block continues the
            # sequence the cache has seen and updates its contents (KV, recurrent state) in place;
            # cache.seen, the position of h's first token, is the shell's count (DecodeState.advance):
            # blocks read it and never change it.
        def new_cache(self, batch: int, max_len: int, device, dtype) -> Any
            # an empty decode state: a KV cache for attention, (W, b, accumulators, conv states)
            # for TTT, (conv state, SSM state) for Mamba.
        def backends(self) -> dict[str, str]
            # which implementation ran, e.g. {"attention": "sdpa"}; recorded in run summaries.

Optional hooks, on any module of a model (the trainer looks for them by these protocols, below):

    CompilesHotPath.compile_hot_path()              trainer.compile=hot_path: compile the module's own
                                                    hot path (TTT's per-mini-batch step, Mamba's scan bodies)
    FollowsTrainProgress.set_train_progress(step, warmup_steps)   called before every optimizer step
                                                    (TTT-MLP's inner base-lr warmup)

The shell knows nothing about attention or recurrences, so TTT and Mamba plug in unchanged, and
`SequenceClassifier` puts a classification head on any of them.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from architectures import recipe
from architectures.config import ModelConfig
from architectures.layers import RMSNorm


@runtime_checkable
class CompilesHotPath(Protocol):
    def compile_hot_path(self) -> None: ...


@runtime_checkable
class FollowsTrainProgress(Protocol):
    def set_train_progress(self, step: int, warmup_steps: int) -> None: ...


class DecodeState:
    """Per-block caches for incremental decoding and the one count of the tokens they have seen: every
    cache's `seen` is set here, after all blocks ran (`advance`), and read by the blocks as the position
    of their first new token."""

    def __init__(self, caches: list, max_len: int):
        self.caches = caches
        self.max_len = max_len
        self.seen = 0  # every cache starts at 0 too (its constructor)

    def advance(self, T: int) -> None:
        self.seen += T
        for cache in self.caches:
            cache.seen = self.seen


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, build_block: Callable[[ModelConfig, int], nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_positions else None
        self.blocks = nn.ModuleList(build_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.recompute_blocks = False  # training: keep only each block's input, recompute the block in backward
        recipe.init_weights(self, cfg)  # the recipe's init scheme (architectures/recipe.py)

    def hidden(self, idx: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> (B, T, d) final-normed hidden states."""
        if state is not None and state.seen + idx.shape[1] > state.max_len:
            raise ValueError(f"decode state holds {state.max_len} tokens; {state.seen} seen + {idx.shape[1]} new")
        h = self.embed(idx)  # (B, T, d)
        if self.pos_embed is not None:
            start, T = 0 if state is None else state.seen, idx.shape[1]
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"learned positions cover {self.cfg.max_seq_len} tokens (max_seq_len, the run's ctx); "
                                 f"got positions up to {start + T - 1}")
            h = h + self.pos_embed(torch.arange(start, start + T, device=idx.device))  # (T, d) broadcast over B
        recompute = self.recompute_blocks and state is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # activation checkpointing: one block's activations alive at a time in backward
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h, None if state is None else state.caches[i])
        if state is not None:
            state.advance(idx.shape[1])
        return self.norm(h)

    def forward(self, idx: torch.Tensor, state: DecodeState | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V); with `at` (a (B, T) bool mask) only the logits at those positions,
        (N, V) in row-major order: a task scored on a few positions skips the rest of the head's product."""
        h = self.hidden(idx, state)
        if at is not None:
            h = h[at]  # (N, d)
        return F.linear(h, self.embed.weight if self.head is None else self.head.weight)  # (B, T, V) or (N, V)

    def new_state(self, batch: int, max_len: int) -> DecodeState:
        p = self.embed.weight
        return DecodeState([b.new_cache(batch, max_len, p.device, p.dtype) for b in self.blocks], max_len)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prefill `prompt` (B, T0) once, then decode one token at a time with the cache.
        temperature 0 means greedy. Returns (B, T0 + max_new_tokens)."""
        state = self.new_state(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = self(prompt, state)[:, -1]  # (B, V)
        out = [prompt]
        for _ in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, generator)  # (B, 1)
            out.append(nxt)
            logits = self(nxt, state)[:, -1]
        return torch.cat(out, dim=1)

    def backends(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for block in self.blocks:
            merged.update(block.backends())
        return merged

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters, or without the embeddings (tokens, learned positions) and an untied head
        (non_embedding, Kaplan et al.)."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        return n - sum(m.weight.numel() for m in (self.embed, self.head, self.pos_embed) if m is not None)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


class SequenceClassifier(nn.Module):
    """A classification head on any LanguageModel: pool the hidden states, then a linear layer.

    pooling="last" takes the state at the last real token (natural for causal and recurrent
    models); "mean" averages over the real tokens. `lengths` (B,) marks where padding starts.
    """

    def __init__(self, lm: LanguageModel, n_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.lm, self.pooling = lm, pooling
        self.head = nn.Linear(lm.cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=lm.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        return self.lm.num_params(non_embedding) + sum(p.numel() for p in self.head.parameters())

    def backends(self) -> dict[str, str]:
        return self.lm.backends()

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.lm.hidden(idx)  # (B, T, d)
        B, T, _ = h.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=h.device)
        if self.pooling == "last":
            pooled = h[torch.arange(B, device=h.device), lengths - 1]  # (B, d)
        else:
            mask = (torch.arange(T, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.head(pooled)  # (B, n_classes)
