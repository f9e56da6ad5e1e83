// The causal depthwise convolution of layers.CausalConv on the CPU (backend=cpp of the layer that owns it;
// built and loaded by layers.py, which documents it). Per sequence b, token t, channel c, tap j (width k), with
// xp = [state, x] the k - 1 earlier inputs and the T new ones, (B, T + k - 1, C):
//   forward   y[t, c] = bias[c] + sum_j w[c, j] xp[t + j, c]
//   backward  dxp[s, c] = sum_j w[c, j] dy[s - j, c]   (terms with 0 <= s - j < T)
//             dw[c, j] = sum_{b, t} dy[t, c] xp[t + j, c]      dbias[c] = sum_{b, t} dy[t, c]
// One job is one sequence and one span of SPAN rows (of y forward, of xp backward): a single pass over its rows, the channels (contiguous in
// the (B, T, C) layout) innermost, so the loops vectorise. The weights come as the module holds them, (C, k); each
// job first copies them as (k, C) rows. The forward reads xp's k - 1 earlier rows from `state` (B, k - 1, C), or
// zeros where it is null, and the rest from x (B, T, C): no padded copy of x. dw and dbias sum over every sequence
// and token, so each job writes its own partial sums (jobs, k + 1, C) and the caller adds them (row k: dbias).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_jobs.h"
#include "rms.h"

namespace {

constexpr int64_t SPAN = 256;  // tokens per job

struct Conv {
  int64_t B, T, C, k;
  int64_t out_spans() const { return (T + SPAN - 1) / SPAN; }         // the forward's jobs: over the T rows of y
  int64_t in_spans() const { return (T + k - 1 + SPAN - 1) / SPAN; }  // the backward's: over the rows of xp
};

template <class T>
std::vector<T> taps_by_row(const T* w, const Conv& s) {  // w (C, k) -> (k, C)
  std::vector<T> rows(s.k * s.C);
  for (int64_t c = 0; c < s.C; c++)
    for (int64_t j = 0; j < s.k; j++) rows[j * s.C + c] = w[c * s.k + j];
  return rows;
}

template <class T>
void forward_job(const T* x, const T* state, const T* w_ck, const T* bias, T* y, const Conv& s, int64_t job) {
  const int64_t b = job / s.out_spans(), lo = (job % s.out_spans()) * SPAN, hi = std::min(lo + SPAN, s.T);
  const std::vector<T> w = taps_by_row(w_ck, s);
  const std::vector<T> zeros(state ? 0 : s.C, T(0));
  const T* xb = x + b * s.T * s.C;
  const T* sb = state ? state + b * (s.k - 1) * s.C : nullptr;
  T* yb = y + b * s.T * s.C;
  for (int64_t t = lo; t < hi; t++) {
    T* yt = yb + t * s.C;
    std::copy(bias, bias + s.C, yt);
    for (int64_t j = 0; j < s.k; j++) {
      const int64_t r = t + j - (s.k - 1);  // xp's row t + j is x's row r, or the state's row k - 1 + r
      const T* xr = r >= 0 ? xb + r * s.C : sb ? sb + (s.k - 1 + r) * s.C : zeros.data();
      const T* wj = w.data() + j * s.C;
#pragma omp simd
      for (int64_t c = 0; c < s.C; c++) yt[c] += wj[c] * xr[c];
    }
  }
}

template <class T>
void backward_job(const T* xp, const T* w_ck, const T* dy, T* dxp, T* dwb, const Conv& s, int64_t job) {
  const std::vector<T> w = taps_by_row(w_ck, s);
  const int64_t b = job / s.in_spans(), lo = (job % s.in_spans()) * SPAN, hi = std::min(lo + SPAN, s.T + s.k - 1);
  const T* xb = xp + b * (s.T + s.k - 1) * s.C;
  const T* gb = dy + b * s.T * s.C;
  T* dxb = dxp + b * (s.T + s.k - 1) * s.C;
  std::vector<T> acc((s.k + 1) * s.C, T(0));  // this job's dw (k rows) and dbias (row k)
  for (int64_t r = lo; r < hi; r++) {  // r: a row of xp for dxp, and a token t = r of dy for dw, dbias
    T* dr = dxb + r * s.C;
    std::fill(dr, dr + s.C, T(0));
    for (int64_t j = 0; j < s.k; j++) {
      const int64_t t = r - j;
      if (t < 0 || t >= s.T) continue;
      const T* gt = gb + t * s.C;
      const T* wj = w.data() + j * s.C;
#pragma omp simd
      for (int64_t c = 0; c < s.C; c++) dr[c] += wj[c] * gt[c];
    }
    if (r >= s.T) continue;
    const T* gt = gb + r * s.C;
    for (int64_t j = 0; j < s.k; j++) {
      const T* xr = xb + (r + j) * s.C;
      T* aj = acc.data() + j * s.C;
#pragma omp simd
      for (int64_t c = 0; c < s.C; c++) aj[c] += gt[c] * xr[c];
    }
    T* ab = acc.data() + s.k * s.C;
#pragma omp simd
    for (int64_t c = 0; c < s.C; c++) ab[c] += gt[c];
  }
  std::copy(acc.begin(), acc.end(), dwb + job * (s.k + 1) * s.C);
}

// The TTT block's pre-conv without a gradient (layers.conv_residual), its norms around it in the same pass:
//   n = RMSNorm(h) w_in,   h' = h + CausalConv(n),   x = RMSNorm(h') w_out
// h, h', x (B, T, C); the conv's k - 1 earlier inputs (rows of n) from `state` (B, k - 1, C), or zeros where null,
// and its new state (the last k - 1 rows of [state, n]) into state_out. A job is one sequence and SPAN rows; it
// normalises the k - 1 rows before its span again rather than wait for the job that owns them.
template <class T>
void residual_job(const T* h, const T* state, const T* w_in, const T* w_ck, const T* bias, const T* w_out, T* h_out,
                  T* x_out, T* state_out, const Conv& s, T eps, int64_t job) {
  const int64_t b = job / s.out_spans(), lo = (job % s.out_spans()) * SPAN, hi = std::min(lo + SPAN, s.T);
  const int64_t first = std::max<int64_t>(lo - (s.k - 1), 0), C = s.C;
  const std::vector<T> w = taps_by_row(w_ck, s);
  std::vector<T> n((hi - first) * C), zeros(C, T(0));  // n's rows first .. hi - 1
  const T* hb = h + b * s.T * C;
  for (int64_t r = first; r < hi; r++) {
    const T *hr = hb + r * C, scale = inverse_rms(hr, C, eps);
    T* nr = n.data() + (r - first) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) nr[c] = hr[c] * scale * w_in[c];
  }
  for (int64_t t = lo; t < hi; t++) {
    T *ho = h_out + (b * s.T + t) * C, *xo = x_out + (b * s.T + t) * C;
    std::copy(bias, bias + C, ho);
    for (int64_t j = 0; j < s.k; j++) {
      const int64_t r = t + j - (s.k - 1);  // n's row r, or the state's row k - 1 + r
      const T* nr = r >= 0      ? n.data() + (r - first) * C
                    : state     ? state + (b * (s.k - 1) + s.k - 1 + r) * C
                                : zeros.data();
      const T* wj = w.data() + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; c++) ho[c] += wj[c] * nr[c];
    }
    const T* hr = hb + t * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) ho[c] += hr[c];
    const T scale = inverse_rms(ho, C, eps);
