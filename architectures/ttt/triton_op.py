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
    owned = state.owned
    if n_decode:  # the primal form, token by token, updating the state's buffers in place
        params, acc = decode_buffers(params, acc, B, owned)
        for i in range(n_decode):
            outs.append(kernels.decode_step(q[:, :, i], k[:, :, i], v[:, :, i], a[:, :, i], tok, ln_w, ln_b,
                                            params, acc, off)[:, :, None])
            off = (off + 1) % b  # a commit (off back to 0) zeroes acc in place: kept for the next mini-batch
        t, owned = n_decode, True
    if t < T:
        group = checkpoint_group if checkpoint_group > 0 else triton_linear.DEFAULT_GROUP
        out, params, acc = kernels.prefill(q[:, :, t:], k[:, :, t:], v[:, :, t:], a[:, :, t:], tok, ln_w, ln_b,
                                           params, group)  # states saved every `group` mini-batches
        outs.append(out)
        off = (T - t) % b
        acc = acc if off else {}
        owned = not needs_grad  # fresh tensors; with a gradient, autograd keeps them for the backward
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out, InnerState(row_biases(params), row_biases(acc), off, owned)


def decode_buffers(params: dict, acc: dict, B: int, owned: bool) -> tuple[dict, dict]:
    """The fp32 contiguous (B, H, ...) tensors the decode kernel updates in place (biases (B, H, n)): the
    state's own when it owns them (`InnerState.owned`: a decode cache after its first step or a prefill
    without gradient), so a step reads and writes the same memory as the step before it (no copy of the
    state per token, and a CUDA graph of steps continues the sequence on every replay); else fp32 copies,
    so a layer's initial weights and tensors autograd saved are never written. acc {}: zeros."""
    def ours(x: torch.Tensor) -> bool:
        return owned and x.dtype == torch.float32 and x.is_contiguous() and x.shape[0] == B

    def buffer(x: torch.Tensor) -> torch.Tensor:
        return x if ours(x) else x.float().expand(B, *x.shape[1:]).contiguous().clone()

    params = {n: buffer(p) for n, p in params.items()}
    acc = {n: buffer(acc[n]) if acc else torch.zeros_like(p) for n, p in params.items()}
    return params, acc
