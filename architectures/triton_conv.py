"""The causal depthwise conv of layers.CausalConv as two Triton kernels, for the layers whose backend is triton (TTT's
pre-conv and QK convs, Mamba's and Mamba-2's convs) over a whole sequence from the zero state: training and a fresh
prefill on a GPU without mamba-ssm's causal-conv1d. On CPU they run under TRITON_INTERPRET=1
(tests/test_conv_triton.py). Per sequence b, token t, channel c, width k:

    forward   y[b, t, c] = bias[c] + sum_j w[c, j] x[b, t + j - (k - 1), c]        (x before token 0 is 0)
    backward  dx[b, t, c] = sum_j w[c, j] dy[b, t + (k - 1) - j, c]                (dy past the last token is 0)
              dw[c, j] = sum_b,t dy[b, t, c] x[b, t + j - (k - 1), c]      dbias[c] = sum_b,t dy[b, t, c]

CausalConv's PyTorch path computes the same with k shifted multiply-adds (torch.addcmul): k + 1 passes over the
(B, T, C) activations forward, and autograd's backward of them a product, a sum and a zero-filled slice per tap
(about 5k passes and 8k kernels). Here the forward reads x and writes y, and the backward reads x and dy and writes
dx, once each from memory (a tile's k shifted loads overlap, served by the cache), in the (B, T, C) layout the
layers hold: no transposed copy, as a grouped conv1d would need. One program per (sequence, block of BLOCK_T
tokens, block of BLOCK_C channels) forward; the backward's programs each walk a run of token blocks and write
their partial sums of dw and dbias ((k + 1) x BLOCK_C), which the caller adds in a fixed order (deterministic).
Products and sums in fp32 (fp64 for fp64 inputs: the tests; the PyTorch path multiplies in x's dtype, bf16 under
autocast), y and dx in x's dtype, the weights' gradients in theirs. Forward and backward are torch.library
operators (causal_conv, causal_conv_backward), so torch.compile(model) traces around them. `make check-kernels`
compiles them for sm_90 without a GPU; `make gpu-check` runs them inside training at 125m (not yet timed on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32  # tokens per tile
BLOCK_C = 64  # channels per tile: a (32, 64) tile is 4 KB in bf16, 8 KB in fp32
# warps per program: ptxas for sm_90 at width 4 (`make check-kernels ARGS="--only conv"`), registers per thread and
# spill stores, forward / backward: 96 / 255 (0 B) at 4 warps, 48 / 118 (0 B) at 8; not yet timed on a GPU
FORWARD_WARPS, BACKWARD_WARPS = 4, 8
BACKWARD_PROGRAMS = 2048  # about how many programs the backward spreads over (several per SM on an H100)


@triton.jit
def _load_shifted(X, base, offs_t, shift, seq_len, offs_c, mask_c, channels, ACC: tl.constexpr):
    """x[b, t + shift, c] for the tile's tokens and channels, 0 outside the sequence: (BLOCK_T, BLOCK_C)."""
    src = offs_t + shift
    inside = (src >= 0) & (src < seq_len)
    return tl.load(X + base + src[:, None] * channels + offs_c[None, :], mask=inside[:, None] & mask_c[None, :],
                   other=0.0).to(ACC)


@triton.jit
def _conv_forward(X, W, BIAS, Y, seq_len, channels, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                  ACC: tl.constexpr):
    b, tb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    base = b.to(tl.int64) * seq_len * channels  # int64: B x T x C passes 2^31 at 1.3B shapes and long contexts
    y = tl.zeros((BLOCK_T, BLOCK_C), ACC) + tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
    for j in tl.static_range(K):
        w = tl.load(W + offs_c * K + j, mask=mask_c, other=0.0).to(ACC)  # (BLOCK_C,)
        y += w[None, :] * _load_shifted(X, base, offs_t, j - (K - 1), seq_len, offs_c, mask_c, channels, ACC)
    tl.store(Y + base + offs_t[:, None] * channels + offs_c[None, :], y.to(Y.dtype.element_ty),
             mask=(offs_t < seq_len)[:, None] & mask_c[None, :])


