"""backend=triton for Mamba-1: the selective scan as two Triton kernels, for GPUs without mamba-ssm's compiled
CUDA extension (selective_scan_cuda); on CPU they run under TRITON_INTERPRET=1 (tests/test_mamba_triton.py).

The math is scan.py's and cpu_scan.cpp's (same inputs x = delta u, delta, A^T, B, C, h0; same outputs and
gradients), per sequence b, channel d, state n, token t:

    forward   h_t = exp(delta_t A) h_{t-1} + B_t x_t          y_t = sum_n C_t[n] h_t[n]
    backward  g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}      (from g_{L-1} = C dy + dlast)
              dx_t = sum_n g_t B_t     dB_t = sum_d g_t x_t     dC_t = sum_d dy_t h_t
              dlog_t = g_t exp(delta_t A) h_{t-1}:  d(delta_t) = sum_n dlog_t A,  dA^T = sum_t dlog_t delta_t
              dh0 = exp(delta_0 A) g_0

One program per (sequence, block of BLOCK_D channels) walks the sequence once with its (N, BLOCK_D) state in
registers, as mamba-ssm's CUDA kernel and our C++ one do: the work per token is elementwise (every state entry
decays at its own rate), so there is nothing for the tensor cores, and the scan reads each input once. The
forward saves the state every SEG tokens; the backward walks the segments last first, recomputes a segment's
states into a per-program scratch (SEG + 1 states of N x BLOCK_D: 66 KB per program, 25 MB at 125m and batch 8,
about an H100's L2), then runs the adjoint back over it. dB and dC sum over all channels, so each program writes
partial sums (B, blocks, L, N) that the caller adds; dA^T likewise per sequence. Tokens past the end are read as
delta = x = B = C = dy = 0: they leave the state and the adjoint unchanged, so every loop runs whole segments.

The kernels compute in the inputs' dtype: fp32 (selective_scan upcasts bf16 first) or fp64 (tests). Forward and
backward are torch.library operators (mamba_scan, mamba_scan_backward), so torch.compile(model) traces around
them. `make check-kernels` compiles them for sm_90 without a GPU; `make gpu-check` times them inside Mamba's
training at 125m (not yet run on a GPU).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


LIMITS = {"SEG": 256, "BLOCK_D": 256, "NUM_WARPS": 16}  # each launch setting: a power of two from 1 to this


def _checked(name: str, value: int, label: str) -> int:
    """A launch setting's value if it is a power of two from 1 to LIMITS[name]; else a ValueError naming `label`."""
    most = LIMITS[name]
    if value < 1 or value > most or value & (value - 1):
        raise ValueError(f"{label} must be a power of two from 1 to {most}, got {value}")
    return value


# Launch settings, not yet timed on a GPU (MAMBA_TRITON_SEG, MAMBA_TRITON_BLOCK_D, MAMBA_TRITON_WARPS override, to
# time variants on a GPU without editing code)
SEG = _checked("SEG", int(os.environ.get("MAMBA_TRITON_SEG", 32)), "MAMBA_TRITON_SEG")  # tokens between saved
#   states: the checkpoints are N / SEG of x's size, the backward's scratch SEG + 1 states per program
BLOCK_D = _checked("BLOCK_D", int(os.environ.get("MAMBA_TRITON_BLOCK_D", 32)), "MAMBA_TRITON_BLOCK_D")  # channels
#   per program: B x D / 32 programs (125m, batch 8: 384)
NUM_WARPS = _checked("NUM_WARPS", int(os.environ.get("MAMBA_TRITON_WARPS", 4)), "MAMBA_TRITON_WARPS")


@contextlib.contextmanager
def launch_settings(**changes: int):
    """Temporarily change SEG, BLOCK_D or NUM_WARPS (the benchmark's variants), checked as the environment's are:
    `with launch_settings(BLOCK_D=32, NUM_WARPS=1): ...`."""
    for name, value in changes.items():
        if name not in LIMITS:
            raise ValueError(f"launch setting {name}: not one of {sorted(LIMITS)}")
        _checked(name, value, f"launch setting {name}")
    old = {name: globals()[name] for name in changes}
    globals().update(changes)
    try:
        yield
    finally:
        globals().update(old)


