"""TTT-Linear's whole mini-batches as one autograd op: the dual form's loop without autograd inside it.

dual.py trains through autograd, which records every mini-batch's dozen ops: at 32k tokens and
b = 16 that is 2,048 mini-batches per layer, and on a CPU the graph's bookkeeping, the per-op
dispatch and the f x f temporaries of the weight update cost several times the matmuls. Here the
forward runs the same formulas under no_grad, writing the weights at the start of every mini-batch
into one preallocated stack, and the backward walks the mini-batches in reverse with the gradient
derived by hand (dual_backward.py derives it, and tests/test_ttt_triton.py checks it against
autograd; the Triton kernels run the same math). Per head, mini-batch i (rows c = b tokens):

  forward                                     backward (d. = gradient of the loss wrt .)
  [Zk; Zq] = [K; Q] W + b                     [dK; dQ] += [dZ; dZbar] W^T, dW += [K; Q]^T [dZ; dZbar]
  G   = LNgrad(Zk, t; gamma, beta)            (dZ, dt, dgamma, dbeta) = LNgrad's VJP of dG
  Zbar = Zq - M G                             dM = -dZbar G^T,  dG = -M^T dZbar
  W'  = W - tok_c K^T (a G)                   P = K dW' + db',  d(aG) = -tok_c P,  dtok_c = -sum(P * aG),
  b'  = b - tok_c 1^T (a G)                   dK -= tok_c (aG) dW'^T,  dW += dW',  db += db'

M = E * (Q K^T + 1) with E = tril(tok a^T), t = V - K, the LN after the loop and the residual stay
outside, in autograd (dual.py computes them for all mini-batches at once), so this op's inputs are
(q, k, t, a, M, tok_c, W0, b0, gamma, beta) and its outputs (Zbar, W_n, b_n). It covers TTT-Linear
with the paper's inner model (LN, residual, bias: the default options) on whole mini-batches; dual.py
keeps everything else. Compiled (trainer.compile=hot_path), sequences of 64 mini-batches and more (1k tokens
at b = 16) run both loops in blocks of consecutive mini-batches, one compiled call each (ScanKernels).
Memory: the n + 1 weight states (n x H x f^2 floats per sequence), as many as autograd saves through dual.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from architectures.ttt import cpu_scan
from architectures.ttt.dual_backward import ln_grad_vjp
from architectures.ttt.inner import ln_loss_grad_stats


BLOCK = 8             # mini-batches per call of a compiled block
BLOCKED_FROM = 64     # mini-batches per sequence from which the loops run in compiled blocks (T >= 1k at b = 16):
                      # from 256 (4k) on, cpu-xs training at 1k-2k took 1.7-1.8x the per-token time of 4k-32k


@dataclass(frozen=True)
class ScanKernels:
    """The elementwise work of one mini-batch: the LN gradient (forward) and its VJP (backward); compiled, also
    the forward and backward loop bodies over `block` consecutive mini-batches, which the loops use from
    `blocked_from` mini-batches per sequence on (the rest, and shorter sequences, run one mini-batch per step)."""

    forward: Callable = ln_loss_grad_stats
    backward: Callable = ln_grad_vjp
    forward_block: Callable | None = None
    backward_block: Callable | None = None
    block: int = BLOCK
    blocked_from: int = BLOCKED_FROM
    cpp: bool = False  # both loops in C++ instead (cpu_scan.py: backend=cpp)

    @classmethod
    def compiled(cls, block: int = BLOCK, blocked_from: int = BLOCKED_FROM) -> "ScanKernels":
        """torch.compile'd (compiled once per shape). The LN kernels fuse into one loop each: ~1.2x on CPU. A
        block replaces `block` mini-batches' two dozen eager ops with one call (inductor fuses the elementwise
        work between the products): TTT-Linear's forward loop at cpu-xs, 8k (512 mini-batches, 2 heads x 100),
        83 -> 50 ms per layer at 8 mini-batches per block. Its compilation (about 10 s forward, more backward,
        once per (batch x heads, b, f)) pays off from a few dozen steps of 1k tokens: `make sweep
        ARCH=ttt_linear CTX=2k` from a cold compile cache took the same time with blocks from 1k as from 4k
        (12 min 25 s vs 12 min 17 s), cpu-m's steps 1.16 vs 1.25 s; shorter sequences run unblocked."""
        c = lambda fn: torch.compile(fn, dynamic=False)
        return cls(c(ln_loss_grad_stats), c(ln_grad_vjp), c(forward_block), c(backward_block), block, blocked_from)

    def blocked(self, n: int) -> int:
        """How many of a sequence's n mini-batches (from the first) run in blocks."""
        if self.forward_block is None or n < self.blocked_from:
            return 0
        return n - n % self.block