#pragma omp simd
    for (int64_t c = 0; c < C; c++) xo[c] = ho[c] * scale * w_out[c];
  }
  if (hi < s.T) return;  // the last job writes the new state: the last k - 1 rows of [state, n]
  for (int64_t i = 0; i < s.k - 1; i++) {
    const int64_t r = s.T - (s.k - 1) + i;  // n's row r (r >= first here), or the old state's row k - 1 + r
    const T* src = r >= 0   ? n.data() + (r - first) * C
                   : state ? state + (b * (s.k - 1) + s.k - 1 + r) * C
                           : zeros.data();
    std::copy(src, src + C, state_out + (b * (s.k - 1) + i) * C);
  }
}

}  // namespace

extern "C" {
#ifndef KERNEL_ONLY_F64  // in one of cpp_kernels.py's two objects
int64_t causal_conv_span() { return SPAN; }
#endif

#define CAUSAL_CONV_ENTRY_POINTS(T, suffix)                                                                      \
  void causal_conv_forward_##suffix(const T* x, const T* state, const T* w, const T* bias, T* y, int64_t B,       \
                                    int64_t L, int64_t C, int64_t k, int64_t threads) {                          \
    const Conv s{B, L, C, k};                                                                                    \
    parallel_jobs(B * s.out_spans(), threads,                                                                    \
                  [&](int64_t job) { forward_job<T>(x, state, w, bias, y, s, job); });                           \
  }                                                                                                              \
  void causal_conv_backward_##suffix(const T* xp, const T* w, const T* dy, T* dxp, T* dwb, int64_t B, int64_t L, \
                                     int64_t C, int64_t k, int64_t threads) {                                    \
    const Conv s{B, L, C, k};                                                                                    \
    parallel_jobs(B * s.in_spans(), threads, [&](int64_t job) { backward_job<T>(xp, w, dy, dxp, dwb, s, job); }); \
  }

#define CONV_RESIDUAL_ENTRY_POINT(T, suffix)                                                                     \
  void conv_residual_forward_##suffix(const T* h, const T* state, const T* w_in, const T* w, const T* bias,      \
                                      const T* w_out, T* h_out, T* x_out, T* state_out, int64_t B, int64_t L,    \
                                      int64_t C, int64_t k, double eps, int64_t threads) {                       \
    const Conv s{B, L, C, k};                                                                                    \
    parallel_jobs(B * s.out_spans(), threads, [&](int64_t job) {                                                 \
      residual_job<T>(h, state, w_in, w, bias, w_out, h_out, x_out, state_out, s, T(eps), job);                  \
    });                                                                                                          \
  }

#ifndef KERNEL_ONLY_F64  // cpp_kernels.py builds each dtype's entry points at once, as two objects
CAUSAL_CONV_ENTRY_POINTS(float, f32)
CONV_RESIDUAL_ENTRY_POINT(float, f32)
#endif
#ifndef KERNEL_ONLY_F32
CAUSAL_CONV_ENTRY_POINTS(double, f64)
CONV_RESIDUAL_ENTRY_POINT(double, f64)
#endif
}
