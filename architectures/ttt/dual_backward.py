"""The backward of the TTT dual form, one mini-batch at a time, derived by hand in PyTorch.

This is the math the Triton backward kernels (triton_linear.py, triton_mlp.py) run, written with whole
tensors so it can be read and checked: tests/test_ttt_triton.py compares it with autograd through
dual.py. TTT-Linear, per head, one mini-batch (rows i, j = 1..c; tok (c,), a (c,) the two factors of
the rank-1 learning rate):

  forward                                    backward (d. = gradient of the loss wrt .)
  Z    = K W + b                             dK += dZ W^T,  dW += K^T dZ,  db += 1^T dZ
  t    = V - K                               dV += dt,  dK -= dt
  G    = LNgrad(Z, t; gamma, beta)           (dZ, dt, dgamma, dbeta) = LNgrad's VJP of dG (ln_grad_vjp)
  E    = tril(tok a^T),  M = E * (Q K^T + 1)  dE = dM * (Q K^T + 1),  d(QK^T) = dM * E
  Zbar = Q W + b - M G                       dQ += dZbar W^T,  dW += Q^T dZbar,  dM = -dZbar G^T,  dG = -M^T dZbar
  out  = Q + LN(Zbar; gamma, beta)           dZbar = LN's VJP of dout,  dQ += dout
  W'   = W - tok_c K^T (a * G)               dW += dW',  d(aG) = -tok_c K dW'  (and the same for b')
  b'   = b - tok_c 1^T (a * G)
"""
from __future__ import annotations

import math

import torch

from architectures.ttt.inner import LN_EPS, gelu_tanh_and_grad


def _ln_stats(z, eps=LN_EPS):
    var, mu = torch.var_mean(z, dim=-1, keepdim=True, correction=0)
    r = torch.rsqrt(var + eps)
    return (z - mu) * r, r  # zhat, 1 / sigma


def ln_vjp(zhat, r, dy, gamma):
    """y = gamma * zhat + beta, zhat = LN(z): returns dz, dgamma rows (dy * zhat), dbeta rows (dy)."""
    dzhat = dy * gamma
    dz = r * (dzhat - dzhat.mean(-1, keepdim=True) - zhat * (dzhat * zhat).mean(-1, keepdim=True))
    return dz, dy * zhat, dy


def ln_grad_vjp(zhat, r, t, gamma, beta, dG):
    """The VJP of G = LNgrad(Z, t) = r (gx - mean(gx) - zhat mean(gx zhat)), gx = (gamma zhat + beta - t) gamma.
    Returns dZ, dt, and the per-row contributions to dgamma and dbeta."""
    gx = (gamma * zhat + beta - t) * gamma
    c2 = (gx * zhat).mean(-1, keepdim=True)
    G = r * (gx - gx.mean(-1, keepdim=True) - zhat * c2)
    m_dG, m_dGz = dG.mean(-1, keepdim=True), (dG * zhat).mean(-1, keepdim=True)
    dgx = r * (dG - m_dG - zhat * m_dGz)                      # G is r times a projection of gx
    dzhat = -r * (dG * c2 + gx * m_dGz) + dgx * gamma * gamma  # through zhat directly, and through gx
    dgamma = dgx * (2 * gamma * zhat + beta - t)
    dbeta = dgx * gamma
    dt = -dgx * gamma
    # zhat = (Z - mu) r and the leading r of G both depend on Z
    dZ = r * (dzhat - dzhat.mean(-1, keepdim=True) - zhat * (dzhat * zhat).mean(-1, keepdim=True))
    dZ = dZ - r * zhat * (dG * G).mean(-1, keepdim=True)
    return dZ, dt, dgamma, dbeta


