// TTT-Linear's and TTT-MLP's loops on the CPU, training and inference (backend=cpp; built and loaded by cpu_scan.py,
// which documents it).
//
// The loops of scan.py's LinearScan, over the n mini-batches of one (sequence, head) per job, the math of
// scan.forward_step and scan.backward_step (scan.py derives it; rows c = mini-batch tokens, f = head dim):
//   forward   [Zk; Zq] = [K; Q] W + b      G, zhat, r = LNgrad(Zk, t)       Zbar = Zq - M G
//             W' = W - tok K^T (a G)       b' = b - tok 1^T (a G)
//   backward  P = K dW' + db'   dtok -= sum(P aG)   d(aG) = -tok P   da = sum_f d(aG) G
//             dG = a d(aG) - M^T dZbar      dM = -dZbar G^T      (dZ, dt, dgamma, dbeta) = LNgrad's VJP of dG
//             [dK; dQ] = [dZ; dZbar] W^T,  dK -= tok (aG) dW'^T,  dW = dW' + [K; Q]^T [dZ; dZbar],  db = db' + sums
// Layouts as LinearScan keeps them, mini-batch first: kq (n, BH, 2c, f), t, G, zhat, Zbar (n, BH, c, f),
// a and r (n, BH, c), M (n, BH, c, c), W (n + 1, BH, f, f), b (n + 1, BH, f); gamma, beta (BH, f).
// Products (gemm): C += op(A) B in register blocks of MR x NR entries of C accumulated over k, the innermost
// loop along a contiguous row (vectorised); the columns past the last whole block take row axpys. The products
// with W^T and dW'^T transpose W and dW' once per mini-batch; dM (c x c) takes dot products of rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_jobs.h"

namespace {

constexpr double LN_EPS = 1e-6;  // inner.LN_EPS

// y += alpha x over n
template <typename T>
inline void axpy(T* __restrict y, const T* __restrict x, T alpha, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; j++) y[j] += alpha * x[j];
}

template <typename T>
inline T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; j++) s += x[j] * y[j];
  return s;
}

template <typename T>
inline T mean(const T* x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; j++) s += x[j];
  return s / T(n);
}

// C (m, n) += alpha op(A) B, row-major and contiguous; op(A) = A (m, k), or A^T for A (k, m) (kTransA). Register
// blocks of MR rows x NR columns of C accumulate over k in registers (NR a few vector widths); the columns
// beyond the last whole block take row axpys.
constexpr int64_t MR = 8, NR = 16;

template <typename T, bool kTransA>
inline T a_at(const T* A, int64_t i, int64_t p, int64_t m, int64_t k) {
  return kTransA ? A[p * m + i] : A[i * k + p];
}

template <typename T, bool kTransA, int64_t R>
inline void block(T* C, const T* A, const T* B, int64_t i, int64_t j0, int64_t m, int64_t k, int64_t n, T alpha) {
  T acc[R][NR] = {};
  for (int64_t p = 0; p < k; p++) {
    const T* b = B + p * n + j0;
    for (int64_t r = 0; r < R; r++) {
      const T a = a_at<T, kTransA>(A, i + r, p, m, k);
#pragma omp simd
      for (int64_t j = 0; j < NR; j++) acc[r][j] += a * b[j];
    }
  }
  for (int64_t r = 0; r < R; r++)
#pragma omp simd
    for (int64_t j = 0; j < NR; j++) C[(i + r) * n + j0 + j] += alpha * acc[r][j];
}

template <typename T, bool kTransA>
void gemm(T* C, const T* A, const T* B, int64_t m, int64_t k, int64_t n, T alpha) {
  const int64_t n_blocked = n - n % NR;
  for (int64_t j0 = 0; j0 < n_blocked; j0 += NR) {
    int64_t i = 0;
    for (; i + MR <= m; i += MR) block<T, kTransA, MR>(C, A, B, i, j0, m, k, n, alpha);
    for (; i < m; i++) block<T, kTransA, 1>(C, A, B, i, j0, m, k, n, alpha);
  }
  if (n_blocked < n)
    for (int64_t i = 0; i < m; i++)
      for (int64_t p = 0; p < k; p++)
        axpy(C + i * n + n_blocked, B + p * n + n_blocked, alpha * a_at<T, kTransA>(A, i, p, m, k), n - n_blocked);
}

// C (m, n) += alpha A (m, k) B (k, n)
template <typename T>
void mm(T* C, const T* A, const T* B, int64_t m, int64_t k, int64_t n, T alpha = 1) {
  gemm<T, false>(C, A, B, m, k, n, alpha);
}

// C (m, n) += alpha A^T B, A (k, m), B (k, n)
template <typename T>
void mm_tn(T* C, const T* A, const T* B, int64_t m, int64_t k, int64_t n, T alpha = 1) {
  gemm<T, true>(C, A, B, m, k, n, alpha);
}

// C (m, n) += alpha A B^T, A (m, k), B (n, k): as dot products of rows (for small n)
template <typename T>
void mm_nt(T* C, const T* A, const T* B, int64_t m, int64_t k, int64_t n, T alpha = 1) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) C[i * n + j] += alpha * dot(A + i * k, B + j * k, k);
}

// dst (cols, rows) = src (rows, cols)^T
template <typename T>
void transpose(const T* src, T* dst, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) dst[j * rows + i] = src[i * cols + j];
}

struct Dims {
  int64_t n, BH, c, f;
};

// One mini-batch's pointers for job j: the array's block (i, j) of `size` numbers.
template <typename T>
inline T* at(T* base, const Dims& d, int64_t i, int64_t j, int64_t size) {
  return base + (i * d.BH + j) * size;
}

// 1 / sqrt(var + eps) of one row z with mean mu: the LN's 1/sigma
template <typename T>
inline T ln_rstd(const T* z, T mu, int64_t f) {
  T var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t j = 0; j < f; j++) var += (z[j] - mu) * (z[j] - mu);
  return T(1) / std::sqrt(var / T(f) + T(LN_EPS));
}

// G, zhat, r of one row: LNgrad(z, t) (inner.ln_loss_grad_stats)
template <typename T>
void ln_grad_row(const T* z, const T* t, const T* gam, const T* bet, T* G, T* zhat, T* r, T* gx, int64_t f) {
  const T mu = mean(z, f), rstd = ln_rstd(z, mu, f);
#pragma omp simd
  for (int64_t j = 0; j < f; j++) {
    zhat[j] = (z[j] - mu) * rstd;
    gx[j] = (gam[j] * zhat[j] + bet[j] - t[j]) * gam[j];
  }
  const T m_gx = mean(gx, f), m_gxz = dot(gx, zhat, f) / T(f);
#pragma omp simd
  for (int64_t j = 0; j < f; j++) G[j] = (gx[j] - m_gx - zhat[j] * m_gxz) * rstd;
  *r = rstd;
}

// The VJP of one row of G = LNgrad(Z, t) (dual_backward.ln_grad_vjp): dZ and dt; adds the row's dgamma and dbeta.
template <typename T>
void ln_grad_vjp_row(const T* zhat, T r, const T* t, const T* gam, const T* bet, const T* G, const T* dG, T* dZ,
                     T* dt, T* dgam, T* dbet, T* gx, T* dgx, T* dzhat, int64_t f) {
#pragma omp simd
  for (int64_t j = 0; j < f; j++) gx[j] = (gam[j] * zhat[j] + bet[j] - t[j]) * gam[j];
  const T c2 = dot(gx, zhat, f) / T(f), m_dG = mean(dG, f), m_dGz = dot(dG, zhat, f) / T(f);
  const T m_dGG = dot(dG, G, f) / T(f);
#pragma omp simd
  for (int64_t j = 0; j < f; j++) {
    dgx[j] = r * (dG[j] - m_dG - zhat[j] * m_dGz);
    dzhat[j] = -r * (dG[j] * c2 + gx[j] * m_dGz) + dgx[j] * gam[j] * gam[j];
    dgam[j] += dgx[j] * (2 * gam[j] * zhat[j] + bet[j] - t[j]);
    dbet[j] += dgx[j] * gam[j];
    dt[j] = -dgx[j] * gam[j];
  }
  const T m_dzhat = mean(dzhat, f), m_dzz = dot(dzhat, zhat, f) / T(f);
#pragma omp simd
  for (int64_t j = 0; j < f; j++) dZ[j] = r * (dzhat[j] - m_dzhat - zhat[j] * m_dzz) - r * zhat[j] * m_dGG;
}