@triton.jit
def _in_sequence(mask, t, seq_len):
    """mask & (t < seq_len) as a block: Triton 3.9's interpreter makes a block mask and-ed with a scalar condition
    int32 and refuses it as a mask ("mask has unsupported dtype"); 3.6-3.8 and the compiler take either."""
    return tl.where(mask, t, seq_len) < seq_len


@triton.jit
def _load_token(X, DL, BM, CM, row, t, seq_len, d_inner, offs_d, valid_d, offs_n, valid_n, N: tl.constexpr):
    """x_t, delta_t (BLOCK_D,) and B_t, C_t (BLOCK_N,) of sequence `row`; zeros past the end (valid_d, valid_n:
    _in_sequence's masks of the token's channels and states, which the callers' stores use too)."""
    at_d = (row * seq_len + t) * d_inner + offs_d
    at_n = (row * seq_len + t) * N + offs_n
    return (tl.load(X + at_d, mask=valid_d, other=0.0), tl.load(DL + at_d, mask=valid_d, other=0.0),
            tl.load(BM + at_n, mask=valid_n, other=0.0), tl.load(CM + at_n, mask=valid_n, other=0.0))


@triton.jit
def _scan_forward(X, DL, AT, BM, CM, H0, Y, LAST, CKPT, seq_len, d_inner, N: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, SEG: tl.constexpr, HAS_H0: tl.constexpr, KEEP: tl.constexpr):
    """y (B, L, D), the last state (B, N, D) and, if KEEP, the state before every segment (B, L / SEG, N, D)."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < d_inner, offs_n < N
    state_at = offs_n[:, None] * d_inner + offs_d[None, :]  # (BLOCK_N, BLOCK_D) of an (N, D) array
    mask_s = mask_n[:, None] & mask_d[None, :]
    At = tl.load(AT + state_at, mask=mask_s, other=0.0)  # padding: a = exp(0) = 1, B = 0: h stays 0
    if HAS_H0:
        h = tl.load(H0 + row * N * d_inner + state_at, mask=mask_s, other=0.0)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=At.dtype)
    n_seg = tl.cdiv(seq_len, SEG)
    for s in range(0, n_seg):
        if KEEP:
            tl.store(CKPT + (row * n_seg + s) * N * d_inner + state_at, h, mask=mask_s)
        for j in range(0, SEG):
            t = s * SEG + j
            valid_d, valid_n = _in_sequence(mask_d, t, seq_len), _in_sequence(mask_n, t, seq_len)
            xv, dv, bv, cv = _load_token(X, DL, BM, CM, row, t, seq_len, d_inner, offs_d, valid_d, offs_n, valid_n,
                                         N)
            h = tl.exp(dv[None, :] * At) * h + bv[:, None] * xv[None, :]
            y = tl.sum(cv[:, None] * h, axis=0)
            tl.store(Y + (row * seq_len + t) * d_inner + offs_d, y, mask=valid_d)
    tl.store(LAST + row * N * d_inner + state_at, h, mask=mask_s)


@triton.jit
def _scan_backward(X, DL, AT, BM, CM, CKPT, DY, DLAST, DX, DDL, DAT, DB, DC, DH0, SCRATCH, seq_len, d_inner,
                   N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SEG: tl.constexpr):
    """Every gradient of _scan_forward's (y, last): dx, d(delta) (B, L, D); dA^T and dh0 (B, N, D); dB and dC per
    block of channels (B, blocks, L, N)."""
    row = tl.program_id(0).to(tl.int64)
    blk, n_blk = tl.program_id(1), tl.num_programs(1)
    offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < d_inner, offs_n < N
    state_at = offs_n[:, None] * d_inner + offs_d[None, :]
    mask_s = mask_n[:, None] & mask_d[None, :]
    At = tl.load(AT + state_at, mask=mask_s, other=0.0)
    ag = tl.load(DLAST + row * N * d_inner + state_at, mask=mask_s, other=0.0)  # a_{t+1} g_{t+1}
    dAt = tl.zeros((BLOCK_N, BLOCK_D), dtype=At.dtype)
    tile_at = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]  # one state in the scratch
    scratch = SCRATCH + (row * n_blk + blk) * (SEG + 1) * BLOCK_N * BLOCK_D  # slot j: h before token t0 + j
    partial = (row * n_blk + blk) * seq_len  # the program's rows of dB, dC
    n_seg = tl.cdiv(seq_len, SEG)
    for si in range(0, n_seg):
        s = n_seg - 1 - si
        t0 = s * SEG
        h = tl.load(CKPT + (row * n_seg + s) * N * d_inner + state_at, mask=mask_s, other=0.0)
        tl.store(scratch + tile_at, h)
        for j in range(0, SEG):  # the segment's states again
            t = t0 + j
            valid_d, valid_n = _in_sequence(mask_d, t, seq_len), _in_sequence(mask_n, t, seq_len)
            xv, dv, bv, cv = _load_token(X, DL, BM, CM, row, t, seq_len, d_inner, offs_d, valid_d, offs_n, valid_n,
                                         N)
            h = tl.exp(dv[None, :] * At) * h + bv[:, None] * xv[None, :]
            tl.store(scratch + (j + 1) * BLOCK_N * BLOCK_D + tile_at, h)
        tl.debug_barrier()  # the scratch written before it is read (by other threads of the program)
        for jj in range(0, SEG):  # the adjoint back over them
            j = SEG - 1 - jj
            t = t0 + j
            valid_d, valid_n = _in_sequence(mask_d, t, seq_len), _in_sequence(mask_n, t, seq_len)
            xv, dv, bv, cv = _load_token(X, DL, BM, CM, row, t, seq_len, d_inner, offs_d, valid_d, offs_n, valid_n,
                                         N)
            dy = tl.load(DY + (row * seq_len + t) * d_inner + offs_d, mask=valid_d, other=0.0)
            h_t = tl.load(scratch + (j + 1) * BLOCK_N * BLOCK_D + tile_at)
            h_prev = tl.load(scratch + j * BLOCK_N * BLOCK_D + tile_at)
            g = ag + cv[:, None] * dy[None, :]
            a = tl.exp(dv[None, :] * At)
            dlog = g * a * h_prev
            at_d = (row * seq_len + t) * d_inner + offs_d
            tl.store(DX + at_d, tl.sum(g * bv[:, None], axis=0), mask=valid_d)
            tl.store(DDL + at_d, tl.sum(dlog * At, axis=0), mask=valid_d)
            at_n = (partial + t) * N + offs_n
            tl.store(DB + at_n, tl.sum(g * xv[None, :], axis=1), mask=valid_n)
            tl.store(DC + at_n, tl.sum(dy[None, :] * h_t, axis=1), mask=valid_n)
            dAt += dlog * dv[None, :]
            ag = a * g
        tl.debug_barrier()  # the reverse pass done reading before the next segment overwrites the scratch
    tl.store(DAT + row * N * d_inner + state_at, dAt, mask=mask_s)
    tl.store(DH0 + row * N * d_inner + state_at, ag, mask=mask_s)


def _grid(x: torch.Tensor) -> tuple[int, int]:
    return x.shape[0], triton.cdiv(x.shape[2], BLOCK_D)


# -- the scan as two operators (torch.library): torch.compile(model) traces around them, as around a matmul ----

@torch.library.custom_op("ttt_bench::mamba_scan", mutates_args=())
def mamba_scan(x: torch.Tensor, delta: torch.Tensor, At: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
               h0: torch.Tensor | None, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, L, D), the last state (B, N, D) and the state every SEG tokens (B, L / SEG, N, D) for the backward
    (keep_states; else one unused slot). Inputs contiguous, of one dtype (selective_scan_triton)."""
    (Bsz, L, D), N = x.shape, At.shape[0]
    y, last = torch.empty_like(x), x.new_empty(Bsz, N, D)
    ckpt = x.new_empty(Bsz, triton.cdiv(L, SEG) if keep_states else 1, N, D)
    _scan_forward[_grid(x)](x, delta, At, Bm, Cm, x if h0 is None else h0, y, last, ckpt, L, D, N=N,
                            BLOCK_N=triton.next_power_of_2(N), BLOCK_D=BLOCK_D, SEG=SEG, HAS_H0=h0 is not None,
                            KEEP=keep_states, num_warps=NUM_WARPS)
    return y, last, ckpt