EAGER = ScanKernels()
CPP = ScanKernels(cpp=True)


def _batch_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, n, ...) -> (n, B H, ...), contiguous: mini-batch i is one contiguous (B H, ...) block."""
    B, H, n = x.shape[:3]
    return x.reshape(B * H, n, *x.shape[3:]).transpose(0, 1).contiguous()


def _heads_first(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """(n, B H, ...) -> (B, H, n, ...)."""
    return x.transpose(0, 1).reshape(B, H, x.shape[0], *x.shape[2:])


def forward_step(W, b, kq, t, a, M, gam, bet, tok, ln_grad: Callable = ln_loss_grad_stats):
    """LinearScan.forward's loop body, one mini-batch from the weights at its start, W (BH, f, f) and b (BH, 1, f);
    kq (BH, 2c, f), t (BH, c, f), a (BH, c, 1), M (BH, c, c); gam, bet (BH, 1, f); tok (1,). Returns the weights
    after it ((BH, f, f), (BH, 1, f)), G, zhat, r and Zbar ((BH, c, f|f|1|f))."""
    c = t.shape[1]
    Z = torch.baddbmm(b, kq, W)  # (BH, 2c, f): [K W + b; Q W + b]
    G, zhat, r = ln_grad(Z[:, :c], t, gam, bet)
    zbar = torch.baddbmm(Z[:, c:], M, G, alpha=-1.0)  # Zq - M G
    aG = a * G
    W = W - tok * torch.bmm(kq[:, :c].transpose(-1, -2), aG)
    b = b - tok * aG.sum(-2, keepdim=True)
    return W, b, G, zhat, r, zbar


def backward_step(dW, db, W, G, kq, dZbar, a, M, zhat, r, t, gam, bet, tok, ln_vjp: Callable = ln_grad_vjp):
    """LinearScan.backward's loop body, one mini-batch, from the gradients of the weights after it, dW (BH, f, f)
    and db (BH, 1, f); W (BH, f, f) the weights at its start; the rest as LinearScan saves them. Returns the
    gradients of the weights before it, its dtok (), dgamma and dbeta terms ((BH, 1, f)), and d[K; Q], dt, da,
    dM ((BH, 2c|c|c|c, f|f|1|c))."""
    c = t.shape[1]
    k = kq[:, :c]
    aG = a * G
    P = torch.baddbmm(db, k, dW)  # (BH, c, f): K dW' + db'
    dtok = -(P * aG).sum()
    daG = -tok * P
    da = (daG * G).sum(-1, keepdim=True)
    dG = torch.baddbmm(a * daG, M.transpose(-1, -2), dZbar, alpha=-1.0)  # a d(aG) - M^T dZbar
    dM = -torch.bmm(dZbar, G.transpose(-1, -2))
    dZ, dt, dg, dbt = ln_vjp(zhat, r, t, gam, bet, dG)
    dZZ = torch.cat([dZ, dZbar], dim=-2)  # (BH, 2c, f)
    dkq = torch.bmm(dZZ, W.transpose(-1, -2))  # [dZ W^T; dZbar W^T]
    dk = dkq[:, :c] - tok * torch.bmm(aG, dW.transpose(-1, -2))  # through W' = W - tok K^T aG
    dW = torch.baddbmm(dW, kq.transpose(-1, -2), dZZ)  # + K^T dZ + Q^T dZbar
    db = db + dZZ.sum(-2, keepdim=True)
    return (dW, db, dtok, dg.sum(-2, keepdim=True), dbt.sum(-2, keepdim=True), torch.cat([dk, dkq[:, c:]], dim=1),
            dt, da, dM)


def forward_block(W, b, kq, tb, ab, Mb, gam, bet, tok):
    """forward_step over K consecutive mini-batches, from the weights at the first; kq, tb, ab, Mb stacked over
    them, (K, BH, ...). Returns forward_step's outputs stacked over the K mini-batches ((K, BH, ...))."""
    out = []
    for i in range(kq.shape[0]):
        W, b, *rest = forward_step(W, b, kq[i], tb[i], ab[i], Mb[i], gam, bet, tok)
        out.append((W, b, *rest))
    return tuple(torch.stack(x) for x in zip(*out))