template <typename T>
void forward_job(const T* kq, const T* tb, const T* ab, const T* Mb, const T* gam, const T* bet, T tok, T* Ws,
                 T* bs, T* Gs, T* zhats, T* rs, T* zbar, const Dims& d, int64_t j) {
  const int64_t c = d.c, f = d.f;
  std::vector<T> Z(2 * c * f), aG(c * f), gx(f);
  const T *g = gam + j * f, *be = bet + j * f;
  for (int64_t i = 0; i < d.n; i++) {
    const T *K = at(kq, d, i, j, 2 * c * f), *t = at(tb, d, i, j, c * f), *a = at(ab, d, i, j, c);
    const T *M = at(Mb, d, i, j, c * c), *W = at(Ws, d, i, j, f * f), *b = at(bs, d, i, j, f);
    T *W1 = at(Ws, d, i + 1, j, f * f), *b1 = at(bs, d, i + 1, j, f);
    T *G = at(Gs, d, i, j, c * f), *zhat = at(zhats, d, i, j, c * f), *r = at(rs, d, i, j, c);
    T* zb = at(zbar, d, i, j, c * f);
    for (int64_t row = 0; row < 2 * c; row++) std::copy(b, b + f, Z.data() + row * f);
    mm(Z.data(), K, W, 2 * c, f, f);  // [K; Q] W + b
    for (int64_t row = 0; row < c; row++)
      ln_grad_row(Z.data() + row * f, t + row * f, g, be, G + row * f, zhat + row * f, r + row, gx.data(), f);
    std::copy(Z.data() + c * f, Z.data() + 2 * c * f, zb);
    mm(zb, M, G, c, c, f, T(-1));  // Zq - M G
    for (int64_t row = 0; row < c; row++)
      for (int64_t col = 0; col < f; col++) aG[row * f + col] = a[row] * G[row * f + col];
    std::copy(W, W + f * f, W1);
    mm_tn(W1, K, aG.data(), f, c, f, -tok);  // W - tok K^T aG
    std::copy(b, b + f, b1);
    for (int64_t row = 0; row < c; row++) axpy(b1, aG.data() + row * f, -tok, f);
  }
}

template <typename T>
void backward_job(const T* kq, const T* tb, const T* ab, const T* Mb, const T* gam, const T* bet, T tok, const T* Ws,
                  const T* Gs, const T* zhats, const T* rs, const T* dzbar, T* dW, T* db, T* dkq, T* dtb, T* dab,
                  T* dMb, T* dtok, T* dgam, T* dbet, const Dims& d, int64_t j) {
  const int64_t c = d.c, f = d.f;
  std::vector<T> aG(c * f), P(c * f), dG(c * f), dZZ(2 * c * f), Wt(f * f), gx(f), dgx(f), dzhat(f);
  const T *g = gam + j * f, *be = bet + j * f;
  T *dWj = dW + j * f * f, *dbj = db + j * f, *dg = dgam + j * f, *dbe = dbet + j * f;
  T dtok_j = 0;
  for (int64_t i = d.n - 1; i >= 0; i--) {
    const T *K = at(kq, d, i, j, 2 * c * f), *t = at(tb, d, i, j, c * f), *a = at(ab, d, i, j, c);
    const T *M = at(Mb, d, i, j, c * c), *W = at(Ws, d, i, j, f * f), *G = at(Gs, d, i, j, c * f);
    const T *zhat = at(zhats, d, i, j, c * f), *r = at(rs, d, i, j, c), *dZbar = at(dzbar, d, i, j, c * f);
    T *dK = at(dkq, d, i, j, 2 * c * f), *dt = at(dtb, d, i, j, c * f), *da = at(dab, d, i, j, c);
    T* dM = at(dMb, d, i, j, c * c);
    for (int64_t row = 0; row < c; row++) {
      for (int64_t col = 0; col < f; col++) aG[row * f + col] = a[row] * G[row * f + col];
      std::copy(dbj, dbj + f, P.data() + row * f);
    }
    mm(P.data(), K, dWj, c, f, f);  // K dW' + db'
    for (int64_t row = 0; row < c; row++) {
      const T* p = P.data() + row * f;
      dtok_j -= dot(p, aG.data() + row * f, f);
      da[row] = -tok * dot(p, G + row * f, f);  // sum_f d(aG) G with d(aG) = -tok P
      for (int64_t col = 0; col < f; col++) dG[row * f + col] = -tok * a[row] * p[col];  // a d(aG)
    }
    mm_tn(dG.data(), M, dZbar, c, c, f, T(-1));  // - M^T dZbar
    std::fill(dM, dM + c * c, T(0));
    mm_nt(dM, dZbar, G, c, f, c, T(-1));  // -dZbar G^T
    for (int64_t row = 0; row < c; row++)
      ln_grad_vjp_row(zhat + row * f, r[row], t + row * f, g, be, G + row * f, dG.data() + row * f,
                      dZZ.data() + row * f, dt + row * f, dg, dbe, gx.data(), dgx.data(), dzhat.data(), f);
    std::copy(dZbar, dZbar + c * f, dZZ.data() + c * f);
    std::fill(dK, dK + 2 * c * f, T(0));
    transpose(W, Wt.data(), f, f);
    mm(dK, dZZ.data(), Wt.data(), 2 * c, f, f);        // [dZ; dZbar] W^T
    transpose(dWj, Wt.data(), f, f);
    mm(dK, aG.data(), Wt.data(), c, f, f, -tok);       // - tok (aG) dW'^T
    mm_tn(dWj, K, dZZ.data(), f, 2 * c, f);           // dW' + [K; Q]^T [dZ; dZbar]
    for (int64_t row = 0; row < 2 * c; row++) axpy(dbj, dZZ.data() + row * f, T(1), f);
  }
  dtok[j] = dtok_j;
}

// Where row t of one (sequence, head) j = b H + h starts in a (B, H, T, f) tensor with any strides but a unit one
// along f, or the entry (b, h, t) of a (B, H, T) one: the layer's q, k, v are head-transposed views of its (B, T, H,
// f) projections, and inference reads and writes them as they lie instead of as contiguous copies.
struct Rows {
  int64_t batch, head, token;  // strides, in entries
  int64_t at(int64_t j, int64_t H, int64_t t) const { return (j / H) * batch + (j % H) * head + t * token; }
};

// What inference reads for a mini-batch's rows: q, k, v where they lie (Rows); or, with u non-null, q and k computed
// here as the Mamba backbone's causal convs (width kw) of u = x Wq (B, T, d = H f; strides u_b, u_t, 1 along d),
//   q_t = bq + sum_j wq[:, j] u_{t + j - kw + 1}     (wq (d, kw), bq (d); k's with wk, bk)
// with the rows before u from the convs' states sq, sk (B, kw - 1, d), or zeros where null; the key factor a (B, H,
// T) where it lies, or, with x non-null, computed from the layer's input as the layer's lr gate does,
//   a_t = a_scale sigmoid(x_t . theta_h + gate_bias_h),   x (B, T, d) at strides x_b, x_t (1 along d), theta (H, d);
// and, with cos non-null, q and k rotated here by the interleaved RoPE at positions 0 .. c - 1 of every mini-batch
// (TTT's RoPE restarts every mini-batch): cos, sin (c, f / 2), pair p of row r rotated by angle (r, p). Else q and k
// come rotated already.
template <typename T>
struct InferInputs {
  const T *q, *k, *v;
  Rows qkv;
  const T* ab;
  Rows ar;
  const T *x, *theta, *gate_bias;
  int64_t x_b, x_t, d;
  T a_scale;
  const T *cos, *sin;
  const T *u, *wq, *bq, *wk, *bk, *sq, *sk;
  int64_t u_b, u_t, kw;
};

