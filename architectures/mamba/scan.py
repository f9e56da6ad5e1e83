"""Mamba-1's selective scan in plain PyTorch: a chunked two-level scan with a hand-written backward,
and the one-token decode step.

The recurrence (Gu & Dao 2023, Alg. 2), per batch b, channel d, state n, token t:

    h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t        A = -exp(A_log): (D, N), delta: (B, L, D)
    y_t = sum_n C_t[n] h_t[n]  (+ D u_t, then * silu(z_t))

The state has D x N entries per token and every entry decays at its own data-dependent rate, so
(unlike Mamba-2) the work is elementwise, not matmul-shaped. The sequence is cut into chunks of Q
tokens and

  1. a local scan runs over the Q positions of every chunk at once, from a zero state: Q steps on
     (B, n_chunks, N, D) slices, keeping only each chunk's end state;
  2. a short recurrence over the chunk boundaries gives each chunk its entering state
     H_c = P_c H_{c-1} + hloc_c,  P_c = exp(A sum_{t in c} delta_t);
  3. the true scan runs again over the Q positions of every chunk at once, from H_c, and reads out y.

Every factor is a product of decays exp(delta A) <= 1: the schedule is exact and stable for any delta
(no exp of a positive cumulative sum), and Python runs 2Q + n_chunks loop bodies, not one per token.
The backward runs the same schedule in reverse on the adjoint g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}:

    d(delta_t u_t) = sum_n g_t B_t      dB_t = sum_d g_t (delta_t u_t)      dC_t = sum_d dy_t h_t
    d(delta_t A)   = g_t exp(delta_t A) h_{t-1}

The loop bodies are the four `_*_step` functions; `compiled_steps()` gives torch.compile'd versions
(each body fuses into one or two loops: about 1.5x on 2 CPU cores) that the mixer uses in training
with trainer.compile=hot_path. Layout: (B, L, D) activations, (B, L, N) B and C, the state (N, D) so that
the long axis D is contiguous; mamba-ssm's selective_scan_fn takes (B, D, L), (B, N, L), state (B, D, N).
Compute is fp32 (fp64 when given fp64, for tests), outside autocast.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def _effective_delta(delta, delta_bias, delta_softplus: bool, dtype):
    """delta (+ delta_bias), through softplus when asked, in the compute dtype."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    return F.softplus(delta) if delta_softplus else delta


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, chunk_size: int = DEFAULT_CHUNK, return_last_state: bool = False,
                   steps: dict | None = None):
    """u, delta, z: (B, L, D); A: (D, N); B, C: (B, L, N); D, delta_bias: (D,);
    initial_state: (B, D, N) or None (zeros); steps: the loop bodies (None: eager, or compiled_steps()).
    Returns y (B, L, D) [and the last state (B, D, N)]."""
    dtype = u.dtype
    ct = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        delta = _effective_delta(delta, delta_bias, delta_softplus, ct)
        u32 = u.to(ct)
        x = delta * u32  # (B, L, D): the input of the recurrence
        h0 = None if initial_state is None else initial_state.to(ct).transpose(-1, -2)  # (B, N, D)
        args = (x, delta, A.to(ct).t(), B.to(ct), C.to(ct), h0)  # A^T (N, D)
        steps = steps or EAGER_STEPS
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            y, last = ChunkedScan.apply(*args, chunk_size, steps)
        else:
            y, last = _scan_forward(*args, chunk_size, steps)[:2]
        last = last.transpose(-1, -2)  # (B, D, N)
        if D is not None:
            y = y + u32 * D.to(ct)
        if z is not None:
            y = y * F.silu(z.to(ct))
    y = y.to(dtype)
    return (y, last) if return_last_state else y


def selective_state_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """One decode step: state (B, D, N) is updated in place; u, delta, z: (B, D); B, C: (B, N).
    Returns y (B, D)."""
    dtype = u.dtype
    ct = state.dtype
    delta = _effective_delta(delta, delta_bias, delta_softplus, ct)
    u32 = u.to(ct)
    decay = torch.exp(delta[..., None] * A.to(ct))  # (B, D, N)
    state.mul_(decay).add_((delta * u32)[..., None] * B.to(ct)[:, None, :])
    y = (state @ C.to(ct)[..., None]).squeeze(-1)  # (B, D)
    if D is not None:
        y = y + u32 * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype)


