// Mamba-1's selective scan and Mamba-2's SSM on the CPU (backend=cpp; built and loaded by cpu_scan.py, which
// documents it). Mamba-2's is at the end of the file.
//
// Per sequence b, channel d, state n, token t (scan.py's recurrence; A^T is (N, D)):
//   forward   h_t = exp(delta_t A) h_{t-1} + B_t x_t          y_t = sum_n C_t[n] h_t[n]
//   backward  g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}      (g_{L-1} starts from C dy + dlast)
//             dx_t = sum_n g_t B_t     dB_t = sum_d g_t x_t     dC_t = sum_d dy_t h_t
//             dlog_t = g_t exp(delta_t A) h_{t-1}:  d(delta_t) = sum_n dlog_t A,  dA^T = sum_t dlog_t delta_t
//             dh0 = exp(delta_0 A) g_0
// One job is one sequence and one tile of TILE channels: it walks the sequence once with its N x TILE state
// in cache; the inner loops run over the tile's channels (contiguous: vectorised). The forward saves the state
// every SEG tokens; the backward walks the segments last first, recomputing each segment's states and decays
// into a small buffer (it stays in L2) before the reverse pass over it. dB and dC sum over all channels, so
// each tile writes its own partial sums (B, tiles, L, N) and the caller adds them; likewise dA^T per sequence.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_jobs.h"