// One (sequence, head)'s taps of the q and k convs, tap-major (kw, f), so a row's sums run along f (vectorised)
template <typename T>
struct HeadConvs {
  std::vector<T> wq, wk;
  HeadConvs(const InferInputs<T>& in, int64_t h, int64_t f) : wq(in.u ? in.kw * f : 0), wk(wq.size()) {
    for (int64_t j = 0; j < (in.u ? in.kw : 0); j++)
      for (int64_t col = 0; col < f; col++) {
        wq[j * f + col] = in.wq[(h * f + col) * in.kw + j];
        wk[j * f + col] = in.wk[(h * f + col) * in.kw + j];
      }
  }
  // q and k of token t of sequence b, head h (f features from column h f): the convs of u and the states
  void rows(const InferInputs<T>& in, int64_t b, int64_t h, int64_t t, int64_t H, int64_t f, T* q, T* k) const {
    const int64_t d = H * f, c0 = h * f;
    std::copy(in.bq + c0, in.bq + c0 + f, q);
    std::copy(in.bk + c0, in.bk + c0 + f, k);
    for (int64_t j = 0; j < in.kw; j++) {
      const int64_t r = t + j - (in.kw - 1);  // u's row, or the states' row kw - 1 + r before u (null: zeros)
      const int64_t state_row = (b * (in.kw - 1) + in.kw - 1 + r) * d + c0;
      const T* ur = r >= 0 ? in.u + b * in.u_b + r * in.u_t + c0 : nullptr;
      const T* uq = ur ? ur : in.sq ? in.sq + state_row : nullptr;
      const T* uk = ur ? ur : in.sk ? in.sk + state_row : nullptr;
      const T *tq = wq.data() + j * f, *tk = wk.data() + j * f;
      if (uq) {
#pragma omp simd
        for (int64_t col = 0; col < f; col++) q[col] += tq[col] * uq[col];
      }
      if (uk) {
#pragma omp simd
        for (int64_t col = 0; col < f; col++) k[col] += tk[col] * uk[col];
      }
    }
  }
};

// (x0, x1) pairs of a row rotated by the angles of one RoPE row: out_2p + i out_2p+1 = (x_2p + i x_2p+1)(cos + i sin)
template <typename T>
inline void rotate_pairs(const T* __restrict x, const T* __restrict cos, const T* __restrict sin, T* __restrict out,
                         int64_t f) {
#pragma omp simd
  for (int64_t p = 0; p < f / 2; p++) {
    const T x0 = x[2 * p], x1 = x[2 * p + 1];
    out[2 * p] = x0 * cos[p] - x1 * sin[p];
    out[2 * p + 1] = x0 * sin[p] + x1 * cos[p];
  }
}

// One mini-batch's c rows of q, k (from the convs of u, rotated, where InferInputs says so), the target t = v - k
// and its a, copied contiguous for the products.
template <typename T>
struct MiniBatchRows {
  std::vector<T> Q, K, t, a, q_raw, k_raw;
  HeadConvs<T> convs;
  MiniBatchRows(const InferInputs<T>& in, int64_t h, int64_t c, int64_t f)
      : Q(c * f), K(c * f), t(c * f), a(c), q_raw(f), k_raw(f), convs(in, h, f) {}
  // rows t0 .. t0 + c - 1 of (sequence, head) j; pos0: the first row's position in its mini-batch (the RoPE's)
  void gather(const InferInputs<T>& in, int64_t j, int64_t H, int64_t t0, int64_t c, int64_t f, int64_t pos0 = 0) {
    const int64_t b = j / H, h = j % H;
    for (int64_t row = 0; row < c; row++) {
      const T *cos = in.cos + (pos0 + row) * (f / 2), *sin = in.sin + (pos0 + row) * (f / 2);
      const int64_t at = in.qkv.at(j, H, t0 + row);
      T *Qr = Q.data() + row * f, *Kr = K.data() + row * f, *tr = t.data() + row * f;
      const T *qs = in.q + at, *ks = in.k + at;  // q and k before the RoPE
      if (in.u) {
        convs.rows(in, b, h, t0 + row, H, f, q_raw.data(), k_raw.data());
        qs = q_raw.data(), ks = k_raw.data();
      }
      if (in.cos) {
        rotate_pairs(qs, cos, sin, Qr, f);
        rotate_pairs(ks, cos, sin, Kr, f);
      } else {
        std::copy(qs, qs + f, Qr);
        std::copy(ks, ks + f, Kr);
      }
      const T* vr = in.v + at;
#pragma omp simd
      for (int64_t col = 0; col < f; col++) tr[col] = vr[col] - Kr[col];
      if (in.x) {
        const T logit = dot(in.x + b * in.x_b + (t0 + row) * in.x_t, in.theta + h * in.d, in.d) + in.gate_bias[h];
        a[row] = in.a_scale / (T(1) + std::exp(-logit));
      } else {
        a[row] = in.ab[in.ar.at(j, H, t0 + row)];
      }
    }
  }
};

// Inference's inputs for tokens inside one mini-batch (decoding, TTTLayer._cpp_decode): the c rows of q, k (from
// the convs, rotated at positions pos0 .. pos0 + c - 1 of their mini-batch), the target t = v - k and a of one
// (sequence, head), as MiniBatchRows gathers them, written contiguous, q, k, t (BH, c, f) and a (BH, c), for the
// decode kernels.
template <typename T>
void gather_job(const InferInputs<T>& src, int64_t pos0, T* q, T* k, T* t, T* a, int64_t H, int64_t c, int64_t f,
                int64_t j) {
  MiniBatchRows<T> in(src, j % H, c, f);
  in.gather(src, j, H, 0, c, f, pos0);
  std::copy(in.Q.begin(), in.Q.end(), q + j * c * f);
  std::copy(in.K.begin(), in.K.end(), k + j * c * f);
  std::copy(in.t.begin(), in.t.end(), t + j * c * f);
  std::copy(in.a.begin(), in.a.end(), a + j * c);
}

// out's c rows from a contiguous block
template <typename T>
void scatter_rows(const T* block, T* out, const Rows& outr, int64_t j, int64_t H, int64_t t0, int64_t c, int64_t f) {
  for (int64_t row = 0; row < c; row++)
    std::copy(block + row * f, block + (row + 1) * f, out + outr.at(j, H, t0 + row));
}

// Inference (no gradient): the whole layer-side inner loop of one (sequence, head) over its n whole mini-batches:
// q, k, v, out (B, H, n c, f) and a where they lie, or a from x, and q, k rotated here or before (InferInputs);
// tok (c); gamma, beta (H, f); W (BH, f, f) and b (BH, f) from the initial weights to the final ones, in place.
// Besides forward_job's math it forms the target t = v - k, builds M = tril(tok a^T) * (Q K^T + 1)
// (dual._lr_matrices) and applies the LN and the residual after the loop (out = Q + gamma LN(Zbar) + beta,
// dual.ttt_dual), and keeps no per-mini-batch states.
template <typename T>
void infer_job(const InferInputs<T>& src, const T* tok, const T* gam, const T* bet, T* W, T* bias, T* out,
               const Rows& outr, int64_t n, int64_t H, int64_t c, int64_t f, int64_t j) {
  MiniBatchRows<T> in(src, j % H, c, f);
  std::vector<T> Zk(c * f), zbar(c * f), G(c * f), zhat(c * f), r(c), gx(f), M(c * c), aG(c * f);
  const T *g = gam + (j % H) * f, *be = bet + (j % H) * f, tok_c = tok[c - 1];
  const T *K = in.K.data(), *Q = in.Q.data(), *t = in.t.data(), *a = in.a.data();
  T *Wj = W + j * f * f, *bj = bias + j * f, *zb = zbar.data();  // Zbar, then the output in place
  for (int64_t i = 0; i < n; i++) {
    in.gather(src, j, H, i * c, c, f);
    for (int64_t row = 0; row < c; row++) {
      std::copy(bj, bj + f, Zk.data() + row * f);
      std::copy(bj, bj + f, zb + row * f);
    }
    mm(Zk.data(), K, Wj, c, f, f);  // K W + b
    mm(zb, Q, Wj, c, f, f);         // Q W + b
    for (int64_t row = 0; row < c; row++)
      ln_grad_row(Zk.data() + row * f, t + row * f, g, be, G.data() + row * f, zhat.data() + row * f, r.data() + row,
                  gx.data(), f);
    std::fill(M.begin(), M.end(), T(0));
    mm_nt(M.data(), Q, K, c, f, c);  // Q K^T
    for (int64_t row = 0; row < c; row++)
      for (int64_t col = 0; col < c; col++)
        M[row * c + col] = col <= row ? tok[row] * a[col] * (M[row * c + col] + T(1)) : T(0);
    mm(zb, M.data(), G.data(), c, c, f, T(-1));  // Zq - M G
    for (int64_t row = 0; row < c; row++) {
      T* z = zb + row * f;
      const T* x = Q + row * f;
      const T mu = mean(z, f), rstd = ln_rstd(z, mu, f);
#pragma omp simd
      for (int64_t col = 0; col < f; col++) z[col] = x[col] + g[col] * (z[col] - mu) * rstd + be[col];
    }
    scatter_rows(zb, out, outr, j, H, i * c, c, f);
    for (int64_t row = 0; row < c; row++)
      for (int64_t col = 0; col < f; col++) aG[row * f + col] = a[row] * G[row * f + col];
    mm_tn(Wj, K, aG.data(), f, c, f, -tok_c);  // W - tok K^T aG (after both products with W)
    for (int64_t row = 0; row < c; row++) axpy(bj, aG.data() + row * f, -tok_c, f);
  }
}

