"""backend=cpp: the TTT inner loops in C++, for CPU tensors: TTT-Linear's scan loops (scan.py's LinearScan) and
inference (infer, decode), TTT-MLP's training loops (MLPScan) and inference (infer_mlp, decode_mlp).

LinearScan walks a sequence's mini-batches in Python; even in compiled blocks of 8, every mini-batch costs two
dozen small products and elementwise passes through PyTorch's dispatcher and inductor's loops. `cpu_scan.cpp`
runs the same two loops (scan.forward_step, scan.backward_step: the same formulas, the same saved tensors) as
one C++ call each, one job per (sequence, head) on torch.get_num_threads() threads, every product a loop whose
innermost runs along a contiguous row of the head dim (vectorised). LinearScan calls it for
ScanKernels.cpp (CPP below); everything around the loops (the layout, the LN after the loop, the residual)
stays as it is. Without a gradient (prefill, generation) `infer` takes the layer's tensors as they are and does
the work around the loop too (M, the LN, the residual), keeping no per-mini-batch state: cpu-xs prefill about
1.4x faster per token at 1k-8k than through the training loop. It reads q, k, v and a where they lie (the layer's
head-transposed views, cpu_scan.cpp's Rows), forms the target v - k itself and writes its output in the layout
the layer reads back, so a prefill copies none of them. `decode` does the same for the tokens inside one mini-batch
(decoding) in place of the dual form's two dozen ops per token (a whole cpu-xs decode step of `ttt_linear_base`,
with layer.py's RoPE table: 1.17 -> 0.73 ms). In a prefill of whole mini-batches (TTTLayer._cpp_prefill) `infer`
also computes q and k as the Mamba backbone's convs of x Wq (Convs), rotates them by RoPE (a table of one
mini-batch's angles) and computes the key factor from the layer's input (Gate); `output` then applies the
post-norm and the gate. The library is built on first use
(architectures/cpp_kernels.py); tests/test_ttt.py checks forward and backward against the eager loops and, through
the layer, against the dual form, and `infer` and `decode` against the dual form (`infer` also against the
token-by-token reference). TTT-MLP runs the same way: without a gradient infer_mlp and decode_mlp (dual._piece_mlp's
formulas per mini-batch or piece), with one MLPScan (both loops, the backward of dual_backward.mlp_minibatch_backward;
a cpu-xs training step of 8 x 1k tokens 320 -> 196 ms against the compiled dual form, of 1 x 8k 1.0 s -> 0.22 s),
checked against autograd through the dual form in fp64 and fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from architectures.cpp_kernels import Library, Strided

KERNEL = Library(Path(__file__).with_name("cpu_scan.cpp"), "TTT backend=cpp")


def unavailable() -> str | None:
    """None when the kernel runs here, else why not ("needs ...")."""
    return KERNEL.unavailable()


def _as(dt, *xs):
    """The tensors as contiguous tensors of dtype dt, the layout the kernels read (no copy where they are)."""
    return (x.to(dt).contiguous() for x in xs)


def forward_loop(kq, tb, ab, Mb, gam, bet, tok, Ws, bs, Gs, zhats, rs, zbar) -> None:
    """LinearScan.forward's loop: fills Ws[1:], bs[1:] (from Ws[0], bs[0]), Gs, zhats, rs and zbar in place.
    kq (n, BH, 2c, f); tb (n, BH, c, f); ab (n, BH, c, 1); Mb (n, BH, c, c); gam, bet (BH, 1, f); tok a float;
    Ws (n + 1, BH, f, f); bs (n + 1, BH, 1, f); Gs, zhats, zbar (n, BH, c, f); rs (n, BH, c, 1)."""
    n, BH, c2, f = kq.shape
    KERNEL.call("ttt_linear_scan_forward", kq.dtype, kq, tb, ab, Mb, gam, bet, float(tok), Ws, bs, Gs, zhats, rs,
                zbar, n, BH, c2 // 2, f, torch.get_num_threads())


def backward_loop(kq, tb, ab, Mb, gam, bet, tok, Ws, Gs, zhats, rs, dzb, dW, db, dkq, dt, da, dM, dgam, dbet):
    """LinearScan.backward's loop: from the gradients of the last weights dW (BH, f, f), db (BH, 1, f), updated
    in place to those of the first; fills dkq, dt, da, dM (shaped as kq, tb, ab, Mb), adds into dgam, dbet
    (BH, 1, f). Returns dtok, summed over the (sequence, head) jobs."""
    n, BH, c2, f = kq.shape
    dtok = kq.new_zeros(BH)
    KERNEL.call("ttt_linear_scan_backward", kq.dtype, kq, tb, ab, Mb, gam, bet, float(tok), Ws, Gs, zhats, rs, dzb,
                dW, db, dkq, dt, da, dM, dtok, dgam, dbet, n, BH, c2 // 2, f, torch.get_num_threads())
    return dtok.sum()


def _rows(x: torch.Tensor) -> tuple[int, int, int]:
    """The (batch, head, token) strides of a (B, H, T[, f]) tensor, in entries: cpu_scan.cpp's Rows."""
    return x.stride(0), x.stride(1), x.stride(2)