@triton.jit
def _conv_backward(X, W, DY, DX, PARTIAL, seq_len, channels, blocks_per_program, n_runs, K: tl.constexpr,
                   KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Program (b, run, channel block): dx of the run's token blocks, and the run's partial dw (K rows) and dbias
    (row K) of its channels into PARTIAL (B * n_runs, K + 1, C). KP: K rounded up to a power of two (a tile's rows)."""
    b, run, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    base = b.to(tl.int64) * seq_len * channels
    dw = tl.zeros((KP, BLOCK_C), ACC)
    taps = tl.arange(0, KP)
    db = tl.zeros((BLOCK_C,), ACC)
    for i in range(blocks_per_program):
        offs_t = (run * blocks_per_program + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        dy = _load_shifted(DY, base, offs_t, 0, seq_len, offs_c, mask_c, channels, ACC)  # (BLOCK_T, BLOCK_C), 0 past T
        db += tl.sum(dy, axis=0)
        dx = tl.zeros((BLOCK_T, BLOCK_C), ACC)
        for j in tl.static_range(K):
            w = tl.load(W + offs_c * K + j, mask=mask_c, other=0.0).to(ACC)
            dx += w[None, :] * _load_shifted(DY, base, offs_t, (K - 1) - j, seq_len, offs_c, mask_c, channels, ACC)
            x = _load_shifted(X, base, offs_t, j - (K - 1), seq_len, offs_c, mask_c, channels, ACC)
            dw += tl.where(taps[:, None] == j, tl.sum(dy * x, axis=0)[None, :], 0.0)
        tl.store(DX + base + offs_t[:, None] * channels + offs_c[None, :], dx.to(DX.dtype.element_ty),
                 mask=(offs_t < seq_len)[:, None] & mask_c[None, :])
    row = (b * n_runs + run).to(tl.int64) * (K + 1) * channels
    tl.store(PARTIAL + row + taps[:, None] * channels + offs_c[None, :], dw, mask=(taps < K)[:, None] & mask_c[None, :])
    tl.store(PARTIAL + row + K * channels + offs_c, db, mask=mask_c)


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def backward_runs(B: int, T: int, C: int) -> tuple[int, int]:
    """(token blocks per backward program, programs per sequence and channel block): about BACKWARD_PROGRAMS in all,
    each walking at least one block of BLOCK_T tokens; the partial sums take (B x runs, k + 1, C) fp32."""
    blocks = triton.cdiv(T, BLOCK_T)
    runs = min(blocks, max(1, triton.cdiv(BACKWARD_PROGRAMS, B * triton.cdiv(C, BLOCK_C))))
    per_program = triton.cdiv(blocks, runs)
    return per_program, triton.cdiv(blocks, per_program)


@torch.library.custom_op("ttt_bench::causal_conv", mutates_args=())
def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) contiguous, weight (C, k), bias (C,) -> y (B, T, C) in x's dtype, from the zero state."""
    B, T, C = x.shape
    y = torch.empty_like(x)
    _conv_forward[(B, triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C))](
        x, weight.contiguous(), bias.contiguous(), y, T, C, K=weight.shape[1], BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        ACC=_acc(x), num_warps=FORWARD_WARPS)
    return y


@causal_conv.register_fake
def _(x, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("ttt_bench::causal_conv_backward", mutates_args=())
def causal_conv_backward(x: torch.Tensor, weight: torch.Tensor,
                         dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of causal_conv's x, weight (C, k) and bias (C,) (each in its input's dtype) from dy (B, T, C)."""
    B, T, C = x.shape
    k = weight.shape[1]
    per_program, runs = backward_runs(B, T, C)
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(B * runs, k + 1, C, device=x.device, dtype=acc_dtype)
    _conv_backward[(B, runs, triton.cdiv(C, BLOCK_C))](
        x, weight.contiguous(), dy, dx, partial, T, C, per_program, runs, K=k, KP=triton.next_power_of_2(k),
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, ACC=_acc(x), num_warps=BACKWARD_WARPS)
    sums = partial.sum(0)  # (k + 1, C)
    return dx, sums[:k].t().to(weight.dtype).contiguous(), sums[k].to(weight.dtype, copy=True)  # tensors of their own


@causal_conv_backward.register_fake
def _(x, weight, dy):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _save_for_backward(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = bias.dtype


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw, db = causal_conv_backward(x, weight, dy)
    return dx, dw, db.to(ctx.bias_dtype)


causal_conv.register_autograd(_backward, setup_context=_save_for_backward)


def causal_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """CausalConv's output over x (B, T, C) from the zero state: the operator on a contiguous x."""
    return causal_conv(x.contiguous(), weight, bias)
