"""TTT-MLP in Triton: causal prefill forward and backward kernels and the decode kernel, with the semantics
of dual.py (f_res(x) = gelu_tanh(x W1 + b1) W2 + b2, hidden 4f). Structure as triton_linear.py (read it
first); the math of the backward is dual_backward.mlp_minibatch_backward, checked against autograd.

The four inner weights (W1 f x 4f, b1, W2 4f x f, b2) stay in fp32 on chip. Head dims that are not a
power of two are padded (hidden 4f too); padded lanes are zero through every product and GELU.
GELU's tanh is 2 sigmoid(2u) - 1 (the interpreter lacks libdevice's tanh).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from architectures.ttt.inner import LN_EPS
from architectures.ttt.triton_linear import (DEFAULT_GROUP, LAUNCH, _block, _ln_grad_vjp, _ln_loss_grad,
                                             _ln_stats, _ln_vjp, _load_minibatch, _load_outer, _load_rows,
                                             _store_minibatch_grads, _store_rows)


@triton.jit
def _gelu(x):
    """gelu_tanh(x), its first and second derivatives."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
    th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    g = 0.5 * x * (1.0 + th)
    dg = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
    d2g = (1.0 - th * th) * (du + 0.5 * x * (0.7978845608028654 * 6.0 * 0.044715 * x - 2.0 * th * du * du))
    return g, dg, d2g