def linear_minibatch_backward(W, b, q, k, v, a, tok, gamma, beta, dout, dW_next, db_next, commit: bool = True):
    """One mini-batch (..., c, f) at inner weights W (..., f, f), b (..., 1, f). dout: the gradient of its
    outputs; dW_next, db_next: of the weights after it. Returns the gradients of (q, k, v, a, tok, gamma,
    beta) and of the weights before it, (dW, db). gamma, beta (..., 1, f) and tok (c,) gradients are per
    batch and head (the caller sums them)."""
    c = q.shape[-2]
    Z = k @ W + b
    t = v - k
    zhat, r = _ln_stats(Z)
    gx = (gamma * zhat + beta - t) * gamma
    G = r * (gx - gx.mean(-1, keepdim=True) - zhat * (gx * zhat).mean(-1, keepdim=True))
    mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    A = q @ k.transpose(-1, -2)
    E = torch.where(mask, tok[:, None] * a[..., None, :], 0.0)
    M = E * (A + 1)
    Zbar = q @ W + b - M @ G
    zbhat, rb = _ln_stats(Zbar)

    dZbar, dgamma, dbeta = ln_vjp(zbhat, rb, dout, gamma)
    dq = dout + dZbar @ W.transpose(-1, -2)
    dW = q.transpose(-1, -2) @ dZbar + dW_next
    db = dZbar.sum(-2, keepdim=True) + db_next
    dM = -dZbar @ G.transpose(-1, -2)
    dG = -M.transpose(-1, -2) @ dZbar
    dE = dM * (A + 1)
    dA = dM * E
    dq = dq + dA @ k
    dk = dA.transpose(-1, -2) @ q
    dE = torch.where(mask, dE, 0.0)
    dtok = (dE * a[..., None, :]).sum(-1)  # (..., c)
    da = (dE * tok[:, None]).sum(-2)       # (..., c)
    if commit:
        aG = a[..., None] * G
        daG = -tok[-1] * (k @ dW_next + db_next)  # W' = W - tok_c K^T aG, b' = b - tok_c 1^T aG
        dk = dk - tok[-1] * aG @ dW_next.transpose(-1, -2)
        dtok_last = -((k.transpose(-1, -2) @ aG) * dW_next).sum((-1, -2)) - (aG.sum(-2, keepdim=True) * db_next).sum((-1, -2))
        dtok = dtok + torch.nn.functional.pad(dtok_last[..., None], (c - 1, 0))
        da = da + (daG * G).sum(-1)
        dG = dG + a[..., None] * daG
    dZ, dt, dg2, db2 = ln_grad_vjp(zhat, r, t, gamma, beta, dG)
    dgamma, dbeta = dgamma + dg2, dbeta + db2
    dk = dk + dZ @ W.transpose(-1, -2) - dt
    dv = dt
    dW = dW + k.transpose(-1, -2) @ dZ
    db = db + dZ.sum(-2, keepdim=True)
    return dq, dk, dv, da, dtok, dgamma.sum(-2, keepdim=True), dbeta.sum(-2, keepdim=True), dW, db


_C = math.sqrt(2.0 / math.pi)


def gelu_tanh_second(x):
    """d^2 gelu_tanh / dx^2 = (1 - th^2) (u' + x/2 (u'' - 2 th u'^2)), u = c (x + 0.044715 x^3)."""
    th = torch.tanh(_C * (x + 0.044715 * x ** 3))
    du = _C * (1 + 3 * 0.044715 * x * x)
    d2u = _C * 6 * 0.044715 * x
    return (1 - th * th) * (du + 0.5 * x * (d2u - 2 * th * du * du))


