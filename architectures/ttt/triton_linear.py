"""TTT-Linear in Triton: the causal dual form for training and prefill (forward and backward kernels)
and the primal form for decoding, with the semantics of dual.py (its oracle) and docs/ttt_math.md.

One program per (sequence, head) walks the mini-batches with W (f x f) and b in fp32 on chip (past f = 64 the
forward keeps W in memory and reads it in tiles of rows: Launch.rows); inputs may be fp32, fp16 or bf16 (loaded,
then computed in fp32). Head dims that are not a power of two (96) are padded to the next one with masked loads;
the LayerNorms divide by the true f.

    forward    per mini-batch: Z = K W + b, G = LNgrad(Z, V - K), M = tril(tok a^T) * (Q K^T + 1),
               out = Q + LN(Q W + b - M G), then W -= tok_b K^T (a G), b -= tok_b sum(a G). The state is
               saved every `group` mini-batches for the backward. A trailing partial mini-batch (a launch
               of its own, PARTIAL) gets its outputs and returns its accumulators (K^T aG, sum aG),
               uncommitted, as dual.py does; in the backward it comes first, also in a launch of its own.
    backward   groups in reverse, two launches each: recompute the group's states from its checkpoint into
               a per-program scratch, then run each mini-batch's backward in reverse (dual_backward.py has
               the same math in PyTorch, with the derivation), carrying dW in place in the dW0 output and
               db, dgamma, dbeta, dtok in theirs (neither W nor dW, f x f each, stays in registers through
               a mini-batch: spills).
    decode     one token: accumulate a k^T G into (GW, Gb), output with W - tok_i GW, commit at the
               end of the mini-batch (the primal form of the notes).

Under TRITON_INTERPRET=1 these run on CPU tensors (tests/test_ttt_triton.py).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl

from architectures.ttt.inner import LN_EPS

# -- shared pieces -----------------------------------------------------------------------------


@triton.jit
def _ln_stats(z, maskf, F: tl.constexpr, eps):
    """Row-wise LN statistics of z (R, BF) over the first F columns: zhat (0 in the padding), 1/sigma."""
    mu = tl.sum(z, axis=1) / F
    zc = tl.where(maskf[None, :], z - mu[:, None], 0.0)
    r = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / F + eps)
    return zc * r[:, None], r


@triton.jit
def _ln_loss_grad(zhat, r, t, gamma, beta, maskf, F: tl.constexpr):
    """G = dl/dZ of 0.5 ||gamma zhat + beta - t||^2 (inner.ln_loss_grad), and gx, mean(gx zhat)."""
    gx = (gamma[None, :] * zhat + beta[None, :] - t) * gamma[None, :]
    m1 = tl.sum(gx, axis=1) / F
    m2 = tl.sum(gx * zhat, axis=1) / F
    G = r[:, None] * (gx - m1[:, None] - zhat * m2[:, None])
    return tl.where(maskf[None, :], G, 0.0), gx, m2


@triton.jit
def _ln_vjp(zhat, r, dy, gamma, maskf, F: tl.constexpr):
    """y = gamma zhat + beta: dz (0 in the padding)."""
    dzh = dy * gamma[None, :]
    m1 = tl.sum(dzh, axis=1) / F
    m2 = tl.sum(dzh * zhat, axis=1) / F
    return tl.where(maskf[None, :], r[:, None] * (dzh - m1[:, None] - zhat * m2[:, None]), 0.0)


@triton.jit
def _load_rows(ptr, rows, offs_f, maskm, maskf, F: tl.constexpr):
    return tl.load(ptr + rows[:, None] * F + offs_f[None, :], mask=maskm[:, None] & maskf[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, rows, offs_f, maskm, maskf, F: tl.constexpr):
    tl.store(ptr + rows[:, None] * F + offs_f[None, :], x.to(ptr.dtype.element_ty),
             mask=maskm[:, None] & maskf[None, :])


@triton.jit
def _ln_grad_vjp(dG, G, zhat, r, gx, c2, t, gamma, beta, maskf, F: tl.constexpr):
    """The VJP of G = LNgrad(Z, t) (dual_backward.ln_grad_vjp): dZ, dt and the row sums for dgamma, dbeta."""
    m_dG = tl.sum(dG, axis=1) / F
    m_dGz = tl.sum(dG * zhat, axis=1) / F
    dgx = tl.where(maskf[None, :], r[:, None] * (dG - m_dG[:, None] - zhat * m_dGz[:, None]), 0.0)
    dzhat = -r[:, None] * (dG * c2[:, None] + gx * m_dGz[:, None]) + dgx * gamma[None, :] * gamma[None, :]
    dgamma = tl.sum(dgx * (2.0 * gamma[None, :] * zhat + beta[None, :] - t), axis=0)
    dbeta = tl.sum(dgx * gamma[None, :], axis=0)
    m1 = tl.sum(dzhat, axis=1) / F
    m2 = tl.sum(dzhat * zhat, axis=1) / F
    m3 = tl.sum(dG * G, axis=1) / F
    dZ = tl.where(maskf[None, :], r[:, None] * (dzhat - m1[:, None] - zhat * m2[:, None] - zhat * m3[:, None]), 0.0)
    return dZ, -dgx * gamma[None, :], dgamma, dbeta


@triton.jit
def _load_outer(LNW, LNB, TOK, h, offs_f, offs_m, maskf, F: tl.constexpr, MB: tl.constexpr):
    """The head's inner-LN weight and bias, the token factors and the last one (it scales the update)."""
    gamma = tl.load(LNW + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    beta = tl.load(LNB + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    return gamma, beta, tl.load(TOK + offs_m).to(tl.float32), tl.load(TOK + MB - 1).to(tl.float32)


@triton.jit
def _load_qkva(Q, K, V, A, base, a_base, rows, offs_f, maskm, maskf, F: tl.constexpr):
    """q, k, v and the key factor a of one mini-batch's rows (masked rows read 0)."""
    return (_load_rows(Q + base, rows, offs_f, maskm, maskf, F), _load_rows(K + base, rows, offs_f, maskm, maskf, F),
            _load_rows(V + base, rows, offs_f, maskm, maskf, F),
            tl.load(A + a_base + rows, mask=maskm, other=0.0).to(tl.float32))


@triton.jit
def _load_minibatch(Q, K, V, A, DOUT, base, a_base, rows, offs_f, maskm, maskf, F: tl.constexpr):
    """_load_qkva's and the output gradient of the rows, for TTT-MLP's backward (written out: ptxas spilled 20 B
    more in TTT-Linear's backward when this called _load_qkva; that one now reads the gradient where it first
    uses it, 8 B fewer)."""
    return (_load_rows(Q + base, rows, offs_f, maskm, maskf, F), _load_rows(K + base, rows, offs_f, maskm, maskf, F),
            _load_rows(V + base, rows, offs_f, maskm, maskf, F),
            tl.load(A + a_base + rows, mask=maskm, other=0.0).to(tl.float32),
            _load_rows(DOUT + base, rows, offs_f, maskm, maskf, F))


@triton.jit
def _load_carried_grads(DB, DLNW, DLNB, DTOK, pid, offs_f, offs_m, maskf, F: tl.constexpr, MB: tl.constexpr):
    """The gradients a backward carries, in memory, from one mini-batch (TTT-Linear) or launch (TTT-MLP) to the
    next: the last bias's (BF), dgamma, dbeta (BF) and dtok (MB)."""
    at = pid * F + offs_f
    return (tl.load(DB + at, mask=maskf, other=0.0), tl.load(DLNW + at, mask=maskf, other=0.0),
            tl.load(DLNB + at, mask=maskf, other=0.0), tl.load(DTOK + pid * MB + offs_m))


@triton.jit
def _start_carried_grads(DB, DBN, DLNW, DLNB, DTOK, pid, offs_f, offs_m, maskf, F: tl.constexpr, BF: tl.constexpr,
                         MB: tl.constexpr):
    """The carried gradients at the start of a backward: the last bias's from DBN (the next layer's), the rest 0."""
    zf = tl.zeros([BF], dtype=tl.float32)
    _store_carried_grads(DB, DLNW, DLNB, DTOK, pid, tl.load(DBN + pid * F + offs_f, mask=maskf, other=0.0), zf, zf,
                         tl.zeros([MB], dtype=tl.float32), offs_f, offs_m, maskf, F, MB)


@triton.jit
def _store_carried_grads(DB, DLNW, DLNB, DTOK, pid, db, dgamma, dbeta, dtok, offs_f, offs_m, maskf, F: tl.constexpr,
                         MB: tl.constexpr):
    """_load_carried_grads' inverse."""
    at = pid * F + offs_f
    tl.store(DB + at, db, mask=maskf)
    tl.store(DLNW + at, dgamma, mask=maskf)
    tl.store(DLNB + at, dbeta, mask=maskf)
    tl.store(DTOK + pid * MB + offs_m, dtok)


@triton.jit
def _group_backwards(gi, pid, n_ckpt, group, n_full):
    """The backward's gi-th group, the last first: its first mini-batch, how many it has, its checkpoint's index."""
    g = n_ckpt - 1 - gi
    first = g * group
    return first, tl.minimum(group, n_full - first), pid * n_ckpt + g


@triton.jit
def _minibatch_outputs(Z, QW, q, k, v, a, tok, gamma, beta, maskf, offs_m, F: tl.constexpr, eps, PREC: tl.constexpr):
    """_minibatch_forward from its products with the state, Z = K W + b and QW = Q W + b (_fwd_rows)."""
    zhat, r = _ln_stats(Z, maskf, F, eps)
    G, gx, m2 = _ln_loss_grad(zhat, r, v - k, gamma, beta, maskf, F)
    A = tl.dot(q, tl.trans(k), input_precision=PREC)
    E = tl.where(offs_m[:, None] >= offs_m[None, :], tok[:, None] * a[None, :], 0.0)
    zbhat, rb = _ln_stats(QW - tl.dot(E * (A + 1.0), G, input_precision=PREC), maskf, F, eps)
    return q + gamma[None, :] * zbhat + beta[None, :], a[:, None] * G


@triton.jit
def _minibatch_forward(W, bias, q, k, v, a, tok, gamma, beta, maskf, offs_m, F: tl.constexpr, eps,
                       PREC: tl.constexpr):
    """One mini-batch: its outputs q + LN(Zbar) and a * G (for the update)."""
    Z = tl.dot(k, W, input_precision=PREC) + bias[None, :]
    QW = tl.dot(q, W, input_precision=PREC) + bias[None, :]
    return _minibatch_outputs(Z, QW, q, k, v, a, tok, gamma, beta, maskf, offs_m, F, eps, PREC)


@triton.jit
def _minibatch_update(W, bias, k, v, a, gamma, beta, tok_last, maskf, F: tl.constexpr, eps, PREC: tl.constexpr):
    """Only the state update of one mini-batch (the backward's recomputation)."""
    Z = tl.dot(k, W, input_precision=PREC) + bias[None, :]
    zhat, r = _ln_stats(Z, maskf, F, eps)
    G, gx, m2 = _ln_loss_grad(zhat, r, v - k, gamma, beta, maskf, F)
    aG = a[:, None] * G
    return W - tok_last * tl.dot(tl.trans(k), aG, input_precision=PREC), bias - tok_last * tl.sum(aG, axis=0)


# -- forward -----------------------------------------------------------------------------------


@triton.jit
def _row_tile(r0, offs_f, maskf, F: tl.constexpr, ROWS: tl.constexpr):
    """Rows r0 .. r0 + ROWS of an f x f matrix: their indices, offsets and mask."""
    wr = r0 + tl.arange(0, ROWS)
    return wr, wr[:, None] * F + offs_f[None, :], (wr < F)[:, None] & maskf[None, :]


@triton.jit
def _fwd_rows(Q, K, V, A, W0, B0, OUT, WN, BN, WC, BC, gamma, beta, tok, tok_last, pid, seq, h, T, n_full, n_ckpt,
              group, stride_w0, stride_b0, eps, F: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
              SAVE: tl.constexpr, PREC: tl.constexpr, W_ROWS: tl.constexpr):
    """The whole mini-batches with the state W at WN, read W_ROWS rows at a time (W_ROWS < BF; Launch.rows):
    per mini-batch, K W and Q W summed over the row tiles (with the matching columns of K and Q), then each tile
    updated, W_r -= tok_b K_r^T (a G). The registers hold one (W_ROWS, BF) tile, not W whole."""
    offs_m, offs_f = tl.arange(0, MB), tl.arange(0, BF)
    maskf = offs_f < F
    all_m = offs_m < MB
    base = pid * T * F
    for r0 in range(0, BF, W_ROWS):  # W0 -> WN
        wr, r_off, r_mask = _row_tile(r0, offs_f, maskf, F, W_ROWS)
        W_r = tl.load(W0 + seq * stride_w0 + h * F * F + r_off, mask=r_mask, other=0.0).to(tl.float32)
        tl.store(WN + pid * F * F + r_off, W_r, mask=r_mask)
    bias = tl.load(B0 + seq * stride_b0 + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    for i in range(0, n_full):
        rows = i * MB + offs_m
        q, k, v, a = _load_qkva(Q, K, V, A, base, pid * T, rows, offs_f, all_m, maskf, F)
        Z = tl.zeros([MB, BF], dtype=tl.float32) + bias[None, :]
        QW = Z
        tl.debug_barrier()  # the state written by every thread
        for r0 in range(0, BF, W_ROWS):
            wr, r_off, r_mask = _row_tile(r0, offs_f, maskf, F, W_ROWS)
            W_r = tl.load(WN + pid * F * F + r_off, mask=r_mask, other=0.0)
            if SAVE:
                if i % group == 0:
                    tl.store(WC + (pid * n_ckpt + i // group) * F * F + r_off, W_r, mask=r_mask)
            Z = tl.dot(_load_rows(K + base, rows, wr, all_m, wr < F, F), W_r, Z, input_precision=PREC)
            QW = tl.dot(_load_rows(Q + base, rows, wr, all_m, wr < F, F), W_r, QW, input_precision=PREC)
        if SAVE:
            if i % group == 0:
                tl.store(BC + (pid * n_ckpt + i // group) * F + offs_f, bias, mask=maskf)
        out, aG = _minibatch_outputs(Z, QW, q, k, v, a, tok, gamma, beta, maskf, offs_m, F, eps, PREC)
        _store_rows(OUT + base, out, rows, offs_f, all_m, maskf, F)
        tl.debug_barrier()  # every thread has read the state
        for r0 in range(0, BF, W_ROWS):
            wr, r_off, r_mask = _row_tile(r0, offs_f, maskf, F, W_ROWS)
            k_r = _load_rows(K + base, rows, wr, all_m, wr < F, F)  # (MB, W_ROWS)
            W_r = tl.load(WN + pid * F * F + r_off, mask=r_mask, other=0.0)
            W_r -= tok_last * tl.dot(tl.trans(k_r), aG, input_precision=PREC)
            tl.store(WN + pid * F * F + r_off, W_r, mask=r_mask)
        bias = bias - tok_last * tl.sum(aG, axis=0)
    tl.store(BN + pid * F + offs_f, bias, mask=maskf)


@triton.jit
def _fwd_kernel(Q, K, V, A, TOK, LNW, LNB, W0, B0, OUT, WN, BN, AW, AB, WC, BC,
                T, H, n_full, n_ckpt, group, stride_w0, stride_b0, eps,
                F: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr, PARTIAL: tl.constexpr,
                SAVE: tl.constexpr, PREC: tl.constexpr, W_ROWS: tl.constexpr):
    """The whole mini-batches; PARTIAL: a second launch for a trailing partial one, from the final state WN, BN
    (one code path per launch keeps the registers to one mini-batch's: ptxas spills less)."""
    pid = tl.program_id(0)  # sequence * H + head
    seq, h = pid // H, pid % H
    offs_m, offs_f = tl.arange(0, MB), tl.arange(0, BF)
    maskf = offs_f < F
    all_m = offs_m < MB
    wmask = maskf[:, None] & maskf[None, :]
    w_off = offs_f[:, None] * F + offs_f[None, :]
    gamma, beta, tok, tok_last = _load_outer(LNW, LNB, TOK, h, offs_f, offs_m, maskf, F, MB)
    base = pid * T * F
    if PARTIAL:  # its outputs from the committed state; its update's sums go to the accumulators
        W = tl.load(WN + pid * F * F + w_off, mask=wmask, other=0.0)
        bias = tl.load(BN + pid * F + offs_f, mask=maskf, other=0.0)
        rows = n_full * MB + offs_m
        maskm = rows < T
        q, k, v, a = _load_qkva(Q, K, V, A, base, pid * T, rows, offs_f, maskm, maskf, F)
        out, aG = _minibatch_forward(W, bias, q, k, v, a, tok, gamma, beta, maskf, offs_m, F, eps, PREC)
        _store_rows(OUT + base, out, rows, offs_f, maskm, maskf, F)
        tl.store(AW + pid * F * F + w_off, tl.dot(tl.trans(k), aG, input_precision=PREC), mask=wmask)
        tl.store(AB + pid * F + offs_f, tl.sum(aG, axis=0), mask=maskf)
    elif W_ROWS < BF:
        _fwd_rows(Q, K, V, A, W0, B0, OUT, WN, BN, WC, BC, gamma, beta, tok, tok_last, pid, seq, h, T, n_full, n_ckpt,
                  group, stride_w0, stride_b0, eps, F, BF, MB, SAVE, PREC, W_ROWS)
    else:
        W = tl.load(W0 + seq * stride_w0 + h * F * F + w_off, mask=wmask, other=0.0).to(tl.float32)
        bias = tl.load(B0 + seq * stride_b0 + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
        for i in range(0, n_full):
            if SAVE:
                if i % group == 0:
                    c = pid * n_ckpt + i // group
                    tl.store(WC + c * F * F + w_off, W, mask=wmask)
                    tl.store(BC + c * F + offs_f, bias, mask=maskf)
            rows = i * MB + offs_m
            q, k, v, a = _load_qkva(Q, K, V, A, base, pid * T, rows, offs_f, all_m, maskf, F)
            out, aG = _minibatch_forward(W, bias, q, k, v, a, tok, gamma, beta, maskf, offs_m, F, eps, PREC)
            _store_rows(OUT + base, out, rows, offs_f, all_m, maskf, F)
            W = W - tok_last * tl.dot(tl.trans(k), aG, input_precision=PREC)
            bias = bias - tok_last * tl.sum(aG, axis=0)
        tl.store(WN + pid * F * F + w_off, W, mask=wmask)
        tl.store(BN + pid * F + offs_f, bias, mask=maskf)


# -- backward ----------------------------------------------------------------------------------


@triton.jit
def _minibatch_backward(WP, DWP, w_off, wmask, bias, q, k, v, a, tok, gamma, beta, DOUT, db, maskf, offs_m,
                        DQ, DK, DV, DA, base, a_base, rows, offs_f, maskm,
                        F: tl.constexpr, MB: tl.constexpr, eps, COMMIT: tl.constexpr, PREC: tl.constexpr):
    """dual_backward.linear_minibatch_backward for one (sequence, head). W is read from WP, twice (as W, then as W^T);
    dW, the gradient of the weights after the mini-batch, is read from DWP (as dW, then as dW^T) and replaced there
    by the one before it: neither f x f matrix stays in registers across the mini-batch's products (ptxas for sm_90
    at f = 64: 608 B of spill stores with both in registers, 76 B so). dq, dk, dv and da are stored at DQ, DK, DV,
    DA (rows `rows` of the sequence at `base`) as soon as each is final (40 B of spill stores so, 76 B when all four
    were returned and stored together; 16 B with the output gradient read from DOUT where it is first used; 0 B
    once _bwd_kernel ran the recompute and the reverse walk in launches of their own and carried the small sums
    in memory). Returns dtok (MB), dgamma, dbeta (BF) and db before the mini-batch."""
    W = tl.load(WP + w_off, mask=wmask, other=0.0)
    Z = tl.dot(k, W, input_precision=PREC) + bias[None, :]
    if COMMIT:  # k dW' beside k W: k's operand copy for the products is then short-lived
        kdW = tl.dot(k, tl.load(DWP + w_off, mask=wmask, other=0.0), input_precision=PREC) + db[None, :]
    t = v - k
    zhat, r = _ln_stats(Z, maskf, F, eps)
    G, gx, c2 = _ln_loss_grad(zhat, r, t, gamma, beta, maskf, F)
    tril = offs_m[:, None] >= offs_m[None, :]
    A = tl.dot(q, tl.trans(k), input_precision=PREC)
    E = tl.where(tril, tok[:, None] * a[None, :], 0.0)
    M = E * (A + 1.0)
    zbar = tl.dot(q, W, input_precision=PREC) + bias[None, :] - tl.dot(M, G, input_precision=PREC)
    zbhat, rb = _ln_stats(zbar, maskf, F, eps)

    dout = _load_rows(DOUT + base, rows, offs_f, maskm, maskf, F)  # read where it is first used
    dzbar = _ln_vjp(zbhat, rb, dout, gamma, maskf, F)
    dgamma = tl.sum(dout * zbhat, axis=0)
    dbeta = tl.sum(dout, axis=0)
    dM = -tl.dot(dzbar, tl.trans(G), input_precision=PREC)
    dG = -tl.dot(tl.trans(M), dzbar, input_precision=PREC)
    dE = tl.where(tril, dM * (A + 1.0), 0.0)
    dA = dM * E
    dq = dout + tl.dot(dA, k, input_precision=PREC)
    dk = tl.dot(tl.trans(dA), q, input_precision=PREC)
    dtok = tl.sum(dE * a[None, :], axis=1)
    da = tl.sum(dE * tok[:, None], axis=0)
    if COMMIT:
        tok_last = tl.sum(tl.where(offs_m == MB - 1, tok, 0.0), axis=0)
        aG = a[:, None] * G
        daG = -tok_last * kdW  # dl/d(aG) = -tok_last (k dW' + db'); its product with dW'^T comes last
        s = -tl.sum(tl.sum(aG * kdW, axis=1), axis=0)  # <k^T aG, dW'> + <sum aG, db'>
        dtok += tl.where(offs_m == MB - 1, s, 0.0)
        da += tl.sum(daG * G, axis=1)
        dG += a[:, None] * daG
    dZ, dt, dg2, db2 = _ln_grad_vjp(dG, G, zhat, r, gx, c2, t, gamma, beta, maskf, F)
    dgamma += dg2
    dbeta += db2
    _store_rows(DV + base, dt, rows, offs_f, maskm, maskf, F)
    tl.store(DA + a_base + rows, da, mask=maskm)
    WT = tl.load(WP + tl.trans(w_off), mask=tl.trans(wmask), other=0.0)  # the W^T products, last
    _store_rows(DQ + base, dq + tl.dot(dzbar, WT, input_precision=PREC), rows, offs_f, maskm, maskf, F)
    dk += tl.dot(dZ, WT, input_precision=PREC) - dt
    if COMMIT:  # through W' = W - tok_last K^T aG: dK -= tok_last aG dW'^T
        dk = tl.dot(-tok_last * (a[:, None] * G), tl.load(DWP + tl.trans(w_off), mask=tl.trans(wmask), other=0.0),
                    dk, input_precision=PREC)
    # dW' and db' are read above (the commit's terms), so this mini-batch's terms are added last
    dW = tl.load(DWP + w_off, mask=wmask, other=0.0)
    dW = tl.dot(tl.trans(k), dZ, tl.dot(tl.trans(q), dzbar, dW, input_precision=PREC), input_precision=PREC)
    tl.debug_barrier()  # every thread has read dW'
    tl.store(DWP + w_off, dW, mask=wmask)
    tl.debug_barrier()  # ... and the next mini-batch reads the new one
    _store_rows(DK + base, dk, rows, offs_f, maskm, maskf, F)
    db_new = db + tl.sum(dzbar, axis=0) + tl.sum(dZ, axis=0)
    return dtok, dgamma, dbeta, db_new


@triton.jit
def _by_rows(XB, rows, maskm, MP, acc, offs_f, maskf, F: tl.constexpr, BF: tl.constexpr, ROWS: tl.constexpr,
             PREC: tl.constexpr):
    """acc + X M for the mini-batch's rows X (MB, f) of the sequence at XB and an f x f matrix M at MP, summed over
    tiles of ROWS rows of M with the matching columns of X: neither is held whole."""
    for r0 in range(0, BF, ROWS):
        wr, r_off, r_mask = _row_tile(r0, offs_f, maskf, F, ROWS)
        acc = tl.dot(_load_rows(XB, rows, wr, maskm, wr < F, F), tl.load(MP + r_off, mask=r_mask, other=0.0), acc,
                     input_precision=PREC)
    return acc


@triton.jit
def _by_rows_t(SX, scale, MP, acc, offs_m, offs_f, maskf, F: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
               ROWS: tl.constexpr, PREC: tl.constexpr):
    """acc + (scale X) M^T for X (MB, BF) in a scratch slot SX and an f x f matrix M at MP, summed over tiles of
    ROWS columns of X and rows of M^T (columns of M, read as rows of M^T)."""
    for c0 in range(0, BF, ROWS):
        wc = c0 + tl.arange(0, ROWS)
        x_c = tl.load(SX + offs_m[:, None] * BF + wc[None, :])  # (MB, ROWS)
        mt_c = tl.load(MP + offs_f[None, :] * F + wc[:, None], mask=(wc < F)[:, None] & maskf[None, :], other=0.0)
        acc = tl.dot(scale[:, None] * x_c, mt_c, acc, input_precision=PREC)
    return acc


@triton.jit
def _minibatch_backward_rows(WP, BP, DWP, S, Q, K, V, A, DOUT, LNWh, LNBh, tok, DB, DLNW, DLNB, DTOK,
                             DQ, DK, DV, DA, pid, base, a_base, rows, offs_m, offs_f, maskm, maskf,
                             F: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr, eps, COMMIT: tl.constexpr,
                             PREC: tl.constexpr, W_ROWS: tl.constexpr):
    """_minibatch_backward_carried past f = 64 (W_ROWS < BF: Launch.rows), with W and dW' read W_ROWS rows at a
    time, as _fwd_rows reads W: K W, Q W and K dW' are summed over row tiles (_by_rows), the products with W^T and
    dW'^T over tiles of their rows, with the matching columns of dzbar, dZ and G read back from the program's
    scratch S (_by_rows_t), and dW is updated tile by tile. S holds, per program, dzbar, dZ, G, K dW' + db'
    (MB x BF each) and this mini-batch's dgamma, dbeta sums (BF each): what is read by columns, or again later,
    is not kept in registers. The carried sums (db, dgamma, dbeta, dtok) are read and written back as soon as dZ
    is known, around the barrier that the W^T products need anyway."""
    s_off = offs_m[:, None] * BF + offs_f[None, :]
    S_DZBAR, S_DZ, S_G, S_KDW, S_SUMS = S, S + MB * BF, S + 2 * MB * BF, S + 3 * MB * BF, S + 4 * MB * BF
    bias = tl.load(BP + offs_f, mask=maskf, other=0.0)
    Z = _by_rows(K + base, rows, maskm, WP, tl.zeros([MB, BF], dtype=tl.float32) + bias[None, :], offs_f, maskf, F,
                 BF, W_ROWS, PREC)
    QW = _by_rows(Q + base, rows, maskm, WP, tl.zeros([MB, BF], dtype=tl.float32) + bias[None, :], offs_f, maskf, F,
                  BF, W_ROWS, PREC)
    if COMMIT:  # k dW' + db', kept in S until it is used
        db_c = tl.load(DB + pid * F + offs_f, mask=maskf, other=0.0)
        tl.store(S_KDW + s_off, _by_rows(K + base, rows, maskm, DWP, tl.zeros([MB, BF], dtype=tl.float32)
                                         + db_c[None, :], offs_f, maskf, F, BF, W_ROWS, PREC))
    gamma = tl.load(LNWh + offs_f, mask=maskf, other=0.0).to(tl.float32)
    beta = tl.load(LNBh + offs_f, mask=maskf, other=0.0).to(tl.float32)
    a = tl.load(A + a_base + rows, mask=maskm, other=0.0).to(tl.float32)
    t = _load_rows(V + base, rows, offs_f, maskm, maskf, F) - _load_rows(K + base, rows, offs_f, maskm, maskf, F)
    zhat, r = _ln_stats(Z, maskf, F, eps)
    G, gx, c2 = _ln_loss_grad(zhat, r, t, gamma, beta, maskf, F)
    A_qk = tl.zeros([MB, MB], dtype=tl.float32)
    for c0 in range(0, BF, W_ROWS):  # Q K^T over tiles of f
        wc = c0 + tl.arange(0, W_ROWS)
        A_qk = tl.dot(_load_rows(Q + base, rows, wc, maskm, wc < F, F),
                      tl.trans(_load_rows(K + base, rows, wc, maskm, wc < F, F)), A_qk, input_precision=PREC)
    tril = offs_m[:, None] >= offs_m[None, :]
    E = tl.where(tril, tok[:, None] * a[None, :], 0.0)
    M = E * (A_qk + 1.0)
    zbhat, rb = _ln_stats(QW - tl.dot(M, G, input_precision=PREC), maskf, F, eps)
    dout = _load_rows(DOUT + base, rows, offs_f, maskm, maskf, F)
    dzbar = _ln_vjp(zbhat, rb, dout, gamma, maskf, F)
    tl.store(S_SUMS + offs_f, tl.sum(dout * zbhat, axis=0))  # dgamma's and dbeta's first terms
    tl.store(S_SUMS + BF + offs_f, tl.sum(dout, axis=0))
    tl.store(S_DZBAR + s_off, dzbar)
    tl.store(S_G + s_off, G)
    ddb = tl.sum(dzbar, axis=0)
    tl.debug_barrier()  # dzbar and G written by every thread
    dM = tl.zeros([MB, MB], dtype=tl.float32)
    for c0 in range(0, BF, W_ROWS):  # -dzbar G^T over tiles of f
        c_off = offs_m[:, None] * BF + (c0 + tl.arange(0, W_ROWS))[None, :]
        dM = tl.dot(tl.load(S_DZBAR + c_off), tl.trans(tl.load(S_G + c_off)), dM, input_precision=PREC)
    dM = -dM
    dG = -tl.dot(tl.trans(M), dzbar, input_precision=PREC)
    dE = tl.where(tril, dM * (A_qk + 1.0), 0.0)
    dA = dM * E
    dtok = tl.sum(dE * a[None, :], axis=1)
    da = tl.sum(dE * tok[:, None], axis=0)
    tok_last = tl.sum(tl.where(offs_m == MB - 1, tok, 0.0), axis=0)
    if COMMIT:  # as _minibatch_backward: dl/d(aG) = -tok_last (k dW' + db')
        kdW = tl.load(S_KDW + s_off)
        u = tl.sum(G * kdW, axis=1)
        dtok += tl.where(offs_m == MB - 1, -tl.sum(a * u, axis=0), 0.0)
        da -= tok_last * u
        dG -= (tok_last * a)[:, None] * kdW
    dZ, dt, dg2, db2 = _ln_grad_vjp(dG, G, zhat, r, gx, c2, t, gamma, beta, maskf, F)
    _store_rows(DV + base, dt, rows, offs_f, maskm, maskf, F)
    tl.store(DA + a_base + rows, da, mask=maskm)
    tl.store(S_DZ + s_off, dZ)
    db, dgamma, dbeta, dtok_c = _load_carried_grads(DB, DLNW, DLNB, DTOK, pid, offs_f, offs_m, maskf, F, MB)
    dgamma += tl.load(S_SUMS + offs_f) + dg2
    dbeta += tl.load(S_SUMS + BF + offs_f) + db2
    tl.debug_barrier()  # dZ written, and the carried sums read, by every thread
    _store_carried_grads(DB, DLNW, DLNB, DTOK, pid, db + ddb + tl.sum(dZ, axis=0), dgamma, dbeta, dtok_c + dtok,
                         offs_f, offs_m, maskf, F, MB)
    dq = _load_rows(DOUT + base, rows, offs_f, maskm, maskf, F) + tl.dot(
        dA, _load_rows(K + base, rows, offs_f, maskm, maskf, F), input_precision=PREC)
    dq = _by_rows_t(S_DZBAR, tl.full([MB], 1.0, tl.float32), WP, dq, offs_m, offs_f, maskf, F, BF, MB, W_ROWS, PREC)
    _store_rows(DQ + base, dq, rows, offs_f, maskm, maskf, F)
    dk = tl.dot(tl.trans(dA), _load_rows(Q + base, rows, offs_f, maskm, maskf, F), input_precision=PREC) - dt
    dk = _by_rows_t(S_DZ, tl.full([MB], 1.0, tl.float32), WP, dk, offs_m, offs_f, maskf, F, BF, MB, W_ROWS, PREC)
    if COMMIT:  # through W' = W - tok_last K^T aG: dK -= tok_last aG dW'^T
        dk = _by_rows_t(S_G, -tok_last * a, DWP, dk, offs_m, offs_f, maskf, F, BF, MB, W_ROWS, PREC)
    _store_rows(DK + base, dk, rows, offs_f, maskm, maskf, F)
    tl.debug_barrier()  # every thread has read dW'
    dzbar, dZ = tl.load(S_DZBAR + s_off), tl.load(S_DZ + s_off)
    for r0 in range(0, BF, W_ROWS):  # dW = dW' + Q^T dzbar + K^T dZ, tile by tile
        wr, r_off, r_mask = _row_tile(r0, offs_f, maskf, F, W_ROWS)
        dW_r = tl.dot(tl.trans(_load_rows(Q + base, rows, wr, maskm, wr < F, F)), dzbar,
                      tl.load(DWP + r_off, mask=r_mask, other=0.0), input_precision=PREC)
        dW_r = tl.dot(tl.trans(_load_rows(K + base, rows, wr, maskm, wr < F, F)), dZ, dW_r, input_precision=PREC)
        tl.store(DWP + r_off, dW_r, mask=r_mask)


@triton.jit
def _minibatch_backward_carried(WP, BP, DWP, S, w_off, wmask, Q, K, V, A, DOUT, tok, gamma, beta, LNWh, LNBh, DB,
                                DLNW, DLNB, DTOK, DQ, DK, DV, DA, pid, base, rows, offs_f, offs_m, maskf, maskm, T,
                                F: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr, eps, COMMIT: tl.constexpr,
                                PREC: tl.constexpr, W_ROWS: tl.constexpr):
    """_minibatch_backward of the rows at `rows`, the state at WP, BP, with the gradients it carries (db, dgamma,
    dbeta, dtok) read from memory and written back, not kept in registers across a loop (ptxas for sm_90 at
    f = 64, the reverse walk: 0 B of spill stores so, 8 B kept); past f = 64 (W_ROWS < BF) with W in tiles of
    rows: _minibatch_backward_rows."""
    tl.debug_barrier()  # the carried gradients (and dW) written by every thread
    if W_ROWS < BF:
        _minibatch_backward_rows(WP, BP, DWP, S, Q, K, V, A, DOUT, LNWh, LNBh, tok, DB, DLNW, DLNB, DTOK, DQ, DK, DV,
                                 DA, pid, base, pid * T, rows, offs_m, offs_f, maskm, maskf, F, BF, MB, eps, COMMIT,
                                 PREC, W_ROWS)
    else:
        q, k, v, a = _load_qkva(Q, K, V, A, base, pid * T, rows, offs_f, maskm, maskf, F)
        db, dgamma, dbeta, dtok = _load_carried_grads(DB, DLNW, DLNB, DTOK, pid, offs_f, offs_m, maskf, F, MB)
        bias = tl.load(BP + offs_f, mask=maskf, other=0.0)
        dt_, dg_, db_, db = _minibatch_backward(WP, DWP, w_off, wmask, bias, q, k, v, a, tok, gamma, beta, DOUT, db,
                                                maskf, offs_m, DQ, DK, DV, DA, base, pid * T, rows, offs_f, maskm, F,
                                                MB, eps, COMMIT, PREC)
        _store_carried_grads(DB, DLNW, DLNB, DTOK, pid, db, dgamma + dg_, dbeta + db_, dtok + dt_, offs_f, offs_m,
                             maskf, F, MB)


@triton.jit
def _bwd_kernel(Q, K, V, A, TOK, LNW, LNB, WC, BC, WN, BN, DOUT, DWN, DBN,
                DQ, DK, DV, DA, DTOK, DLNW, DLNB, DW0, DB0, WS, BS, SCR,
                T, H, n_full, n_ckpt, group, gi, eps,
                F: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr, PHASE: tl.constexpr, FIRST: tl.constexpr,
                PREC: tl.constexpr, W_ROWS: tl.constexpr):
    """One phase of the backward (linear_prefill_backward launches them in turn). PHASE "partial": a trailing
    partial mini-batch (its outputs used the final committed state; it changed no state); "recompute": the states
    inside group gi (counted from the last) from its checkpoint, slot to slot in WS, BS; "reverse": the
    mini-batches of group gi, the last first. dW is carried in place at DW0 and db, dgamma, dbeta, dtok at DB0,
    DLNW, DLNB, DTOK from one launch to the next; FIRST: the launch that starts them (from DWN, DBN and zeros).
    Apart, the recompute and the reverse walk need no registers for each other: ptxas for sm_90 at f = 64, 0 B of
    spill stores in each (16 B as one loop after the other in one launch; 8 B apart, with the sums in registers).
    2 launches per group of mini-batches: 16 at T = 2k, 256 at 32k (group 16)."""
    pid = tl.program_id(0)
    h = pid % H
    offs_m, offs_f = tl.arange(0, MB), tl.arange(0, BF)
    maskf = offs_f < F
    all_m = offs_m < MB
    wmask = maskf[:, None] & maskf[None, :]
    w_off = offs_f[:, None] * F + offs_f[None, :]
    gamma, beta, tok, tok_last = _load_outer(LNW, LNB, TOK, h, offs_f, offs_m, maskf, F, MB)
    DWP = DW0 + pid * F * F  # dW, carried through the mini-batches in place (it ends as dW0)
    base = pid * T * F
    S = SCR + pid * (4 * MB + 2) * BF  # past f = 64 (W_ROWS < BF): _minibatch_backward_rows' scratch
    s0 = pid * group  # the program's first slot
    if PHASE == "recompute":
        first, count, c = _group_backwards(gi, pid, n_ckpt, group, n_full)
        tl.store(WS + s0 * F * F + w_off, tl.load(WC + c * F * F + w_off, mask=wmask, other=0.0), mask=wmask)
        tl.store(BS + s0 * F + offs_f, tl.load(BC + c * F + offs_f, mask=maskf, other=0.0), mask=maskf)
        for j in range(0, count - 1):  # slot j -> slot j + 1
            tl.debug_barrier()  # slot j written by every thread
            W = tl.load(WS + (s0 + j) * F * F + w_off, mask=wmask, other=0.0)
            bias = tl.load(BS + (s0 + j) * F + offs_f, mask=maskf, other=0.0)
            rows = (first + j) * MB + offs_m
            k = _load_rows(K + base, rows, offs_f, all_m, maskf, F)
            v = _load_rows(V + base, rows, offs_f, all_m, maskf, F)
            a = tl.load(A + pid * T + rows).to(tl.float32)
            W, bias = _minibatch_update(W, bias, k, v, a, gamma, beta, tok_last, maskf, F, eps, PREC)
            tl.store(WS + (s0 + j + 1) * F * F + w_off, W, mask=wmask)
            tl.store(BS + (s0 + j + 1) * F + offs_f, bias, mask=maskf)
    else:  # dW at DW0 and db, dgamma, dbeta, dtok at DB0, DLNW, DLNB, DTOK: read and written back per mini-batch
        if FIRST:
            tl.store(DWP + w_off, tl.load(DWN + pid * F * F + w_off, mask=wmask, other=0.0), mask=wmask)
            _start_carried_grads(DB0, DBN, DLNW, DLNB, DTOK, pid, offs_f, offs_m, maskf, F, BF, MB)
        if PHASE == "partial":
            rows = n_full * MB + offs_m
            maskm = rows < T
            _minibatch_backward_carried(WN + pid * F * F, BN + pid * F, DWP, S, w_off, wmask, Q, K, V, A, DOUT, tok,
                                        gamma, beta, LNW + h * F, LNB + h * F, DB0, DLNW, DLNB, DTOK, DQ, DK, DV, DA,
                                        pid, base, rows, offs_f, offs_m, maskf, maskm, T, F, BF, MB, eps, False, PREC,
                                        W_ROWS)
        else:
            first, count, c = _group_backwards(gi, pid, n_ckpt, group, n_full)
            # the walk's loop-invariant values (index vectors, masks) made where they are used, not hoisted and kept
            # live across it: ptxas for sm_90, 104 / 56 -> 0 / 0 B of spill stores at f = 96 / 128, 0 B at 64 as
            # before (f = 32, none of the paper's sizes: 396 -> 424 B)
            for jj in tl.range(0, count, disable_licm=True):
                j = count - 1 - jj
                _minibatch_backward_carried(WS + (s0 + j) * F * F, BS + (s0 + j) * F, DWP, S, w_off, wmask, Q, K, V,
                                            A, DOUT, tok, gamma, beta, LNW + h * F, LNB + h * F, DB0, DLNW, DLNB,
                                            DTOK, DQ, DK, DV, DA, pid, base, (first + j) * MB + offs_m, offs_f, offs_m,
                                            maskf, all_m, T, F, BF, MB, eps, True, PREC, W_ROWS)


# -- decode ------------------------------------------------------------------------------------


@triton.jit
def _load_decode_token(Q, K, V, A, TOK, LNW, LNB, pid, h, pos, offs, maskf, F: tl.constexpr):
    """A decode step's inputs for (sequence, head) `pid`, in fp32: the head's inner-LN weight and bias, q, k, v
    (BF,), the key factor a and the token factor of position `pos` (TTT-Linear's and TTT-MLP's decode kernels)."""
    gamma = tl.load(LNW + h * F + offs, mask=maskf, other=0.0).to(tl.float32)
    beta = tl.load(LNB + h * F + offs, mask=maskf, other=0.0).to(tl.float32)
    q = tl.load(Q + pid * F + offs, mask=maskf, other=0.0).to(tl.float32)
    k = tl.load(K + pid * F + offs, mask=maskf, other=0.0).to(tl.float32)
    v = tl.load(V + pid * F + offs, mask=maskf, other=0.0).to(tl.float32)
    return gamma, beta, q, k, v, tl.load(A + pid).to(tl.float32), tl.load(TOK + pos).to(tl.float32)


@triton.jit
def _decode_kernel(Q, K, V, A, TOK, LNW, LNB, W, B, GW, GB, OUT, H, pos, eps,
                   F: tl.constexpr, BF: tl.constexpr, ROWS: tl.constexpr, COMMIT: tl.constexpr):
    """One token at in-mini-batch position `pos` (0-based) for every (sequence, head); W, B, GW, GB
    (fp32) are updated in place. W and GW are read ROWS rows at a time (decode_rows): z = k W + b in a first
    pass, the update and zbar = q Wbar + bbar in a second, so the registers hold two (ROWS, BF) tiles, not
    three (BF, BF) ones."""
    pid = tl.program_id(0)
    h = pid % H
    offs = tl.arange(0, BF)
    maskf = offs < F
    bt = tl.load(B + pid * F + offs, mask=maskf, other=0.0)
    gb = tl.load(GB + pid * F + offs, mask=maskf, other=0.0)
    gamma, beta, q, k, v, a, tok = _load_decode_token(Q, K, V, A, TOK, LNW, LNB, pid, h, pos, offs, maskf, F)
    z = bt  # k W + b, (BF,)
    for r0 in range(0, BF, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        w_off, wmask = pid * F * F + rows[:, None] * F + offs[None, :], (rows < F)[:, None] & maskf[None, :]
        kr = tl.load(K + pid * F + rows, mask=rows < F, other=0.0).to(tl.float32)
        z += tl.sum(kr[:, None] * tl.load(W + w_off, mask=wmask, other=0.0), axis=0)
    zhat, r = _ln_stats(z[None, :], maskf, F, eps)
    G, gx, m2 = _ln_loss_grad(zhat, r, (v - k)[None, :], gamma, beta, maskf, F)
    G = tl.sum(G, axis=0)  # (BF,)
    gb += a * G
    bbar = bt - tok * gb
    zb = bbar  # q Wbar + bbar, (BF,)
    for r0 in range(0, BF, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        w_off, wmask = pid * F * F + rows[:, None] * F + offs[None, :], (rows < F)[:, None] & maskf[None, :]
        kr = tl.load(K + pid * F + rows, mask=rows < F, other=0.0).to(tl.float32)
        qr = tl.load(Q + pid * F + rows, mask=rows < F, other=0.0).to(tl.float32)
        gW = tl.load(GW + w_off, mask=wmask, other=0.0) + a * kr[:, None] * G[None, :]
        Wbar = tl.load(W + w_off, mask=wmask, other=0.0) - tok * gW
        zb += tl.sum(qr[:, None] * Wbar, axis=0)
        if COMMIT:
            tl.store(W + w_off, Wbar, mask=wmask)
            tl.store(GW + w_off, tl.zeros([ROWS, BF], dtype=tl.float32), mask=wmask)
        else:
            tl.store(GW + w_off, gW, mask=wmask)
    zbhat, rb = _ln_stats(zb[None, :], maskf, F, eps)
    out = q + gamma * tl.sum(zbhat, axis=0) + beta
    tl.store(OUT + pid * F + offs, out.to(OUT.dtype.element_ty), mask=maskf)
    if COMMIT:
        tl.store(B + pid * F + offs, bbar, mask=maskf)
        tl.store(GB + pid * F + offs, tl.zeros([BF], dtype=tl.float32), mask=maskf)
    else:
        tl.store(GB + pid * F + offs, gb, mask=maskf)


# -- launchers ---------------------------------------------------------------------------------

DEFAULT_GROUP = 16  # mini-batches per checkpoint of the backward


def _block(f: int) -> int:
    return max(16, triton.next_power_of_2(f))


def decode_warps(bf: int) -> int:
    """Warps per program of the decode kernels (TTT-Linear's and TTT-MLP's) at block size bf."""
    return 4 if bf <= 32 else 8 if bf <= 64 else 16


def decode_rows(bf: int) -> int:
    """Rows of W (and of its accumulated gradient) the TTT-Linear decode kernel reads at a time: all of them up
    to bf 64, else 64 per pass. ptxas for sm_90 (`make check-kernels`; registers, spill stores), bf 64 at 8 warps:
    one tile 110-128 registers, 0 B (the whole-W kernel before it: 170, 0 B); bf 128 (f 96 or 128) at 16 warps:
    tiles of 64 rows 98-128 registers, 0 B, against 368 B (f 96) and 1204 B (f 128) for the whole W. Tiles of
    32 rows at 8 warps also give 0 B. Not yet timed on a GPU."""
    return min(bf, 64)


PRECISIONS = ("tf32", "ieee")
# Warps per program of each prefill kernel, by measurement (bench/ttt_kernel_speed.py --variants on one
# H200, 2026-11-30: 32 heads x 64, bf16 inputs, tf32 products). TTT-Linear forward, batch 16: 0.91 / 3.23 ms
# at 4 warps and 1.55 / 6.11 ms at 8 (T = 2k / 8k); forward+backward, batch 4: 3.54 / 12.35 ms at 4 and
# 3.14 / 10.59 ms at 8, so the backward is faster at 8. TTT-MLP forward, batch 16, 2k: 16.2 ms at 4, 9.9 at
# 8; its backward was not timed (it held W1 and W2 whole and needed more shared memory than sm_90 has at f = 64).
# TTT-MLP's kernels now read them a tile of hidden units at a time (triton_mlp.py): not yet timed.
DEFAULT_WARPS = {("linear", "fwd"): 4, ("linear", "bwd"): 8, ("mlp", "fwd"): 8, ("mlp", "bwd"): 8}
# ... where they differ at a block of 128 (f = 96 or 128; the paper's 760M has f = 96). ptxas for sm_90 (`make
# check-kernels ARGS="--num-warps N --num-stages S"`, S = 1-3), spill stores of the TTT-Linear forward, which holds
# the fp32 W (64 KB) in registers: 1.3-1.7 KB at 4 warps, 220-252 B at 8, 448-460 B at 16. Not yet timed on a GPU.
WIDE_WARPS = {("linear", "fwd"): 8}
# Software-pipelining stages of the prefill kernels' loops: Triton's default for CUDA. ptxas for sm_90 at f = 64
# (`make check-kernels ARGS="--num-stages N"`), spill stores at 3 / 2 / 1 stages: TTT-Linear forward (4 warps)
# 0 / 0 / 0; backward (8 warps, each phase) 0 / 0 / 0; TTT-MLP forward 0 / 0 / 0, backward 188 / 192 / 188 B. 1 stage
# is not yet timed on a GPU (`make gpu-check` times it: bench/ttt_kernel_speed.py --variants), so the default stays.
DEFAULT_STAGES = 3
# ... where they differ at a block of 128: the TTT-Linear backward with W in tiles of 16 rows
# (_minibatch_backward_rows), whose short tile loops gain little from pipelining and whose registers are full.
# Its spill stores (f = 96 / 128), reverse walk: 8 / 92 B at 3 stages, 60 / 104 B at 2, 0 / 0 B at 1; partial
# launch 0 B at each (W whole: 264 / 568 B and 48 / 456 B at 1 or 3 stages). Not yet timed on a GPU.
WIDE_STAGES = {("linear", "bwd"): 1}
# Rows of W the TTT-Linear forward holds in registers at a time past f = 64 (W whole up to a block of 64). Whole,
# the fp32 W is loop-carried in registers; in tiles it lives in memory (WN) and each mini-batch reads it twice and
# writes it once (_fwd_rows). ptxas for sm_90 (`make check-kernels ARGS="--w-rows R --num-warps N"`), the forward's
# spill stores at a block of 128 (f = 96 / 128): whole W 248 / 220 B at 8 warps; tiles of 64 rows 248 / 260 B,
# of 32: 28 / 8 B, of 16: 0 / 0 B (244 registers; also 0 B at 4 warps, 188 B at 16). f = 64 stays whole: 0 B either
# way. Not yet timed on a GPU: `make gpu-check ARGS="--stages env,kernel-variants-760m"` times tiles against W whole.
# The backward reads W (and dW) in the same tiles (_minibatch_backward_rows; its spills at WIDE_STAGES above).
WIDE_W_ROWS = 16


@dataclass
class Launch:
    """How the prefill kernels (linear and MLP) are compiled and launched. `precision` is tl.dot's
    input_precision: "tf32" multiplies on the tensor cores (10-bit mantissa, fp32 accumulation and state;
    0.7-1.4e-3 relative RMSE of the output against "ieee" at the 1.3B shape, T = 2k-8k;
    tests/test_ttt_triton.py states the tolerance against the fp32 dual form); "ieee" gives exact fp32
    products on the CUDA cores, 2.8x slower in the TTT-Linear forward on an H200 (ptxas spills 1.6 KB per
    thread in its backward at f = 64: `make check-kernels ARGS="--precision ieee"`). The interpreter ignores it
    (exact). `num_warps` per program: None takes DEFAULT_WARPS per kernel (WIDE_WARPS past f = 64), a number
    applies to every prefill kernel; `num_stages` the loops' software-pipelining stages, None: DEFAULT_STAGES per
    kernel (WIDE_STAGES past f = 64), a number applies to every prefill kernel; `w_rows` the rows of W the
    TTT-Linear forward and backward hold at a time (rows(); WIDE_W_ROWS past f = 64).
    `make gpu-check` times every variant (bench/ttt_kernel_speed.py --variants). TTT_TRITON_PRECISION,
    TTT_TRITON_WARPS, TTT_TRITON_STAGES and TTT_TRITON_W_ROWS override the defaults."""
    precision: str = "tf32"
    num_warps: int | None = None
    num_stages: int | None = None
    w_rows: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"TTT kernel precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.num_warps not in (None, 1, 2, 4, 8, 16):
            raise ValueError(f"TTT kernel num_warps must be a power of two up to 16, got {self.num_warps!r}")
        if self.num_stages not in (None, 1, 2, 3, 4):
            raise ValueError(f"TTT kernel num_stages must be 1 to 4, got {self.num_stages!r}")
        if self.w_rows not in (None, 16, 32, 64, 128):
            raise ValueError(f"TTT-Linear w_rows must be 16, 32, 64 or 128 (rows of W per tile), got {self.w_rows!r}")

    def warps(self, inner: str, direction: str, f: int) -> int:
        """Warps for one kernel: inner "linear" | "mlp", direction "fwd" | "bwd", at head dim f."""
        if self.num_warps:
            return self.num_warps
        if _block(f) > 64:
            return WIDE_WARPS.get((inner, direction), DEFAULT_WARPS[inner, direction])
        return DEFAULT_WARPS[inner, direction]

    def stages(self, inner: str, direction: str, f: int) -> int:
        """Software-pipelining stages for one kernel, as warps() picks its warps."""
        if self.num_stages:
            return self.num_stages
        return WIDE_STAGES.get((inner, direction), DEFAULT_STAGES) if _block(f) > 64 else DEFAULT_STAGES

    def rows(self, f: int) -> int:
        """Rows of W the TTT-Linear kernels hold at a time at head dim f: the block (W whole, in registers
        through the forward's loop), or fewer (W in memory, read in tiles of that many rows: _fwd_rows,
        _minibatch_backward_rows)."""
        bf = _block(f)
        return min(self.w_rows, bf) if self.w_rows else WIDE_W_ROWS if bf > 64 else bf


def _launch_from_env() -> Launch:
    warps, stages = os.environ.get("TTT_TRITON_WARPS"), os.environ.get("TTT_TRITON_STAGES")
    w_rows = os.environ.get("TTT_TRITON_W_ROWS")
    return Launch(os.environ.get("TTT_TRITON_PRECISION", Launch.precision), int(warps) if warps else None,
                  int(stages) if stages else None, int(w_rows) if w_rows else None)


LAUNCH = _launch_from_env()


@contextmanager
def launch_settings(**changes):
    """Temporarily change LAUNCH (the benchmark's variants): `with launch_settings(precision="tf32"): ...`."""
    old, new = replace(LAUNCH), replace(LAUNCH, **changes)  # replace() checks the names and the values
    for f in fields(Launch):
        setattr(LAUNCH, f.name, getattr(new, f.name))
    try:
        yield LAUNCH
    finally:
        for f in fields(Launch):
            setattr(LAUNCH, f.name, getattr(old, f.name))


# -- the prefill as two operators (torch.library): torch.compile(model) traces around them, as around a matmul --

@torch.library.custom_op("ttt_bench::linear_prefill", mutates_args=())
def linear_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, tok: torch.Tensor,
                   ln_w: torch.Tensor, ln_b: torch.Tensor, W0: torch.Tensor, b0: torch.Tensor, group: int,
                   save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    """Whole sequences from a mini-batch boundary. q, k, v (B, H, T, f) and a (B, H, T) contiguous, tok (b,), ln_w,
    ln_b (H, f), W0 (B|1, H, f, f), b0 (B|1, H, f). Returns out (B, H, T, f) in q's dtype; the state after T tokens:
    W, b (fp32, committed) and a trailing partial mini-batch's accumulators; and, for the backward (save), the
    state every `group` mini-batches (B, H, n_ckpt, f, f) / (B, H, n_ckpt, f) (one unused slot without save)."""
    Bsz, H, T, f, MB, n_full, partial, n_ckpt = prefill_shape(q, tok, group)
    f32 = dict(device=q.device, dtype=torch.float32)
    tok32, lnw, lnb = outer_fp32(tok, ln_w, ln_b)
    W0c, b0c = W0.float().contiguous(), b0.float().contiguous()
    out = torch.empty_like(q)
    Wn, bn = torch.empty(Bsz, H, f, f, **f32), torch.empty(Bsz, H, f, **f32)
    aw, ab = torch.zeros(Bsz, H, f, f, **f32), torch.zeros(Bsz, H, f, **f32)
    wc = torch.empty(Bsz, H, n_ckpt if save else 1, f, f, **f32)
    bc = torch.empty(Bsz, H, n_ckpt if save else 1, f, **f32)
    for part in (False, True)[: 1 + (partial > 0)]:  # the whole mini-batches, then a trailing partial one
        _fwd_kernel[(Bsz * H,)](
            q, k, v, a, tok32, lnw, lnb, W0c, b0c, out, Wn, bn, aw, ab, wc, bc,
            T, H, n_full, n_ckpt, group, 0 if W0.shape[0] == 1 else H * f * f, 0 if b0.shape[0] == 1 else H * f,
            LN_EPS, F=f, BF=_block(f), MB=MB, PARTIAL=part, SAVE=save, PREC=LAUNCH.precision,
            W_ROWS=LAUNCH.rows(f), num_warps=LAUNCH.warps("linear", "fwd", f),
            num_stages=LAUNCH.stages("linear", "fwd", f))
    return out, Wn, bn, aw, ab, wc, bc


def _checkpoints(n_full: int, group: int) -> int:
    """States the forward saves for the backward: one every `group` mini-batches (integer arithmetic: under
    torch.compile n_full may be symbolic)."""
    return max(1, -(-n_full // group))


def prefill_shape(q: torch.Tensor, tok: torch.Tensor, group: int) -> tuple[int, ...]:
    """(B, H, T, f, the mini-batch b, whole mini-batches, tokens of a trailing partial one, states saved for the
    backward) of a prefill of q (B, H, T, f) with token factors tok (b,) (TTT-Linear's and TTT-MLP's)."""
    Bsz, H, T, f = q.shape
    MB = tok.shape[0]
    return Bsz, H, T, f, MB, T // MB, T % MB, _checkpoints(T // MB, group)


def outer_fp32(tok: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The token factors and the inner LN's weight and bias as the prefill kernels read them: fp32, contiguous."""
    return tok.float().contiguous(), ln_w.float().contiguous(), ln_b.float().contiguous()


@linear_prefill.register_fake
def _(q, k, v, a, tok, ln_w, ln_b, W0, b0, group, save):
    Bsz, H, T, f = q.shape
    nc = _checkpoints(T // tok.shape[0], group) if save else 1
    fp32 = lambda *shape: q.new_empty(*shape, dtype=torch.float32)
    return (torch.empty_like(q), fp32(Bsz, H, f, f), fp32(Bsz, H, f), fp32(Bsz, H, f, f), fp32(Bsz, H, f),
            fp32(Bsz, H, nc, f, f), fp32(Bsz, H, nc, f))


@torch.library.custom_op("ttt_bench::linear_prefill_backward", mutates_args=())
def linear_prefill_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, tok: torch.Tensor,
                            ln_w: torch.Tensor, ln_b: torch.Tensor, W0: torch.Tensor, b0: torch.Tensor,
                            wc: torch.Tensor, bc: torch.Tensor, Wn: torch.Tensor, bn: torch.Tensor,
                            dout: torch.Tensor, dWn: torch.Tensor, dbn: torch.Tensor,
                            group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of linear_prefill's inputs q .. b0 (each like its input) from those of out, W and b."""
    Bsz, H, T, f, MB, n_full, partial, n_ckpt = prefill_shape(q, tok, group)
    f32 = dict(device=q.device, dtype=torch.float32)
    tok32, lnw, lnb = outer_fp32(tok, ln_w, ln_b)
    dout, dWn, dbn = dout.contiguous(), dWn.float().contiguous(), dbn.float().contiguous()
    dq, dk, dv, da = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(a)
    dtok = torch.empty(Bsz, H, MB, **f32)
    dlnw, dlnb = torch.empty(Bsz, H, f, **f32), torch.empty(Bsz, H, f, **f32)
    dW0, db0 = torch.empty(Bsz, H, f, f, **f32), torch.empty(Bsz, H, f, **f32)
    ws, bs = torch.empty(Bsz, H, group, f, f, **f32), torch.empty(Bsz, H, group, f, **f32)
    rows, bf = LAUNCH.rows(f), _block(f)
    scratch = torch.empty(Bsz, H, 4 * MB + 2, bf, **f32) if rows < bf else bs  # bs: a placeholder, unused

    def launch(phase: str, first: bool, gi: int = 0):
        _bwd_kernel[(Bsz * H,)](
            q, k, v, a, tok32, lnw, lnb, wc, bc, Wn, bn, dout, dWn, dbn,
            dq, dk, dv, da, dtok, dlnw, dlnb, dW0, db0, ws, bs, scratch,
            T, H, n_full, n_ckpt, group, gi, LN_EPS,
            F=f, BF=bf, MB=MB, PHASE=phase, FIRST=first, PREC=LAUNCH.precision, W_ROWS=rows,
            num_warps=LAUNCH.warps("linear", "bwd", f), num_stages=LAUNCH.stages("linear", "bwd", f))

    if partial:  # a trailing partial mini-batch first, then the groups of whole ones, the last first
        launch("partial", True)
    for gi in range(n_ckpt if n_full else 0):
        launch("recompute", False, gi)
        launch("reverse", gi == 0 and not partial, gi)
    if W0.shape[0] == 1:
        dW0, db0 = dW0.sum(0, keepdim=True), db0.sum(0, keepdim=True)
    return (dq, dk, dv, da, dtok.sum((0, 1)).to(tok.dtype), dlnw.sum(0).to(ln_w.dtype), dlnb.sum(0).to(ln_b.dtype),
            dW0.to(W0.dtype), db0.to(b0.dtype))


@linear_prefill_backward.register_fake
def _(q, k, v, a, tok, ln_w, ln_b, W0, b0, wc, bc, Wn, bn, dout, dWn, dbn, group):
    return tuple(torch.empty_like(x) for x in (q, k, v, a, tok, ln_w, ln_b, W0, b0))


def _save_for_backward(ctx, inputs, output):
    q, k, v, a, tok, ln_w, ln_b, W0, b0, group, _save = inputs
    _out, Wn, bn, aw, ab, wc, bc = output
    ctx.save_for_backward(q, k, v, a, tok, ln_w, ln_b, W0, b0, wc, bc, Wn, bn)
    ctx.group = group
    ctx.mark_non_differentiable(aw, ab, wc, bc)


def _backward(ctx, dout, dWn, dbn, *_):
    q, k, v, a, tok, ln_w, ln_b, W0, b0, wc, bc, Wn, bn = ctx.saved_tensors
    dout = torch.zeros_like(q) if dout is None else dout
    dWn = torch.zeros_like(Wn) if dWn is None else dWn
    dbn = torch.zeros_like(bn) if dbn is None else dbn
    grads = linear_prefill_backward(q, k, v, a, tok, ln_w, ln_b, W0, b0, wc, bc, Wn, bn, dout, dWn, dbn, ctx.group)
    return (*grads, None, None)


linear_prefill.register_autograd(_backward, setup_context=_save_for_backward)


# -- the interface the layer uses (the same in triton_mlp.py) ------------------------------------

PARAMS = ("W", "b")


def prefill(q, k, v, a, tok, ln_w, ln_b, params: dict, group: int = DEFAULT_GROUP):
    """out (B, H, T, f), the inner weights after T tokens and a trailing partial mini-batch's accumulators,
    as dicts keyed W, b (b as (B, H, f))."""
    q, k, v, a = (x.contiguous() for x in (q, k, v, a))  # saved for the backward as the kernels read them
    inputs = (q, k, v, a, tok, ln_w, ln_b, params["W"], params["b"])
    save = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    out, W, b, GW, Gb, _, _ = linear_prefill(*inputs, group, save)
    return out, {"W": W, "b": b}, {"W": GW, "b": Gb}


def decode_step(q, k, v, a, tok, ln_w, ln_b, params: dict, acc: dict, pos: int):
    """One token for every (sequence, head): q, k, v (B, H, f), a (B, H); params and acc fp32 contiguous
    (B, H, f, f) / (B, H, f) dicts, updated in place; pos the token's 0-based place in its mini-batch.
    Returns out (B, H, f)."""
    return linear_decode_step(q, k, v, a, tok, ln_w, ln_b, params["W"], params["b"], acc["W"], acc["b"], pos)


@torch.library.custom_op("ttt_bench::linear_decode_step", mutates_args=("W", "b", "GW", "Gb"))
def linear_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, tok: torch.Tensor,
                       ln_w: torch.Tensor, ln_b: torch.Tensor, W: torch.Tensor, b: torch.Tensor, GW: torch.Tensor,
                       Gb: torch.Tensor, pos: int) -> torch.Tensor:
    """decode_step as an operator that writes W, b (at the mini-batch's last token) and GW, Gb in place, so a
    compiled decode step (torch.compile) calls the kernel as it is, with no graph break."""
    Bsz, H, f = q.shape
    out = torch.empty_like(q)
    _decode_kernel[(Bsz * H,)](q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(),
                               tok.float().contiguous(), ln_w.float().contiguous(), ln_b.float().contiguous(),
                               W, b, GW, Gb, out, H, pos, LN_EPS, F=f, BF=_block(f), ROWS=decode_rows(_block(f)),
                               COMMIT=pos == tok.shape[0] - 1, num_warps=decode_warps(_block(f)))
    return out


@linear_decode_step.register_fake
def _(q, k, v, a, tok, ln_w, ln_b, W, b, GW, Gb, pos):
    return torch.empty_like(q)