@triton.jit
def _load_w(ptr, rows, cols, mr, mc, NC: tl.constexpr):
    return tl.load(ptr + rows[:, None] * NC + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_w(ptr, x, rows, cols, mr, mc, NC: tl.constexpr):
    tl.store(ptr + rows[:, None] * NC + cols[None, :], x, mask=mr[:, None] & mc[None, :])


@triton.jit
def _mb_forward(W1, b1, W2, b2, q, k, v, a, tok, gamma, beta, maskf, offs_m, F: tl.constexpr, eps,
                PREC: tl.constexpr):
    """One mini-batch: outputs q + LN(Zbar2), and a G1, a G2, X2 for the update."""
    Z1 = tl.dot(k, W1, input_precision=PREC) + b1[None, :]
    X2, s1, _d2 = _gelu(Z1)
    Z2 = tl.dot(X2, W2, input_precision=PREC) + b2[None, :]
    zhat, r = _ln_stats(Z2, maskf, F, eps)
    G2, gx, c2 = _ln_loss_grad(zhat, r, v - k, gamma, beta, maskf, F)
    G1 = tl.dot(G2, tl.trans(W2), input_precision=PREC) * s1
    E = tl.where(offs_m[:, None] >= offs_m[None, :], tok[:, None] * a[None, :], 0.0)
    A1 = tl.dot(q, tl.trans(k), input_precision=PREC)
    zbar1 = tl.dot(q, W1, input_precision=PREC) + b1[None, :] - tl.dot(E * (A1 + 1.0), G1, input_precision=PREC)
    xbar2, _s, _d = _gelu(zbar1)
    A2 = tl.dot(xbar2, tl.trans(X2), input_precision=PREC)
    zbar2 = tl.dot(xbar2, W2, input_precision=PREC) + b2[None, :] - tl.dot(E * (A2 + 1.0), G2, input_precision=PREC)
    zbhat, rb = _ln_stats(zbar2, maskf, F, eps)
    return q + gamma[None, :] * zbhat + beta[None, :], a[:, None] * G1, a[:, None] * G2, X2


@triton.jit
def _mb_update(W1, b1, W2, b2, k, v, a, gamma, beta, tok_last, maskf, F: tl.constexpr, eps, PREC: tl.constexpr):
    Z1 = tl.dot(k, W1, input_precision=PREC) + b1[None, :]
    X2, s1, _d2 = _gelu(Z1)
    Z2 = tl.dot(X2, W2, input_precision=PREC) + b2[None, :]
    zhat, r = _ln_stats(Z2, maskf, F, eps)
    G2, gx, c2 = _ln_loss_grad(zhat, r, v - k, gamma, beta, maskf, F)
    aG1 = a[:, None] * tl.dot(G2, tl.trans(W2), input_precision=PREC) * s1
    aG2 = a[:, None] * G2
    return (W1 - tok_last * tl.dot(tl.trans(k), aG1, input_precision=PREC), b1 - tok_last * tl.sum(aG1, axis=0),
            W2 - tok_last * tl.dot(tl.trans(X2), aG2, input_precision=PREC), b2 - tok_last * tl.sum(aG2, axis=0))


@triton.jit
def _fwd_kernel(Q, K, V, A, TOK, LNW, LNB, W10, B10, W20, B20, OUT, W1N, B1N, W2N, B2N, AW1, AB1, AW2, AB2,
                WC1, BC1, WC2, BC2, T, H, n_full, n_ckpt, group, s_w1, s_b1, s_w2, s_b2, eps,
                F: tl.constexpr, BF: tl.constexpr, BH: tl.constexpr, MB: tl.constexpr,
                HAS_PARTIAL: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    seq, h = pid // H, pid % H
    offs_m, offs_f, offs_h = tl.arange(0, MB), tl.arange(0, BF), tl.arange(0, BH)
    maskf, maskh, all_m = offs_f < F, offs_h < 4 * F, offs_m < MB
    W1 = _load_w(W10 + seq * s_w1 + h * F * 4 * F, offs_f, offs_h, maskf, maskh, 4 * F)
    b1 = tl.load(B10 + seq * s_b1 + h * 4 * F + offs_h, mask=maskh, other=0.0).to(tl.float32)
    W2 = _load_w(W20 + seq * s_w2 + h * 4 * F * F, offs_h, offs_f, maskh, maskf, F)
    b2 = tl.load(B20 + seq * s_b2 + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    gamma, beta, tok, tok_last = _load_outer(LNW, LNB, TOK, h, offs_f, offs_m, maskf, F, MB)
    base = pid * T * F
    for i in range(0, n_full):
        if SAVE:
            if i % group == 0:
                c = pid * n_ckpt + i // group
                _store_w(WC1 + c * F * 4 * F, W1, offs_f, offs_h, maskf, maskh, 4 * F)
                tl.store(BC1 + c * 4 * F + offs_h, b1, mask=maskh)
                _store_w(WC2 + c * 4 * F * F, W2, offs_h, offs_f, maskh, maskf, F)
                tl.store(BC2 + c * F + offs_f, b2, mask=maskf)
        rows = i * MB + offs_m
        q = _load_rows(Q + base, rows, offs_f, all_m, maskf, F)
        k = _load_rows(K + base, rows, offs_f, all_m, maskf, F)
        v = _load_rows(V + base, rows, offs_f, all_m, maskf, F)
        a = tl.load(A + pid * T + rows).to(tl.float32)
        out, aG1, aG2, X2 = _mb_forward(W1, b1, W2, b2, q, k, v, a, tok, gamma, beta, maskf, offs_m, F, eps, PREC)
        _store_rows(OUT + base, out, rows, offs_f, all_m, maskf, F)
        W1 = W1 - tok_last * tl.dot(tl.trans(k), aG1, input_precision=PREC)
        b1 = b1 - tok_last * tl.sum(aG1, axis=0)
        W2 = W2 - tok_last * tl.dot(tl.trans(X2), aG2, input_precision=PREC)
        b2 = b2 - tok_last * tl.sum(aG2, axis=0)
    if HAS_PARTIAL:
        rows = n_full * MB + offs_m
        maskm = rows < T
        q = _load_rows(Q + base, rows, offs_f, maskm, maskf, F)
        k = _load_rows(K + base, rows, offs_f, maskm, maskf, F)
        v = _load_rows(V + base, rows, offs_f, maskm, maskf, F)
        a = tl.load(A + pid * T + rows, mask=maskm, other=0.0).to(tl.float32)
        out, aG1, aG2, X2 = _mb_forward(W1, b1, W2, b2, q, k, v, a, tok, gamma, beta, maskf, offs_m, F, eps, PREC)
        _store_rows(OUT + base, out, rows, offs_f, maskm, maskf, F)
        _store_w(AW1 + pid * F * 4 * F, tl.dot(tl.trans(k), aG1, input_precision=PREC), offs_f, offs_h, maskf, maskh,
                 4 * F)
        tl.store(AB1 + pid * 4 * F + offs_h, tl.sum(aG1, axis=0), mask=maskh)
        _store_w(AW2 + pid * 4 * F * F, tl.dot(tl.trans(X2), aG2, input_precision=PREC), offs_h, offs_f, maskh, maskf,
                 F)
        tl.store(AB2 + pid * F + offs_f, tl.sum(aG2, axis=0), mask=maskf)
    _store_w(W1N + pid * F * 4 * F, W1, offs_f, offs_h, maskf, maskh, 4 * F)
    tl.store(B1N + pid * 4 * F + offs_h, b1, mask=maskh)
    _store_w(W2N + pid * 4 * F * F, W2, offs_h, offs_f, maskh, maskf, F)
    tl.store(B2N + pid * F + offs_f, b2, mask=maskf)


@triton.jit
def _mb_backward(W1, b1, W2, b2, q, k, v, a, tok, gamma, beta, dout, dW1, db1, dW2, db2, maskf, offs_m,
                 F: tl.constexpr, MB: tl.constexpr, eps, COMMIT: tl.constexpr, PREC: tl.constexpr):
    """dual_backward.mlp_minibatch_backward for one (sequence, head)."""
    Z1 = tl.dot(k, W1, input_precision=PREC) + b1[None, :]
    X2, s1, g2nd = _gelu(Z1)
    Z2 = tl.dot(X2, W2, input_precision=PREC) + b2[None, :]
    t = v - k
    zhat, r = _ln_stats(Z2, maskf, F, eps)
    G2, gx, c2 = _ln_loss_grad(zhat, r, t, gamma, beta, maskf, F)
    P = tl.dot(G2, tl.trans(W2), input_precision=PREC)
    G1 = P * s1
    tril = offs_m[:, None] >= offs_m[None, :]
    E = tl.where(tril, tok[:, None] * a[None, :], 0.0)
    A1 = tl.dot(q, tl.trans(k), input_precision=PREC)
    M1 = E * (A1 + 1.0)
    zbar1 = tl.dot(q, W1, input_precision=PREC) + b1[None, :] - tl.dot(M1, G1, input_precision=PREC)
    xbar2, sbar1, _d = _gelu(zbar1)
    A2 = tl.dot(xbar2, tl.trans(X2), input_precision=PREC)
    M2 = E * (A2 + 1.0)
    zbar2 = tl.dot(xbar2, W2, input_precision=PREC) + b2[None, :] - tl.dot(M2, G2, input_precision=PREC)
    zbhat, rb = _ln_stats(zbar2, maskf, F, eps)

    dzbar2 = _ln_vjp(zbhat, rb, dout, gamma, maskf, F)
    dgamma = tl.sum(dout * zbhat, axis=0)
    dbeta = tl.sum(dout, axis=0)
    dxbar2 = tl.dot(dzbar2, tl.trans(W2), input_precision=PREC)
    dW2n = dW2 + tl.dot(tl.trans(xbar2), dzbar2, input_precision=PREC)
    db2n = db2 + tl.sum(dzbar2, axis=0)
    dM2 = -tl.dot(dzbar2, tl.trans(G2), input_precision=PREC)
    dG2 = -tl.dot(tl.trans(M2), dzbar2, input_precision=PREC)
    dE = dM2 * (A2 + 1.0)
    dA2 = dM2 * E
    dxbar2 += tl.dot(dA2, X2, input_precision=PREC)
    dX2 = tl.dot(tl.trans(dA2), xbar2, input_precision=PREC)
    dzbar1 = dxbar2 * sbar1
    dq = dout + tl.dot(dzbar1, tl.trans(W1), input_precision=PREC)
    dW1n = dW1 + tl.dot(tl.trans(q), dzbar1, input_precision=PREC)
    db1n = db1 + tl.sum(dzbar1, axis=0)
    dM1 = -tl.dot(dzbar1, tl.trans(G1), input_precision=PREC)
    dG1 = -tl.dot(tl.trans(M1), dzbar1, input_precision=PREC)
    dE += dM1 * (A1 + 1.0)
    dA1 = dM1 * E
    dq += tl.dot(dA1, k, input_precision=PREC)
    dk = tl.dot(tl.trans(dA1), q, input_precision=PREC)
    dE = tl.where(tril, dE, 0.0)
    dtok = tl.sum(dE * a[None, :], axis=1)
    da = tl.sum(dE * tok[:, None], axis=0)
    if COMMIT:
        tok_last = tl.sum(tl.where(offs_m == MB - 1, tok, 0.0), axis=0)
        aG1 = a[:, None] * G1
        aG2 = a[:, None] * G2
        daG1 = -tok_last * (tl.dot(k, dW1, input_precision=PREC) + db1[None, :])
        daG2 = -tok_last * (tl.dot(X2, dW2, input_precision=PREC) + db2[None, :])
        dk -= tok_last * tl.dot(aG1, tl.trans(dW1), input_precision=PREC)
        dX2 -= tok_last * tl.dot(aG2, tl.trans(dW2), input_precision=PREC)
        s = -(tl.sum(tl.sum(tl.dot(tl.trans(k), aG1, input_precision=PREC) * dW1, axis=1), axis=0)
              + tl.sum(tl.sum(aG1, axis=0) * db1, axis=0)
              + tl.sum(tl.sum(tl.dot(tl.trans(X2), aG2, input_precision=PREC) * dW2, axis=1), axis=0)
              + tl.sum(tl.sum(aG2, axis=0) * db2, axis=0))
        dtok += tl.where(offs_m == MB - 1, s, 0.0)
        da += tl.sum(daG1 * G1, axis=1) + tl.sum(daG2 * G2, axis=1)
        dG1 += a[:, None] * daG1
        dG2 += a[:, None] * daG2
    dP = dG1 * s1
    ds1 = dG1 * P
    dG2 += tl.dot(dP, W2, input_precision=PREC)
    dW2n += tl.dot(tl.trans(dP), G2, input_precision=PREC)
    dZ2, dt, dg2, db2 = _ln_grad_vjp(dG2, G2, zhat, r, gx, c2, t, gamma, beta, maskf, F)
    dgamma += dg2
    dbeta += db2
    dX2 += tl.dot(dZ2, tl.trans(W2), input_precision=PREC)
    dW2n += tl.dot(tl.trans(X2), dZ2, input_precision=PREC)
    db2n += tl.sum(dZ2, axis=0)
    dZ1 = dX2 * s1 + ds1 * g2nd
    dk += tl.dot(dZ1, tl.trans(W1), input_precision=PREC) - dt
    dW1n += tl.dot(tl.trans(k), dZ1, input_precision=PREC)
    db1n += tl.sum(dZ1, axis=0)
    return dq, dk, dt, da, dtok, dgamma, dbeta, dW1n, db1n, dW2n, db2n


@triton.jit
def _bwd_kernel(Q, K, V, A, TOK, LNW, LNB, WC1, BC1, WC2, BC2, W1N, B1N, W2N, B2N, DOUT, DW1N, DB1N, DW2N, DB2N,
                DQ, DK, DV, DA, DTOK, DLNW, DLNB, DW1, DB1, DW2, DB2, WS1, BS1, WS2, BS2,
                T, H, n_full, n_ckpt, group, eps,
                F: tl.constexpr, BF: tl.constexpr, BH: tl.constexpr, MB: tl.constexpr,
                HAS_PARTIAL: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    offs_m, offs_f, offs_h = tl.arange(0, MB), tl.arange(0, BF), tl.arange(0, BH)
    maskf, maskh, all_m = offs_f < F, offs_h < 4 * F, offs_m < MB
    gamma, beta, tok, tok_last = _load_outer(LNW, LNB, TOK, h, offs_f, offs_m, maskf, F, MB)
    gW1 = _load_w(DW1N + pid * F * 4 * F, offs_f, offs_h, maskf, maskh, 4 * F)
    gb1 = tl.load(DB1N + pid * 4 * F + offs_h, mask=maskh, other=0.0)
    gW2 = _load_w(DW2N + pid * 4 * F * F, offs_h, offs_f, maskh, maskf, F)
    gb2 = tl.load(DB2N + pid * F + offs_f, mask=maskf, other=0.0)
    dgamma = tl.zeros([BF], dtype=tl.float32)
    dbeta = tl.zeros([BF], dtype=tl.float32)
    dtok = tl.zeros([MB], dtype=tl.float32)
    base = pid * T * F
    if HAS_PARTIAL:
        rows = n_full * MB + offs_m
        maskm = rows < T
        W1 = _load_w(W1N + pid * F * 4 * F, offs_f, offs_h, maskf, maskh, 4 * F)
        b1 = tl.load(B1N + pid * 4 * F + offs_h, mask=maskh, other=0.0)
        W2 = _load_w(W2N + pid * 4 * F * F, offs_h, offs_f, maskh, maskf, F)
        b2 = tl.load(B2N + pid * F + offs_f, mask=maskf, other=0.0)
        q, k, v, a, do = _load_minibatch(Q, K, V, A, DOUT, base, pid * T, rows, offs_f, maskm, maskf, F)
        dq, dk, dv, da, dt_, dg_, db_, gW1, gb1, gW2, gb2 = _mb_backward(
            W1, b1, W2, b2, q, k, v, a, tok, gamma, beta, do, gW1, gb1, gW2, gb2, maskf, offs_m, F, MB, eps, False,
            PREC)
        _store_minibatch_grads(DQ, DK, DV, DA, base, pid * T, rows, dq, dk, dv, da, offs_f, maskm, maskf, F)
        dtok += dt_
        dgamma += dg_
        dbeta += db_
    for gi in range(0, n_ckpt):
        g = n_ckpt - 1 - gi
        first = g * group
        count = tl.minimum(group, n_full - first)
        c = pid * n_ckpt + g
        W1 = _load_w(WC1 + c * F * 4 * F, offs_f, offs_h, maskf, maskh, 4 * F)
        b1 = tl.load(BC1 + c * 4 * F + offs_h, mask=maskh, other=0.0)
        W2 = _load_w(WC2 + c * 4 * F * F, offs_h, offs_f, maskh, maskf, F)
        b2 = tl.load(BC2 + c * F + offs_f, mask=maskf, other=0.0)
        for j in range(0, count):
            s = pid * group + j
            _store_w(WS1 + s * F * 4 * F, W1, offs_f, offs_h, maskf, maskh, 4 * F)
            tl.store(BS1 + s * 4 * F + offs_h, b1, mask=maskh)
            _store_w(WS2 + s * 4 * F * F, W2, offs_h, offs_f, maskh, maskf, F)
            tl.store(BS2 + s * F + offs_f, b2, mask=maskf)
            rows = (first + j) * MB + offs_m
            k = _load_rows(K + base, rows, offs_f, all_m, maskf, F)
            v = _load_rows(V + base, rows, offs_f, all_m, maskf, F)
            a = tl.load(A + pid * T + rows).to(tl.float32)
            W1, b1, W2, b2 = _mb_update(W1, b1, W2, b2, k, v, a, gamma, beta, tok_last, maskf, F, eps, PREC)
        tl.debug_barrier()
        for jj in range(0, count):
            j = count - 1 - jj
            s = pid * group + j
            W1 = _load_w(WS1 + s * F * 4 * F, offs_f, offs_h, maskf, maskh, 4 * F)
            b1 = tl.load(BS1 + s * 4 * F + offs_h, mask=maskh, other=0.0)
            W2 = _load_w(WS2 + s * 4 * F * F, offs_h, offs_f, maskh, maskf, F)
            b2 = tl.load(BS2 + s * F + offs_f, mask=maskf, other=0.0)
            rows = (first + j) * MB + offs_m
            q, k, v, a, do = _load_minibatch(Q, K, V, A, DOUT, base, pid * T, rows, offs_f, all_m, maskf, F)
            dq, dk, dv, da, dt_, dg_, db_, gW1, gb1, gW2, gb2 = _mb_backward(
                W1, b1, W2, b2, q, k, v, a, tok, gamma, beta, do, gW1, gb1, gW2, gb2, maskf, offs_m, F, MB, eps,
                True, PREC)
            _store_minibatch_grads(DQ, DK, DV, DA, base, pid * T, rows, dq, dk, dv, da, offs_f, all_m, maskf, F)
            dtok += dt_
            dgamma += dg_
            dbeta += db_
        tl.debug_barrier()
    _store_w(DW1 + pid * F * 4 * F, gW1, offs_f, offs_h, maskf, maskh, 4 * F)
    tl.store(DB1 + pid * 4 * F + offs_h, gb1, mask=maskh)
    _store_w(DW2 + pid * 4 * F * F, gW2, offs_h, offs_f, maskh, maskf, F)
    tl.store(DB2 + pid * F + offs_f, gb2, mask=maskf)
    tl.store(DLNW + pid * F + offs_f, dgamma, mask=maskf)
    tl.store(DLNB + pid * F + offs_f, dbeta, mask=maskf)
    tl.store(DTOK + pid * MB + offs_m, dtok)


@triton.jit
def _decode_kernel(Q, K, V, A, TOK, LNW, LNB, W1, B1, W2, B2, GW1, GB1, GW2, GB2, OUT, H, pos, eps,
                   F: tl.constexpr, BF: tl.constexpr, BH: tl.constexpr, COMMIT: tl.constexpr):
    """One token at in-mini-batch position `pos` for every (sequence, head); the fp32 state and its
    accumulators are updated in place."""
    pid = tl.program_id(0)
    h = pid % H
    offs_f, offs_h = tl.arange(0, BF), tl.arange(0, BH)
    maskf, maskh = offs_f < F, offs_h < 4 * F
    o1, o2 = pid * F * 4 * F, pid * 4 * F * F
    w1 = _load_w(W1 + o1, offs_f, offs_h, maskf, maskh, 4 * F)
    w2 = _load_w(W2 + o2, offs_h, offs_f, maskh, maskf, F)
    b1 = tl.load(B1 + pid * 4 * F + offs_h, mask=maskh, other=0.0)
    b2 = tl.load(B2 + pid * F + offs_f, mask=maskf, other=0.0)
    g1 = _load_w(GW1 + o1, offs_f, offs_h, maskf, maskh, 4 * F)
    g2 = _load_w(GW2 + o2, offs_h, offs_f, maskh, maskf, F)
    gb1 = tl.load(GB1 + pid * 4 * F + offs_h, mask=maskh, other=0.0)
    gb2 = tl.load(GB2 + pid * F + offs_f, mask=maskf, other=0.0)
    gamma = tl.load(LNW + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    beta = tl.load(LNB + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    q = tl.load(Q + pid * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    k = tl.load(K + pid * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    v = tl.load(V + pid * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
    a = tl.load(A + pid).to(tl.float32)
    tok = tl.load(TOK + pos).to(tl.float32)
    z1 = tl.sum(k[:, None] * w1, axis=0) + b1  # (BH,)
    x2, s1, _d = _gelu(z1)
    z2 = tl.sum(x2[:, None] * w2, axis=0) + b2  # (BF,)
    zhat, r = _ln_stats(z2[None, :], maskf, F, eps)
    G2, gx, c2 = _ln_loss_grad(zhat, r, (v - k)[None, :], gamma, beta, maskf, F)
    G2 = tl.sum(G2, axis=0)
    G1 = tl.sum(w2 * G2[None, :], axis=1) * s1  # (BH,)
    g1 += a * k[:, None] * G1[None, :]
    gb1 += a * G1
    g2 += a * x2[:, None] * G2[None, :]
    gb2 += a * G2
    w1b, b1b, w2b, b2b = w1 - tok * g1, b1 - tok * gb1, w2 - tok * g2, b2 - tok * gb2
    zb1 = tl.sum(q[:, None] * w1b, axis=0) + b1b
    xb2, _s, _d2 = _gelu(zb1)
    zb2 = tl.sum(xb2[:, None] * w2b, axis=0) + b2b
    zbhat, rb = _ln_stats(zb2[None, :], maskf, F, eps)
    out = q + gamma * tl.sum(zbhat, axis=0) + beta
    tl.store(OUT + pid * F + offs_f, out.to(OUT.dtype.element_ty), mask=maskf)
    if COMMIT:
        _store_w(W1 + o1, w1b, offs_f, offs_h, maskf, maskh, 4 * F)
        tl.store(B1 + pid * 4 * F + offs_h, b1b, mask=maskh)
        _store_w(W2 + o2, w2b, offs_h, offs_f, maskh, maskf, F)
        tl.store(B2 + pid * F + offs_f, b2b, mask=maskf)
        g1 = g1 * 0.0
        gb1 = gb1 * 0.0
        g2 = g2 * 0.0
        gb2 = gb2 * 0.0
    _store_w(GW1 + o1, g1, offs_f, offs_h, maskf, maskh, 4 * F)
    tl.store(GB1 + pid * 4 * F + offs_h, gb1, mask=maskh)
    _store_w(GW2 + o2, g2, offs_h, offs_f, maskh, maskf, F)
    tl.store(GB2 + pid * F + offs_f, gb2, mask=maskf)


# -- launchers ---------------------------------------------------------------------------------

PARAMS = ("W1", "b1", "W2", "b2")


def _shapes(Bsz, H, f):
    return {"W1": (Bsz, H, f, 4 * f), "b1": (Bsz, H, 4 * f), "W2": (Bsz, H, 4 * f, f), "b2": (Bsz, H, f)}


class TTTMLPFunction(torch.autograd.Function):
    """As triton_linear.TTTLinearFunction, with the inner weights W1 (B|1, H, f, 4f), b1 (B|1, H, 4f),
    W2 (B|1, H, 4f, f), b2 (B|1, H, f)."""

    @staticmethod
    def forward(ctx, q, k, v, a, tok, ln_w, ln_b, W1, b1, W2, b2, group: int):
        Bsz, H, T, f = q.shape
        MB = tok.shape[0]
        n_full, partial = T // MB, T % MB
        n_ckpt = max(1, math.ceil(n_full / group))
        q, k, v, a = (x.contiguous() for x in (q, k, v, a))
        f32 = dict(device=q.device, dtype=torch.float32)
        tok32, lnw, lnb = tok.float().contiguous(), ln_w.float().contiguous(), ln_b.float().contiguous()
        init = [p.float().contiguous() for p in (W1, b1, W2, b2)]
        shapes = _shapes(Bsz, H, f)
        new = [torch.empty(shapes[n], **f32) for n in PARAMS]
        acc = [torch.zeros(shapes[n], **f32) for n in PARAMS]
        save = any(ctx.needs_input_grad)
        nc = n_ckpt if save else 1
        ckpt = [torch.empty(Bsz, H, nc, *shapes[n][2:], **f32) for n in PARAMS]
        strides = [0 if p.shape[0] == 1 else p[0].numel() for p in init]
        out = torch.empty_like(q)
        _fwd_kernel[(Bsz * H,)](q, k, v, a, tok32, lnw, lnb, *init, out, *new, *acc, *ckpt,
                                T, H, n_full, n_ckpt, group, *strides, LN_EPS,
                                F=f, BF=_block(f), BH=_block(4 * f), MB=MB, HAS_PARTIAL=partial > 0,
                                SAVE=bool(save), PREC=LAUNCH.precision,
                                num_warps=LAUNCH.warps("mlp", "fwd"), num_stages=LAUNCH.num_stages)
        ctx.save_for_backward(q, k, v, a, tok32, lnw, lnb, *ckpt, *new)
        ctx.meta = (group, n_full, n_ckpt, partial, [p.shape for p in (W1, b1, W2, b2)], tok.dtype, ln_w.dtype,
                    W1.dtype)
        ctx.mark_non_differentiable(*acc)
        return (out, *new, *acc)

    @staticmethod
    def backward(ctx, dout, dW1n, db1n, dW2n, db2n, *_dacc):
        q, k, v, a, tok32, lnw, lnb, *rest = ctx.saved_tensors
        ckpt, new = rest[:4], rest[4:]
        group, n_full, n_ckpt, partial, shapes_in, tok_dtype, ln_dtype, w_dtype = ctx.meta
        Bsz, H, T, f = q.shape
        MB = tok32.shape[0]
        f32 = dict(device=q.device, dtype=torch.float32)
        shapes = _shapes(Bsz, H, f)
        dout = torch.zeros_like(q) if dout is None else dout.contiguous()
        dnext = [torch.zeros(shapes[n], **f32) if g is None else g.float().contiguous()
                 for n, g in zip(PARAMS, (dW1n, db1n, dW2n, db2n))]
        dq, dk, dv, da = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(a)
        dtok = torch.empty(Bsz, H, MB, **f32)
        dlnw, dlnb = torch.empty(Bsz, H, f, **f32), torch.empty(Bsz, H, f, **f32)
        dinit = [torch.empty(shapes[n], **f32) for n in PARAMS]
        scratch = [torch.empty(Bsz, H, group, *shapes[n][2:], **f32) for n in PARAMS]
        _bwd_kernel[(Bsz * H,)](q, k, v, a, tok32, lnw, lnb, *ckpt, *new, dout, *dnext,
                                dq, dk, dv, da, dtok, dlnw, dlnb, *dinit, *scratch,
                                T, H, n_full, n_ckpt if n_full else 0, group, LN_EPS,
                                F=f, BF=_block(f), BH=_block(4 * f), MB=MB, HAS_PARTIAL=partial > 0,
                                PREC=LAUNCH.precision, num_warps=LAUNCH.warps("mlp", "bwd"),
                                num_stages=LAUNCH.num_stages)
        dinit = [(g.sum(0, keepdim=True) if s[0] == 1 else g).to(w_dtype) for g, s in zip(dinit, shapes_in)]
        return (dq, dk, dv, da, dtok.sum((0, 1)).to(tok_dtype), dlnw.sum(0).to(ln_dtype), dlnb.sum(0).to(ln_dtype),
                *dinit, None)


def prefill(q, k, v, a, tok, ln_w, ln_b, params: dict, group: int = DEFAULT_GROUP):
    """out (B, H, T, f), the inner weights after T tokens and a trailing partial mini-batch's accumulators,
    as dicts keyed W1, b1, W2, b2 (biases (B, H, n))."""
    res = TTTMLPFunction.apply(q, k, v, a, tok, ln_w, ln_b, *[params[n] for n in PARAMS], group)
    return res[0], dict(zip(PARAMS, res[1:5])), dict(zip(PARAMS, res[5:9]))


def decode_step(q, k, v, a, tok, ln_w, ln_b, params: dict, acc: dict, pos: int):
    """One token; params and acc: fp32 contiguous (B, H, ...) dicts, updated in place. Returns (B, H, f)."""
    Bsz, H, f = q.shape
    out = torch.empty_like(q)
    _decode_kernel[(Bsz * H,)](q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(),
                               tok.float().contiguous(), ln_w.float().contiguous(), ln_b.float().contiguous(),
                               *[params[n] for n in PARAMS], *[acc[n] for n in PARAMS], out, H, pos, LN_EPS,
                               F=f, BF=_block(f), BH=_block(4 * f), COMMIT=pos == tok.shape[0] - 1)
    return out
