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
(no exp of a positive cumulative sum), and Python runs a few loop bodies per chunk position, not one per
token. The backward runs the same schedule in reverse on the adjoint g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}:

    d(delta_t u_t) = sum_n g_t B_t      dB_t = sum_d g_t (delta_t u_t)      dC_t = sum_d dy_t h_t
    d(delta_t A)   = g_t exp(delta_t A) h_{t-1}

The scan is memory-bound: the forward saves only the true states (B L N D floats) for the backward; the
decays exp(delta A), as large, are recomputed wherever they are needed (an exp is cheaper than a round trip
to memory). The loop bodies are the six `_*_step` functions, each a block of steps: the local scans keep
only their end state, so a body runs LOCAL_BLOCK positions of every chunk and never writes the states in
between; a true scan's body runs BLOCK positions; a boundary recurrence's body CARRY_BLOCK chunks.
`compiled_steps()` gives torch.compile'd versions (each body fuses into a few loops) that the mixer uses in
training with trainer.compile=hot_path and backend=torch. On machines without CUDA the mixer's default is
backend=cpp instead: the same recurrence as one sequential C++ pass (cpu_scan.py; selective_scan(kernel="cpp")),
and on GPUs without mamba-ssm's CUDA kernels backend=triton: one sequential Triton pass (triton_scan.py).
Layout: (B, L, D) activations, (B, L, N) B and C, the state (N, D) so that the long axis D is contiguous;
mamba-ssm's selective_scan_fn takes (B, D, L), (B, N, L), state (B, D, N). Compute is fp32 (fp64 when given
fp64, for tests), outside autocast.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from architectures.mamba.cpu_scan import selective_scan_cpp

DEFAULT_CHUNK = 64
LOCAL_BLOCK = 8  # positions per call of the local scans' loop bodies (they keep only the end state)
CARRY_BLOCK = 16  # chunks per call of the recurrences over the chunk boundaries
BLOCK = 2  # positions per call of the true scans' loop bodies (they write every state or read it back)
MIN_CHUNKS = 64  # short sequences take shorter chunks, down to MIN_CHUNK, to have this many (chunk_for)
MIN_CHUNK = 16
KERNELS = ("chunked", "cpp", "triton")  # selective_scan's implementations of the recurrence