def mlp_minibatch_backward(W1, b1, W2, b2, q, k, v, a, tok, gamma, beta, dout, dW1n, db1n, dW2n, db2n,
                           commit: bool = True):
    """TTT-MLP, one mini-batch (f_res(x) = gelu(x W1 + b1) W2 + b2, hidden 4f):

      forward                                      backward
      Z1 = K W1 + b1, X2 = gelu(Z1), s1 = gelu'(Z1)   dK += dZ1 W1^T, dW1 += K^T dZ1; dZ1 = dX2 s1 + ds1 gelu''(Z1)
      Z2 = X2 W2 + b2, G2 = LNgrad(Z2, V - K)          dX2 += dZ2 W2^T, dW2 += X2^T dZ2; (dZ2, dt) = LNgrad VJP
      G1 = (G2 W2^T) * s1                              dG2 += (dG1 s1) W2, dW2 += (dG1 s1)^T G2, ds1 = dG1 (G2 W2^T)
      Zbar1 = Q W1 + b1 - (E * (Q K^T + 1)) G1         as TTT-Linear's Zbar, with G1
      Xbar2 = gelu(Zbar1)                              dZbar1 = dXbar2 gelu'(Zbar1)
      Zbar2 = Xbar2 W2 + b2 - (E * (Xbar2 X2^T + 1)) G2  dXbar2 = dZbar2 W2^T + dA2 X2, dX2 += dA2^T Xbar2
      out = Q + LN(Zbar2)
      W1' = W1 - tok_c K^T (a G1), W2' = W2 - tok_c X2^T (a G2) (and the biases)
    Shapes: W1 (..., f, 4f), b1 (..., 1, 4f), W2 (..., 4f, f), b2 (..., 1, f); the rest as
    linear_minibatch_backward. Returns the gradients of (q, k, v, a, tok, gamma, beta) and of
    (W1, b1, W2, b2) before the mini-batch."""
    c = q.shape[-2]
    T_ = lambda x: x.transpose(-1, -2)
    Z1 = k @ W1 + b1
    X2, s1 = gelu_tanh_and_grad(Z1)
    Z2 = X2 @ W2 + b2
    t = v - k
    zhat, r = _ln_stats(Z2)
    gx = (gamma * zhat + beta - t) * gamma
    G2 = r * (gx - gx.mean(-1, keepdim=True) - zhat * (gx * zhat).mean(-1, keepdim=True))
    P = G2 @ T_(W2)
    G1 = P * s1
    mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    E = torch.where(mask, tok[:, None] * a[..., None, :], 0.0)
    A1 = q @ T_(k)
    M1 = E * (A1 + 1)
    Zbar1 = q @ W1 + b1 - M1 @ G1
    Xbar2, sbar1 = gelu_tanh_and_grad(Zbar1)
    A2 = Xbar2 @ T_(X2)
    M2 = E * (A2 + 1)
    Zbar2 = Xbar2 @ W2 + b2 - M2 @ G2
    zbhat, rb = _ln_stats(Zbar2)

    dZbar2, dgamma, dbeta = ln_vjp(zbhat, rb, dout, gamma)
    dq = dout
    dXbar2 = dZbar2 @ T_(W2)
    dW2 = T_(Xbar2) @ dZbar2 + dW2n
    db2 = dZbar2.sum(-2, keepdim=True) + db2n
    dM2 = -dZbar2 @ T_(G2)
    dG2 = -T_(M2) @ dZbar2
    dE = dM2 * (A2 + 1)
    dA2 = dM2 * E
    dXbar2 = dXbar2 + dA2 @ X2
    dX2 = T_(dA2) @ Xbar2
    dZbar1 = dXbar2 * sbar1
    dq = dq + dZbar1 @ T_(W1)
    dW1 = T_(q) @ dZbar1 + dW1n
    db1 = dZbar1.sum(-2, keepdim=True) + db1n
    dM1 = -dZbar1 @ T_(G1)
    dG1 = -T_(M1) @ dZbar1
    dE = dE + dM1 * (A1 + 1)
    dA1 = dM1 * E
    dq = dq + dA1 @ k
    dk = T_(dA1) @ q
    dE = torch.where(mask, dE, 0.0)
    dtok = (dE * a[..., None, :]).sum(-1)
    da = (dE * tok[:, None]).sum(-2)
    if commit:
        aG1, aG2 = a[..., None] * G1, a[..., None] * G2
        daG1 = -tok[-1] * (k @ dW1n + db1n)
        daG2 = -tok[-1] * (X2 @ dW2n + db2n)
        dk = dk - tok[-1] * aG1 @ T_(dW1n)
        dX2 = dX2 - tok[-1] * aG2 @ T_(dW2n)
        dtok_last = -(((T_(k) @ aG1) * dW1n).sum((-1, -2)) + (aG1.sum(-2, keepdim=True) * db1n).sum((-1, -2))
                      + ((T_(X2) @ aG2) * dW2n).sum((-1, -2)) + (aG2.sum(-2, keepdim=True) * db2n).sum((-1, -2)))
        dtok = dtok + torch.nn.functional.pad(dtok_last[..., None], (c - 1, 0))
        da = da + (daG1 * G1).sum(-1) + (daG2 * G2).sum(-1)
        dG1 = dG1 + a[..., None] * daG1
        dG2 = dG2 + a[..., None] * daG2
    dP = dG1 * s1
    ds1 = dG1 * P
    dG2 = dG2 + dP @ W2
    dW2 = dW2 + T_(dP) @ G2
    dZ2, dt, dg2, db2_ = ln_grad_vjp(zhat, r, t, gamma, beta, dG2)
    dgamma, dbeta = dgamma + dg2, dbeta + db2_
    dX2 = dX2 + dZ2 @ T_(W2)
    dW2 = dW2 + T_(X2) @ dZ2
    db2 = db2 + dZ2.sum(-2, keepdim=True)
    dZ1 = dX2 * s1 + ds1 * gelu_tanh_second(Z1)
    dk = dk + dZ1 @ T_(W1) - dt
    dW1 = dW1 + T_(k) @ dZ1
    db1 = db1 + dZ1.sum(-2, keepdim=True)
    return (dq, dk, dt, da, dtok, dgamma.sum(-2, keepdim=True), dbeta.sum(-2, keepdim=True), dW1, db1, dW2, db2)
