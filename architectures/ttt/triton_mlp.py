"""TTT-MLP in Triton: causal prefill forward and backward kernels and the decode kernel, with the semantics
of dual.py (f_res(x) = gelu_tanh(x W1 + b1) W2 + b2, hidden 4f). Structure as triton_linear.py (read it
first); the math of the backward is dual_backward.mlp_minibatch_backward, checked against autograd.

The inner weights (W1 f x 4f, b1, W2 4f x f, b2) are fp32. W1, b1 and W2 stay in memory (at f = 64 they are
128 KB, more than registers or shared memory hold), updated in place, and every kernel reads them a tile of
hidden units at a time (hidden_tile): the forward in two passes per mini-batch (_mb_forward_tiled), the
backward in four (_mb_backward_tiled, with per-program scratch between them), decode in two; b2 and its
gradient stay in registers. So they fit at every head dim (`make check-kernels`); `backend: auto` takes them
up to layer.MLP_TRITON_AUTO_MAX_HEAD_DIM until they are timed on a GPU. Head dims that are not a power of two
are padded (hidden 4f too); padded lanes are zero through every product and GELU.
GELU's tanh is 2 sigmoid(2u) - 1 (the interpreter lacks libdevice's tanh).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from architectures.ttt.inner import LN_EPS
from architectures.ttt.triton_linear import (DEFAULT_GROUP, LAUNCH, _block, _checkpoints, _group_backwards,
                                             _ln_grad_vjp, _ln_loss_grad, _ln_stats, _ln_vjp, _load_carried_grads,
                                             _load_decode_token, _load_minibatch, _load_outer, _load_qkva,
                                             _load_rows, _start_carried_grads, _store_carried_grads, _store_rows,
                                             decode_warps, outer_fp32, prefill_shape)


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
def _copy_state(S1, SB1, S2, D1, DB1, D2, offs_f, maskf, offs_t0, F: tl.constexpr, BT: tl.constexpr,
                NT: tl.constexpr):
    """W1 (f x 4f), b1 (4f), W2 (4f x f) from S* to D*, a tile of BT hidden units at a time."""
    for j in tl.range(0, NT, disable_licm=True):
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        _store_w(D1, _load_w(S1, offs_f, offs_t, maskf, maskt, 4 * F), offs_f, offs_t, maskf, maskt, 4 * F)
        tl.store(DB1 + offs_t, tl.load(SB1 + offs_t, mask=maskt, other=0.0), mask=maskt)
        _store_w(D2, _load_w(S2, offs_t, offs_f, maskt, maskf, F), offs_t, offs_f, maskt, maskf, F)


@triton.jit
def _load_tile_weights(S1, SB1, S2, offs_f, maskf, offs_t, maskt, F: tl.constexpr):
    """One tile of hidden units: W1[:, tile] (BF, BT), b1[tile], W2[tile, :] (BT, BF)."""
    return (_load_w(S1, offs_f, offs_t, maskf, maskt, 4 * F), tl.load(SB1 + offs_t, mask=maskt, other=0.0),
            _load_w(S2, offs_t, offs_f, maskt, maskf, F))


@triton.jit
def _tile_zbar1(W1, b1, W2, q, k, G2, M1, PREC: tl.constexpr):
    """One tile's share of a mini-batch (MB, BT each): X2, s1, g2nd = gelu(K W1 + b1) and its derivatives,
    P = G2 W2^T, G1 = P s1, Zbar1 = Q W1 + b1 - M1 G1."""
    X2, s1, g2nd = _gelu(tl.dot(k, W1, input_precision=PREC) + b1[None, :])
    P = tl.dot(G2, tl.trans(W2), input_precision=PREC)
    G1 = P * s1
    return X2, s1, g2nd, P, G1, tl.dot(q, W1, input_precision=PREC) + b1[None, :] - tl.dot(M1, G1, input_precision=PREC)


@triton.jit
def _tile_sums(W1, b1, W2, q, k, G2, M1, A2, zbar2, PREC: tl.constexpr):
    """_tile_zbar1's X2, G1 and Zbar1, and the tile's terms added to A2 += Xbar2 X2^T and Zbar2 += Xbar2 W2."""
    X2, _s1, _g2nd, _P, G1, zbar1 = _tile_zbar1(W1, b1, W2, q, k, G2, M1, PREC)
    xbar2, _s, _d = _gelu(zbar1)
    return (X2, G1, zbar1, tl.dot(xbar2, tl.trans(X2), A2, input_precision=PREC),
            tl.dot(xbar2, W2, zbar2, input_precision=PREC))


@triton.jit
def _hidden_sum(S1, SB1, S2, b2, KR, rows, maskm, maskf, offs_f, offs_t0, F: tl.constexpr, BF: tl.constexpr,
                BT: tl.constexpr, NT: tl.constexpr, MB: tl.constexpr, PREC: tl.constexpr):
    """Z2 = gelu(K W1 + b1) W2 + b2 (MB, BF), summed over the tiles of hidden units (W1, b1, W2 read from S*;
    K, the rows at `rows` of KR, read per tile: a product's left operand kept across the loop holds a whole copy
    per warp)."""
    Z2 = tl.zeros([MB, BF], dtype=tl.float32) + b2[None, :]
    for j in tl.range(0, NT, disable_licm=True):
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        k = _load_rows(KR, rows, offs_f, maskm, maskf, F)
        Z1 = tl.dot(k, _load_w(S1, offs_f, offs_t, maskf, maskt, 4 * F), input_precision=PREC) \
            + tl.load(SB1 + offs_t, mask=maskt, other=0.0)[None, :]
        X2, _s1, _d2 = _gelu(Z1)
        Z2 = tl.dot(X2, _load_w(S2, offs_t, offs_f, maskt, maskf, F), Z2, input_precision=PREC)
    return Z2


@triton.jit
def _mb_update_tiled(S1, SB1, S2, D1, DB1, D2, b2, KR, rows, maskm, v, a, tok_last, gamma, beta, maskf, offs_f,
                     offs_t0, F: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, NT: tl.constexpr,
                     MB: tl.constexpr, eps, PREC: tl.constexpr):
    """Only the state update of one mini-batch (the backward's recomputation): the weights after it into D*
    (another slot than S*), tile by tile; returns b2 after it. K: the rows at `rows` of KR."""
    k = _load_rows(KR, rows, offs_f, maskm, maskf, F)
    Z2 = _hidden_sum(S1, SB1, S2, b2, KR, rows, maskm, maskf, offs_f, offs_t0, F, BF, BT, NT, MB, PREC)
    zhat, r = _ln_stats(Z2, maskf, F, eps)
    G2, _gx, _c2 = _ln_loss_grad(zhat, r, v - k, gamma, beta, maskf, F)
    aG2 = a[:, None] * G2
    for j in tl.range(0, NT, disable_licm=True):
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        W1, b1, W2 = _load_tile_weights(S1, SB1, S2, offs_f, maskf, offs_t, maskt, F)
        X2, s1, _d2 = _gelu(tl.dot(k, W1, input_precision=PREC) + b1[None, :])
        aG1 = a[:, None] * tl.dot(G2, tl.trans(W2), input_precision=PREC) * s1
        _store_w(D1, tl.dot(tl.trans(k), -tok_last * aG1, W1, input_precision=PREC), offs_f, offs_t, maskf, maskt,
                 4 * F)
        tl.store(DB1 + offs_t, b1 - tok_last * tl.sum(aG1, axis=0), mask=maskt)
        _store_w(D2, tl.dot(tl.trans(X2), -tok_last * aG2, W2, input_precision=PREC), offs_t, offs_f, maskt, maskf,
                 F)
    tl.debug_barrier()  # the new state written before it is read
    return b2 - tok_last * tl.sum(aG2, axis=0)


@triton.jit
def _mb_forward_tiled(S1, SB1, S2, D1, DB1, D2, b2, q, k, v, a, tok, tok_last, gamma, beta, maskf, offs_f, offs_m,
                      QR, KR, G2P, rows, maskm, offs_t0, F: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
                      NT: tl.constexpr, MB: tl.constexpr, eps, COMMIT: tl.constexpr, PREC: tl.constexpr):
    """One mini-batch of TTT-MLP with W1, b1, W2 in memory (S1, SB1, S2), read a tile of BT hidden units at a
    time; b2 (BF) in registers. Two passes over the tiles: the first sums Z2 = gelu(K W1 + b1) W2 + b2 (then G2),
    the second computes G1, Zbar1, Xbar2 and their sums Zbar2 and A2 tile by tile, and writes each tile's update:
    COMMIT, the weights after the mini-batch into D* (= S*: in place, each tile after its last read); else the
    update's sums K^T aG1, sum aG1, X2^T aG2 (a partial mini-batch's accumulators). Pass 2 reads q and k (QR, KR:
    the rows at `rows`) from memory per tile: kept across the loop as the products' left operands, each held a
    whole copy per warp (ptxas for sm_90 at f = 64: 16 B of spill stores so, none now). For the same reason
    pass 1 reads K per tile too (_hidden_sum), G2 goes through the program's scratch G2P (MB, f) and is read
    back per tile, the update reads k again (not the copy K W1 took) and the outputs read q again. ptxas for
    sm_90, 8 warps, 32 hidden units per tile, f = 96 / 128: 64 / 24 B of spill stores with those kept in
    registers, none so (Triton 3.7.1; 3.6.0: 252 / 268 B then, 32 / 80 B so). Returns the outputs
    q + LN(Zbar2) and aG2 (the caller updates b2)."""
    Z2 = _hidden_sum(S1, SB1, S2, b2, KR, rows, maskm, maskf, offs_f, offs_t0, F, BF, BT, NT, MB, PREC)  # pass 1
    zhat, r = _ln_stats(Z2, maskf, F, eps)
    G2, _gx, _c2 = _ln_loss_grad(zhat, r, v - k, gamma, beta, maskf, F)
    E = tl.where(offs_m[:, None] >= offs_m[None, :], tok[:, None] * a[None, :], 0.0)
    M1 = E * (tl.dot(q, tl.trans(k), input_precision=PREC) + 1.0)
    all_m = offs_m < MB  # G2P's rows: the whole mini-batch's, padding included
    _store_rows(G2P, G2, offs_m, offs_f, all_m, maskf, F)
    zbar2 = tl.zeros([MB, BF], dtype=tl.float32) + b2[None, :]
    A2 = tl.zeros([MB, MB], dtype=tl.float32)
    tl.debug_barrier()  # every tile read by pass 1 before pass 2 writes any (and G2 written)
    for j in range(0, NT):  # pass 2: G1, Zbar1, Xbar2 per tile; the tile's update
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        W1, b1, W2 = _load_tile_weights(S1, SB1, S2, offs_f, maskf, offs_t, maskt, F)
        G2j = _load_rows(G2P, offs_m, offs_f, all_m, maskf, F)
        X2, G1, _zbar1, A2, zbar2 = _tile_sums(W1, b1, W2, _load_rows(QR, rows, offs_f, maskm, maskf, F),
                                               _load_rows(KR, rows, offs_f, maskm, maskf, F), G2j, M1, A2, zbar2, PREC)
        aG1, aG2 = a[:, None] * G1, a[:, None] * G2j
        tl.debug_barrier()  # every thread has read the tile before it is overwritten (COMMIT: in place)
        kj = _load_rows(KR, rows, offs_f, maskm, maskf, F)  # again: each product's operand from memory
        if COMMIT:  # W - tok_last (update), accumulated on the tensor cores
            W1 = tl.dot(tl.trans(kj), -tok_last * aG1, W1, input_precision=PREC)
            b1 = b1 - tok_last * tl.sum(aG1, axis=0)
            W2 = tl.dot(tl.trans(X2), -tok_last * aG2, W2, input_precision=PREC)
        else:
            W1 = tl.dot(tl.trans(kj), aG1, input_precision=PREC)
            b1 = tl.sum(aG1, axis=0)
            W2 = tl.dot(tl.trans(X2), aG2, input_precision=PREC)
        _store_w(D1, W1, offs_f, offs_t, maskf, maskt, 4 * F)
        tl.store(DB1 + offs_t, b1, mask=maskt)
        _store_w(D2, W2, offs_t, offs_f, maskt, maskf, F)
    G2 = _load_rows(G2P, offs_m, offs_f, all_m, maskf, F)
    tl.debug_barrier()  # the tiles written before the next mini-batch reads them, G2 read before it is replaced
    zbhat, rb = _ln_stats(zbar2 - tl.dot(E * (A2 + 1.0), G2, input_precision=PREC), maskf, F, eps)
    return _load_rows(QR, rows, offs_f, maskm, maskf, F) + gamma[None, :] * zbhat + beta[None, :], a[:, None] * G2


@triton.jit
def _fwd_kernel(Q, K, V, A, TOK, LNW, LNB, W10, B10, W20, B20, OUT, W1N, B1N, W2N, B2N, AW1, AB1, AW2, AB2,
                WC1, BC1, WC2, BC2, G2S, T, H, n_full, n_ckpt, group, s_w1, s_b1, s_w2, s_b2, eps,
                F: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, MB: tl.constexpr, PARTIAL: tl.constexpr,
                SAVE: tl.constexpr, PREC: tl.constexpr):
    """The state (W1, b1, W2) lives in the outputs W1N, B1N, W2N, updated in place tile by tile (BT hidden units;
    at f = 64 the whole state, 128 KB of fp32, fits neither registers nor shared memory); b2 in registers.
    PARTIAL: a second launch for a trailing partial mini-batch: its outputs from the final state, its update's
    sums into the accumulators AW1, AB1, AW2, AB2 (one code path per launch keeps the registers to one
    mini-batch's). G2S: (MB, f) numbers of scratch per program (_mb_forward_tiled)."""
    pid = tl.program_id(0)
    seq, h = pid // H, pid % H
    NT = (4 * F + BT - 1) // BT  # tiles of hidden units (the padding past 4f needs none)
    offs_m, offs_f, offs_t0 = tl.arange(0, MB), tl.arange(0, BF), tl.arange(0, BT)
    maskf, all_m = offs_f < F, offs_m < MB
    S1, SB1, S2 = W1N + pid * F * 4 * F, B1N + pid * 4 * F, W2N + pid * 4 * F * F
    gamma, beta, tok, tok_last = _load_outer(LNW, LNB, TOK, h, offs_f, offs_m, maskf, F, MB)
    base = pid * T * F
    G2P = G2S + pid * MB * F
    if PARTIAL:
        rows = n_full * MB + offs_m
        maskm = rows < T
        q, k, v, a = _load_qkva(Q, K, V, A, base, pid * T, rows, offs_f, maskm, maskf, F)
        b2 = tl.load(B2N + pid * F + offs_f, mask=maskf, other=0.0)
        out, aG2 = _mb_forward_tiled(S1, SB1, S2, AW1 + pid * F * 4 * F, AB1 + pid * 4 * F, AW2 + pid * 4 * F * F,
                                     b2, q, k, v, a, tok, tok_last, gamma, beta, maskf, offs_f, offs_m, Q + base,
                                     K + base, G2P, rows, maskm, offs_t0, F, BF, BT, NT, MB, eps, False, PREC)
        _store_rows(OUT + base, out, rows, offs_f, maskm, maskf, F)
        tl.store(AB2 + pid * F + offs_f, tl.sum(aG2, axis=0), mask=maskf)
    else:
        _copy_state(W10 + seq * s_w1 + h * F * 4 * F, B10 + seq * s_b1 + h * 4 * F,
                    W20 + seq * s_w2 + h * 4 * F * F, S1, SB1, S2, offs_f, maskf, offs_t0, F, BT, NT)
        b2 = tl.load(B20 + seq * s_b2 + h * F + offs_f, mask=maskf, other=0.0).to(tl.float32)
        tl.debug_barrier()
        for i in range(0, n_full):
            if SAVE:
                if i % group == 0:
                    c = pid * n_ckpt + i // group
                    _copy_state(S1, SB1, S2, WC1 + c * F * 4 * F, BC1 + c * 4 * F, WC2 + c * 4 * F * F, offs_f,
                                maskf, offs_t0, F, BT, NT)
                    tl.store(BC2 + c * F + offs_f, b2, mask=maskf)
            rows = i * MB + offs_m
            q, k, v, a = _load_qkva(Q, K, V, A, base, pid * T, rows, offs_f, all_m, maskf, F)
            out, aG2 = _mb_forward_tiled(S1, SB1, S2, S1, SB1, S2, b2, q, k, v, a, tok, tok_last, gamma, beta,
                                         maskf, offs_f, offs_m, Q + base, K + base, G2P, rows, all_m, offs_t0, F, BF,
                                         BT, NT, MB, eps, True, PREC)
            _store_rows(OUT + base, out, rows, offs_f, all_m, maskf, F)
            b2 = b2 - tok_last * tl.sum(aG2, axis=0)
        tl.store(B2N + pid * F + offs_f, b2, mask=maskf)


@triton.jit
def _load_tile(ptr, offs_m, offs_t, maskt, F: tl.constexpr):
    """One (MB, BT) tile of a per-program (MB, 4f) scratch array."""
    return tl.load(ptr + offs_m[:, None] * 4 * F + offs_t[None, :], mask=maskt[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, x, offs_m, offs_t, maskt, F: tl.constexpr):
    tl.store(ptr + offs_m[:, None] * 4 * F + offs_t[None, :], x, mask=maskt[None, :])


@triton.jit
def _load_tile_operands(S1, SB1, S2, QR, KR, G2S, rows, maskm, offs_m, all_m, offs_f, maskf, offs_t, maskt,
                        F: tl.constexpr):
    """A backward tile pass's operands: the tile's W1, b1, W2, and q, k and G2 read again from memory (not kept
    across the loop: _mb_backward_tiled)."""
    W1, b1, W2 = _load_tile_weights(S1, SB1, S2, offs_f, maskf, offs_t, maskt, F)
    return (W1, b1, W2, _load_rows(QR, rows, offs_f, maskm, maskf, F), _load_rows(KR, rows, offs_f, maskm, maskf, F),
            _load_rows(G2S, offs_m, offs_f, all_m, maskf, F))


@triton.jit
def _mb_backward_tiled(S1, SB1, S2, b2, GW1, GB1, GW2, DB2, DLNW, DLNB, DTOK, pid, q, k, v, a, dout, tok, tok_last,
                       gamma, beta, SCR, maskf, offs_f, offs_m, QR, KR, rows, maskm, offs_t0, DQ, DK, DV, DA, base,
                       a_base, F: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, NT: tl.constexpr,
                       MB: tl.constexpr, eps, COMMIT: tl.constexpr, PREC: tl.constexpr):
    """dual_backward.mlp_minibatch_backward for one (sequence, head), tile by tile: W1, b1, W2 read from S*, b2 given;
    the gradients of the weights after the mini-batch in GW1, GB1, GW2 (replaced by those before it, in place), and
    the sums the backward carries (db2, dgamma, dbeta, dtok) at DB2, DLNW, DLNB, DTOK: read before the barrier ahead
    of pass 4 and written back after it, so that no pass keeps them. Four passes over the tiles of hidden units, with
    the whole-width quantities between them: (1) Z2; (2) Zbar1 per tile (kept in scratch), Zbar2 and A2; (3) the
    gradients through Zbar1 and Xbar2 per tile, the sums dq, dM1, dG2 and the commit's terms (the weight gradients
    after the mini-batch are read here); (4) after the LN's VJP (dZ2), dX2 and dZ1 per tile, dk, and the new weight
    gradients. SCR: the program's scratch, 5 arrays (MB, 4f): Zbar1, dZbar1, dP, dX2 (its first terms) and ds1, then
    3 (MB, f): G2, dZbar2, dZ2. The loops read those three, and q and k (QR, KR: the rows at `rows`), from memory
    rather than keep them: as the products' left operands, kept across a loop, each held a whole copy per warp (ptxas
    for sm_90 at f = 64: 584 B of spill stores so, 440 B then). dq, da and dv are stored at DQ, DA, DV before pass 4,
    dk after it (they are final there)."""
    ZB1, DZB1, DPS, DX2S, DS1S = SCR, SCR + MB * 4 * F, SCR + 2 * MB * 4 * F, SCR + 3 * MB * 4 * F, \
        SCR + 4 * MB * 4 * F
    G2S, DZB2S, DZ2S = SCR + 5 * MB * 4 * F, SCR + 5 * MB * 4 * F + MB * F, SCR + 5 * MB * 4 * F + 2 * MB * F
    all_m = offs_m < MB
    t = v - k
    Z2 = _hidden_sum(S1, SB1, S2, b2, KR, rows, maskm, maskf, offs_f, offs_t0, F, BF, BT, NT, MB, PREC)  # pass 1
    zhat, r = _ln_stats(Z2, maskf, F, eps)
    G2, gx, c2 = _ln_loss_grad(zhat, r, t, gamma, beta, maskf, F)
    _store_rows(G2S, G2, offs_m, offs_f, all_m, maskf, F)
    tl.debug_barrier()
    tril = offs_m[:, None] >= offs_m[None, :]
    E = tl.where(tril, tok[:, None] * a[None, :], 0.0)
    A1 = tl.dot(q, tl.trans(k), input_precision=PREC)
    M1 = E * (A1 + 1.0)
    zbar2 = tl.zeros([MB, BF], dtype=tl.float32) + b2[None, :]
    A2 = tl.zeros([MB, MB], dtype=tl.float32)
    for j in tl.range(0, NT, disable_licm=True):  # pass 2: Zbar1 (kept), Zbar2 and A2
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        W1, b1, W2, qj, kj, G2j = _load_tile_operands(S1, SB1, S2, QR, KR, G2S, rows, maskm, offs_m, all_m, offs_f,
                                                      maskf, offs_t, maskt, F)
        X2, G1, zbar1, A2, zbar2 = _tile_sums(W1, b1, W2, qj, kj, G2j, M1, A2, zbar2, PREC)
        _store_tile(ZB1, zbar1, offs_m, offs_t, maskt, F)
    M2 = E * (A2 + 1.0)
    zbar2 = zbar2 - tl.dot(M2, G2, input_precision=PREC)
    zbhat, rb = _ln_stats(zbar2, maskf, F, eps)
    dzbar2 = _ln_vjp(zbhat, rb, dout, gamma, maskf, F)
    _store_rows(DZB2S, dzbar2, offs_m, offs_f, all_m, maskf, F)
    dgamma = tl.sum(dout * zbhat, axis=0)
    dbeta = tl.sum(dout, axis=0)
    dM2 = -tl.dot(dzbar2, tl.trans(G2), input_precision=PREC)
    dG2 = -tl.dot(tl.trans(M2), dzbar2, input_precision=PREC)
    dE = dM2 * (A2 + 1.0)
    dA2 = dM2 * E
    aG2 = a[:, None] * G2
    dq = dout
    dk = tl.zeros([MB, BF], dtype=tl.float32)
    dM1 = tl.zeros([MB, MB], dtype=tl.float32)
    X2dW2 = tl.zeros([MB, BF], dtype=tl.float32)
    da = tl.zeros([MB], dtype=tl.float32)
    s = tl.sum(da, axis=0)  # the commit's dtok term (a scalar 0 here)
    tl.debug_barrier()  # Zbar1 written
    for j in tl.range(0, NT, disable_licm=True):  # pass 3: through Zbar1 and Xbar2; the commit's terms
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        W1, b1, W2, qj, kj, G2j = _load_tile_operands(S1, SB1, S2, QR, KR, G2S, rows, maskm, offs_m, all_m, offs_f,
                                                      maskf, offs_t, maskt, F)
        X2, s1, _d2, P, G1, _zbar1 = _tile_zbar1(W1, b1, W2, qj, kj, G2j, M1, PREC)  # Zbar1 from pass 2 instead
        xbar2, sbar1, _d = _gelu(_load_tile(ZB1, offs_m, offs_t, maskt, F))
        dzbar2j = _load_rows(DZB2S, offs_m, offs_f, all_m, maskf, F)
        dxbar2 = tl.dot(dzbar2j, tl.trans(W2), input_precision=PREC) + tl.dot(dA2, X2, input_precision=PREC)
        dX2 = tl.dot(tl.trans(dA2), xbar2, input_precision=PREC)
        dzbar1 = dxbar2 * sbar1
        dq = tl.dot(dzbar1, tl.trans(W1), dq, input_precision=PREC)
        dM1 = dM1 - tl.dot(dzbar1, tl.trans(G1), input_precision=PREC)
        dG1 = -tl.dot(tl.trans(M1), dzbar1, input_precision=PREC)
        if COMMIT:  # through W' = W - tok_last (update): the gradients after the mini-batch, dW1', db1', dW2'
            aG1 = a[:, None] * G1
            dW1 = _load_w(GW1, offs_f, offs_t, maskf, maskt, 4 * F)
            kdW1 = tl.dot(kj, dW1, input_precision=PREC) + tl.load(GB1 + offs_t, mask=maskt, other=0.0)[None, :]
            dG1 -= tok_last * a[:, None] * kdW1  # a d(aG1), d(aG1) = -tok_last (K dW1' + db1')
            da -= tok_last * tl.sum(kdW1 * G1, axis=1)
            s -= tl.sum(tl.sum(aG1 * kdW1, axis=1), axis=0)
            dk -= tok_last * tl.dot(aG1, tl.trans(dW1), input_precision=PREC)
            dW2 = _load_w(GW2, offs_t, offs_f, maskt, maskf, F)
            X2dW2 = tl.dot(X2, dW2, X2dW2, input_precision=PREC)
            dX2 -= tok_last * tl.dot(a[:, None] * G2j, tl.trans(dW2), input_precision=PREC)
        dP = dG1 * s1
        dG2 = tl.dot(dP, W2, dG2, input_precision=PREC)
        _store_tile(DZB1, dzbar1, offs_m, offs_t, maskt, F)
        _store_tile(DPS, dP, offs_m, offs_t, maskt, F)
        _store_tile(DX2S, dX2, offs_m, offs_t, maskt, F)
        _store_tile(DS1S, dG1 * P, offs_m, offs_t, maskt, F)
    if COMMIT:
        kd2 = X2dW2 + tl.load(DB2 + pid * F + offs_f, mask=maskf, other=0.0)[None, :]  # X2 dW2' + db2'
        s -= tl.sum(tl.sum(aG2 * kd2, axis=1), axis=0)
        da -= tok_last * tl.sum(kd2 * G2, axis=1)
        dG2 -= tok_last * a[:, None] * kd2
    dE += dM1 * (A1 + 1.0)
    dA1 = dM1 * E
    dq = tl.dot(dA1, _load_rows(KR, rows, offs_f, maskm, maskf, F), dq, input_precision=PREC)
    dk = tl.dot(tl.trans(dA1), _load_rows(QR, rows, offs_f, maskm, maskf, F), dk, input_precision=PREC)
    dE = tl.where(tril, dE, 0.0)
    dtok = tl.sum(dE * a[None, :], axis=1)
    da += tl.sum(dE * tok[:, None], axis=0)
    if COMMIT:
        dtok += tl.where(offs_m == MB - 1, s, 0.0)
    _store_rows(DQ + base, dq, rows, offs_f, maskm, maskf, F)  # final: stored before pass 4
    tl.store(DA + a_base + rows, da, mask=maskm)
    dZ2, dt, dg2, dbt2 = _ln_grad_vjp(dG2, G2, zhat, r, gx, c2, t, gamma, beta, maskf, F)
    _store_rows(DZ2S, dZ2, offs_m, offs_f, all_m, maskf, F)
    _store_rows(DV + base, dt, rows, offs_f, maskm, maskf, F)
    dgamma += dg2
    dbeta += dbt2
    dk -= dt
    db2, dgamma_c, dbeta_c, dtok_c = _load_carried_grads(DB2, DLNW, DLNB, DTOK, pid, offs_f, offs_m, maskf, F, MB)
    tl.debug_barrier()  # scratch written; every read of the gradients after the mini-batch done
    _store_carried_grads(DB2, DLNW, DLNB, DTOK, pid, db2 + tl.sum(dzbar2, axis=0) + tl.sum(dZ2, axis=0),
                         dgamma_c + dgamma, dbeta_c + dbeta, dtok_c + dtok, offs_f, offs_m, maskf, F, MB)
    for j in tl.range(0, NT, disable_licm=True):  # pass 4: dX2, dZ1; the weight gradients before the mini-batch
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        W1, b1, W2, qj, kj, G2j = _load_tile_operands(S1, SB1, S2, QR, KR, G2S, rows, maskm, offs_m, all_m, offs_f,
                                                      maskf, offs_t, maskt, F)
        X2, s1, g2nd = _gelu(tl.dot(kj, W1, input_precision=PREC) + b1[None, :])
        xbar2, _s, _d = _gelu(_load_tile(ZB1, offs_m, offs_t, maskt, F))
        dzbar1 = _load_tile(DZB1, offs_m, offs_t, maskt, F)
        dZ2j = _load_rows(DZ2S, offs_m, offs_f, all_m, maskf, F)
        dzbar2j = _load_rows(DZB2S, offs_m, offs_f, all_m, maskf, F)
        dX2 = tl.dot(dZ2j, tl.trans(W2), _load_tile(DX2S, offs_m, offs_t, maskt, F), input_precision=PREC)
        dZ1 = dX2 * s1 + _load_tile(DS1S, offs_m, offs_t, maskt, F) * g2nd
        dk = tl.dot(dZ1, tl.trans(W1), dk, input_precision=PREC)
        dW2 = _load_w(GW2, offs_t, offs_f, maskt, maskf, F)
        dW1 = _load_w(GW1, offs_f, offs_t, maskf, maskt, 4 * F)
        db1 = tl.load(GB1 + offs_t, mask=maskt, other=0.0) + tl.sum(dzbar1, axis=0) + tl.sum(dZ1, axis=0)
        dW2 = tl.dot(tl.trans(xbar2), dzbar2j, dW2, input_precision=PREC)
        dW2 = tl.dot(tl.trans(_load_tile(DPS, offs_m, offs_t, maskt, F)), G2j, dW2, input_precision=PREC)
        dW2 = tl.dot(tl.trans(X2), dZ2j, dW2, input_precision=PREC)
        dW1 = tl.dot(tl.trans(kj), dZ1, tl.dot(tl.trans(qj), dzbar1, dW1, input_precision=PREC), input_precision=PREC)
        tl.debug_barrier()  # every thread has read the tile's gradients before they are overwritten
        _store_w(GW2, dW2, offs_t, offs_f, maskt, maskf, F)
        _store_w(GW1, dW1, offs_f, offs_t, maskf, maskt, 4 * F)
        tl.store(GB1 + offs_t, db1, mask=maskt)
    tl.debug_barrier()  # the new gradients written before the next mini-batch reads them
    _store_rows(DK + base, dk, rows, offs_f, maskm, maskf, F)


@triton.jit
def _bwd_kernel(Q, K, V, A, TOK, LNW, LNB, WC1, BC1, WC2, BC2, W1N, B1N, W2N, B2N, DOUT, DW1N, DB1N, DW2N, DB2N,
                DQ, DK, DV, DA, DTOK, DLNW, DLNB, DW1, DB1, DW2, DB2, WS1, BS1, WS2, BS2, SCR,
                T, H, n_full, n_ckpt, group, s_scr, eps,
                F: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, MB: tl.constexpr,
                PARTIAL: tl.constexpr, AFTER_PARTIAL: tl.constexpr, PREC: tl.constexpr):
    """Groups of mini-batches in reverse: the group's states recomputed from its checkpoint into the program's
    slots WS*, BS* (tile by tile), then each mini-batch's backward, the last first. The weight gradients are
    carried in DW1, DB1, DW2 (the outputs, in place), and so are db2, dgamma, dbeta and dtok (DB2, DLNW, DLNB,
    DTOK: _mb_backward_tiled reads and writes them back once per mini-batch). PARTIAL: a first launch for a
    trailing partial mini-batch (its outputs used the final state; it changed no state), which leaves the
    gradients in the outputs; the second launch (AFTER_PARTIAL) continues from them.
    Its loops, and those of the helpers it shares with the forward, are tl.range(..., disable_licm=True): what
    does not change inside a loop (index vectors, their products, masks) is computed where it is used rather
    than hoisted out and kept live across the loop. With the sums in memory, ptxas for sm_90 (Triton 3.7.1)
    spills 188 B at f = 64 (the partial launch 0 B), 876 / 880 B at f = 96 / 128; before, 412 (48) and
    1184 / 1168 B; either alone, 228-336 B at f = 64 (`make check-kernels`). The forward's own loops keep
    LICM (without it, 4 B at f = 96; 0 B with)."""
    pid = tl.program_id(0)
    h = pid % H
    NT = (4 * F + BT - 1) // BT  # tiles of hidden units (the padding past 4f needs none)
    offs_m, offs_f, offs_t0 = tl.arange(0, MB), tl.arange(0, BF), tl.arange(0, BT)
    maskf, all_m = offs_f < F, offs_m < MB
    gamma, beta, tok, tok_last = _load_outer(LNW, LNB, TOK, h, offs_f, offs_m, maskf, F, MB)
    GW1, GB1, GW2 = DW1 + pid * F * 4 * F, DB1 + pid * 4 * F, DW2 + pid * 4 * F * F
    scr = SCR + pid * s_scr  # the program's scratch (_mb_backward_tiled: 5 x (MB, 4f) + 3 x (MB, f) numbers)
    base = pid * T * F
    if not AFTER_PARTIAL:
        _copy_state(DW1N + pid * F * 4 * F, DB1N + pid * 4 * F, DW2N + pid * 4 * F * F, GW1, GB1, GW2, offs_f,
                    maskf, offs_t0, F, BT, NT)
        _start_carried_grads(DB2, DB2N, DLNW, DLNB, DTOK, pid, offs_f, offs_m, maskf, F, BF, MB)
        tl.debug_barrier()
    if PARTIAL:
        rows = n_full * MB + offs_m
        maskm = rows < T
        q, k, v, a, do = _load_minibatch(Q, K, V, A, DOUT, base, pid * T, rows, offs_f, maskm, maskf, F)
        b2 = tl.load(B2N + pid * F + offs_f, mask=maskf, other=0.0)
        _mb_backward_tiled(
            W1N + pid * F * 4 * F, B1N + pid * 4 * F, W2N + pid * 4 * F * F, b2, GW1, GB1, GW2, DB2, DLNW, DLNB, DTOK,
            pid, q, k, v, a, do, tok, tok_last, gamma, beta, scr, maskf, offs_f, offs_m, Q + base, K + base, rows,
            maskm, offs_t0, DQ, DK, DV, DA, base, pid * T, F, BF, BT, NT, MB, eps, False, PREC)
    else:
        for gi in tl.range(0, n_ckpt, disable_licm=True):
            first, count, c = _group_backwards(gi, pid, n_ckpt, group, n_full)
            s0 = pid * group  # the program's first slot
            _copy_state(WC1 + c * F * 4 * F, BC1 + c * 4 * F, WC2 + c * 4 * F * F, WS1 + s0 * F * 4 * F,
                        BS1 + s0 * 4 * F, WS2 + s0 * 4 * F * F, offs_f, maskf, offs_t0, F, BT, NT)
            b2 = tl.load(BC2 + c * F + offs_f, mask=maskf, other=0.0)
            tl.store(BS2 + s0 * F + offs_f, b2, mask=maskf)
            tl.debug_barrier()
            for j in tl.range(0, count - 1, disable_licm=True):  # recompute the group's states: slot j -> j + 1
                sj = s0 + j
                rows = (first + j) * MB + offs_m
                v = _load_rows(V + base, rows, offs_f, all_m, maskf, F)
                a = tl.load(A + pid * T + rows).to(tl.float32)
                b2 = _mb_update_tiled(WS1 + sj * F * 4 * F, BS1 + sj * 4 * F, WS2 + sj * 4 * F * F,
                                      WS1 + (sj + 1) * F * 4 * F, BS1 + (sj + 1) * 4 * F, WS2 + (sj + 1) * 4 * F * F,
                                      b2, K + base, rows, all_m, v, a, tok_last, gamma, beta, maskf, offs_f,
                                      offs_t0, F, BF, BT, NT, MB, eps, PREC)
                tl.store(BS2 + (sj + 1) * F + offs_f, b2, mask=maskf)
            tl.debug_barrier()
            for jj in tl.range(0, count, disable_licm=True):
                j = count - 1 - jj
                sj = s0 + j
                rows = (first + j) * MB + offs_m
                q, k, v, a, do = _load_minibatch(Q, K, V, A, DOUT, base, pid * T, rows, offs_f, all_m, maskf, F)
                b2 = tl.load(BS2 + sj * F + offs_f, mask=maskf, other=0.0)
                _mb_backward_tiled(
                    WS1 + sj * F * 4 * F, BS1 + sj * 4 * F, WS2 + sj * 4 * F * F, b2, GW1, GB1, GW2, DB2, DLNW, DLNB,
                    DTOK, pid, q, k, v, a, do, tok, tok_last, gamma, beta, scr, maskf, offs_f, offs_m, Q + base,
                    K + base, rows, all_m, offs_t0, DQ, DK, DV, DA, base, pid * T, F, BF, BT, NT, MB, eps, True, PREC)
            tl.debug_barrier()


@triton.jit
def _decode_kernel(Q, K, V, A, TOK, LNW, LNB, W1, B1, W2, B2, GW1, GB1, GW2, GB2, OUT, H, pos, eps,
                   F: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, COMMIT: tl.constexpr):
    """One token at in-mini-batch position `pos` for every (sequence, head); the fp32 state and its
    accumulators are updated in place, a tile of BT hidden units at a time: pass 1 sums z2 = gelu(k W1 + b1) W2
    + b2 (then G2), pass 2 accumulates each tile's gradient, forms its Wbar and sums zbar2 (the primal form)."""
    pid = tl.program_id(0)
    h = pid % H
    NT = (4 * F + BT - 1) // BT
    offs_f, offs_t0 = tl.arange(0, BF), tl.arange(0, BT)
    maskf = offs_f < F
    S1, SB1, S2 = W1 + pid * F * 4 * F, B1 + pid * 4 * F, W2 + pid * 4 * F * F
    G1P, GB1P, G2P = GW1 + pid * F * 4 * F, GB1 + pid * 4 * F, GW2 + pid * 4 * F * F
    gamma, beta, q, k, v, a, tok = _load_decode_token(Q, K, V, A, TOK, LNW, LNB, pid, h, pos, offs_f, maskf, F)
    b2 = tl.load(B2 + pid * F + offs_f, mask=maskf, other=0.0)
    gb2 = tl.load(GB2 + pid * F + offs_f, mask=maskf, other=0.0)
    z2 = b2
    for j in range(0, NT):  # pass 1: z2
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        z1 = tl.sum(k[:, None] * _load_w(S1, offs_f, offs_t, maskf, maskt, 4 * F), axis=0) \
            + tl.load(SB1 + offs_t, mask=maskt, other=0.0)  # (BT,)
        x2, _s1, _d = _gelu(z1)
        z2 += tl.sum(x2[:, None] * _load_w(S2, offs_t, offs_f, maskt, maskf, F), axis=0)
    zhat, r = _ln_stats(z2[None, :], maskf, F, eps)
    G2, _gx, _c2 = _ln_loss_grad(zhat, r, (v - k)[None, :], gamma, beta, maskf, F)
    G2 = tl.sum(G2, axis=0)  # (BF,)
    gb2 += a * G2
    b2b = b2 - tok * gb2
    zb2 = b2b
    tl.debug_barrier()  # pass 1's reads done before pass 2 writes
    for j in range(0, NT):  # pass 2: the tile's gradient, Wbar, zbar1, and its share of zbar2
        offs_t = j * BT + offs_t0
        maskt = offs_t < 4 * F
        w1 = _load_w(S1, offs_f, offs_t, maskf, maskt, 4 * F)
        b1 = tl.load(SB1 + offs_t, mask=maskt, other=0.0)
        w2 = _load_w(S2, offs_t, offs_f, maskt, maskf, F)
        x2, s1, _d = _gelu(tl.sum(k[:, None] * w1, axis=0) + b1)
        G1 = tl.sum(w2 * G2[None, :], axis=1) * s1  # (BT,)
        g1 = _load_w(G1P, offs_f, offs_t, maskf, maskt, 4 * F) + a * k[:, None] * G1[None, :]
        gb1 = tl.load(GB1P + offs_t, mask=maskt, other=0.0) + a * G1
        g2 = _load_w(G2P, offs_t, offs_f, maskt, maskf, F) + a * x2[:, None] * G2[None, :]
        w1b, b1b, w2b = w1 - tok * g1, b1 - tok * gb1, w2 - tok * g2
        xb2, _s, _d2 = _gelu(tl.sum(q[:, None] * w1b, axis=0) + b1b)
        zb2 += tl.sum(xb2[:, None] * w2b, axis=0)
        tl.debug_barrier()  # every thread has read the tile before it is overwritten
        if COMMIT:
            _store_w(S1, w1b, offs_f, offs_t, maskf, maskt, 4 * F)
            tl.store(SB1 + offs_t, b1b, mask=maskt)
            _store_w(S2, w2b, offs_t, offs_f, maskt, maskf, F)
            g1, gb1, g2 = g1 * 0.0, gb1 * 0.0, g2 * 0.0
        _store_w(G1P, g1, offs_f, offs_t, maskf, maskt, 4 * F)
        tl.store(GB1P + offs_t, gb1, mask=maskt)
        _store_w(G2P, g2, offs_t, offs_f, maskt, maskf, F)
    zbhat, rb = _ln_stats(zb2[None, :], maskf, F, eps)
    out = q + gamma * tl.sum(zbhat, axis=0) + beta
    tl.store(OUT + pid * F + offs_f, out.to(OUT.dtype.element_ty), mask=maskf)
    if COMMIT:
        tl.store(B2 + pid * F + offs_f, b2b, mask=maskf)
        gb2 = gb2 * 0.0
    tl.store(GB2 + pid * F + offs_f, gb2, mask=maskf)


# -- launchers ---------------------------------------------------------------------------------

PARAMS = ("W1", "b1", "W2", "b2")
HIDDEN_TILE = 64  # hidden units (of 4f) per tile of the prefill kernels up to a block of 64 (f <= 64); 32 above.
                  # ptxas for sm_90 (`make check-kernels`), spill stores of the forward (its partial launch) at
                  # f = 96 / 128: tiles of 64, 40 (48) / 128 (56) B; of 32, none (Triton 3.6.0: 208 (64) / 212
                  # (120) B and 32 (20) / 80 (16) B); at f = 64 none either way. The backward: tiles of 64,
                  # 892 / 932 B; of 32, 876 / 880 B

DECODE_TILE = 32  # ... of the decode kernel up to a block of 64 (f <= 64); 16 above. ptxas for sm_90
                  # (`make check-kernels`; registers, spill stores of a token inside its mini-batch / of the
                  # committing one): f = 64, 8 warps, tiles of 16 / 32 / 64: 101-128 / 128-186 / 193-253
                  # registers, no spills (4 warps: up to 4.8 KB); f = 96 and 128 (16 warps, decode_warps),
                  # tiles of 16: 102-128 registers, no spills; of 32: 44 and 76 B at the commit


def hidden_tile(f: int, decode: bool = False) -> int:
    """Hidden units (of 4f) per tile: HIDDEN_TILE in the prefill kernels, DECODE_TILE in decode (each halved past
    f = 64)."""
    tile = DECODE_TILE if decode else HIDDEN_TILE
    return min(tile if _block(f) <= 64 else tile // 2, _block(4 * f))


def _shapes(Bsz, H, f):
    return {"W1": (Bsz, H, f, 4 * f), "b1": (Bsz, H, 4 * f), "W2": (Bsz, H, 4 * f, f), "b2": (Bsz, H, f)}


# -- the prefill as two operators (torch.library), as triton_linear.linear_prefill ---------------------------

Tensors11 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Tensors13 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("ttt_bench::mlp_prefill", mutates_args=())
def mlp_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, tok: torch.Tensor,
                ln_w: torch.Tensor, ln_b: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor,
                b2: torch.Tensor, group: int, save: bool) -> Tensors13:
    """As triton_linear.linear_prefill, with the inner weights W1 (B|1, H, f, 4f), b1 (B|1, H, 4f), W2 (B|1, H, 4f,
    f), b2 (B|1, H, f). Returns out, the four new weights, their four accumulators and the four states saved every
    `group` mini-batches."""
    Bsz, H, T, f, MB, n_full, partial, n_ckpt = prefill_shape(q, tok, group)
    f32 = dict(device=q.device, dtype=torch.float32)
    tok32, lnw, lnb = outer_fp32(tok, ln_w, ln_b)
    init = [p.float().contiguous() for p in (W1, b1, W2, b2)]
    shapes = _shapes(Bsz, H, f)
    new = [torch.empty(shapes[n], **f32) for n in PARAMS]
    acc = [torch.zeros(shapes[n], **f32) for n in PARAMS]
    ckpt = [torch.empty(Bsz, H, n_ckpt if save else 1, *shapes[n][2:], **f32) for n in PARAMS]
    strides = [0 if p.shape[0] == 1 else p[0].numel() for p in init]
    out = torch.empty_like(q)
    g2 = torch.empty(Bsz * H, MB, f, **f32)  # per program: the mini-batch's G2 (_mb_forward_tiled)
    for part in (False, True)[: 1 + (partial > 0)]:  # the whole mini-batches, then a trailing partial one
        _fwd_kernel[(Bsz * H,)](q, k, v, a, tok32, lnw, lnb, *init, out, *new, *acc, *ckpt, g2,
                                T, H, n_full, n_ckpt, group, *strides, LN_EPS,
                                F=f, BF=_block(f), BT=hidden_tile(f), MB=MB, PARTIAL=part, SAVE=save,
                                PREC=LAUNCH.precision, num_warps=LAUNCH.warps("mlp", "fwd", f),
                                num_stages=LAUNCH.stages("mlp", "fwd", f))
    return (out, *new, *acc, *ckpt)


@mlp_prefill.register_fake
def _(q, k, v, a, tok, ln_w, ln_b, W1, b1, W2, b2, group, save):
    Bsz, H, T, f = q.shape
    nc = _checkpoints(T // tok.shape[0], group) if save else 1
    shapes = _shapes(Bsz, H, f)
    fp32 = lambda shape: q.new_empty(shape, dtype=torch.float32)
    return (torch.empty_like(q), *(fp32(shapes[n]) for n in PARAMS), *(fp32(shapes[n]) for n in PARAMS),
            *(fp32((Bsz, H, nc, *shapes[n][2:])) for n in PARAMS))


@torch.library.custom_op("ttt_bench::mlp_prefill_backward", mutates_args=())
def mlp_prefill_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, tok: torch.Tensor,
                         ln_w: torch.Tensor, ln_b: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor,
                         b2: torch.Tensor, ckpt: list[torch.Tensor], new: list[torch.Tensor], dout: torch.Tensor,
                         dnext: list[torch.Tensor], group: int) -> Tensors11:
    """The gradients of mlp_prefill's inputs q .. b2 (each like its input) from those of out and the new weights
    (dnext, in PARAMS order); ckpt and new: mlp_prefill's saved states and new weights."""
    Bsz, H, T, f, MB, n_full, partial, n_ckpt = prefill_shape(q, tok, group)
    f32 = dict(device=q.device, dtype=torch.float32)
    tok32, lnw, lnb = outer_fp32(tok, ln_w, ln_b)
    shapes = _shapes(Bsz, H, f)
    dout = dout.contiguous()
    dnext = [g.float().contiguous() for g in dnext]
    dq, dk, dv, da = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(a)
    dtok = torch.empty(Bsz, H, MB, **f32)
    dlnw, dlnb = torch.empty(Bsz, H, f, **f32), torch.empty(Bsz, H, f, **f32)
    dinit = [torch.empty(shapes[n], **f32) for n in PARAMS]
    scratch = [torch.empty(Bsz, H, group, *shapes[n][2:], **f32) for n in PARAMS]  # the group's states
    tiles = torch.empty(Bsz, H, 6, MB, 4 * f, **f32)  # per program: Zbar1, dZbar1, dP, dX2, ds1; G2, dZbar2, dZ2
    for part in (True, False)[partial == 0:]:  # a trailing partial mini-batch first, then the whole ones
        _bwd_kernel[(Bsz * H,)](q, k, v, a, tok32, lnw, lnb, *ckpt, *new, dout, *dnext,
                                dq, dk, dv, da, dtok, dlnw, dlnb, *dinit, *scratch, tiles,
                                T, H, n_full, n_ckpt if n_full else 0, group, tiles[0, 0].numel(), LN_EPS,
                                F=f, BF=_block(f), BT=hidden_tile(f), MB=MB, PARTIAL=part,
                                AFTER_PARTIAL=partial > 0 and not part, PREC=LAUNCH.precision,
                                num_warps=LAUNCH.warps("mlp", "bwd", f),
                                num_stages=LAUNCH.stages("mlp", "bwd", f))
    inits = (W1, b1, W2, b2)
    dinit = [(g.sum(0, keepdim=True) if p.shape[0] == 1 else g).to(p.dtype) for g, p in zip(dinit, inits)]
    return (dq, dk, dv, da, dtok.sum((0, 1)).to(tok.dtype), dlnw.sum(0).to(ln_w.dtype), dlnb.sum(0).to(ln_b.dtype),
            *dinit)


@mlp_prefill_backward.register_fake
def _(q, k, v, a, tok, ln_w, ln_b, W1, b1, W2, b2, ckpt, new, dout, dnext, group):
    return tuple(torch.empty_like(x) for x in (q, k, v, a, tok, ln_w, ln_b, W1, b1, W2, b2))


def _save_for_backward(ctx, inputs, output):
    *tensors, group, _save = inputs
    new, acc, ckpt = output[1:5], output[5:9], output[9:13]
    ctx.save_for_backward(*tensors, *ckpt, *new)
    ctx.group = group
    ctx.mark_non_differentiable(*acc, *ckpt)


def _backward(ctx, dout, *grads):
    saved = ctx.saved_tensors
    inputs, ckpt, new = saved[:11], list(saved[11:15]), list(saved[15:19])
    dout = torch.zeros_like(inputs[0]) if dout is None else dout
    dnext = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[:4], new)]
    return (*mlp_prefill_backward(*inputs, ckpt, new, dout, dnext, ctx.group), None, None)