def _rows_unit_stride(dt, x: torch.Tensor) -> torch.Tensor:
    """x in dtype dt as it lies where its last dim has a unit stride (the kernels read rows along it), else a
    contiguous copy."""
    x = x.to(dt)
    return x if x.stride(-1) == 1 else x.contiguous()


def _where_they_lie(dt, q, k, v):
    """q, k, v (B, H, T, f) as inference reads them: in dtype dt, each as it lies where the three share one layout
    with a unit stride along f (the layer's head-transposed projections), else contiguous copies."""
    q, k, v = (x.to(dt) for x in (q, k, v))
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


class Gate(NamedTuple):
    """The key factor's inputs, for inference to compute a = scale * sigmoid(x theta^T + bias) itself (the layer's lr
    gate, layer.TTTLayer.key_factor) instead of reading a: x (B, T, d) with a unit stride along d, theta (H, d),
    bias (H,), scale = base_lr / f."""
    x: torch.Tensor
    theta: torch.Tensor
    bias: torch.Tensor
    scale: float


class Convs(NamedTuple):
    """q and k as the Mamba backbone makes them, for inference to compute in C++ instead of reading them: the causal
    convs (width k) of u = x Wq (B, T, d), q_t = q_bias + sum_j q_weight[:, j] u_{t + j - k + 1} (layers.CausalConv;
    k's with k_weight, k_bias), the rows before u from the convs' states (B, k - 1, d), or zeros where None."""
    u: torch.Tensor
    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    q_state: torch.Tensor | None
    k_state: torch.Tensor | None