// Inference inside one mini-batch (decoding): c tokens of one open mini-batch, one at a time, for one (sequence,
// head), the primal form of dual.py's accumulators. Every gradient is taken at W, b of the mini-batch's start:
//   z = k W + b,  G = LNgrad(z, t),  GW += a k^T G,  Gb += a G        (the accumulators, this token's included)
//   zbar = q W + b - tok_i (q GW + Gb),  out = q + gamma LN(zbar) + beta
// q, k, t, out (BH, c, f), a (BH, c); tok (c) the tokens' query factors; gamma, beta (H, f); W (BH, f, f), b (BH, f)
// read only; the accumulators start from GW_in, Gb_in (null: zeros) and end in GW, Gb; W_out, b_out (null: the
// mini-batch stays open) get the committed weights W - tok_last GW, b - tok_last Gb.
template <typename T>
void decode_job(const T* q, const T* k, const T* tb, const T* ab, const T* tok, T tok_last, const T* gam,
                const T* bet, const T* W, const T* bias, const T* GW_in, const T* Gb_in, T* GW, T* Gb, T* W_out,
                T* b_out, T* out, int64_t c, int64_t H, int64_t f, int64_t j) {
  std::vector<T> z(f), G(f), zhat(f), gx(f);
  T r;
  const T *g = gam + (j % H) * f, *be = bet + (j % H) * f, *Wj = W + j * f * f, *bj = bias + j * f;
  T *GWj = GW + j * f * f, *Gbj = Gb + j * f;
  if (GW_in) {
    std::copy(GW_in + j * f * f, GW_in + (j + 1) * f * f, GWj);
    std::copy(Gb_in + j * f, Gb_in + (j + 1) * f, Gbj);
  } else {
    std::fill(GWj, GWj + f * f, T(0));
    std::fill(Gbj, Gbj + f, T(0));
  }
  for (int64_t row = 0; row < c; row++) {
    const int64_t at_row = j * c + row;
    const T *K = k + at_row * f, *Q = q + at_row * f, *t = tb + at_row * f, a = ab[at_row];
    T* zb = out + at_row * f;  // zbar, then the output in place
    std::copy(bj, bj + f, z.data());
    mm(z.data(), K, Wj, 1, f, f);  // k W + b
    ln_grad_row(z.data(), t, g, be, G.data(), zhat.data(), &r, gx.data(), f);
    for (int64_t p = 0; p < f; p++) axpy(GWj + p * f, G.data(), a * K[p], f);  // GW += a k^T G
    axpy(Gbj, G.data(), a, f);
    std::copy(bj, bj + f, zb);
    mm(zb, Q, Wj, 1, f, f);               // q W + b
    mm(zb, Q, GWj, 1, f, f, -tok[row]);  // - tok_i q GW
    axpy(zb, Gbj, -tok[row], f);          // - tok_i Gb
    const T mu = mean(zb, f), rstd = ln_rstd(zb, mu, f);
#pragma omp simd
    for (int64_t col = 0; col < f; col++) zb[col] = Q[col] + g[col] * (zb[col] - mu) * rstd + be[col];
  }
  if (W_out) {
    T *Wo = W_out + j * f * f, *bo = b_out + j * f;
    std::copy(Wj, Wj + f * f, Wo);
    axpy(Wo, GWj, -tok_last, f * f);
    std::copy(bj, bj + f, bo);
    axpy(bo, Gbj, -tok_last, f);
  }
}

// TTT-MLP inference (no gradient): f_res(x) = gelu(x W1 + b1) W2 + b2 with hidden h = 4f, the math of
// dual._piece_mlp. One piece of c tokens of a mini-batch of one (sequence, head), from the weights at the
// mini-batch's start W1 (f, h), b1 (h), W2 (h, f), b2 (f) and the accumulators A1, Ab1, A2, Ab2 of its tokens so
// far (has_acc; else zero):
//   Z1 = [K; Q] W1 + b1,  X2 = gelu(Z1k),  G2 = LNgrad(X2 W2 + b2, t),  G1 = (G2 W2^T) * gelu'(Z1k)
//   Zbar1 = Z1q - M1 G1 - tok (Q A1 + Ab1),  M1 = tril(tok a^T) * (Q K^T + 1)
//   Xbar2 = gelu(Zbar1),  Zbar2 = Xbar2 W2 + b2 - M2 G2 - tok (Xbar2 A2 + Ab2),  M2 = tril(tok a^T) * (Xbar2 X2^T + 1)
//   out = Q + gamma LN(Zbar2) + beta;  A1 += K^T (a G1), Ab1 += 1^T (a G1), A2 += X2^T (a G2), Ab2 += 1^T (a G2)
// (tok per row), and with commit (the piece ends the mini-batch) W -= tok_last A for each weight, in place.
constexpr double GELU_K0 = 0.7978845608028654, GELU_K1 = 0.044715;  // sqrt(2 / pi); inner.gelu_tanh_and_grad

// tanh(u) of tanh-GELU, u = K0 (x + K1 x^3), as 2 / (1 + exp(-2u)) - 1 (exp vectorises); u clamped to +-20
// (tanh(20) = 1 in fp64), which keeps exp finite, as -ffast-math assumes
template <typename T>
inline T gelu_tanh_u(T x) {
  const T u = std::min(std::max(T(GELU_K0) * x * (T(1) + T(GELU_K1) * x * x), T(-20)), T(20));
  return T(2) / (T(1) + std::exp(T(-2) * u)) - T(1);
}

template <typename T>
inline void gelu_and_grad(T x, T* g, T* dg) {
  const T k0 = T(GELU_K0), k1 = T(GELU_K1), x2 = x * x, th = gelu_tanh_u(x);
  const T half_1p = T(0.5) * (T(1) + th);
  *g = x * half_1p;
  *dg = half_1p + T(0.5) * k0 * x * (T(1) - th * th) * (T(1) + T(3) * k1 * x2);
}

// The layer's output before Wo, inference (cpu_scan.output): per token row r of z (rows, d), with the LN over the
// token's d = H f features (the layer's post_norm: weight w, bias b, eps),
//   y[r] = (LN(z[r]) w + b) * gelu_tanh(g[r])      (g null: no gate, the Transformer backbone)
// a job is OUTPUT_ROWS rows.
constexpr int64_t OUTPUT_ROWS = 64;

