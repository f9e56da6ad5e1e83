// Shared by the C++ CPU kernels that normalise rows (rms_norm.cpp, causal_conv.cpp's conv_residual_forward;
// cpp_kernels.py builds them with -I architectures/).
#pragma once
#include <cmath>
#include <cstdint>

// 1 / sqrt(mean_c x[c]^2 + eps) over a row of C entries: RMSNorm's scale (layers.RMSNorm)
template <class T>
T inverse_rms(const T* x, int64_t C, T eps) {
  T ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < C; c++) ss += x[c] * x[c];
  return T(1) / std::sqrt(ss / T(C) + eps);
}
