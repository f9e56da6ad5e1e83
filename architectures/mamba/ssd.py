"""Mamba-2's state space duality (SSD) in plain PyTorch: the chunked algorithm and the decode step.

The recurrence (Dao & Gu 2024), per batch b, head h (P channels), token t, with a scalar decay per
head and token and B, C shared by the heads of a group g:

    S_t = exp(a_t) S_{t-1} + x_t B_t^T        S: (P, N), a_t = dt_t A_h <= 0, x_t already times dt_t
    y_t = S_t C_t

Chunked (chunks of Q tokens; acs = cumulative sum of a inside a chunk):

    Y_diag[q] = sum_{s <= q} (C_q . B_s) exp(acs_q - acs_s) x_s        quadratic, masked "attention"
    states_c  = sum_s exp(acs_last - acs_s) B_s x_s^T                  what chunk c adds to the state
    S_c       = exp(acs_last) S_{c-1} + states_c                       a short loop over chunks
    Y_off[q]  = exp(acs_q) C_q S_{c-1}                                 the carried-in state, read out

Every exponent is a sum of a_t <= 0 over a span, so no factor exceeds 1. All four terms are batched
matmuls; autograd differentiates them. Shapes follow mamba-ssm's mamba_chunk_scan_combined:
x (b, L, H, P), a (b, L, H), B and C (b, L, G, N), states (b, H, P, N).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ssd_chunked(x, a, B, C, chunk_size: int, initial_state=None):
    """x (b, L, H, P), a (b, L, H), B, C (b, L, G, N), initial_state (b, H, P, N) or None.
    Returns y (b, L, H, P) and the final state (b, H, P, N)."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    Q = max(1, min(chunk_size, L))
    nc = math.ceil(L / Q)
    pad = nc * Q - L  # a padded step has a = 0 and x = 0: it leaves the state unchanged
    xc = F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)  # (b, c, G, R, Q, P)
    ac = F.pad(a, (0, 0, 0, pad)).view(b, nc, Q, G, R).permute(0, 1, 3, 4, 2)  # (b, c, G, R, Q)
    Bc = F.pad(B, (0, 0, 0, 0, 0, pad)).view(b, nc, Q, G, N).transpose(2, 3)  # (b, c, G, Q, N)
    Cc = F.pad(C, (0, 0, 0, 0, 0, pad)).view(b, nc, Q, G, N).transpose(2, 3)
    acs = ac.cumsum(-1)  # (b, c, G, R, Q)

    # intra-chunk: (C B^T) masked by the decay between positions, times x
    seg = acs[..., :, None] - acs[..., None, :]  # (b, c, G, R, Q, Q): sum of a over (s, q]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    scores = (Cc @ Bc.transpose(-1, -2))[:, :, :, None]  # (b, c, G, 1, Q, Q)
    y = (scores * decay) @ xc  # (b, c, G, R, Q, P)

    # what each chunk adds to the state, decayed to the chunk's end: (b, c, G, R, N, P)
    to_end = torch.exp(acs[..., -1:] - acs)  # (b, c, G, R, Q)
    added = (Bc[:, :, :, None] * to_end[..., None]).transpose(-1, -2) @ xc

    # the state entering each chunk
    S = (x.new_zeros(b, G, R, N, P) if initial_state is None
         else initial_state.view(b, G, R, P, N).transpose(-1, -2).to(x.dtype))
    chunk_decay = torch.exp(acs[..., -1])[..., None, None]  # (b, c, G, R, 1, 1)
    entering = []
    for decay_c, added_c in zip(chunk_decay.unbind(1), added.unbind(1)):  # unbind: one backward node
        entering.append(S)
        S = decay_c * S + added_c
    S_in = torch.stack(entering, dim=1)  # (b, c, G, R, N, P)

    # the carried-in state, read out at each position
    y = y + (Cc[:, :, :, None] * torch.exp(acs)[..., None]) @ S_in  # (b, c, G, R, Q, P)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, H, P)[:, :L]
    return y, S.transpose(-1, -2).reshape(b, H, P, N)


def ssd_step(state, x, a, B, C):
    """One decode step. state (b, H, P, N) updated in place; x (b, H, P) already times dt; a (b, H);
    B, C (b, G, N). Returns y (b, H, P)."""
    H, G = state.shape[1], B.shape[1]
    Bh = B.repeat_interleave(H // G, dim=1)  # (b, H, N)
    Ch = C.repeat_interleave(H // G, dim=1)
    state.mul_(torch.exp(a)[..., None, None]).add_(x[..., None] * Bh[:, :, None, :])
    return (state @ Ch[..., None]).squeeze(-1)