template <typename T>
void output_job(const T* z, const T* w, const T* b, const T* g, T* y, int64_t rows, int64_t d, T eps, int64_t job) {
  const int64_t lo = job * OUTPUT_ROWS, hi = std::min(lo + OUTPUT_ROWS, rows);
  for (int64_t r = lo; r < hi; r++) {
    const T* zr = z + r * d;
    T* yr = y + r * d;
    const T mu = mean(zr, d);
    T var = 0;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < d; c++) var += (zr[c] - mu) * (zr[c] - mu);
    const T rstd = T(1) / std::sqrt(var / T(d) + eps);
#pragma omp simd
    for (int64_t c = 0; c < d; c++) yr[c] = (zr[c] - mu) * rstd * w[c] + b[c];
    if (!g) continue;
    const T* gr = g + r * d;
#pragma omp simd
    for (int64_t c = 0; c < d; c++) yr[c] *= T(0.5) * gr[c] * (T(1) + gelu_tanh_u(gr[c]));
  }
}

// One piece's forward at the weights of its mini-batch's start, before the accumulators' terms: what mlp_piece
// finishes into outputs and mlp_backward_job recomputes for its adjoint. first(): Z1 = [K; Q] W1 + b1, X2 =
// gelu(Z1k), s1 = gelu'(Z1k), G2 = LNgrad(X2 W2 + b2, t) (with zhat, r), P = G2 W2^T, G1 = P s1, A1 = Q K^T,
// E = tril(tok a^T), M = E * (A1 + 1) and Zbar1 = Z1q - M G1 (in Z1's second half). second(), after the caller's
// terms on Zbar1: Xbar2 = gelu(Zbar1), sb1 = gelu'(Zbar1), A2 = Xbar2 X2^T and M = E * (A2 + 1).
template <typename T>
struct MlpForward {
  int64_t c, f, h;
  std::vector<T> Z1, X2, s1, P, G1, xb2, sb1, Z2, G2, zhat, r, gx, A1, A2, E, M;
  MlpForward(int64_t c, int64_t f)
      : c(c), f(f), h(4 * f), Z1(2 * c * h), X2(c * h), s1(c * h), P(c * h), G1(c * h), xb2(c * h), sb1(c * h),
        Z2(c * f), G2(c * f), zhat(c * f), r(c), gx(f), A1(c * c), A2(c * c), E(c * c), M(c * c) {}
  T* zbar1() { return Z1.data() + c * h; }

  void first(const T* Q, const T* K, const T* t, const T* a, const T* tok, const T* g, const T* be, const T* W1,
             const T* b1, const T* W2, const T* b2) {
    T *Z1k = Z1.data(), *Z1q = zbar1();
    for (int64_t row = 0; row < 2 * c; row++) std::copy(b1, b1 + h, Z1k + row * h);
    mm(Z1k, K, W1, c, f, h);  // K W1 + b1
    mm(Z1q, Q, W1, c, f, h);  // Q W1 + b1
    for (int64_t i = 0; i < c * h; i++) gelu_and_grad(Z1k[i], &X2[i], &s1[i]);
    for (int64_t row = 0; row < c; row++) std::copy(b2, b2 + f, Z2.data() + row * f);
    mm(Z2.data(), X2.data(), W2, c, h, f);  // X2 W2 + b2
    for (int64_t row = 0; row < c; row++)
      ln_grad_row(Z2.data() + row * f, t + row * f, g, be, G2.data() + row * f, zhat.data() + row * f, &r[row],
                  gx.data(), f);
    std::fill(P.begin(), P.end(), T(0));
    mm_nt(P.data(), G2.data(), W2, c, f, h);  // G2 W2^T
    for (int64_t i = 0; i < c * h; i++) G1[i] = P[i] * s1[i];
    for (int64_t row = 0; row < c; row++)
      for (int64_t col = 0; col < c; col++) E[row * c + col] = col <= row ? tok[row] * a[col] : T(0);
    std::fill(A1.begin(), A1.end(), T(0));
    mm_nt(A1.data(), Q, K, c, f, c);  // Q K^T
    for (int64_t i = 0; i < c * c; i++) M[i] = E[i] * (A1[i] + T(1));  // M1
    mm(Z1q, M.data(), G1.data(), c, c, h, T(-1));  // - M1 G1
  }

  void second() {
    const T* Z1q = zbar1();
    for (int64_t i = 0; i < c * h; i++) gelu_and_grad(Z1q[i], &xb2[i], &sb1[i]);
    std::fill(A2.begin(), A2.end(), T(0));
    mm_nt(A2.data(), xb2.data(), X2.data(), c, h, c);  // Xbar2 X2^T
    for (int64_t i = 0; i < c * c; i++) M[i] = E[i] * (A2[i] + T(1));  // M2
  }
};

template <typename T>
void mlp_piece(const T* Q, const T* K, const T* t, const T* a, const T* tok, T tok_last, const T* g, const T* be,
               T* W1, T* b1, T* W2, T* b2, T* A1, T* Ab1, T* A2, T* Ab2, bool has_acc, bool commit, T* out,
               int64_t c, int64_t f, MlpForward<T>& s, bool finish = true) {
  const int64_t h = 4 * f;
  s.first(Q, K, t, a, tok, g, be, W1, b1, W2, b2);
  T* Z1q = s.zbar1();
  if (has_acc)
    for (int64_t row = 0; row < c; row++) {
      mm(Z1q + row * h, Q + row * f, A1, 1, f, h, -tok[row]);
      axpy(Z1q + row * h, Ab1, -tok[row], h);
    }
  s.second();
  for (int64_t row = 0; row < c; row++) std::copy(b2, b2 + f, out + row * f);
  mm(out, s.xb2.data(), W2, c, h, f);                 // Xbar2 W2 + b2
  mm(out, s.M.data(), s.G2.data(), c, c, f, T(-1));  // - M2 G2
  if (has_acc)
    for (int64_t row = 0; row < c; row++) {
      mm(out + row * f, s.xb2.data() + row * h, A2, 1, h, f, -tok[row]);
      axpy(out + row * f, Ab2, -tok[row], f);
    }
  for (int64_t row = 0; row < c && finish; row++) {  // out = Q + gamma LN(Zbar2) + beta (else Zbar2)
    T* z = out + row * f;
    const T* x = Q + row * f;
    const T mu = mean(z, f), rstd = ln_rstd(z, mu, f);
#pragma omp simd
    for (int64_t col = 0; col < f; col++) z[col] = x[col] + g[col] * (z[col] - mu) * rstd + be[col];
  }
  if (!has_acc) {
    std::fill(A1, A1 + f * h, T(0));
    std::fill(Ab1, Ab1 + h, T(0));
    std::fill(A2, A2 + h * f, T(0));
    std::fill(Ab2, Ab2 + f, T(0));
  }
  for (int64_t row = 0; row < c; row++) {  // a G1, a G2 in place: the piece reads G1 and G2 no more
    for (int64_t col = 0; col < h; col++) s.G1[row * h + col] *= a[row];
    for (int64_t col = 0; col < f; col++) s.G2[row * f + col] *= a[row];
    axpy(Ab1, s.G1.data() + row * h, T(1), h);
    axpy(Ab2, s.G2.data() + row * f, T(1), f);
  }
  mm_tn(A1, K, s.G1.data(), f, c, h);         // K^T (a G1)
  mm_tn(A2, s.X2.data(), s.G2.data(), h, c, f);  // X2^T (a G2)
  if (commit) {
    axpy(W1, A1, -tok_last, f * h);
    axpy(b1, Ab1, -tok_last, h);
    axpy(W2, A2, -tok_last, h * f);
    axpy(b2, Ab2, -tok_last, f);
  }
}