def backward_block(dW, db, Ws, Gs, kq, dzb, ab, Mb, zhats, rs, tb, gam, bet, tok):
    """backward_step over K consecutive mini-batches, the last first, from the gradients of the weights after
    them; Ws (K, BH, f, f) the weights at the start of each, the rest stacked as LinearScan saves them. Returns
    the gradients of the weights before the first, dtok, dgamma and dbeta summed over the block, and d[K; Q],
    dt, da, dM stacked ((K, BH, ...))."""
    dtok, dgam, dbet = tok.new_zeros(()), torch.zeros_like(gam), torch.zeros_like(bet)
    out = []
    for i in reversed(range(kq.shape[0])):
        dW, db, dtok_i, dg, dbt, *grads = backward_step(dW, db, Ws[i], Gs[i], kq[i], dzb[i], ab[i], Mb[i], zhats[i],
                                                        rs[i], tb[i], gam, bet, tok)
        dtok, dgam, dbet = dtok + dtok_i, dgam + dg, dbet + dbt
        out.append(grads)
    return (dW, db, dtok, dgam, dbet, *(torch.stack(x[::-1]) for x in zip(*out)))


def _forward_loop(kernels: ScanKernels, kq, tb, ab, Mb, gam, bet, tok, Ws, bs, Gs, zhats, rs, zbar) -> None:
    """LinearScan.forward's loop in Python (shapes there): fills Ws[1:], bs[1:], Gs, zhats, rs, zbar in place."""
    n = kq.shape[0]
    blocked, K = kernels.blocked(n), kernels.block
    for i in range(0, blocked, K):  # compiled blocks of K mini-batches
        j, after = slice(i, i + K), slice(i + 1, i + K + 1)
        Ws[after], bs[after], Gs[j], zhats[j], rs[j], zbar[j] = kernels.forward_block(
            Ws[i], bs[i], kq[j], tb[j], ab[j], Mb[j], gam, bet, tok)
    for i in range(blocked, n):  # one mini-batch per step
        (Ws[i + 1], bs[i + 1], Gs[i], zhats[i], rs[i], zbar[i]) = forward_step(
            Ws[i], bs[i], kq[i], tb[i], ab[i], Mb[i], gam, bet, tok, kernels.forward)


def _backward_loop(kernels: ScanKernels, kq, tb, ab, Mb, gam, bet, tok, Ws, Gs, zhats, rs, dzb, dW, db, dkq, dt, da,
                   dM, dgam, dbet):
    """LinearScan.backward's loop in Python, the last mini-batch first: fills dkq, dt, da, dM in place; returns
    the gradients of the first weights (dW, db), dtok, dgam and dbet."""
    n = kq.shape[0]
    blocked, K = kernels.blocked(n), kernels.block
    dtok = kq.new_zeros(())
    for i in reversed(range(blocked, n)):  # one mini-batch per step, then the compiled blocks
        dW, db, dtok_i, dg, dbt, dkq[i], dt[i], da[i], dM[i] = backward_step(
            dW, db, Ws[i], Gs[i], kq[i], dzb[i], ab[i], Mb[i], zhats[i], rs[i], tb[i], gam, bet, tok, kernels.backward)
        dtok, dgam, dbet = dtok + dtok_i, dgam + dg, dbet + dbt
    for i in reversed(range(0, blocked, K)):
        j = slice(i, i + K)
        dW, db, dtok_j, dgam_j, dbet_j, dkq[j], dt[j], da[j], dM[j] = kernels.backward_block(
            dW, db, Ws[j], Gs[j], kq[j], dzb[j], ab[j], Mb[j], zhats[j], rs[j], tb[j], gam, bet, tok)
        dtok, dgam, dbet = dtok + dtok_j, dgam + dgam_j, dbet + dbet_j
    return dW, db, dtok, dgam, dbet