def _infer_inputs(dt, q, k, v, a: torch.Tensor | Gate, rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    """The first arguments of an inference call (cpu_scan.cpp's INFER_INPUTS_ARGS), each read where it lies: q, k, v
    and their strides (Rows; no contiguous copies of the layer's head-transposed tensors, no target v - k), or with q
    a Convs (and k None) no q, k but v's strides; a and its strides, or null and the Gate's x, its strides, theta,
    bias and scale; the RoPE tables cos, sin (c, f/2) that rotate q and k in the kernel, or null (rotated already);
    the Convs' u, weights, biases, states, u's strides and the width, or nulls."""
    convs = q if isinstance(q, Convs) else None
    if convs is not None:
        if k is not None:
            raise ValueError("inference takes q and k, or Convs as q and k=None")
        v, q_k = _rows_unit_stride(dt, v), (None, None)
    else:
        q, k, v = _where_they_lie(dt, q, k, v)
        q_k = (Strided(q), Strided(k))
    if isinstance(a, Gate):
        x = _rows_unit_stride(dt, a.x)
        given = (None, 0, 0, 0, Strided(x), x.stride(0), x.stride(1), x.shape[-1], *_as(dt, a.theta, a.bias),
                 float(a.scale))
    else:
        a = a.to(dt)
        given = (Strided(a), *_rows(a), None, 0, 0, 0, None, None, 0.0)
    cos_sin = tuple(_as(dt, *rope)) if rope is not None else (None, None)
    if convs is not None:
        u = _rows_unit_stride(dt, convs.u)
        states = [None if st is None else next(_as(dt, st)) for st in (convs.q_state, convs.k_state)]
        wq, bq, wk, bk = _as(dt, convs.q_weight, convs.q_bias, convs.k_weight, convs.k_bias)
        conv_args = (Strided(u), wq, bq, wk, bk, *states, u.stride(0), u.stride(1), wq.shape[1])
    else:
        conv_args = (None,) * 7 + (0, 0, 0)
    return (*q_k, Strided(v), *_rows(v), *given, *cos_sin, *conv_args)


def _output(B: int, H: int, T: int, f: int, dt) -> torch.Tensor:
    """Inference's out (B, H, T, f), laid out (B, T, H, f) as the layer reads it back: its transpose to (B, T, H f)
    is then a view, not a copy."""
    return torch.empty(B, T, H, f, dtype=dt).transpose(1, 2)


def infer(q, k, v, a, tok, gamma, beta, W0, b0, rope=None):
    """Inference over whole mini-batches (no gradient): the outputs q + LN(Zbar) and the weights after them, in one
    call that also forms the target v - k, builds M and applies the LN and the residual (dual.ttt_dual does these
    around the loop when it trains). q, k, v (B, H, n c, f) read where they lie (the layer's head-transposed views),
    or q a Convs and k None (the Mamba backbone's q and k computed in the kernel, before their RoPE); a (B, H, n c)
    where it lies, or a Gate that the kernel computes it from; rope: None (q, k rotated already), or the tables cos,
    sin (c, f/2) of the positions 0 .. c - 1 of every mini-batch, which rotate q and k in the kernel
    (layer.TTTLayer's RoPE, restarting every mini-batch); tok (c,); gamma, beta (H, f); W0 (B|1, H, f, f); b0 (B|1,
    H, 1, f). Returns out (B, H, n c, f), laid out (B, T, H, f), W (B, H, f, f), b (B, H, 1, f)."""
    B, H, T, f = v.shape
    c = tok.shape[0]
    dt = v.dtype
    inputs = _infer_inputs(dt, q, k, v, a, rope)
    tok, gamma, beta = _as(dt, tok, gamma, beta)
    W = W0.to(dt).expand(B, H, f, f).clone(memory_format=torch.contiguous_format)  # the kernel updates W, b in place
    b = b0.to(dt).expand(B, H, 1, f).clone(memory_format=torch.contiguous_format)
    out = _output(B, H, T, f, dt)
    KERNEL.call("ttt_linear_scan_infer", dt, *inputs, tok, gamma, beta, W, b, Strided(out), *_rows(out), T // c, B * H,
                H, c, f, torch.get_num_threads())
    return out, W, b


def gather(q, k, v, a, rope, pos0: int) -> tuple[torch.Tensor, ...]:
    """Inference's inputs for tokens inside one mini-batch (decoding: TTTLayer._cpp_decode), in one call: q, k, v and
    a as `infer` takes them (q a Convs and k None on the Mamba backbone; a a Gate), rope the tables (b, f/2) of a
    mini-batch's positions, pos0 the first token's position in its mini-batch. Returns q, k rotated, the target
    t = v - k (B, H, c, f) and a (B, H, c), contiguous, as `decode` and `decode_mlp` read them."""
    B, H, c, f = v.shape
    dt = v.dtype
    inputs = _infer_inputs(dt, q, k, v, a, rope)
    q, k, t = (torch.empty(B, H, c, f, dtype=dt) for _ in range(3))
    a = torch.empty(B, H, c, dtype=dt)
    KERNEL.call("ttt_infer_gather", dt, *inputs, int(pos0), q, k, t, a, B * H, H, c, f, torch.get_num_threads())
    return q, k, t, a


def output(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor | None,
           eps: float) -> torch.Tensor:
    """The layer's output before Wo without a gradient, one C++ pass per token: LayerNorm(z) with the layer's post_norm
    (weight, bias (d,), eps), times gelu_tanh(gate) where a gate is given (the Mamba backbone's). z, gate (B, T, d),
    the output (B, T, d). In place of LayerNorm's, GELU's and the product's three passes, which at a prefill of 1k
    tokens cost mostly their fixed cost per call."""
    dt = z.dtype
    z, weight, bias = _as(dt, z, weight, bias)
    gate = None if gate is None else gate.to(dt).contiguous()
    y = torch.empty_like(z)
    d = z.shape[-1]
    KERNEL.call("ttt_output", dt, z, weight, bias, gate, y, z.numel() // d, d, float(eps), torch.get_num_threads())
    return y


def decode(q, k, t, a, tok, complete: bool, gamma, beta, W, b, acc: dict):
    """Tokens inside one mini-batch without a gradient (decoding; a prefill's open and trailing pieces): the c tokens
    one at a time through the accumulators (dual.py's "Decoding ... carry the partial sums"), in one call that also
    applies the LN and the residual. q, k, t (B, H, c, f); a (B, H, c); tok (c,) the tokens' query factors; gamma,
    beta (H, f); W (B|1, H, f, f), b (B|1, H, 1, f) the weights at the mini-batch's start; acc its accumulators so far
    ({} at its start). complete: the piece ends the mini-batch, whose update is then committed. Returns out (B, H, c,
    f), the weights after ({"W", "b"}: W, b themselves unless complete) and the accumulators after ({} if complete).
    Nothing given is written to: the layer's own W0, b0 start every sequence."""
    B, H, c, f = q.shape
    dt = q.dtype
    q, k, t, a, tok, gamma, beta = _as(dt, q, k, t, a, tok, gamma, beta)
    W_in, b_in = (x.to(dt).expand(B, *x.shape[1:]).contiguous() for x in (W, b))  # (B, H, f, f), (B, H, 1, f)
    GW_in, Gb_in = (acc["W"].to(dt).contiguous(), acc["b"].to(dt).contiguous()) if acc else (None, None)
    GW, Gb = torch.empty_like(W_in), torch.empty_like(b_in)
    W_out, b_out = (torch.empty_like(W_in), torch.empty_like(b_in)) if complete else (None, None)
    out = torch.empty_like(q)
    KERNEL.call("ttt_linear_scan_decode", dt, q, k, t, a, tok, float(tok[-1]), gamma, beta, W_in, b_in, GW_in, Gb_in,
                GW, Gb, W_out, b_out, out, B * H, H, c, f, torch.get_num_threads())
    if complete:
        return out, {"W": W_out, "b": b_out}, {}
    return out, {"W": W, "b": b}, {"W": GW, "b": Gb}


MLP = ("W1", "b1", "W2", "b2")


def _mlp_weights(params: dict, B: int, dt, copy: bool) -> list[torch.Tensor]:
    """W1 (B, H, f, 4f), b1 (B, H, 1, 4f), W2 (B, H, 4f, f), b2 (B, H, 1, f) as contiguous tensors of dtype dt,
    from (B|1, ...) ones; copy: fresh tensors the kernel may write."""
    out = [params[n].to(dt).expand(B, *params[n].shape[1:]) for n in MLP]
    return [x.clone(memory_format=torch.contiguous_format) if copy else x.contiguous() for x in out]


def infer_mlp(q, k, v, a, tok, gamma, beta, params: dict, rope=None):
    """TTT-MLP's whole mini-batches without a gradient (f_res(x) = gelu(x W1 + b1) W2 + b2, dual._piece_mlp), the LN
    and the residual included, as `infer` for TTT-Linear: q, k, v (B, H, n c, f) where they lie, or Convs, None, v;
    a (B, H, n c) or a Gate; rope None or (cos, sin); tok (c,); gamma, beta (H, f); params W1 (B|1, H, f, 4f), b1
    (B|1, H, 1, 4f), W2 (B|1, H, 4f, f), b2 (B|1, H, 1, f). Returns out (B, H, n c, f), laid out (B, T, H, f), and
    the weights after (B, H, ...), as a dict."""
    B, H, T, f = v.shape
    c = tok.shape[0]
    dt = v.dtype
    inputs = _infer_inputs(dt, q, k, v, a, rope)
    tok, gamma, beta = _as(dt, tok, gamma, beta)
    weights = _mlp_weights(params, B, dt, copy=True)  # the kernel updates them in place
    out = _output(B, H, T, f, dt)
    KERNEL.call("ttt_mlp_infer", dt, *inputs, tok, gamma, beta, *weights, Strided(out), *_rows(out), T // c, B * H, H,
                c, f, torch.get_num_threads())
    return out, dict(zip(MLP, weights))


def decode_mlp(q, k, t, a, tok, complete: bool, gamma, beta, params: dict, acc: dict):
    """TTT-MLP's tokens inside one mini-batch without a gradient, as `decode` for TTT-Linear (the c tokens as one
    piece of the dual form with the accumulators): arguments as `decode`, params and acc keyed W1, b1, W2, b2.
    Returns out (B, H, c, f), the weights after (params themselves unless complete) and the accumulators after
    ({} if complete). Nothing given is written to."""
    B, H, c, f = q.shape
    dt = q.dtype
    q, k, t, a, tok, gamma, beta = _as(dt, q, k, t, a, tok, gamma, beta)
    weights = _mlp_weights(params, B, dt, copy=complete)  # written only by a commit
    sums = ([acc[n].to(dt).clone(memory_format=torch.contiguous_format) for n in MLP] if acc
            else [torch.empty_like(w) for w in weights])
    out = torch.empty_like(q)
    KERNEL.call("ttt_mlp_decode", dt, q, k, t, a, tok, float(tok[-1]), gamma, beta, *weights, *sums, int(bool(acc)),
                int(complete), out, B * H, H, c, f, torch.get_num_threads())
    if complete:
        return out, dict(zip(MLP, weights)), {}
    return out, params, dict(zip(MLP, sums))


class MLPScan(torch.autograd.Function):
    """TTT-MLP's whole mini-batches with a gradient: both loops in C++, as LinearScan runs TTT-Linear's (scan.py),
    heads-first. The forward keeps the weights at the start of every mini-batch (n + 1 states of W1, b1, W2, b2 per
    sequence and head, as many as autograd through the dual form keeps) and returns Zbar2, before the LN and the
    residual (they stay in autograd, dual.ttt_dual); the backward recomputes each mini-batch's forward from its
    state and runs dual_backward.mlp_minibatch_backward's math in reverse. q, k, t (B, H, n c, f); a (B, H, n c);
    tok (c,); gamma, beta (H, f); W1 (B|1, H, f, 4f), b1 (B|1, H, 1, 4f), W2 (B|1, H, 4f, f), b2 (B|1, H, 1, f).
    Returns Zbar2 (B, H, n c, f) and the weights after the n mini-batches, (B, H, ...) each."""

    @staticmethod
    def forward(ctx, q, k, t, a, tok, gamma, beta, W1, b1, W2, b2):
        B, H, T, f = q.shape
        c, h, BH = tok.shape[0], 4 * f, B * H
        n = T // c
        q, k, t, a, tok, gamma, beta = (x.contiguous() for x in (q, k, t, a, tok, gamma, beta))
        shapes = ((f, h), (h,), (h, f), (f,))
        states = [q.new_empty(BH, n + 1, *s) for s in shapes]  # the weights at the start of every mini-batch
        for st, p, s in zip(states, (W1, b1, W2, b2), shapes):
            st[:, 0] = p.expand(B, *p.shape[1:]).reshape(BH, *s)
        zbar = torch.empty_like(q)
        KERNEL.call("ttt_mlp_forward", q.dtype, q, k, t, a, tok, gamma, beta, *states, zbar, n, BH, H, c, f,
                    torch.get_num_threads())
        ctx.save_for_backward(q, k, t, a, tok, gamma, beta, *states)
        ctx.shapes = [p.shape for p in (W1, b1, W2, b2)]
        return (zbar, *[st[:, n].reshape(B, *p.shape[1:]).clone() for st, p in zip(states, (W1, b1, W2, b2))])

    @staticmethod
    def backward(ctx, dzbar, *dnext):
        q, k, t, a, tok, gamma, beta, *states = ctx.saved_tensors
        B, H, T, f = q.shape
        c, BH = tok.shape[0], B * H
        dzbar = torch.zeros_like(q) if dzbar is None else dzbar.contiguous()
        grads = [torch.zeros(BH, *st.shape[2:], dtype=q.dtype) if d is None
                 else d.expand(B, *d.shape[1:]).reshape(BH, *st.shape[2:]).clone() for d, st in zip(dnext, states)]
        dq, dk, dt, da = torch.empty_like(q), torch.empty_like(k), torch.empty_like(t), torch.empty_like(a)
        dtok, dgam, dbet = q.new_zeros(BH, c), q.new_zeros(BH, f), q.new_zeros(BH, f)
        KERNEL.call("ttt_mlp_backward", q.dtype, q, k, t, a, tok, gamma, beta, *states, dzbar, *grads, dq, dk, dt, da,
                    dtok, dgam, dbet, T // c, BH, H, c, f, torch.get_num_threads())
        dinit = [g.reshape(B, *s[1:]).sum(0, keepdim=True) if s[0] == 1 else g.reshape(B, *s[1:])
                 for g, s in zip(grads, ctx.shapes)]
        return (dq, dk, dt, da, dtok.sum(0), dgam.view(B, H, f).sum(0), dbet.view(B, H, f).sum(0), *dinit)


def mlp_scan(q, k, t, a, tok, gamma, beta, params: dict):
    """MLPScan.apply (shapes there): Zbar2 of whole mini-batches and the weights after them, as a dict."""
    out = MLPScan.apply(q, k, t, a, tok, gamma, beta, *[params[n] for n in MLP])
    return out[0], dict(zip(MLP, out[1:]))
