// Mamba-1's selective scan on the CPU (backend=cpp; built and loaded by cpu_scan.py, which documents it).
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

}  // namespace

extern "C" {
int64_t mamba_scan_tile() { return TILE; }
int64_t mamba_scan_segment() { return SEG; }

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

MAMBA_SCAN_ENTRY_POINTS(float, f32)
MAMBA_SCAN_ENTRY_POINTS(double, f64)
}
