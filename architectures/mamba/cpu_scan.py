"""backend=cpp: Mamba-1's selective scan and Mamba-2's SSM as sequential C++ passes over the sequence, for CPU
tensors (Mamba-2: ssd_scan_cpp at the end of this file).

scan.py's chunked schedule keeps Python's loops short, but on a CPU every position of it still reads and
writes a (D, N) state per token through memory, several times (local scans, true scans, and their adjoints).
`cpu_scan.cpp` instead walks each sequence once per tile of 32 channels with the tile's (N, 32) state in
cache, vectorised over the channels (glibc's vector exp). The forward keeps a state every 64 tokens
(1/64 of the chunked scan's saved states); the backward recomputes one 64-token segment at a time and runs
the adjoint back over it. The jobs, (sequence, tile) pairs, run on torch.get_num_threads() threads.
Measured on 2 cores (cpu-xs Mamba at 8k: B 1, L 8192, D 394, N 16, fp32), forward + backward of one layer's
scan: 52 ms here against 200 ms for the chunked scan with compiled loop bodies (/tmp script, this session).

The library is built on first use (architectures/cpp_kernels.py: `$CXX`, cached per source and host);
`unavailable()` says why it cannot be built or loaded: backend=auto then takes the chunked scan, and
backend=cpp raises with that reason. The math is the chunked scan's (same inputs, same gradients, fp32 or
fp64); tests/test_mamba.py checks it against mamba-ssm's selective_scan_ref and a step-by-step reference,
forward and backward. Mamba-2's SSM (ssd_scan_cpp) walks each sequence once per head with its (P, N) state in
cache, the same segments; it computes one exp per token and head (Mamba-1's kernel takes one per state and
channel), and tests/test_mamba.py checks it against the chunked SSD (ssd.py), forward and backward.
"""
from __future__ import annotations

from pathlib import Path

import torch

from architectures.cpp_kernels import Library

KERNEL = Library(Path(__file__).with_name("cpu_scan.cpp"), "Mamba backend=cpp")


def unavailable() -> str | None:
    """None when the kernel runs here, else why not ("needs ...")."""
    return KERNEL.unavailable()


