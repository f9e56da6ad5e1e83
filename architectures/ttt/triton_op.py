"""The Triton inner loop behind the op signature dual.py's ttt_dual has: (inner, state, q, k, v, a, tok,
ln_w, ln_b, mini_batch, checkpoint_group) -> (out, state after the tokens), with the state as dual.py's
InnerState (biases (B|1, H, 1, n)), so the layer and its decode cache see one op and one state layout
whichever backend runs. The kernels' own wrappers (triton_linear.py, triton_mlp.py: prefill, decode_step)
take biases as (B, H, n), the layout their pointers walk; the conversion happens here, once.

Tokens that finish an open mini-batch, and a single token when no gradient is needed (decoding), go
through the decode kernel (the primal form, token by token; it has no backward); whole and trailing
mini-batches go through the prefill kernel, which trains.
"""
from __future__ import annotations

import torch

from architectures.ttt import triton_linear, triton_mlp
from architectures.ttt.dual import InnerState, flat_biases, row_biases

KERNELS = {"linear": triton_linear, "mlp": triton_mlp}


def ttt_triton(inner: str, state: InnerState, q, k, v, a, tok, ln_w, ln_b, mini_batch: int,
               checkpoint_group: int = 0) -> tuple[torch.Tensor, InnerState]:
    """Outputs (B, H, T, f) for T new tokens continuing `state`, and the state after them; arguments as
    dual.ttt_dual's (ln_w, ln_b (H, 1, f)), for the paper's inner model (LN, residual, bias) with
    mini_batch <= dual.LONG_PIECE (layer.resolve_ttt_backend checks). checkpoint_group: mini-batches per
    saved state of the backward (0: triton_linear.DEFAULT_GROUP)."""
    kernels = KERNELS[inner]
    B, H, T, f = q.shape
    b = mini_batch
    ln_w, ln_b = ln_w[:, 0], ln_b[:, 0]  # (H, f)
    params, acc, off = flat_biases(state.params), flat_biases(state.acc), state.offset
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, a, *params.values()))
    n_decode = min((b - off) % b, T) if off else int(T == 1 and not needs_grad)
    outs, t = [], 0
    if n_decode:  # the primal form, token by token, in place on fp32 copies of the state
        params = {n: p.float().expand(B, *p.shape[1:]).contiguous().clone() for n, p in params.items()}
        acc = {n: (acc[n].float().expand(B, *p.shape[1:]).contiguous().clone() if acc else torch.zeros_like(p))
               for n, p in params.items()}
        for i in range(n_decode):
            outs.append(kernels.decode_step(q[:, :, i], k[:, :, i], v[:, :, i], a[:, :, i], tok, ln_w, ln_b,
                                            params, acc, off)[:, :, None])
            off = (off + 1) % b
        acc = acc if off else {}
        t = n_decode
    if t < T:
        group = checkpoint_group if checkpoint_group > 0 else triton_linear.DEFAULT_GROUP
        out, params, acc = kernels.prefill(q[:, :, t:], k[:, :, t:], v[:, :, t:], a[:, :, t:], tok, ln_w, ln_b,
                                           params, group)  # states saved every `group` mini-batches
        outs.append(out)
        off = (T - t) % b
        acc = acc if off else {}
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out, InnerState(row_biases(params), row_biases(acc), off)