// TTT-MLP over the n whole mini-batches of one (sequence, head), read and written where they lie as infer_job:
// q, k, v, out (B, H, n c, f), a (B, H, n c) or from x (InferInputs); the weights W1 (BH, f, h), b1 (BH, h),
// W2 (BH, h, f), b2 (BH, f) from the initial ones to the final ones, in place.
template <typename T>
void mlp_infer_job(const InferInputs<T>& src, const T* tok, const T* gam, const T* bet, T* W1, T* b1, T* W2, T* b2,
                   T* out, const Rows& outr, int64_t n, int64_t H, int64_t c, int64_t f, int64_t j) {
  const int64_t h = 4 * f;
  MlpForward<T> s(c, f);
  MiniBatchRows<T> in(src, j % H, c, f);
  std::vector<T> A1(f * h), Ab1(h), A2(h * f), Ab2(f), o(c * f);
  const T *g = gam + (j % H) * f, *be = bet + (j % H) * f;
  for (int64_t i = 0; i < n; i++) {
    in.gather(src, j, H, i * c, c, f);
    mlp_piece<T>(in.Q.data(), in.K.data(), in.t.data(), in.a.data(), tok, tok[c - 1], g, be, W1 + j * f * h,
                 b1 + j * h, W2 + j * h * f, b2 + j * f, A1.data(), Ab1.data(), A2.data(), Ab2.data(), false, true,
                 o.data(), c, f, s);
    scatter_rows(o.data(), out, outr, j, H, i * c, c, f);
  }
}

// TTT-MLP, c tokens inside one mini-batch (decoding): mlp_piece for each (sequence, head) with the accumulators
// A1 (BH, f, h), Ab1 (BH, h), A2 (BH, h, f), Ab2 (BH, f) updated in place (has_acc: they hold the mini-batch's
// tokens so far; else they are overwritten), and the weights only if commit.
template <typename T>
void mlp_decode_job(const T* q, const T* k, const T* tb, const T* ab, const T* tok, T tok_last, const T* gam,
                    const T* bet, T* W1, T* b1, T* W2, T* b2, T* A1, T* Ab1, T* A2, T* Ab2, bool has_acc, bool commit,
                    T* out, int64_t H, int64_t c, int64_t f, int64_t j) {
  const int64_t h = 4 * f;
  MlpForward<T> s(c, f);
  mlp_piece<T>(q + j * c * f, k + j * c * f, tb + j * c * f, ab + j * c, tok, tok_last, gam + (j % H) * f,
               bet + (j % H) * f, W1 + j * f * h, b1 + j * h, W2 + j * h * f, b2 + j * f, A1 + j * f * h, Ab1 + j * h,
               A2 + j * h * f, Ab2 + j * f, has_acc, commit, out + j * c * f, c, f, s);
}

// TTT-MLP training (MLPScan in cpu_scan.py): the forward over the n whole mini-batches of one (sequence, head),
// heads-first, keeping the weights at the start of every mini-batch (W1s (BH, n + 1, f, h), b1s (BH, n + 1, h),
// W2s (BH, n + 1, h, f), b2s (BH, n + 1, f); slot 0 given) and writing Zbar2 (the LN and the residual run in
// autograd); the backward walks them in reverse (mlp_backward_job).
template <typename T>
void mlp_forward_job(const T* q, const T* k, const T* tb, const T* ab, const T* tok, const T* gam, const T* bet,
                     T* W1s, T* b1s, T* W2s, T* b2s, T* zbar, int64_t n, int64_t H, int64_t c, int64_t f, int64_t j) {
  const int64_t h = 4 * f;
  MlpForward<T> s(c, f);
  std::vector<T> A1(f * h), Ab1(h), A2(h * f), Ab2(f);
  const T *g = gam + (j % H) * f, *be = bet + (j % H) * f;
  for (int64_t i = 0; i < n; i++) {
    const int64_t row0 = j * n * c + i * c, st = j * (n + 1) + i;  // the mini-batch's first row, its state
    T *W1 = W1s + (st + 1) * f * h, *b1 = b1s + (st + 1) * h, *W2 = W2s + (st + 1) * h * f, *b2 = b2s + (st + 1) * f;
    std::copy(W1s + st * f * h, W1s + (st + 1) * f * h, W1);  // the next state starts as this one
    std::copy(b1s + st * h, b1s + (st + 1) * h, b1);
    std::copy(W2s + st * h * f, W2s + (st + 1) * h * f, W2);
    std::copy(b2s + st * f, b2s + (st + 1) * f, b2);
    mlp_piece<T>(q + row0 * f, k + row0 * f, tb + row0 * f, ab + row0, tok, tok[c - 1], g, be, W1, b1, W2, b2,
                 A1.data(), Ab1.data(), A2.data(), Ab2.data(), false, true, zbar + row0 * f, c, f, s, false);
  }
}

// d^2 gelu_tanh / dx^2 (dual_backward.gelu_tanh_second)
template <typename T>
inline T gelu_second(T x) {
  const T k0 = T(GELU_K0), k1 = T(GELU_K1), th = gelu_tanh_u(x);
  const T du = k0 * (T(1) + T(3) * k1 * x * x), d2u = k0 * T(6) * k1 * x;
  return (T(1) - th * th) * (du + T(0.5) * x * (d2u - T(2) * th * du * du));
}