def _forward(x, delta, At, Bm, Cm, h0, keep_states: bool):
    """y (B, L, D), the last state (B, N, D) and, if keep_states, the state every segment (B, L/SEG, N, D)."""
    (Bsz, L, D), N = x.shape, At.shape[0]
    seg = KERNEL.constant("mamba_scan_segment")
    y, last = torch.empty_like(x), x.new_empty(Bsz, N, D)
    ckpt = x.new_empty(Bsz, -(-L // seg), N, D) if keep_states else None
    KERNEL.call("mamba_scan_forward", x.dtype, x, delta, At, Bm, Cm, h0, y, last, ckpt, Bsz, L, D, N,
                torch.get_num_threads())
    return y, last, ckpt


class SelectiveScanCpp(torch.autograd.Function):
    """(x = delta * u, delta, A^T, B, C, h0) -> (y = sum_n C h, last state), as scan.ChunkedScan."""

    @staticmethod
    def forward(ctx, x, delta, At, Bm, Cm, h0):
        y, last, ckpt = _forward(x, delta, At, Bm, Cm, h0, keep_states=True)
        ctx.save_for_backward(x, delta, At, Bm, Cm, ckpt)
        ctx.has_h0 = h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, delta, At, Bm, Cm, ckpt = ctx.saved_tensors
        (Bsz, L, D), N = x.shape, At.shape[0]
        tiles = -(-D // KERNEL.constant("mamba_scan_tile"))
        dx, ddelta, dA, dh0 = torch.empty_like(x), torch.empty_like(x), x.new_empty(Bsz, N, D), x.new_empty(Bsz, N, D)
        dB, dC = x.new_empty(Bsz, tiles, L, N), x.new_empty(Bsz, tiles, L, N)  # per tile of channels: summed below
        KERNEL.call("mamba_scan_backward", x.dtype, x, delta, At, Bm, Cm, ckpt, dy.contiguous(), dlast.contiguous(),
                    dx, ddelta, dA, dB, dC, dh0, Bsz, L, D, N, torch.get_num_threads())
        return dx, ddelta, dA.sum(0), dB.sum(1), dC.sum(1), dh0 if ctx.has_h0 else None


def selective_scan_cpp(x, delta, At, Bm, Cm, h0=None):
    """x, delta (B, L, D); At = A^T (N, D); Bm, Cm (B, L, N); h0 (B, N, D) or None, all CPU tensors of one
    dtype (fp32 or fp64). Returns y (B, L, D) = sum_n C h and the last state (B, N, D)."""
    args = tuple(None if t is None else t.contiguous() for t in (x, delta, At, Bm, Cm, h0))  # checked by KERNEL.call
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return SelectiveScanCpp.apply(*args)
    return _forward(*args, keep_states=False)[:2]


# -- Mamba-2 -----------------------------------------------------------------------------------------------

def _ssd_forward(x, a, Bm, Cm, h0, keep_states: bool):
    """y (b, L, H, P), the last state (b, H, P, N) and, if keep_states, the state every segment (b H, L/SEG, P, N)."""
    (Bsz, L, H, P), (G, N) = x.shape, Bm.shape[2:]
    seg = KERNEL.constant("mamba_scan_segment")
    y, last = torch.empty_like(x), x.new_empty(Bsz, H, P, N)
    ckpt = x.new_empty(Bsz * H, -(-L // seg), P, N) if keep_states else None
    KERNEL.call("ssd_scan_forward", x.dtype, x, a, Bm, Cm, h0, y, last, ckpt, Bsz, L, H, P, G, N,
                torch.get_num_threads())
    return y, last, ckpt


class SsdScanCpp(torch.autograd.Function):
    """Mamba-2's SSM as one sequential C++ pass per sequence and head (ssd.py's recurrence, the math of
    ssd_chunked): (x = dt * xs, a = dt * A, B, C, h0) -> (y, last state)."""

    @staticmethod
    def forward(ctx, x, a, Bm, Cm, h0):
        y, last, ckpt = _ssd_forward(x, a, Bm, Cm, h0, keep_states=True)
        ctx.save_for_backward(x, a, Bm, Cm, ckpt)
        ctx.has_h0 = h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, a, Bm, Cm, ckpt = ctx.saved_tensors
        (Bsz, L, H, P), (G, N) = x.shape, Bm.shape[2:]
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        dx, da, dh0 = torch.empty_like(x), torch.empty_like(a), x.new_empty(Bsz, H, P, N)
        dB, dC = x.new_empty(Bsz, L, H, N), x.new_empty(Bsz, L, H, N)  # per head: summed over each group below
        KERNEL.call("ssd_scan_backward", x.dtype, x, a, Bm, Cm, ckpt, dy, dlast, dx, da, dB, dC, dh0, Bsz, L, H, P,
                    G, N, torch.get_num_threads())
        dB, dC = (g.view(Bsz, L, G, H // G, N).sum(3) for g in (dB, dC))
        return dx, da, dB, dC, dh0 if ctx.has_h0 else None


def ssd_scan_cpp(x, a, Bm, Cm, h0=None):
    """x (b, L, H, P) already times dt; a (b, L, H) the log decays dt * A; Bm, Cm (b, L, G, N); h0 (b, H, P, N) or
    None; CPU tensors of one dtype (fp32 or fp64). Returns y (b, L, H, P) = S_t C_t and the last state
    (b, H, P, N), as ssd.ssd_chunked."""
    args = tuple(None if t is None else t.contiguous() for t in (x, a, Bm, Cm, h0))  # checked by KERNEL.call
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return SsdScanCpp.apply(*args)
    return _ssd_forward(*args, keep_states=False)[:2]
