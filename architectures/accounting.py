"""What a model costs: parameters, FLOPs per token, decode-state size. One convention, everywhere:

- A multiply-add is 2 FLOPs; a dense (m, k) @ (k, n) product is 2 m k n.
- Attention is counted with CAUSAL HALVING: the token at position t attends to t + 1 keys, so the
  average token of a length-T sequence costs (T + 1) / 2 keys, the work a causal flash kernel does
  (nanoGPT's and PaLM's convention counts all T keys: twice our attention term).
- Training FLOPs per token = 3 x forward (the backward of a product costs two products: the gradient
  of each input). tests/test_flops.py measures this ratio with FlopCounterMode for every architecture.
- Elementwise work of size O(d) per token (norms, activations, residuals, gates, softmax) is left out,
  as in Kaplan et al. and Chinchilla's 6N; elementwise work proportional to the recurrent state (the
  Mamba scan) and depthwise convs are counted, because FLOP counters miss them and they are not small.

Every architecture module provides `count(cfg, T) -> Counts`, with its derivation in the docstring;
tests/test_flops.py checks the parameters against the built model, the matrix-product terms against
`torch.utils.flop_counter.FlopCounterMode` on the PyTorch path, the terms that counter cannot see by
counting the operations of the reference code (`OpCounter`), and the state against the decode cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

TRAIN_FACTOR = 3.0  # training FLOPs per token / forward FLOPs per token


def embedding_params(cfg) -> int:
    """The embedding V d, as many again for an LM head not tied to it, and max_seq_len d for learned
    absolute positions (cfg a ModelConfig; Kaplan et al. count positions with the embeddings). The logits
    cost 2 d V FLOPs per token either way; adding a position embedding is elementwise (not counted)."""
    positions = cfg.max_seq_len * cfg.d_model if cfg.learned_positions else 0
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + positions


@dataclass(frozen=True)
class Counts:
    """One architecture at one context length T. FLOPs are per token, forward, by named term."""

    embedding_params: int
    non_embedding_params: int
    fwd_terms: dict[str, float]
    # terms FlopCounterMode does not see on the PyTorch path (elementwise scans, layers.CausalConv's
    # shifted multiply-adds); every other term is a matrix product it counts
    unseen: frozenset[str] = frozenset()
    state_numbers: int = 0  # numbers kept per sequence to decode after T tokens (KV cache, TTT W/b, SSM state)
    attention: str | None = None  # the name of the causal-halved attention term, if any
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return self.embedding_params + self.non_embedding_params

    @property
    def fwd_flops(self) -> float:
        return float(sum(self.fwd_terms.values()))

    @property
    def train_flops(self) -> float:
        return TRAIN_FACTOR * self.fwd_flops

    @property
    def seen_fwd_flops(self) -> float:
        """The part a FLOP counter sees: the matrix products."""
        return float(sum(v for k, v in self.fwd_terms.items() if k not in self.unseen))

    def row(self) -> dict:
        return {"params": self.params, "non_embedding_params": self.non_embedding_params,
                "fwd_flops_per_token": self.fwd_flops, "train_flops_per_token": self.train_flops,
                "state_size": self.state_numbers}


# -- measuring ----------------------------------------------------------------------------------

def _grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                                transposed, _output_padding, _groups, output_mask, out_shape=None, **kw) -> int:
    """The backward of a convolution: the input gradient and the weight gradient each cost one forward.
    torch's own formula (2.13) ignores `groups` and charges a depthwise conv's backward d times too much."""
    fwd = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode (matrix products, convs, fused attention) with a correct grouped-conv backward."""
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: _grouped_conv_backward_flop})


# FLOPs per output element of the elementwise operations the reference scans use
_ELEMENTWISE = {"mul": 1, "add": 1, "sub": 1, "div": 1, "exp": 1, "addcmul": 2, "addcdiv": 2, "neg": 1}


class OpCounter(TorchDispatchMode):
    """Counts elementwise FLOPs (a multiply-add = 2) as (op name, output numel) records, for the
    terms a FLOP counter cannot see. `flops(numel=n)` sums the ops whose output has n elements,
    e.g. the state-sized work of one recurrence step."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int, int]] = []  # (op, output numel, FLOPs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name in _ELEMENTWISE and isinstance(out, torch.Tensor):
            self.records.append((name, out.numel(), _ELEMENTWISE[name] * out.numel()))
        return out

    def flops(self, numel: int | None = None) -> int:
        return sum(f for _, n, f in self.records if numel is None or n == numel)