// The backward of mlp_forward_job, the last mini-batch first: each mini-batch's forward recomputed from its saved
// weights, then dual_backward.mlp_minibatch_backward's math from dZbar2 (the LN's VJP ran in autograd) and the
// gradients of the weights after it, dW1 (BH, f, h), db1 (BH, h), dW2 (BH, h, f), db2 (BH, f), replaced in place by
// those before it. Writes dq, dk, dt (BH, n c, f), da (BH, n c); adds into dtok (BH, c), dgam, dbet (BH, f).
template <typename T>
void mlp_backward_job(const T* q, const T* k, const T* tb, const T* ab, const T* tok, const T* gam, const T* bet,
                      const T* W1s, const T* b1s, const T* W2s, const T* b2s, const T* dzbar, T* dW1, T* db1, T* dW2,
                      T* db2, T* dq, T* dk, T* dt, T* da, T* dtok, T* dgam, T* dbet, int64_t n, int64_t H, int64_t c,
                      int64_t f, int64_t j) {
  const int64_t h = 4 * f, ch = c * h, cf = c * f;
  MlpForward<T> s(c, f);  // each mini-batch's forward, recomputed
  const T *X2 = s.X2.data(), *s1 = s.s1.data(), *P = s.P.data(), *G1 = s.G1.data(), *xb2 = s.xb2.data();
  const T *sb1 = s.sb1.data(), *A1 = s.A1.data(), *A2 = s.A2.data(), *E = s.E.data(), *G2 = s.G2.data();
  std::vector<T> dgx(f), dzh(f);
  std::vector<T> dXb2(ch), dX2(ch), dZb1(ch), dG1(ch), dP(ch), ds1(ch), dZ1(ch), dG2(cf), dZ2(cf), P1(ch), P2(cf);
  std::vector<T> dM(c * c), dE(c * c), dA(c * c);
  std::vector<T> nW1(f * h), nb1(h), nW2(h * f), nb2(f);  // the gradients of the weights before the mini-batch
  const T *g = gam + (j % H) * f, *be = bet + (j % H) * f, tok_c = tok[c - 1];
  T *gW1 = dW1 + j * f * h, *gb1 = db1 + j * h, *gW2 = dW2 + j * h * f, *gb2 = db2 + j * f;
  T *dtok_j = dtok + j * c, *dg = dgam + j * f, *dbt = dbet + j * f;
  for (int64_t i = n - 1; i >= 0; i--) {
    const int64_t row0 = j * n * c + i * c, st = j * (n + 1) + i;
    const T *Q = q + row0 * f, *K = k + row0 * f, *t = tb + row0 * f, *a = ab + row0, *dZb2 = dzbar + row0 * f;
    const T *W1 = W1s + st * f * h, *b1 = b1s + st * h, *W2 = W2s + st * h * f, *b2 = b2s + st * f;
    s.first(Q, K, t, a, tok, g, be, W1, b1, W2, b2);
    s.second();
    // through Zbar2 = Xbar2 W2 + b2 - M2 G2
    std::copy(gW1, gW1 + f * h, nW1.data());  // the gradients before start from those after, plus ...
    std::copy(gb1, gb1 + h, nb1.data());
    std::copy(gW2, gW2 + h * f, nW2.data());
    std::copy(gb2, gb2 + f, nb2.data());
    std::fill(dXb2.begin(), dXb2.end(), T(0));
    mm_nt(dXb2.data(), dZb2, W2, c, f, h);       // dZbar2 W2^T
    mm_tn(nW2.data(), xb2, dZb2, h, c, f);  // Xbar2^T dZbar2
    for (int64_t row = 0; row < c; row++) axpy(nb2.data(), dZb2 + row * f, T(1), f);
    std::fill(dM.begin(), dM.end(), T(0));
    mm_nt(dM.data(), dZb2, G2, c, f, c, T(-1));  // dM2 = -dZbar2 G2^T
    for (int64_t x = 0; x < c * c; x++) {
      dE[x] = dM[x] * (A2[x] + T(1));
      dA[x] = dM[x] * E[x];  // dA2
    }
    std::fill(dG2.begin(), dG2.end(), T(0));
    mm_tn(dG2.data(), s.M.data(), dZb2, c, c, f, T(-1));  // -M2^T dZbar2
    mm(dXb2.data(), dA.data(), X2, c, c, h);               // + dA2 X2
    std::fill(dX2.begin(), dX2.end(), T(0));
    mm_tn(dX2.data(), dA.data(), xb2, c, c, h);            // dA2^T Xbar2
    for (int64_t x = 0; x < ch; x++) dZb1[x] = dXb2[x] * sb1[x];
    // through Zbar1 = Q W1 + b1 - M1 G1
    T* dQ = dq + row0 * f;
    T* dK = dk + row0 * f;
    std::fill(dQ, dQ + cf, T(0));
    mm_nt(dQ, dZb1.data(), W1, c, h, f);           // dZbar1 W1^T
    mm_tn(nW1.data(), Q, dZb1.data(), f, c, h);     // Q^T dZbar1
    for (int64_t row = 0; row < c; row++) axpy(nb1.data(), dZb1.data() + row * h, T(1), h);
    std::fill(dM.begin(), dM.end(), T(0));
    mm_nt(dM.data(), dZb1.data(), G1, c, h, c, T(-1));  // dM1 = -dZbar1 G1^T
    std::fill(dG1.begin(), dG1.end(), T(0));
    for (int64_t x = 0; x < c * c; x++) {
      dE[x] += dM[x] * (A1[x] + T(1));
      dA[x] = dM[x] * E[x];  // dA1
      dM[x] = E[x] * (A1[x] + T(1));  // M1 (scratch)
    }
    mm_tn(dG1.data(), dM.data(), dZb1.data(), c, c, h, T(-1));  // -M1^T dZbar1
    mm(dQ, dA.data(), K, c, c, f);                               // + dA1 K
    std::fill(dK, dK + cf, T(0));
    mm_tn(dK, dA.data(), Q, c, c, f);                            // dA1^T Q
    T* dA_ = da + row0;
    for (int64_t col = 0; col < c; col++) dA_[col] = T(0);
    for (int64_t row = 0; row < c; row++)
      for (int64_t col = 0; col <= row; col++) {  // E = tril(tok a^T)
        dtok_j[row] += dE[row * c + col] * a[col];
        dA_[col] += dE[row * c + col] * tok[row];
      }
    // through the commit W' = W - tok_c (update): P1 = K dW1' + db1', P2 = X2 dW2' + db2'
    for (int64_t row = 0; row < c; row++) {
      std::copy(gb1, gb1 + h, P1.data() + row * h);
      std::copy(gb2, gb2 + f, P2.data() + row * f);
    }
    mm(P1.data(), K, gW1, c, f, h);
    mm(P2.data(), X2, gW2, c, h, f);
    T dtok_last = 0;
    for (int64_t row = 0; row < c; row++) {
      const T *p1 = P1.data() + row * h, *p2 = P2.data() + row * f, *g1 = G1 + row * h;
      const T *g2 = G2 + row * f;
      const T s1p = dot(g1, p1, h), s2p = dot(g2, p2, f);
      dtok_last -= a[row] * (s1p + s2p);            // -sum(aG1 P1) - sum(aG2 P2)
      dA_[row] -= tok_c * (s1p + s2p);              // da += sum(daG1 G1) + sum(daG2 G2), daG = -tok_c P
      axpy(dG1.data() + row * h, p1, -tok_c * a[row], h);  // dG1 += a daG1
      axpy(dG2.data() + row * f, p2, -tok_c * a[row], f);
    }
    dtok_j[c - 1] += dtok_last;
    for (int64_t row = 0; row < c; row++) {  // aG1, aG2 into P1, P2 (scratch)
      for (int64_t col = 0; col < h; col++) P1[row * h + col] = a[row] * G1[row * h + col];
      for (int64_t col = 0; col < f; col++) P2[row * f + col] = a[row] * G2[row * f + col];
    }
    mm_nt(dK, P1.data(), gW1, c, h, f, -tok_c);        // dk -= tok_c aG1 dW1'^T
    mm_nt(dX2.data(), P2.data(), gW2, c, f, h, -tok_c);  // dX2 -= tok_c aG2 dW2'^T
    // through G1 = P * s1, P = G2 W2^T
    for (int64_t x = 0; x < ch; x++) {
      dP[x] = dG1[x] * s1[x];
      ds1[x] = dG1[x] * P[x];
    }
    mm(dG2.data(), dP.data(), W2, c, h, f);             // dG2 += dP W2
    mm_tn(nW2.data(), dP.data(), G2, h, c, f);   // dW2 += dP^T G2
    // through G2 = LNgrad(Z2, t)
    T* dT = dt + row0 * f;
    for (int64_t row = 0; row < c; row++)
      ln_grad_vjp_row(s.zhat.data() + row * f, s.r[row], t + row * f, g, be, G2 + row * f, dG2.data() + row * f,
                      dZ2.data() + row * f, dT + row * f, dg, dbt, s.gx.data(), dgx.data(), dzh.data(), f);
    mm_nt(dX2.data(), dZ2.data(), W2, c, f, h);         // dX2 += dZ2 W2^T
    mm_tn(nW2.data(), X2, dZ2.data(), h, c, f);  // dW2 += X2^T dZ2
    for (int64_t row = 0; row < c; row++) axpy(nb2.data(), dZ2.data() + row * f, T(1), f);
    // through X2 = gelu(Z1), s1 = gelu'(Z1), Z1 = K W1 + b1
    for (int64_t x = 0; x < ch; x++) dZ1[x] = dX2[x] * s1[x] + ds1[x] * gelu_second(s.Z1[x]);
    mm_nt(dK, dZ1.data(), W1, c, h, f);                 // dk += dZ1 W1^T (t = V - K: autograd adds -dt)
    mm_tn(nW1.data(), K, dZ1.data(), f, c, h);          // dW1 += K^T dZ1
    for (int64_t row = 0; row < c; row++) axpy(nb1.data(), dZ1.data() + row * h, T(1), h);
    std::copy(nW1.begin(), nW1.end(), gW1);
    std::copy(nb1.begin(), nb1.end(), gb1);
    std::copy(nW2.begin(), nW2.end(), gW2);
    std::copy(nb2.begin(), nb2.end(), gb2);
  }
}

}  // namespace

// The inference entry points' first arguments, InferInputs' fields in order (cpu_scan.py's _infer_inputs): q, k, v
// and their (batch, head, token) strides; a and its strides (null: from x); x, its (batch, token) strides and d,
// theta, the gate's bias and a_scale; the RoPE tables cos, sin (null: q, k rotated already); u (null: q, k given),
// the convs' weights, biases and states, u's (batch, token) strides and the conv width.
#define INFER_INPUTS_ARGS(T)                                                                                   \
  const T *q, const T *k, const T *v, int64_t qkv_b, int64_t qkv_h, int64_t qkv_t, const T *ab, int64_t a_b,   \
      int64_t a_h, int64_t a_t, const T *x, int64_t x_b, int64_t x_t, int64_t d, const T *theta,             \
      const T *gate_bias, double a_scale, const T *cos, const T *sin, const T *u, const T *wq, const T *bq,   \
      const T *wk, const T *bk, const T *sq, const T *sk, int64_t u_b, int64_t u_t, int64_t kw
