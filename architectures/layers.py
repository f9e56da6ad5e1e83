"""Building blocks shared by every architecture: RMSNorm, SwiGLU, rotary embeddings, the causal
depthwise convolution of the Mamba backbone.

Llama-style ("Transformer++") conventions, as in the TTT paper's backbone
(Sun et al. 2024, arXiv 2407.04620, App. "Experiment details"): pre-norm RMSNorm with eps 1e-6,
SwiGLU FFN without biases, RoPE with theta 1e4.
"""
from __future__ import annotations

import math
from functools import lru_cache, wraps
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.backends import triton_interpreting
from architectures.cpp_kernels import Library

CONV_KERNEL = Library(Path(__file__).with_name("causal_conv.cpp"), "causal conv backend=cpp")
NORM_KERNEL = Library(Path(__file__).with_name("rms_norm.cpp"), "RMSNorm backend=cpp")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (F.rms_norm: one fused kernel each way on
    CUDA, where the formula written out is about eight forward and ten backward; the same numbers on CPU).

    With `cpp` set (by a block whose backend is cpp, as its convs), an fp32 CPU forward outside torch.compile is
    one C++ pass (rms_norm.cpp) instead of F.rms_norm's six ops on CPU, and with a gradient its
    backward is one more (_RMSNormCpp) instead of about ten: most of their cost is fixed per call at 1k tokens, and
    at a decode step all of it. tests/test_mamba.py checks both against F.rms_norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.cpp = False  # set by the block that owns it when that block's backend is cpp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.cpp and x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormCpp.apply(x, self.weight, self.eps)
            return _rms_norm_cpp(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def _rms_norm_cpp(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over x's last dim in one C++ pass (no gradient): x (..., d) fp32 (or fp64, the tests') on CPU."""
    x = x.contiguous()
    y = torch.empty_like(x)
    d = x.shape[-1]
    NORM_KERNEL.call("rms_norm_forward", x.dtype, x, weight.contiguous(), y, x.numel() // d, d, float(eps),
                     torch.get_num_threads())
    return y


def cpp_inference(*tensors: torch.Tensor) -> bool:
    """Whether a C++ inference pass (no autograd node) may take these tensors: all fp32 on CPU, no gradient being
    recorded, and not inside torch.compile (where a C++ call would break the graph)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors))


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the norm after it: (h + y, norm(h + y)), h and y (..., d). One C++ pass (rms_norm.cpp)
    where the norm's forward runs in C++ without a gradient (RMSNorm: `cpp` set, fp32 on CPU, not compiling) and h, y
    are fp32 too; else the add and the norm."""
    if norm.cpp and h.shape == y.shape and cpp_inference(h, y, norm.weight):
        h, y = h.contiguous(), y.contiguous()
        out, normed = torch.empty_like(h), torch.empty_like(h)
        d = h.shape[-1]
        NORM_KERNEL.call("rms_norm_residual_forward", h.dtype, h, y, norm.weight.contiguous(), out, normed,
                         h.numel() // d, d, float(norm.eps), torch.get_num_threads())
        return out, normed
    h = h + y
    return h, norm(h)


class _RMSNormCpp(torch.autograd.Function):
    """RMSNorm with a gradient in C++ (rms_norm.cpp): one pass forward, one backward, which recomputes each row's
    1 / rms rather than keeping it. x (..., d), weight (d,)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm_cpp(x, weight, eps)  # autograd records no ops inside a Function's forward

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        d = x.shape[-1]
        rows = x.numel() // d
        dx = torch.empty_like(x)
        partial = x.new_empty(-(-rows // NORM_KERNEL.constant("rms_norm_rows_per_job")), d)  # per job: dw
        NORM_KERNEL.call("rms_norm_backward", x.dtype, x, weight, dy.contiguous(), dx, partial, rows, d,
                         float(ctx.eps), torch.get_num_threads())
        return dx, partial.sum(0), None


class SwiGLU(nn.Module):
    """FFN(x) = W_down(silu(W_gate x) * W_up x), no biases (Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def keep_state(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """A decode cache's state after a step: `old` overwritten with `new` in place when it has new's shape and
    dtype and neither is part of an autograd graph, else `new`. In place, a step reads and writes the same
    memory as the step before it, so a CUDA graph of decode steps continues the sequence on every replay
    (every cache updates its contents in place: shell.py)."""
    if old is None or old.shape != new.shape or old.dtype != new.dtype or old.requires_grad or new.requires_grad:
        return new
    return old.copy_(new)


class CausalConv(nn.Module):
    """Depthwise causal convolution over time, width k, with bias (nn.Conv1d's default init; recipe init
    ttt_jax redraws it as flax's). Decode state: the last k - 1 inputs. The one conv of every architecture:
    TTT's pre-conv and QK convs, transformer_conv's short conv, Mamba's and Mamba-2's convs."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        bound = 1 / math.sqrt(width)
        self.weight = nn.Parameter(torch.empty(dim, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.cpp = False  # set by the layer that owns it when that layer's backend is cpp (_CausalConvCpp)
        self.triton = False  # ... when it is triton (architectures/triton_conv.py)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), state (B, k-1, C) or None (zeros) -> y (B, T, C), new state (B, k-1, C).

        y_t = bias + sum_j w[:, j] xp_{t+j}, xp = [state, x]: k shifted multiply-adds in the (B, T, C)
        layout (on CPU several times faster than a grouped conv1d, whose backward and layout copies
        dominate a Mamba layer); with `cpp` set, over T > 1 tokens in fp32 or fp64 on CPU, one C++ pass
        each way (_CausalConvCpp); with `triton` set, over T > 1 tokens from the zero state on CUDA (or under
        TRITON_INTERPRET=1), one Triton kernel each way in fp32 (triton_conv.py; a state to continue takes the
        multiply-adds). Elementwise, so a FLOP counter does not see it (accounting.py: unseen)."""
        B, T, C = x.shape
        k = self.width
        if T > 1 and state is None and self.triton and (x.is_cuda or triton_interpreting()):
            from architectures.triton_conv import causal_conv_triton

            return causal_conv_triton(x, self.weight, self.bias), self.next_state(x, None)
        w = self.weight.to(x.dtype)  # (C, k)
        if T > 1 and self.cpp and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            state = None if state is None else state.to(x.dtype)
            new_state = self.next_state(x, state)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w, self.bias)):
                return _CausalConvCpp.apply(x, state, w, self.bias.to(x.dtype)), new_state
            return _causal_conv_cpp(x, state, w, self.bias.to(x.dtype)), new_state  # no autograd node to record
        xp = F.pad(x, (0, 0, k - 1, 0)) if state is None else torch.cat([state.to(x.dtype), x], dim=1)
        if T == 1:  # a decode step: one weighted sum over the window (B, k, C), 3 ops instead of k + 1
            return (xp * w.t()).sum(1, keepdim=True) + self.bias.to(x.dtype), xp[:, 1:]
        new_state = xp[:, T:].clone()  # (B, k-1, C) of its own: a view would keep all of xp (B, T + k-1, C) alive
        y = torch.addcmul(self.bias.to(x.dtype), xp[:, k - 1:], w[:, k - 1])  # (B, T, C)
        for j in range(k - 1):
            y = torch.addcmul(y, xp[:, j:j + T], w[:, j])
        return y, new_state

    def next_state(self, x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """The decode state after x (B, T, C) following `state` (B, k - 1, C) or None (zeros): the last k - 1 inputs,
        (B, k - 1, C), a tensor of its own."""
        T, k = x.shape[1], self.width
        return (x[:, T - k + 1:] if T >= k - 1 else torch.cat([_or_zeros(state, x, k), x], 1)[:, T:]).clone()

    def cuda_forward(self, x: torch.Tensor, conv_fn) -> torch.Tensor:
        """causal_conv1d with SiLU fused: x (B, T, C) -> silu(conv(x)) (B, T, C)."""
        y = conv_fn(x.transpose(1, 2).contiguous(), self.weight.to(x.dtype), self.bias.to(x.dtype), activation="silu")
        return y.transpose(1, 2)


def _or_zeros(state: torch.Tensor | None, x: torch.Tensor, k: int) -> torch.Tensor:
    """A conv's state before x (B, k - 1, C): the given one, or zeros (a sequence's start)."""
    return state if state is not None else x.new_zeros(x.shape[0], k - 1, x.shape[2])


def _causal_conv_cpp(x: torch.Tensor, state: torch.Tensor | None, weight: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """causal_conv.cpp's forward (no gradient): x (B, T, C); state (B, k - 1, C) or None (zeros); weight (C, k); bias
    (C,) -> y (B, T, C)."""
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    state = None if state is None else state.contiguous()
    (B, T, C), k = x.shape, weight.shape[1]
    y = torch.empty_like(x)
    CONV_KERNEL.call("causal_conv_forward", x.dtype, x, state, weight, bias, y, B, T, C, k, torch.get_num_threads())
    return y


class _CausalConvCpp(torch.autograd.Function):
    """CausalConv over T > 1 tokens in C++ (causal_conv.cpp), for the layers whose backend is cpp: one pass over
    the sequence forward and one backward, where the k shifted multiply-adds and autograd's backward of them (a
    product, a sum and a zero-filled slice per tap) take about 5 passes per tap. Forward and backward of one conv
    over 8k tokens (2 cores, fp32): 4.2 -> 0.86 ms at 64 channels, 10.6 -> 1.3 at 128, 24.9 -> 4.5 at Mamba-2's 384
    at cpu-xs. The kernel reads x and the state where they are and the weights as (C, k): no padded copy of x and no
    transposed one of the weights per call (a prefill runs the forward alone, and at 1k tokens a conv's few ops
    are mostly their fixed cost). tests/test_mamba.py checks it against the PyTorch ops (fp64 and fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); state (B, k - 1, C), the k - 1 earlier inputs, or None (zeros); weight (C, k); bias (C,)
        -> y (B, T, C)."""
        x, weight = x.contiguous(), weight.contiguous()
        state = None if state is None else state.contiguous()
        ctx.save_for_backward(x, state, weight)
        return _causal_conv_cpp(x, state, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, state, weight = ctx.saved_tensors
        (B, T, C), k = x.shape, weight.shape[1]
        xp = torch.cat([_or_zeros(state, x, k), x], 1)  # (B, T + k - 1, C)
        dxp = torch.empty_like(xp)
        partial = xp.new_empty(B * -(-(T + k - 1) // CONV_KERNEL.constant("causal_conv_span")), k + 1, C)  # per
        #   job: dw, db
        CONV_KERNEL.call("causal_conv_backward", xp.dtype, xp, weight, dy.contiguous(), dxp, partial, B, T, C, k,
                         torch.get_num_threads())
        sums = partial.sum(0)  # (k + 1, C)
        return dxp[:, k - 1:], None if state is None else dxp[:, :k - 1], sums[:k].t(), sums[k]


def conv_residual(h: torch.Tensor, norm_in: RMSNorm, conv: CausalConv, norm_out: RMSNorm,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The TTT block's pre-conv and the norm after it: h' = h + conv(norm_in(h)) and x = norm_out(h'), with the
    conv's new state. h (B, T, C); state (B, k - 1, C) or None (zeros). Returns (h', x, new state). Where the three
    run in C++ (their `cpp` set by a block whose backend is cpp), in fp32 on CPU without a gradient (a prefill, a
    decode step), one C++ pass (causal_conv.cpp's conv_residual_forward) in place of their four calls and the add,
    which at a prefill of 1k tokens cost mostly their fixed cost per call, and at a decode step all of it; else the
    modules one by one. tests/test_mamba.py checks the two agree."""
    T, k = h.shape[1], conv.width
    weights = (norm_in.weight, conv.weight, conv.bias, norm_out.weight)
    if norm_in.cpp and conv.cpp and norm_out.cpp and norm_in.eps == norm_out.eps and cpp_inference(h, *weights):
        h = h.contiguous()
        B, _, C = h.shape
        h_out, x, new_state = torch.empty_like(h), torch.empty_like(h), h.new_empty(B, k - 1, C)
        state = None if state is None else state.to(h.dtype).contiguous()
        CONV_KERNEL.call("conv_residual_forward", h.dtype, h, state, *(w.contiguous() for w in weights), h_out, x,
                         new_state, B, T, C, k, float(norm_in.eps), torch.get_num_threads())
        return h_out, x, new_state
    y, new_state = conv(norm_in(h), state)
    h = h + y
    return h, norm_out(h), new_state


def rope_angles(head_dim: int, positions: torch.Tensor, theta: float = 1e4):
    """cos, sin of shape (T, head_dim // 2) for integer `positions` (T,).

    Frequency of pair i is theta^(-2i/head_dim) (Su et al. 2021).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, f/2)
    return angles.cos(), angles.sin()


def constant_table(make):
    """`make`'s tensors made once per arguments (an lru_cache: cache_clear, cache_info) and outside inference mode,
    so a table first made while generating can still be saved for a backward later."""

    @lru_cache(maxsize=32)
    @wraps(make)
    def made(*args):
        with torch.inference_mode(False), torch.no_grad():
            return make(*args)

    return made


@constant_table
def rope_period(head_dim: int, period: int, theta: float, device: torch.device):
    """rope_angles at positions 0 .. period - 1, computed once per (shape, device)."""
    return rope_angles(head_dim, torch.arange(period, device=device), theta)


def rope_angles_periodic(head_dim: int, start: int, T: int, period: int, theta: float, device):
    """rope_angles at positions (start + 0 .. T - 1) mod period, (T, head_dim // 2) each, from a table of one
    period (TTT's RoPE restarts every mini-batch): a decode step slices it instead of recomputing the angles.
    Under torch.compile the angles are computed in the graph, as before the table (no cache to trace)."""
    s = start % period
    if torch.compiler.is_compiling():
        return rope_angles(head_dim, (s + torch.arange(T, device=device)) % period, theta)
    cos, sin = rope_period(head_dim, period, float(theta), torch.device(device))
    if s + T <= period:
        return cos[s:s + T], sin[s:s + T]
    pos = (s + torch.arange(T, device=cos.device)) % period
    return cos[pos], sin[pos]


@constant_table
def _rope_period_rotations(head_dim: int, period: int, theta: float, device: torch.device) -> torch.Tensor:
    """cos + i sin of rope_period's angles: (period, head_dim // 2) complex64."""
    return torch.complex(*rope_period(head_dim, period, theta, device))


def apply_rope_periodic(x: torch.Tensor, start: int, period: int, theta: float) -> torch.Tensor:
    """The interleaved RoPE of x (B, T, H, f), laid out as the projections make it, at positions (start + 0 .. T - 1)
    mod period (TTT's, restarting every mini-batch): apply_rope's numbers on x.transpose(1, 2) with
    rope_angles_periodic's angles. Over whole periods from a period's start (a prefill) T is viewed as (T / period,
    period) and every period rotated by one cached table of `period` rotations, in x's own (contiguous) layout: no
    (T, f/2) angles gathered, no complex table built and no strided product per call (of a prefill's ops at 1k
    tokens, most of the cost is fixed per call)."""
    B, T, H, f = x.shape
    if start % period or T % period or torch.compiler.is_compiling():
        cos, sin = rope_angles_periodic(f, start, T, period, theta, x.device)
        return apply_rope(x.transpose(1, 2), cos, sin, interleaved=True).transpose(1, 2)
    rot = _rope_period_rotations(f, period, float(theta), torch.device(x.device))[:, None]  # (period, 1, f/2)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).unflatten(1, (T // period, period)))  # (B,
    #   T / period, period, H, f/2)
    return torch.view_as_real(pairs * rot).flatten(-2).flatten(1, 2).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x of shape (B, H, T, f) by the angles (T, f/2).

    interleaved=False: the half-split convention (pairs are (i, i + f/2)), used by our attention.
    interleaved=True: adjacent pairs (2i, 2i+1) rotate together as complex numbers, the convention of
    the official TTT JAX code, which TTT layers must match (see docs/ttt_math.md).
    """
    x32 = x.float()
    cos, sin = cos.to(x32.dtype), sin.to(x32.dtype)
    if interleaved and not torch.compiler.is_compiling():  # one complex product: eager, 4x fewer passes over x
        pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))  # (B, H, T, f/2): x_2i + i x_2i+1
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
    if interleaved:  # the same in real arithmetic (what torch.compile traces: inductor has no complex kernels)
        x1, x2 = x32[..., 0::2], x32[..., 1::2]  # (B, H, T, f/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, f/2, 2)
        return out.flatten(-2).to(x.dtype)
    half = x32.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