class LinearScan(torch.autograd.Function):
    """q, k, t (B, H, n, c, f); a (B, H, n, c); M (B, H, n, c, c); tok_c (1,) the last token factor;
    W0 (B|1, H, f, f); b0 (B|1, H, 1, f); gamma, beta: H f numbers, e.g. (H, 1, f). Returns Zbar
    (B, H, n, c, f) and the weights after the n mini-batches, W_n (B, H, f, f), b_n (B, H, 1, f)."""

    @staticmethod
    def forward(ctx, q, k, t, a, M, tok_c, W0, b0, gamma, beta, kernels: ScanKernels):
        B, H, n, c, f = q.shape
        BH = B * H
        kq = torch.cat([_batch_first(k), _batch_first(q)], dim=-2)  # (n, BH, 2c, f)
        tb, ab, Mb = _batch_first(t), _batch_first(a)[..., None], _batch_first(M)  # (n, BH, c, f|1|c)
        gam, bet = (x.reshape(H, 1, f).repeat(B, 1, 1) for x in (gamma, beta))  # (BH, 1, f)
        Ws = q.new_empty(n + 1, BH, f, f)  # the weights at the start of every mini-batch, and after the last
        bs = q.new_empty(n + 1, BH, 1, f)
        Ws[0], bs[0] = W0.expand(B, H, f, f).reshape(BH, f, f), b0.expand(B, H, 1, f).reshape(BH, 1, f)
        Gs, zhats, rs = (q.new_empty(n, BH, c, f), q.new_empty(n, BH, c, f), q.new_empty(n, BH, c, 1))
        zbar = q.new_empty(n, BH, c, f)
        if kernels.cpp:
            cpu_scan.forward_loop(kq, tb, ab, Mb, gam, bet, tok_c.item(), Ws, bs, Gs, zhats, rs, zbar)
        else:
            _forward_loop(kernels, kq, tb, ab, Mb, gam, bet, tok_c, Ws, bs, Gs, zhats, rs, zbar)
        ctx.save_for_backward(kq, tb, ab, Mb, tok_c, Ws, Gs, zhats, rs, gam, bet)
        ctx.kernels = kernels
        ctx.dims, ctx.w0_batch, ctx.b0_batch, ctx.ln_shape = (B, H), W0.shape[0], b0.shape[0], gamma.shape
        return _heads_first(zbar, B, H), Ws[n].view(B, H, f, f).clone(), bs[n].view(B, H, 1, f).clone()

    @staticmethod
    def backward(ctx, dzbar, dW_n, db_n):
        kq, tb, ab, Mb, tok_c, Ws, Gs, zhats, rs, gam, bet = ctx.saved_tensors
        n, BH, c2, f = kq.shape
        c, (B, H) = c2 // 2, ctx.dims
        dzb = _batch_first(dzbar) if dzbar is not None else kq.new_zeros(n, BH, c, f)
        dW = dW_n.reshape(BH, f, f).clone() if dW_n is not None else kq.new_zeros(BH, f, f)
        db = db_n.reshape(BH, 1, f).clone() if db_n is not None else kq.new_zeros(BH, 1, f)
        dkq = torch.empty_like(kq)  # [dK; dQ] per mini-batch
        dt, da, dM = torch.empty_like(tb), torch.empty_like(ab), torch.empty_like(Mb)
        dgam, dbet = torch.zeros_like(gam), torch.zeros_like(bet)
        if ctx.kernels.cpp:
            dtok = cpu_scan.backward_loop(kq, tb, ab, Mb, gam, bet, tok_c.item(), Ws, Gs, zhats, rs, dzb, dW, db, dkq,
                                          dt, da, dM, dgam, dbet)
        else:
            dW, db, dtok, dgam, dbet = _backward_loop(ctx.kernels, kq, tb, ab, Mb, gam, bet, tok_c, Ws, Gs, zhats, rs,
                                                      dzb, dW, db, dkq, dt, da, dM, dgam, dbet)
        dk, dq = _heads_first(dkq[:, :, :c], B, H), _heads_first(dkq[:, :, c:], B, H)
        dW0 = dW.view(B, H, f, f).sum(0, keepdim=True) if ctx.w0_batch == 1 else dW.view(B, H, f, f)
        db0 = db.view(B, H, 1, f).sum(0, keepdim=True) if ctx.b0_batch == 1 else db.view(B, H, 1, f)
        dgamma, dbeta = (x.view(B, H, 1, f).sum(0).reshape(ctx.ln_shape) for x in (dgam, dbet))
        return (dq, dk, _heads_first(dt, B, H), _heads_first(da, B, H)[..., 0], _heads_first(dM, B, H),
                dtok.reshape(tok_c.shape), dW0, db0, dgamma, dbeta, None)


def linear_scan(q, k, t, a, M, tok_c, W0, b0, gamma, beta, kernels: ScanKernels = EAGER):
    """LinearScan.apply (shapes there): Zbar of whole mini-batches and the weights after them."""
    return LinearScan.apply(q, k, t, a, M, tok_c, W0, b0, gamma, beta, kernels)