namespace {

constexpr int64_t TILE = 32;  // channels per job
constexpr int64_t SEG = 64;   // tokens between saved states

struct Shape {
  int64_t batch, L, D, N;
  int64_t tiles() const { return (D + TILE - 1) / TILE; }
  int64_t segments() const { return (L + SEG - 1) / SEG; }
};

// One tile's view of a (rows, D) array: row r, the tile's channels [d0, d0 + width), zero beyond width.
template <typename T>
struct Tile {
  int64_t d0, width, D;
  void load(const T* src, int64_t row, T* dst) const {
    for (int64_t d = 0; d < TILE; d++) dst[d] = d < width ? src[row * D + d0 + d] : T(0);
  }
  void store(const T* src, T* dst, int64_t row) const {
    for (int64_t d = 0; d < width; d++) dst[row * D + d0 + d] = src[d];
  }
  // a (N, D) array <-> an (N, TILE) block
  void load_state(const T* src, T* dst, int64_t N) const {
    for (int64_t n = 0; n < N; n++) load(src, n, dst + n * TILE);
  }
  void store_state(const T* src, T* dst, int64_t N) const {
    for (int64_t n = 0; n < N; n++) store(src + n * TILE, dst, n);
  }
};

// Pointers of one sequence b.
template <typename T>
struct Seq {
  const T *x, *dl, *Bm, *Cm;
  Seq(const T* x, const T* dl, const T* Bm, const T* Cm, const Shape& s, int64_t b)
      : x(x + b * s.L * s.D), dl(dl + b * s.L * s.D), Bm(Bm + b * s.L * s.N), Cm(Cm + b * s.L * s.N) {}
};

// One token over the tile: h <- exp(delta_t A) h + B_t x_t, h and A (N, TILE). The forward reads out
// y = sum_n C_t h (kReadout); the backward's recomputation keeps the decays in a (N, TILE) instead.
template <typename T, bool kReadout>
inline void step(T* h, T* a, const T* A, const T* xv, const T* dv, const T* b, const T* c, T* y, int64_t N) {
  if (kReadout)
    for (int64_t d = 0; d < TILE; d++) y[d] = 0;
  for (int64_t n = 0; n < N; n++) {
    const T bn = b[n], cn = kReadout ? c[n] : T(0);
    T* hn = h + n * TILE;
    const T* An = A + n * TILE;
#pragma omp simd
    for (int64_t d = 0; d < TILE; d++) {
      const T an = std::exp(dv[d] * An[d]);
      hn[d] = an * hn[d] + bn * xv[d];
      if (kReadout)
        y[d] += cn * hn[d];
      else
        a[n * TILE + d] = an;
    }
  }
}

template <typename T>
void forward_tile(const Seq<T>& q, const T* At, const T* h0, T* y, T* last, T* ckpt, const Shape& s, const Tile<T>& tl) {
  const int64_t N = s.N;
  std::vector<T> h(N * TILE, T(0)), A(N * TILE);
  tl.load_state(At, A.data(), N);
  if (h0) tl.load_state(h0, h.data(), N);
  T xv[TILE], dv[TILE], yv[TILE];
  for (int64_t t = 0; t < s.L; t++) {
    if (ckpt && t % SEG == 0) tl.store_state(h.data(), ckpt + (t / SEG) * N * s.D, N);
    tl.load(q.x, t, xv);
    tl.load(q.dl, t, dv);
    step<T, true>(h.data(), nullptr, A.data(), xv, dv, q.Bm + t * N, q.Cm + t * N, yv, N);
    tl.store(yv, y, t);
  }
  tl.store_state(h.data(), last, N);
}

template <typename T>
void backward_tile(const Seq<T>& q, const T* At, const T* ckpt, const T* dy, const T* dlast, T* dx, T* ddl,
                   T* dA, T* dB, T* dC, T* dh0, const Shape& s, const Tile<T>& tl) {
  const int64_t N = s.N, NT = N * TILE;
  std::vector<T> G(NT, T(0)), A(NT), dAt(NT, T(0));  // G: exp(delta_{t+1} A) g_{t+1}
  std::vector<T> hs((SEG + 1) * NT), as(SEG * NT);    // a segment's states h_{t-1}, h_t, ... and decays
  tl.load_state(At, A.data(), N);
  if (dlast) tl.load_state(dlast, G.data(), N);
  T xv[TILE], dv[TILE], dyv[TILE], dxv[TILE], ddv[TILE];
  for (int64_t sg = s.segments() - 1; sg >= 0; sg--) {
    const int64_t t0 = sg * SEG, t1 = std::min(s.L, t0 + SEG);
    tl.load_state(ckpt + sg * N * s.D, hs.data(), N);
    for (int64_t t = t0; t < t1; t++) {  // recompute the segment
      const int64_t k = t - t0;
      std::copy(hs.begin() + k * NT, hs.begin() + (k + 1) * NT, hs.begin() + (k + 1) * NT);
      tl.load(q.x, t, xv);
      tl.load(q.dl, t, dv);
      step<T, false>(hs.data() + (k + 1) * NT, as.data() + k * NT, A.data(), xv, dv, q.Bm + t * N, nullptr,
                     nullptr, N);
    }
    for (int64_t t = t1 - 1; t >= t0; t--) {  // the adjoint, last token first
      const int64_t k = t - t0;
      const T *h_prev = hs.data() + k * NT, *h_t = hs.data() + (k + 1) * NT, *a_t = as.data() + k * NT;
      tl.load(q.x, t, xv);
      tl.load(q.dl, t, dv);
      tl.load(dy, t, dyv);
      for (int64_t d = 0; d < TILE; d++) dxv[d] = ddv[d] = 0;
      for (int64_t n = 0; n < N; n++) {
        const T bn = q.Bm[t * N + n], cn = q.Cm[t * N + n];
        T* Gn = G.data() + n * TILE;
        T* dAn = dAt.data() + n * TILE;
        const T *An = A.data() + n * TILE, *hp = h_prev + n * TILE, *ht = h_t + n * TILE, *an = a_t + n * TILE;
        T sb = 0, sc = 0;
#pragma omp simd reduction(+ : sb, sc)
        for (int64_t d = 0; d < TILE; d++) {
          const T g = Gn[d] + cn * dyv[d];
          dxv[d] += g * bn;
          sb += g * xv[d];
          sc += dyv[d] * ht[d];
          const T ga = g * an[d];
          const T dlog = ga * hp[d];
          ddv[d] += dlog * An[d];
          dAn[d] += dlog * dv[d];
          Gn[d] = ga;
        }
        dB[t * N + n] = sb;
        dC[t * N + n] = sc;
      }
      tl.store(dxv, dx, t);
      tl.store(ddv, ddl, t);
    }
  }
  tl.store_state(dAt.data(), dA, N);
  tl.store_state(G.data(), dh0, N);
}

template <typename T>
void forward(const T* x, const T* dl, const T* At, const T* Bm, const T* Cm, const T* h0, T* y, T* last, T* ckpt,
             Shape s, int64_t threads) {
  parallel_jobs(s.batch * s.tiles(), threads, [&](int64_t job) {
    const int64_t b = job / s.tiles(), d0 = (job % s.tiles()) * TILE;
    const Tile<T> tl{d0, std::min(TILE, s.D - d0), s.D};
    forward_tile(Seq<T>(x, dl, Bm, Cm, s, b), At, h0 ? h0 + b * s.N * s.D : nullptr, y + b * s.L * s.D,
                 last + b * s.N * s.D, ckpt ? ckpt + b * s.segments() * s.N * s.D : nullptr, s, tl);
  });
}

template <typename T>
void backward(const T* x, const T* dl, const T* At, const T* Bm, const T* Cm, const T* ckpt, const T* dy,
              const T* dlast, T* dx, T* ddl, T* dA, T* dB, T* dC, T* dh0, Shape s, int64_t threads) {
  parallel_jobs(s.batch * s.tiles(), threads, [&](int64_t job) {
    const int64_t b = job / s.tiles(), tile = job % s.tiles(), d0 = tile * TILE;
    const Tile<T> tl{d0, std::min(TILE, s.D - d0), s.D};
    const int64_t LD = s.L * s.D, ND = s.N * s.D, part = (b * s.tiles() + tile) * s.L * s.N;
    backward_tile(Seq<T>(x, dl, Bm, Cm, s, b), At, ckpt + b * s.segments() * ND, dy + b * LD,
                  dlast ? dlast + b * ND : nullptr, dx + b * LD, ddl + b * LD, dA + b * ND, dB + part, dC + part,
                  dh0 + b * ND, s, tl);
  });
}

// Mamba-2's SSM (ssd.py's recurrence: one decay per token and head), one job per sequence and head with its (P, N)
// state in cache, the inner loops over the N states (contiguous: vectorised). x is already times dt; heads share
// B and C within a group (g = h / (H / G)):
//   forward   S_t = exp(a_t) S_{t-1} + x_t B_t^T          y_t = S_t C_t
//   backward  dS_t = dy_t C_t^T + exp(a_{t+1}) dS_{t+1}   (from dlast)
//             dx_t = dS_t B_t   dB_t = dS_t^T x_t   dC_t = S_t^T dy_t   da_t = exp(a_t) <dS_t, S_{t-1}>   dh0 = dS_0
// The forward saves the state every SEG tokens; the backward recomputes one segment's states at a time. dB and dC
// are per head (B, L, H, N): the caller sums the heads of a group.
struct Ssd {
  int64_t batch, L, H, P, G, N;
  int64_t segments() const { return (L + SEG - 1) / SEG; }
  int64_t row(int64_t b, int64_t t, int64_t h) const { return (b * L + t) * H + h; }  // (B, L, H) index
  int64_t group_row(int64_t b, int64_t t, int64_t h) const { return (b * L + t) * G + h / (H / G); }
};

// S <- exp(a) S + x B^T over the (P, N) state; with C, also y = S C
template <typename T>
inline void ssd_token(T* S, const T* x, T dec, const T* B, const T* C, T* y, int64_t P, int64_t N) {
  for (int64_t p = 0; p < P; p++) {
    T* Sp = S + p * N;
    const T xp = x[p];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; n++) {
      Sp[n] = dec * Sp[n] + xp * B[n];
      if (C) acc += Sp[n] * C[n];
    }
    if (y) y[p] = acc;
  }
}