# -- the loop bodies: one position of every chunk; states (B, nc, N, D), per-position inputs (B, nc, D|N)

def _sum_n(c, h):
    """sum_n c[n] h[n, :] -> (B, nc, D). Eager: a batched (1, N) @ (N, D); compiled: fused into the loop."""
    if torch.compiler.is_compiling():
        return (c[..., None] * h).sum(-2)
    return (c[..., None, :] @ h).squeeze(-2)


def _sum_d(v, h):
    """sum_d v[d] h[:, d] -> (B, nc, N). Eager: a batched (1, D) @ (D, N); compiled: fused into the loop."""
    if torch.compiler.is_compiling():
        return (v[..., None, :] * h).sum(-1)
    return (v[..., None, :] @ h.transpose(-1, -2)).squeeze(-2)


def _local_step(h, dl, At, Bi, xi):
    """Forward, pass 1: a = exp(delta A); h <- a h + B x in place. Returns a."""
    a = torch.exp(dl[..., None, :] * At)
    h.mul_(a).addcmul_(Bi[..., None], xi[..., None, :])
    return a


def _true_step(a, h, Bi, xi, Ci):
    """Forward, pass 3: the new state a h + B x (a new tensor: it is saved) and y = sum_n C h."""
    h = torch.mul(a, h).addcmul_(Bi[..., None], xi[..., None, :])
    return h, _sum_n(Ci, h)


def _adjoint_local_step(g, a_next, Ci, dyi):
    """Backward, pass 1: g <- a_{i+1} g + C dy in place."""
    return g.mul_(a_next).addcmul_(Ci[..., None], dyi[..., None, :])


def _adjoint_step(ag, Ci, dyi, h, xi, Bi, a, h_prev, At, dl, dAt):
    """Backward, pass 3, from ag = a_{i+1} g_{i+1}: the adjoint g_i and the gradients at position i.
    Accumulates dA^T into dAt in place. Returns a_i g_i, dC, dB, d(delta u), d(delta) (through A)."""
    g = torch.addcmul(ag, Ci[..., None], dyi[..., None, :])  # (B, nc, N, D)
    dC, dB, dx = _sum_d(dyi, h), _sum_d(xi, g), _sum_n(Bi, g)
    ag = g.mul_(a)
    dlog = ag * h_prev  # d(delta A) = g a h_{i-1}
    dAt.addcmul_(dl[..., None, :], dlog)
    return ag, dC, dB, dx, (dlog * At).sum(-2)


EAGER_STEPS = {"local": _local_step, "true": _true_step, "adjoint_local": _adjoint_local_step,
               "adjoint": _adjoint_step}


@lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile(EAGER_STEPS[name], dynamic=False)


def compiled_steps() -> dict:
    """The loop bodies under torch.compile (compiled once per shape, on first use)."""
    return {name: _compiled(name) for name in EAGER_STEPS}


# -- the chunked schedule -------------------------------------------------------------------

def _chunked(t: torch.Tensor, Q: int) -> torch.Tensor:
    """(B, L, K) -> (Q, B, n_chunks, K), zero-padded at the end (a padded step has delta = 0 and
    x = 0: it leaves the state unchanged). Slice [i] is position i of every chunk."""
    Bsz, L, K = t.shape
    nc = math.ceil(L / Q)
    t = F.pad(t, (0, 0, 0, nc * Q - L))
    return t.view(Bsz, nc, Q, K).permute(2, 0, 1, 3).contiguous()


def _unchunked(t: torch.Tensor, L: int) -> torch.Tensor:
    """(Q, B, n_chunks, K) -> (B, L, K)."""
    Q, Bsz, nc, K = t.shape
    return t.permute(1, 2, 0, 3).reshape(Bsz, nc * Q, K)[:, :L]


def _carry_in(h0, hloc_end, P):
    """The state entering each chunk. h0 (B, N, D) or None; hloc_end, P: (B, nc, N, D) (the local
    end state and the total decay of each chunk). Returns (B, nc, N, D) and the final state (B, N, D)."""
    H = torch.zeros_like(hloc_end[:, 0]) if h0 is None else h0
    Hin = torch.empty_like(hloc_end)
    for c in range(hloc_end.shape[1]):
        Hin[:, c] = H
        H = torch.addcmul(hloc_end[:, c], P[:, c], H)
    return Hin, H


