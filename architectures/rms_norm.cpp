// RMSNorm on the CPU (layers.RMSNorm with `cpp` set; built and loaded by layers.py, which documents it). Per row r
// of x (rows, d), with s = 1 / sqrt(mean_c x[r, c]^2 + eps):
//   forward   y[r, c] = x[r, c] s w[c]
//   backward  g = dy[r] * w,  dx[r, c] = s g[c] - x[r, c] s^3 mean_c(g x[r])      dw[c] = sum_r dy[r, c] x[r, c] s
// one pass over a row for its sum of squares, one to write it (the backward: one more for mean(g x)); a job is ROWS
// rows. dw sums over every row, so each backward job writes its own partial sums (jobs, d) and the caller adds them.
// With a residual add first (inference): h = a + b, y = RMSNorm(h) w, both written.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel_jobs.h"
#include "rms.h"

namespace {

constexpr int64_t ROWS = 256;  // rows per job

template <class T>
void rows_job(const T* x, const T* w, T* y, int64_t rows, int64_t d, T eps, int64_t job) {
  const int64_t lo = job * ROWS, hi = std::min(lo + ROWS, rows);
  for (int64_t r = lo; r < hi; r++) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    const T scale = inverse_rms(xr, d, eps);
#pragma omp simd
    for (int64_t c = 0; c < d; c++) yr[c] = xr[c] * scale * w[c];
  }
}

template <class T>
void backward_job(const T* x, const T* w, const T* dy, T* dx, T* dw_partial, int64_t rows, int64_t d, T eps,
                  int64_t job) {
  const int64_t lo = job * ROWS, hi = std::min(lo + ROWS, rows);
  T* dw = dw_partial + job * d;
  std::fill(dw, dw + d, T(0));
  for (int64_t r = lo; r < hi; r++) {
    const T *xr = x + r * d, *gr = dy + r * d;
    T* dxr = dx + r * d;
    const T s = inverse_rms(xr, d, eps);
    T gx = 0;  // sum_c g[c] x[c], g = dy w
#pragma omp simd reduction(+ : gx)
    for (int64_t c = 0; c < d; c++) gx += gr[c] * w[c] * xr[c];
    const T k = s * s * s * gx / T(d);
#pragma omp simd
    for (int64_t c = 0; c < d; c++) {
      dxr[c] = s * gr[c] * w[c] - xr[c] * k;
      dw[c] += gr[c] * xr[c] * s;
    }
  }
}

// A residual add and the norm after it, without a gradient (layers.add_rms_norm): h = a + b, y = RMSNorm(h) w
template <class T>
void residual_rows_job(const T* a, const T* b, const T* w, T* h, T* y, int64_t rows, int64_t d, T eps, int64_t job) {
  const int64_t lo = job * ROWS, hi = std::min(lo + ROWS, rows);
  for (int64_t r = lo; r < hi; r++) {
    const T *ar = a + r * d, *br = b + r * d;
    T *hr = h + r * d, *yr = y + r * d;
#pragma omp simd
    for (int64_t c = 0; c < d; c++) hr[c] = ar[c] + br[c];
    const T scale = inverse_rms(hr, d, eps);
#pragma omp simd
    for (int64_t c = 0; c < d; c++) yr[c] = hr[c] * scale * w[c];
  }
}

}  // namespace

extern "C" {
#ifndef KERNEL_ONLY_F64  // in one of cpp_kernels.py's two objects
int64_t rms_norm_rows_per_job() { return ROWS; }
#endif

#define RMS_NORM_ENTRY_POINTS(T, suffix)                                                                         \
  void rms_norm_forward_##suffix(const T* x, const T* w, T* y, int64_t rows, int64_t d, double eps,              \
                                 int64_t threads) {                                                              \
    parallel_jobs((rows + ROWS - 1) / ROWS, threads,                                                             \
                  [&](int64_t job) { rows_job<T>(x, w, y, rows, d, T(eps), job); });                             \
  }                                                                                                              \
  void rms_norm_backward_##suffix(const T* x, const T* w, const T* dy, T* dx, T* dw_partial, int64_t rows,         \
                                  int64_t d, double eps, int64_t threads) {                                      \
    parallel_jobs((rows + ROWS - 1) / ROWS, threads,                                                             \
                  [&](int64_t job) { backward_job<T>(x, w, dy, dx, dw_partial, rows, d, T(eps), job); });        \
  }                                                                                                              \
  void rms_norm_residual_forward_##suffix(const T* a, const T* b, const T* w, T* h, T* y, int64_t rows, int64_t d, \
                                          double eps, int64_t threads) {                                         \
    parallel_jobs((rows + ROWS - 1) / ROWS, threads,                                                             \
                  [&](int64_t job) { residual_rows_job<T>(a, b, w, h, y, rows, d, T(eps), job); });              \
  }

#ifndef KERNEL_ONLY_F64  // cpp_kernels.py builds each dtype's entry points at once, as two objects
RMS_NORM_ENTRY_POINTS(float, f32)
#endif
#ifndef KERNEL_ONLY_F32
RMS_NORM_ENTRY_POINTS(double, f64)
#endif
}