def chunk_for(L: int, chunk_size: int) -> int:
    """The chunk length the mixer scans a sequence of L tokens with: chunk_size, or shorter for short sequences,
    so that the Python loops over a chunk's positions (a fixed cost per call) do not dominate. Measured on 2
    cores, ms per token at chunk 16 / 32 / 64: prefill (cpu-xs Mamba, 4 x 64) 1k 0.027 / 0.036 / 0.051,
    2k 0.027 / 0.027 / 0.031, 4k 0.031 / 0.027 / 0.027, 8k 0.029 / 0.025 / 0.021; training (the same model,
    compiled loop bodies) 1k 0.055 / 0.056 / 0.062, 2k 0.052 / 0.045 / 0.047, 8k 0.041 / 0.037 / 0.038."""
    return min(chunk_size, max(MIN_CHUNK, L // MIN_CHUNKS))


def _effective_delta(delta, delta_bias, delta_softplus: bool, dtype):
    """delta (+ delta_bias), through softplus when asked, in the compute dtype."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    return F.softplus(delta) if delta_softplus else delta


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, chunk_size: int = DEFAULT_CHUNK, return_last_state: bool = False,
                   steps: dict | None = None, kernel: str = "chunked"):
    """u, delta, z: (B, L, D); A: (D, N); B, C: (B, L, N); D, delta_bias: (D,);
    initial_state: (B, D, N) or None (zeros); steps: the loop bodies (None: eager, or compiled_steps());
    kernel: "chunked" (this file's schedule), "cpp" (the sequential C++ kernel, cpu_scan.py: CPU tensors) or
    "triton" (the sequential Triton kernels, triton_scan.py: CUDA tensors, or CPU under TRITON_INTERPRET=1).
    Returns y (B, L, D) [and the last state (B, D, N)]."""
    if kernel not in KERNELS:
        raise ValueError(f"selective_scan kernel must be one of {KERNELS}, got {kernel!r}")
    dtype = u.dtype
    ct = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        delta = _effective_delta(delta, delta_bias, delta_softplus, ct)
        u32 = u.to(ct)
        x = delta * u32  # (B, L, D): the input of the recurrence
        h0 = None if initial_state is None else initial_state.to(ct).transpose(-1, -2)  # (B, N, D)
        args = (x, delta, A.to(ct).t().contiguous(), B.to(ct), C.to(ct), h0)  # A^T (N, D), contiguous: compiled bodies lay out their states like it
        steps = steps or EAGER_STEPS
        if kernel == "cpp":
            y, last = selective_scan_cpp(*args)
        elif kernel == "triton":
            from architectures.mamba.triton_scan import selective_scan_triton  # imports triton

            y, last = selective_scan_triton(*args)
        elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
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


# -- the loop bodies: K consecutive positions of every chunk; states (B, nc, N, D), inputs (B, nc, K, D|N)

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


def _decay(dl, At):
    """exp(delta A) (B, nc, N, D) from dl (B, nc, D) and A^T (N, D): recomputed wherever it is needed. A new
    tensor that the bodies update in place (in eager mode a large allocation costs more than the pass)."""
    return torch.mul(dl[..., None, :], At).exp_()


def _local_step(h, dl, At, Bs, xs):
    """Forward, pass 1, over the K positions of dl, Bs, xs (B, nc, K, D|N): h <- a h + B x, K times."""
    for k in range(dl.shape[2]):
        h = _decay(dl[:, :, k], At).mul_(h).addcmul_(Bs[:, :, k, :, None], xs[:, :, k, None, :])
    return h


def _true_step(h, dl, At, Bs, xs, Cs):
    """Forward, pass 3, over the K positions of dl, Bs, xs, Cs (B, nc, K, D|N): the new states a h + B x
    (a list of K: they are saved) and y = sum_n C h (B, nc, K, D)."""
    hs, ys = [], []
    for k in range(dl.shape[2]):
        h = _decay(dl[:, :, k], At).mul_(h).addcmul_(Bs[:, :, k, :, None], xs[:, :, k, None, :])
        hs.append(h)
        ys.append(_sum_n(Cs[:, :, k], h))
    return hs, torch.stack(ys, 2)


def _adjoint_local_step(g, dl_next, At, Cs, dys):
    """Backward, pass 1, over K positions i (last first), dl_next at i + 1: g <- a_{i+1} g + C_i dy_i."""
    for k in reversed(range(dl_next.shape[2])):
        g = _decay(dl_next[:, :, k], At).mul_(g).addcmul_(Cs[:, :, k, :, None], dys[:, :, k, None, :])
    return g


def _adjoint_step(ag, Cs, dys, hs, xs, Bs, At, dl, dAt):
    """Backward, pass 3, over K positions i (last first), from ag = a_{i+1} g_{i+1} after them; hs: the K + 1
    states h_{i-1} .. h_{i+K-1}. Accumulates dA^T into dAt in place. Returns a g at the first position and
    dC, dB, d(delta u), d(delta) (through A), each (B, nc, K, N|D)."""
    grads = []
    for k in reversed(range(dl.shape[2])):
        g = torch.addcmul(ag, Cs[:, :, k, :, None], dys[:, :, k, None, :])  # (B, nc, N, D)
        dC, dB, dx = _sum_d(dys[:, :, k], hs[k + 1]), _sum_d(xs[:, :, k], g), _sum_n(Bs[:, :, k], g)
        ag = g.mul_(_decay(dl[:, :, k], At))
        dlog = ag * hs[k]  # d(delta A) = g a h_{i-1}
        dAt.addcmul_(dl[:, :, k, None, :], dlog)
        grads.append((dC, dB, dx, dlog.mul_(At).sum(-2)))
    return ag, *(torch.stack(gk[::-1], 2) for gk in zip(*grads))


def _carry_step(H, hloc_end, P):
    """Pass 2 over K consecutive chunks: H (B, N, D) enters the first; hloc_end, P (B, K, N, D) are each
    chunk's local end state and total decay. Returns the states entering the K chunks and the one leaving."""
    Hin = []
    for c in range(P.shape[1]):
        Hin.append(H)
        H = torch.addcmul(hloc_end[:, c], P[:, c], H)
    return torch.stack(Hin, 1), H


def _carry_back_step(e, w, P):
    """Backward, pass 2, over K consecutive chunks (last first): e (B, N, D) enters the last chunk's end;
    w = a g at each chunk's local start and P (B, K, N, D). Returns the adjoint entering each chunk's end
    (B, K, N, D) and the one leaving the first chunk's start."""
    E = []
    for c in reversed(range(P.shape[1])):
        E.append(e)
        e = torch.addcmul(w[:, c], P[:, c], e)
    return torch.stack(E[::-1], 1), e


EAGER_STEPS = {"local": _local_step, "true": _true_step, "adjoint_local": _adjoint_local_step,
               "adjoint": _adjoint_step, "carry": _carry_step, "carry_back": _carry_back_step}


@lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile(EAGER_STEPS[name], dynamic=False)


def compiled_steps() -> dict:
    """The loop bodies under torch.compile (compiled once per shape, on first use)."""
    return {name: _compiled(name) for name in EAGER_STEPS}


# -- the chunked schedule -------------------------------------------------------------------

def _chunked(t: torch.Tensor, Q: int) -> torch.Tensor:
    """(B, L, K) -> (B, n_chunks, Q, K), zero-padded at the end (a padded step has delta = 0 and
    x = 0: it leaves the state unchanged). A view when Q divides L. [:, :, i] is position i of every chunk."""
    Bsz, L, K = t.shape
    nc = math.ceil(L / Q)
    if nc * Q > L:  # F.pad copies even when it pads nothing
        t = F.pad(t, (0, 0, 0, nc * Q - L))
    return t.contiguous().view(Bsz, nc, Q, K)


def _unchunked(ts: list, L: int) -> torch.Tensor:
    """Blocks (B, n_chunks, Q_j, K) of consecutive positions of every chunk -> (B, L, K)."""
    t = torch.cat(ts, dim=2)  # (B, nc, Q, K)
    return t.view(t.shape[0], -1, t.shape[-1])[:, :L]


def _carry_in(h0, hloc_end, P, steps):
    """The state entering each chunk. h0 (B, N, D) or None; hloc_end, P: (B, nc, N, D) (the local
    end state and the total decay of each chunk). Returns (B, nc, N, D) and the final state (B, N, D)."""
    H = torch.zeros_like(hloc_end[:, 0]) if h0 is None else h0
    Hin = []
    for c in range(0, P.shape[1], CARRY_BLOCK):
        j = slice(c, c + CARRY_BLOCK)
        Hj, H = steps["carry"](H, hloc_end[:, j], P[:, j])
        Hin.append(Hj)
    return torch.cat(Hin, 1), H


def _carry_out(dlast, w, P, steps):
    """The adjoint entering each chunk's end from the chunks after it, E_c = a g at chunk c+1's start:
    E_{c-1} = P_c E_c + w_c with w_c = a g at chunk c's start. dlast (B, N, D) or None; w, P (B, nc, N, D)."""
    e = torch.zeros_like(w[:, 0]) if dlast is None else dlast
    E = []
    for c in reversed(range(0, P.shape[1], CARRY_BLOCK)):
        j = slice(c, c + CARRY_BLOCK)
        Ej, e = steps["carry_back"](e, w[:, j], P[:, j])
        E.append(Ej)
    return torch.cat(E[::-1], 1)


def _scan_forward(x, delta, At, Bm, Cm, h0, Q: int, steps: dict):
    """y (B, L, D) = sum_n C h, the last state (B, N, D), and what the backward reads: the true states
    (a list of Q tensors (B, nc, N, D)), the states entering each chunk and the decay across each chunk
    ((B, nc, N, D))."""
    Bsz, L, D = x.shape
    Q = max(1, min(Q, L))
    xs, dl, Bs, Cs = (_chunked(t, Q) for t in (x, delta, Bm, Cm))  # (B, nc, Q, D|N)
    h = x.new_zeros(Bsz, xs.shape[1], At.shape[0], D)
    for i in range(0, Q, LOCAL_BLOCK):  # 1. local scans from zero
        j = slice(i, i + LOCAL_BLOCK)
        h = steps["local"](h, dl[:, :, j], At, Bs[:, :, j], xs[:, :, j])
    P = _decay(dl.sum(2), At)  # (B, nc, N, D): decay across each chunk
    Hin, last = _carry_in(h0, h, P, steps)  # 2. chunk boundaries
    ys, states = [], [Hin]
    for i in range(0, Q, BLOCK):  # 3. the true scan from each chunk's entering state
        j = slice(i, i + BLOCK)
        hs, yj = steps["true"](states[-1], dl[:, :, j], At, Bs[:, :, j], xs[:, :, j], Cs[:, :, j])
        ys.append(yj)
        states += hs
    return _unchunked(ys, L), last, states[1:], Hin, P


class ChunkedScan(torch.autograd.Function):
    """(x = delta * u, delta, A^T, B, C, h0) -> (y = sum_n C h, last state), backward by the reverse
    chunked schedule. Saves the states (B L N D floats); the decays exp(delta A) are recomputed."""

    @staticmethod
    def forward(ctx, x, delta, At, Bm, Cm, h0, Q, steps):
        y, last, states, Hin, P = _scan_forward(x, delta, At, Bm, Cm, h0, Q, steps)
        ctx.save_for_backward(x, delta, At, Bm, Cm, Hin, P, *states)
        ctx.has_h0, ctx.steps = h0 is not None, steps
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, delta, At, Bm, Cm, Hin, P, *states = ctx.saved_tensors
        Q, L, steps = len(states), x.shape[1], ctx.steps
        xs, dl, Bs, Cs = (_chunked(t, Q) for t in (x, delta, Bm, Cm))  # (B, nc, Q, D|N)
        dys = _chunked(dy if dy is not None else torch.zeros_like(x), Q)
        # 1. local adjoint scans from zero at each chunk's end; only g at the chunk's start is kept
        g = Cs[:, :, Q - 1, :, None] * dys[:, :, Q - 1, None, :]  # (B, nc, N, D)
        for i in reversed(range(0, Q - 1, LOCAL_BLOCK)):  # positions i .. j - 1
            j = min(i + LOCAL_BLOCK, Q - 1)
            g = steps["adjoint_local"](g, dl[:, :, i + 1:j + 1], At, Cs[:, :, i:j], dys[:, :, i:j])
        # 2. the adjoint entering each chunk's end from the chunks after it
        E = _carry_out(dlast, _decay(dl[:, :, 0], At) * g, P, steps)
        # 3. the true adjoint scan from E, and the gradients position by position
        grads, hs = [], [Hin, *states]  # hs[i]: the state before position i
        dAt = torch.zeros_like(E)
        ag = E  # a_{i+1} g_{i+1}
        for i in reversed(range(0, Q, BLOCK)):
            j = slice(i, i + BLOCK)
            ag, *gj = steps["adjoint"](ag, Cs[:, :, j], dys[:, :, j], hs[j.start:j.stop + 1], xs[:, :, j], Bs[:, :, j],
                                       At, dl[:, :, j], dAt)
            grads.append(gj)
        dCs, dBs, dxs, ddl = (_unchunked(gs[::-1], L) for gs in zip(*grads))
        dh0 = ag[:, 0] if ctx.has_h0 else None
        return dxs, ddl, dAt.sum((0, 1)), dBs, dCs, dh0, None, None