#define INFER_INPUTS(T)                                                                                        \
  InferInputs<T> {                                                                                             \
    q, k, v, Rows{qkv_b, qkv_h, qkv_t}, ab, Rows{a_b, a_h, a_t}, x, theta, gate_bias, x_b, x_t, d, T(a_scale), \
        cos, sin, u, wq, bq, wk, bk, sq, sk, u_b, u_t, kw                                                      \
  }

extern "C" {
#define TTT_SCAN_ENTRY_POINTS(T, suffix)                                                                         \
  void ttt_linear_scan_forward_##suffix(const T* kq, const T* tb, const T* ab, const T* Mb, const T* gam,        \
                                        const T* bet, double tok, T* Ws, T* bs, T* Gs, T* zhats, T* rs, T* zbar, \
                                        int64_t n, int64_t BH, int64_t c, int64_t f, int64_t threads) {          \
    const Dims d{n, BH, c, f};                                                                                   \
    parallel_jobs(BH, threads, [&](int64_t j) {                                                                  \
      forward_job<T>(kq, tb, ab, Mb, gam, bet, T(tok), Ws, bs, Gs, zhats, rs, zbar, d, j);                       \
    });                                                                                                          \
  }                                                                                                              \
  void ttt_linear_scan_backward_##suffix(const T* kq, const T* tb, const T* ab, const T* Mb, const T* gam,       \
                                         const T* bet, double tok, const T* Ws, const T* Gs, const T* zhats,     \
                                         const T* rs, const T* dzbar, T* dW, T* db, T* dkq, T* dtb, T* dab,      \
                                         T* dMb, T* dtok, T* dgam, T* dbet, int64_t n, int64_t BH, int64_t c,    \
                                         int64_t f, int64_t threads) {                                           \
    const Dims d{n, BH, c, f};                                                                                   \
    parallel_jobs(BH, threads, [&](int64_t j) {                                                                  \
      backward_job<T>(kq, tb, ab, Mb, gam, bet, T(tok), Ws, Gs, zhats, rs, dzbar, dW, db, dkq, dtb, dab, dMb,    \
                      dtok, dgam, dbet, d, j);                                                                   \
    });                                                                                                          \
  }                                                                                                              \
  void ttt_linear_scan_infer_##suffix(INFER_INPUTS_ARGS(T), const T* tok, const T* gam, const T* bet, T* W, T* b,  \
                                      T* out, int64_t out_b, int64_t out_h, int64_t out_t, int64_t n, int64_t BH, \
                                      int64_t H, int64_t c, int64_t f, int64_t threads) {                        \
    const InferInputs<T> src = INFER_INPUTS(T);                                                                  \
    const Rows outr{out_b, out_h, out_t};                                                                        \
    parallel_jobs(BH, threads, [&](int64_t j) { infer_job<T>(src, tok, gam, bet, W, b, out, outr, n, H, c, f, j); }); \
  }                                                                                                              \
  void ttt_linear_scan_decode_##suffix(const T* q, const T* k, const T* tb, const T* ab, const T* tok,           \
                                       double tok_last, const T* gam, const T* bet, const T* W, const T* b,      \
                                       const T* GW_in, const T* Gb_in, T* GW, T* Gb, T* W_out, T* b_out, T* out, \
                                       int64_t BH, int64_t H, int64_t c, int64_t f, int64_t threads) {           \
    parallel_jobs(BH, threads, [&](int64_t j) {                                                                  \
      decode_job<T>(q, k, tb, ab, tok, T(tok_last), gam, bet, W, b, GW_in, Gb_in, GW, Gb, W_out, b_out, out, c,  \
                    H, f, j);                                                                                    \
    });                                                                                                          \
  }                                                                                                              \
  void ttt_infer_gather_##suffix(INFER_INPUTS_ARGS(T), int64_t pos0, T* q_out, T* k_out, T* t_out, T* a_out,       \
                                 int64_t BH, int64_t H, int64_t c, int64_t f, int64_t threads) {                 \
    const InferInputs<T> src = INFER_INPUTS(T);                                                                  \
    parallel_jobs(BH, threads,                                                                                   \
                  [&](int64_t j) { gather_job<T>(src, pos0, q_out, k_out, t_out, a_out, H, c, f, j); });         \
  }                                                                                                              \
  void ttt_mlp_infer_##suffix(INFER_INPUTS_ARGS(T), const T* tok, const T* gam, const T* bet, T* W1, T* b1, T* W2, \
                              T* b2, T* out, int64_t out_b, int64_t out_h, int64_t out_t, int64_t n, int64_t BH,  \
                              int64_t H, int64_t c, int64_t f, int64_t threads) {                                \
    const InferInputs<T> src = INFER_INPUTS(T);                                                                  \
    const Rows outr{out_b, out_h, out_t};                                                                        \
    parallel_jobs(BH, threads, [&](int64_t j) {                                                                  \
      mlp_infer_job<T>(src, tok, gam, bet, W1, b1, W2, b2, out, outr, n, H, c, f, j);                            \
    });                                                                                                          \
  }                                                                                                              \
  void ttt_mlp_decode_##suffix(const T* q, const T* k, const T* tb, const T* ab, const T* tok, double tok_last,  \
                               const T* gam, const T* bet, T* W1, T* b1, T* W2, T* b2, T* A1, T* Ab1, T* A2,     \
                               T* Ab2, int64_t has_acc, int64_t commit, T* out, int64_t BH, int64_t H,           \
                               int64_t c, int64_t f, int64_t threads) {                                          \
    parallel_jobs(BH, threads, [&](int64_t j) {                                                                  \
      mlp_decode_job<T>(q, k, tb, ab, tok, T(tok_last), gam, bet, W1, b1, W2, b2, A1, Ab1, A2, Ab2, has_acc != 0, \
                        commit != 0, out, H, c, f, j);                                                           \
    });                                                                                                          \
  }                                                                                                              \
  void ttt_mlp_forward_##suffix(const T* q, const T* k, const T* tb, const T* ab, const T* tok, const T* gam,    \
                                const T* bet, T* W1s, T* b1s, T* W2s, T* b2s, T* zbar, int64_t n, int64_t BH,    \
                                int64_t H, int64_t c, int64_t f, int64_t threads) {                              \
    parallel_jobs(BH, threads, [&](int64_t j) {                                                                  \
      mlp_forward_job<T>(q, k, tb, ab, tok, gam, bet, W1s, b1s, W2s, b2s, zbar, n, H, c, f, j);                  \
    });                                                                                                          \
  }                                                                                                              \
  void ttt_mlp_backward_##suffix(const T* q, const T* k, const T* tb, const T* ab, const T* tok, const T* gam,   \
                                 const T* bet, const T* W1s, const T* b1s, const T* W2s, const T* b2s,           \
                                 const T* dzbar, T* dW1, T* db1, T* dW2, T* db2, T* dq, T* dk, T* dt, T* da,     \
                                 T* dtok, T* dgam, T* dbet, int64_t n, int64_t BH, int64_t H, int64_t c,         \
                                 int64_t f, int64_t threads) {                                                   \
    parallel_jobs(BH, threads, [&](int64_t j) {                                                                  \
      mlp_backward_job<T>(q, k, tb, ab, tok, gam, bet, W1s, b1s, W2s, b2s, dzbar, dW1, db1, dW2, db2, dq, dk, dt, \
                          da, dtok, dgam, dbet, n, H, c, f, j);                                                  \
    });                                                                                                          \
  }                                                                                                              \
  void ttt_output_##suffix(const T* z, const T* w, const T* b, const T* g, T* y, int64_t rows, int64_t d,        \
                           double eps, int64_t threads) {                                                        \
    parallel_jobs((rows + OUTPUT_ROWS - 1) / OUTPUT_ROWS, threads,                                               \
                  [&](int64_t job) { output_job<T>(z, w, b, g, y, rows, d, T(eps), job); });                     \
  }

#ifndef KERNEL_ONLY_F64  // cpp_kernels.py builds each dtype's entry points at once, as two objects
TTT_SCAN_ENTRY_POINTS(float, f32)
#endif
#ifndef KERNEL_ONLY_F32
TTT_SCAN_ENTRY_POINTS(double, f64)
#endif
}
