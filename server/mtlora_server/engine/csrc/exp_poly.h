// exp_poly: a vectorisable fp32 exp shared by the CPU kernels (fused_rows.cpp: silu; paged_decode_attention.cpp:
// softmax). Header-only; cpu_ext.CpuExtension hashes every header in this folder into each build name, so editing
// it rebuilds the kernels that include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// exp(x) for x in fp32, vectorisable inside `omp simd` loops (std::exp is not without -ffast-math): Cody-Waite
// range reduction x = n ln2 + r, a degree-6 polynomial for e^r on |r| <= ln2/2, scaled by 2^n through the
// exponent bits. Within ~2 ulp of expf over the float range; saturates to 0 / inf past it.
#pragma omp declare simd
static inline float exp_poly(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
