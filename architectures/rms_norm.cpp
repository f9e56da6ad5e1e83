// RMSNorm's forward on the CPU for inference (layers.RMSNorm with `cpp` set, without a gradient; built and loaded by
// layers.py, which documents it). Per row r of x (rows, d):
//   y[r, c] = x[r, c] / sqrt(mean_c x[r, c]^2 + eps) * w[c]
// one pass over a row for its sum of squares, one to write it; a job is ROWS rows.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel_jobs.h"

namespace {

constexpr int64_t ROWS = 256;  // rows per job

template <class T>
void rows_job(const T* x, const T* w, T* y, int64_t rows, int64_t d, T eps, int64_t job) {
  const int64_t lo = job * ROWS, hi = std::min(lo + ROWS, rows);
  for (int64_t r = lo; r < hi; r++) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < d; c++) ss += xr[c] * xr[c];
    const T scale = T(1) / std::sqrt(ss / T(d) + eps);
#pragma omp simd
    for (int64_t c = 0; c < d; c++) yr[c] = xr[c] * scale * w[c];
  }
}

}  // namespace

extern "C" {
#define RMS_NORM_ENTRY_POINTS(T, suffix)                                                                         \
  void rms_norm_forward_##suffix(const T* x, const T* w, T* y, int64_t rows, int64_t d, double eps,              \
                                 int64_t threads) {                                                              \
    parallel_jobs((rows + ROWS - 1) / ROWS, threads,                                                             \
                  [&](int64_t job) { rows_job<T>(x, w, y, rows, d, T(eps), job); });                             \
  }

#ifndef KERNEL_ONLY_F64  // cpp_kernels.py builds each dtype's entry points at once, as two objects
RMS_NORM_ENTRY_POINTS(float, f32)
#endif
#ifndef KERNEL_ONLY_F32
RMS_NORM_ENTRY_POINTS(double, f64)
#endif
}