@mamba_scan.register_fake
def _(x, delta, At, Bm, Cm, h0, keep_states):
    (Bsz, L, D), N = x.shape, At.shape[0]
    return torch.empty_like(x), x.new_empty(Bsz, N, D), x.new_empty(Bsz, -(-L // SEG) if keep_states else 1, N, D)


@torch.library.custom_op("ttt_bench::mamba_scan_backward", mutates_args=())
def mamba_scan_backward(x: torch.Tensor, delta: torch.Tensor, At: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                        ckpt: torch.Tensor, dy: torch.Tensor, dlast: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x, delta, A^T, B, C and h0 from those of y and the last state."""
    (Bsz, L, D), N = x.shape, At.shape[0]
    grid = _grid(x)
    block_n = triton.next_power_of_2(N)
    dx, ddelta = torch.empty_like(x), torch.empty_like(x)
    dAt, dh0 = x.new_empty(Bsz, N, D), x.new_empty(Bsz, N, D)
    dB, dC = x.new_empty(Bsz, grid[1], L, N), x.new_empty(Bsz, grid[1], L, N)  # per block: summed below
    scratch = x.new_empty(Bsz * grid[1], SEG + 1, block_n, BLOCK_D)
    _scan_backward[grid](x, delta, At, Bm, Cm, ckpt, dy.contiguous(), dlast.contiguous(), dx, ddelta, dAt, dB, dC,
                         dh0, scratch, L, D, N=N, BLOCK_N=block_n, BLOCK_D=BLOCK_D, SEG=SEG, num_warps=NUM_WARPS)
    return dx, ddelta, dAt.sum(0), dB.sum(1), dC.sum(1), dh0


@mamba_scan_backward.register_fake
def _(x, delta, At, Bm, Cm, ckpt, dy, dlast):
    (Bsz, L, D), N = x.shape, At.shape[0]
    return (torch.empty_like(x), torch.empty_like(x), torch.empty_like(At), torch.empty_like(Bm), torch.empty_like(Cm),
            x.new_empty(Bsz, N, D))


def _save_for_backward(ctx, inputs, output):
    x, delta, At, Bm, Cm, h0, _keep = inputs
    ctx.save_for_backward(x, delta, At, Bm, Cm, output[2])
    ctx.has_h0 = h0 is not None
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dy, dlast, _dckpt):
    x, delta, At, Bm, Cm, ckpt = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy
    dlast = x.new_zeros(x.shape[0], At.shape[0], x.shape[2]) if dlast is None else dlast
    dx, ddelta, dAt, dB, dC, dh0 = mamba_scan_backward(x, delta, At, Bm, Cm, ckpt, dy, dlast)
    return dx, ddelta, dAt, dB, dC, dh0 if ctx.has_h0 else None, None


mamba_scan.register_autograd(_backward, setup_context=_save_for_backward)


def selective_scan_triton(x, delta, At, Bm, Cm, h0=None):
    """x, delta (B, L, D); At = A^T (N, D); Bm, Cm (B, L, N); h0 (B, N, D) or None; tensors of one dtype (fp32
    or fp64) on a CUDA device, or on CPU under TRITON_INTERPRET=1. Returns y (B, L, D) = sum_n C h and the last
    state (B, N, D), as cpu_scan.selective_scan_cpp and scan.py's chunked scan."""
    args = tuple(None if t is None else t.contiguous() for t in (x, delta, At, Bm, Cm, h0))
    dtypes = {t.dtype for t in args if t is not None}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        got = ", ".join(sorted(map(str, dtypes)))
        raise ValueError(f"the Triton selective scan takes tensors of one dtype, fp32 or fp64; got {got}")
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    y, last, _ = mamba_scan(*args, keep)
    return y, last