mlp_prefill.register_autograd(_backward, setup_context=_save_for_backward)


def prefill(q, k, v, a, tok, ln_w, ln_b, params: dict, group: int = DEFAULT_GROUP):
    """out (B, H, T, f), the inner weights after T tokens and a trailing partial mini-batch's accumulators,
    as dicts keyed W1, b1, W2, b2 (biases (B, H, n))."""
    q, k, v, a = (x.contiguous() for x in (q, k, v, a))  # saved for the backward as the kernels read them
    inputs = (q, k, v, a, tok, ln_w, ln_b, *[params[n] for n in PARAMS])
    save = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    res = mlp_prefill(*inputs, group, save)
    return res[0], dict(zip(PARAMS, res[1:5])), dict(zip(PARAMS, res[5:9]))


def decode_step(q, k, v, a, tok, ln_w, ln_b, params: dict, acc: dict, pos: int):
    """One token; params and acc: fp32 contiguous (B, H, ...) dicts, updated in place. Returns (B, H, f)."""
    return mlp_decode_step(q, k, v, a, tok, ln_w, ln_b, *[params[n] for n in PARAMS], *[acc[n] for n in PARAMS], pos)


@torch.library.custom_op("ttt_bench::mlp_decode_step",
                         mutates_args=("W1", "b1", "W2", "b2", "GW1", "Gb1", "GW2", "Gb2"))
def mlp_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, tok: torch.Tensor,
                    ln_w: torch.Tensor, ln_b: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor,
                    b2: torch.Tensor, GW1: torch.Tensor, Gb1: torch.Tensor, GW2: torch.Tensor, Gb2: torch.Tensor,
                    pos: int) -> torch.Tensor:
    """decode_step as an operator writing the weights and accumulators in place (triton_linear.linear_decode_step)."""
    Bsz, H, f = q.shape
    out = torch.empty_like(q)
    _decode_kernel[(Bsz * H,)](q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(),
                               tok.float().contiguous(), ln_w.float().contiguous(), ln_b.float().contiguous(),
                               W1, b1, W2, b2, GW1, Gb1, GW2, Gb2, out, H, pos, LN_EPS,
                               F=f, BF=_block(f), BT=hidden_tile(f, decode=True), COMMIT=pos == tok.shape[0] - 1,
                               num_warps=decode_warps(_block(f)))
    return out


@mlp_decode_step.register_fake
def _(q, k, v, a, tok, ln_w, ln_b, W1, b1, W2, b2, GW1, Gb1, GW2, Gb2, pos):
    return torch.empty_like(q)