template <typename T>
void ssd_forward_job(const T* x, const T* a, const T* Bm, const T* Cm, const T* h0, T* y, T* last, T* ckpt,
                     const Ssd& s, int64_t job) {
  const int64_t b = job / s.H, h = job % s.H, PN = s.P * s.N;
  std::vector<T> S(PN, T(0));
  if (h0) std::copy(h0 + job * PN, h0 + (job + 1) * PN, S.data());
  for (int64_t t = 0; t < s.L; t++) {
    if (ckpt && t % SEG == 0) std::copy(S.begin(), S.end(), ckpt + (job * s.segments() + t / SEG) * PN);
    const int64_t r = s.row(b, t, h), gr = s.group_row(b, t, h);
    ssd_token(S.data(), x + r * s.P, T(std::exp(a[r])), Bm + gr * s.N, Cm + gr * s.N, y + r * s.P, s.P, s.N);
  }
  std::copy(S.begin(), S.end(), last + job * PN);
}

template <typename T>
void ssd_backward_job(const T* x, const T* a, const T* Bm, const T* Cm, const T* ckpt, const T* dy, const T* dlast,
                      T* dx, T* da, T* dB, T* dC, T* dh0, const Ssd& s, int64_t job) {
  const int64_t b = job / s.H, h = job % s.H, P = s.P, N = s.N, PN = P * N;
  std::vector<T> dS(PN, T(0)), states((SEG + 1) * PN);  // states[k]: the state before token t0 + k
  if (dlast) std::copy(dlast + job * PN, dlast + (job + 1) * PN, dS.data());
  for (int64_t seg = s.segments() - 1; seg >= 0; seg--) {
    const int64_t t0 = seg * SEG, len = std::min(SEG, s.L - t0);
    std::copy(ckpt + (job * s.segments() + seg) * PN, ckpt + (job * s.segments() + seg + 1) * PN, states.data());
    for (int64_t k = 0; k < len; k++) {  // the segment's states, again
      const int64_t r = s.row(b, t0 + k, h), gr = s.group_row(b, t0 + k, h);
      std::copy(states.data() + k * PN, states.data() + (k + 1) * PN, states.data() + (k + 1) * PN);
      ssd_token<T>(states.data() + (k + 1) * PN, x + r * P, T(std::exp(a[r])), Bm + gr * N, nullptr, nullptr, P, N);
    }
    for (int64_t k = len - 1; k >= 0; k--) {
      const int64_t r = s.row(b, t0 + k, h), gr = s.group_row(b, t0 + k, h);
      const T *St = states.data() + (k + 1) * PN, *Sprev = states.data() + k * PN;
      const T *xt = x + r * P, *dyt = dy + r * P, *Bt = Bm + gr * N, *Ct = Cm + gr * N, dec = T(std::exp(a[r]));
      T *dBt = dB + r * N, *dCt = dC + r * N, *dxt = dx + r * P;
      std::fill(dBt, dBt + N, T(0));
      std::fill(dCt, dCt + N, T(0));
      T dlog = 0;
      for (int64_t p = 0; p < P; p++) {
        T* dSp = dS.data() + p * N;
        const T *Sp = St + p * N, *Sq = Sprev + p * N, g = dyt[p], xp = xt[p];
        T dxp = 0, dl = 0;
#pragma omp simd reduction(+ : dxp, dl)
        for (int64_t n = 0; n < N; n++) {
          dSp[n] += g * Ct[n];   // + dy_t C_t^T
          dCt[n] += g * Sp[n];   // S_t^T dy_t
          dBt[n] += xp * dSp[n];  // dS_t^T x_t
          dxp += dSp[n] * Bt[n];
          dl += dSp[n] * Sq[n];
          dSp[n] *= dec;  // the gradient of S_{t-1} through S_t
        }
        dxt[p] = dxp;
        dlog += dl;
      }
      da[r] = dec * dlog;
    }
  }
  std::copy(dS.begin(), dS.end(), dh0 + job * PN);
}

}  // namespace