def _scan_forward(x, delta, At, Bm, Cm, h0, Q: int, steps: dict):
    """y (B, L, D) = sum_n C h, the last state (B, N, D), and what the backward reads: the per-position
    decays and true states (lists of Q tensors (B, nc, N, D)) and the states entering each chunk and
    the decay across each chunk ((B, nc, N, D))."""
    Bsz, L, D = x.shape
    Q = max(1, min(Q, L))
    xs, dl, Bs, Cs = (_chunked(t, Q) for t in (x, delta, Bm, Cm))  # (Q, B, nc, D|N)
    nc = xs.shape[2]
    h = x.new_zeros(Bsz, nc, At.shape[0], D)
    decays = [steps["local"](h, dl[i], At, Bs[i], xs[i]) for i in range(Q)]  # 1. local scans from zero
    P = torch.exp(dl.sum(0)[..., None, :] * At)  # (B, nc, N, D): decay across each chunk
    Hin, last = _carry_in(h0, h, P)  # 2. chunk boundaries
    y = x.new_empty(Q, Bsz, nc, D)
    states, h = [], Hin
    for i in range(Q):  # 3. the true scan from each chunk's entering state
        h, y[i] = steps["true"](decays[i], h, Bs[i], xs[i], Cs[i])
        states.append(h)
    return _unchunked(y, L), last, decays, states, Hin, P


class ChunkedScan(torch.autograd.Function):
    """(x = delta * u, delta, A^T, B, C, h0) -> (y = sum_n C h, last state), backward by the reverse
    chunked schedule. Saves the decays and states (2 x B L N D floats)."""

    @staticmethod
    def forward(ctx, x, delta, At, Bm, Cm, h0, Q, steps):
        y, last, decays, states, Hin, P = _scan_forward(x, delta, At, Bm, Cm, h0, Q, steps)
        ctx.save_for_backward(x, delta, At, Bm, Cm, Hin, P, *decays, *states)
        ctx.has_h0, ctx.steps = h0 is not None, steps
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, delta, At, Bm, Cm, Hin, P, *saved = ctx.saved_tensors
        Q, nc, L = len(saved) // 2, P.shape[1], x.shape[1]
        decays, states, steps = saved[:Q], saved[Q:], ctx.steps
        xs, dl, Bs, Cs = (_chunked(t, Q) for t in (x, delta, Bm, Cm))
        dys = _chunked(dy if dy is not None else torch.zeros_like(x), Q)
        # 1. local adjoint scans from zero at each chunk's end; only g at the chunk's start is kept
        g = Cs[Q - 1][..., None] * dys[Q - 1][..., None, :]  # (B, nc, N, D)
        for i in reversed(range(Q - 1)):
            g = steps["adjoint_local"](g, decays[i + 1], Cs[i], dys[i])
        # 2. the adjoint entering each chunk's end from the chunks after it: E_c = a g at chunk c+1's start
        E = torch.empty_like(g)
        e = torch.zeros_like(E[:, 0]) if dlast is None else dlast
        for c in reversed(range(nc)):
            E[:, c] = e
            e = torch.addcmul(P[:, c] * e, decays[0][:, c], g[:, c])
        # 3. the true adjoint scan from E, and the gradients position by position
        dxs, ddl = torch.empty_like(xs), torch.empty_like(dl)
        dBs, dCs = torch.empty_like(Bs), torch.empty_like(Cs)
        dAt = torch.zeros_like(E)
        ag = E  # a_{i+1} g_{i+1}
        for i in reversed(range(Q)):
            ag, dCs[i], dBs[i], dxs[i], ddl[i] = steps["adjoint"](
                ag, Cs[i], dys[i], states[i], xs[i], Bs[i], decays[i], states[i - 1] if i else Hin, At, dl[i], dAt)
        dh0 = ag[:, 0] if ctx.has_h0 else None
        return (_unchunked(dxs, L), _unchunked(ddl, L), dAt.sum((0, 1)), _unchunked(dBs, L), _unchunked(dCs, L),
                dh0, None, None)
