"""The backward of TTT-Linear's dual form, one mini-batch at a time, derived by hand in PyTorch.

This is the math the Triton backward kernel (triton_linear.py) runs, written with whole tensors so it
can be read and checked: tests/test_ttt_triton.py compares it with autograd through dual.py. Per head,
one mini-batch (rows i, j = 1..c; tok (c,), a (c,) the two factors of the rank-1 learning rate):

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

import torch

from architectures.ttt.inner import LN_EPS


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


def minibatch_backward(W, b, q, k, v, a, tok, gamma, beta, dout, dW_next, db_next, commit: bool = True):
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