extern "C" {
#ifndef KERNEL_ONLY_F64  // in one of cpp_kernels.py's two objects
int64_t mamba_scan_tile() { return TILE; }
int64_t mamba_scan_segment() { return SEG; }
#endif

#define MAMBA_SCAN_ENTRY_POINTS(T, suffix)                                                                       \
  void mamba_scan_forward_##suffix(const T* x, const T* dl, const T* At, const T* Bm, const T* Cm, const T* h0,   \
                                   T* y, T* last, T* ckpt, int64_t batch, int64_t L, int64_t D, int64_t N,        \
                                   int64_t threads) {                                                             \
    forward<T>(x, dl, At, Bm, Cm, h0, y, last, ckpt, Shape{batch, L, D, N}, threads);                           \
  }                                                                                                              \
  void mamba_scan_backward_##suffix(const T* x, const T* dl, const T* At, const T* Bm, const T* Cm,              \
                                    const T* ckpt, const T* dy, const T* dlast, T* dx, T* ddl, T* dA, T* dB,    \
                                    T* dC, T* dh0, int64_t batch, int64_t L, int64_t D, int64_t N,               \
                                    int64_t threads) {                                                            \
    backward<T>(x, dl, At, Bm, Cm, ckpt, dy, dlast, dx, ddl, dA, dB, dC, dh0, Shape{batch, L, D, N}, threads);  \
  }

#define SSD_SCAN_ENTRY_POINTS(T, suffix)                                                                         \
  void ssd_scan_forward_##suffix(const T* x, const T* a, const T* Bm, const T* Cm, const T* h0, T* y, T* last,    \
                                 T* ckpt, int64_t batch, int64_t L, int64_t H, int64_t P, int64_t G, int64_t N,   \
                                 int64_t threads) {                                                               \
    const Ssd s{batch, L, H, P, G, N};                                                                           \
    parallel_jobs(batch * H, threads,                                                                            \
                  [&](int64_t job) { ssd_forward_job<T>(x, a, Bm, Cm, h0, y, last, ckpt, s, job); });            \
  }                                                                                                              \
  void ssd_scan_backward_##suffix(const T* x, const T* a, const T* Bm, const T* Cm, const T* ckpt, const T* dy,   \
                                  const T* dlast, T* dx, T* da, T* dB, T* dC, T* dh0, int64_t batch, int64_t L,  \
                                  int64_t H, int64_t P, int64_t G, int64_t N, int64_t threads) {                 \
    const Ssd s{batch, L, H, P, G, N};                                                                           \
    parallel_jobs(batch * H, threads, [&](int64_t job) {                                                         \
      ssd_backward_job<T>(x, a, Bm, Cm, ckpt, dy, dlast, dx, da, dB, dC, dh0, s, job);                           \
    });                                                                                                          \
  }

#ifndef KERNEL_ONLY_F64  // cpp_kernels.py builds each dtype's entry points at once, as two objects
MAMBA_SCAN_ENTRY_POINTS(float, f32)
SSD_SCAN_ENTRY_POINTS(float, f32)
#endif
#ifndef KERNEL_ONLY_F32
MAMBA_SCAN_ENTRY_POINTS(double, f64)
SSD_SCAN_ENTRY_POINTS(double, f64)
#endif
}
