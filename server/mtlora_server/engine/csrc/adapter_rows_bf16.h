// AVX-512 BF16 building blocks of adapter_rows.cpp (issue 15), split out to keep that file readable: the bf16
// shrink on dot products (4 weight rows x 4 input rows a pass, 16 sums by one transpose-and-add tree) and the
// expand on B row pairs (the kernel's layout 1) added straight into a bf16 output. Contract and math: the header
// of adapter_rows.cpp; these functions only exist in builds with __AVX512BF16__ (adapter_rows.cpp's BF16_DOT).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace mtlora_rows {

constexpr int64_t RB = 4;          // rows per block
constexpr int64_t CW = 32;         // columns per chunk of B (the arenas' layout; cpu_adapters.CHUNK)

}  // namespace mtlora_rows

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace mtlora_rows {

// A masked load of up to 32 bf16 values (zeros past n).
inline __m512bh load_bf16(const at::BFloat16* p, int64_t n) {
  const __mmask32 m = n >= 32 ? ~__mmask32(0) : ((__mmask32(1) << n) - 1);
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

// The sums of 16 vectors as one: lane i of the result is the sum of v[i]'s 16 lanes (a transpose-and-add tree:
// ~40 instructions where 16 separate horizontal sums take ~130).
inline __m512 sum16(const __m512* v) {
  __m512 q[4];
  for (int g = 0; g < 4; ++g) {           // q[g], 128-bit lane k: the lane-k partial sums of v[4g .. 4g+3]
    const __m512 a = v[4 * g], b = v[4 * g + 1], c = v[4 * g + 2], d = v[4 * g + 3];
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    q[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  }
  const __m512 q01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], 0x44), _mm512_shuffle_f32x4(q[0], q[1], 0xEE));
  const __m512 q23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], 0x44), _mm512_shuffle_f32x4(q[2], q[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(q01, q23, 0x88), _mm512_shuffle_f32x4(q01, q23, 0xDD));
}

// shrink's hz for bf16 weights and bf16 input rows xr[b], with AVX-512 BF16 dot products (32 pairs a
// instruction): 4 weight rows x 4 input rows at a time, 16 accumulators.
inline void shrink_bf16(const at::BFloat16* W, int64_t rows, const at::BFloat16* const* xr, int64_t nb, int64_t d_in,
                 float* hz, int64_t hz_stride) {
  int64_t k = 0;
  if (nb == RB) {
    for (; k + 4 <= rows; k += 4) {
      __m512 acc[4][RB];
      for (auto& a : acc)
        for (auto& v : a) v = _mm512_setzero_ps();
      for (int64_t i = 0; i < d_in; i += 32) {
        __m512bh xv[RB], wv[4];
        for (int64_t b = 0; b < RB; ++b) xv[b] = load_bf16(xr[b] + i, d_in - i);
        for (int64_t q = 0; q < 4; ++q) wv[q] = load_bf16(W + (k + q) * d_in + i, d_in - i);
        for (int64_t q = 0; q < 4; ++q)
          for (int64_t b = 0; b < RB; ++b) acc[q][b] = _mm512_dpbf16_ps(acc[q][b], wv[q], xv[b]);
      }
      __m512 v[16];                                   // v[4b + q]: row b's dot product with weight row k + q
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t b = 0; b < RB; ++b) v[4 * b + q] = acc[q][b];
      const __m512 sums = sum16(v);
      _mm_storeu_ps(hz + k, _mm512_extractf32x4_ps(sums, 0));
      _mm_storeu_ps(hz + hz_stride + k, _mm512_extractf32x4_ps(sums, 1));
      _mm_storeu_ps(hz + 2 * hz_stride + k, _mm512_extractf32x4_ps(sums, 2));
      _mm_storeu_ps(hz + 3 * hz_stride + k, _mm512_extractf32x4_ps(sums, 3));
    }
  }
  for (; k < rows; ++k) {
    const at::BFloat16* w = W + k * d_in;
    for (int64_t b = 0; b < nb; ++b) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t i = 0; i < d_in; i += 32)
        a = _mm512_dpbf16_ps(a, load_bf16(w + i, d_in - i), load_bf16(xr[b] + i, d_in - i));
      hz[b * hz_stride + k] = _mm512_reduce_add_ps(a);
    }
  }
}

// lp[p] = the bf16 pair (lhs[2p], lhs[2p+1]) as one 32-bit word (low half first; lhs[Nr] = 0 when Nr is odd): the
// routed input rounded to bf16 once, as the torch path's bf16 matmul rounds it -- i.e. lhs as a bf16 array,
// converted 16 at a time (vcvtneps2bf16: round to nearest even like c10::BFloat16, but denormals, |x| < 1.2e-38,
// become zero). The bf16 output add below converts the same way.
inline void lhs_pairs(const float* lhs, int64_t Nr, uint32_t* lp) {
  int64_t q = 0;
  auto* out = reinterpret_cast<uint16_t*>(lp);
  for (; q + 16 <= Nr; q += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lhs + q)));
  for (; q < Nr; ++q) out[q] = c10::BFloat16(lhs[q]).x;
  if (Nr % 2) out[Nr] = 0;
}

// The expand on B row pairs (layout 1, file header) with AVX-512 BF16 dot products, added straight into a bf16
// output: per chunk of CW columns, two 16-column accumulators per row, each instruction adding two rows of B (one
// pair) times the row's lhs pair; then out[b][c0 + c] = bf16(float(out) + acc). The groups of a site own disjoint
// columns, so nothing else adds into them: no fp32 delta to zero and add back. (Layout 1 implies bf16 x, hence
// bf16 outputs: the arenas are float32 or x's dtype.)
inline __m512 load_bf16_as_f32(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

template <int64_t NB>
void expand_pairs(const at::BFloat16* Bj, int64_t Np, int64_t dg, const uint32_t* lp, int64_t lp_stride,
                  uint16_t* out, int64_t out_stride) {
  for (int64_t c0 = 0; c0 < dg; c0 += CW) {
    const int64_t w = std::min(CW, dg - c0);
    const at::BFloat16* chunk = Bj + c0 * 2 * Np;                 // [Np, w, 2]
    const int64_t n0 = std::min<int64_t>(32, 2 * w), n1 = 2 * w - n0;
    const __mmask32 m0 = n0 >= 32 ? ~__mmask32(0) : ((__mmask32(1) << n0) - 1);
    const __mmask32 m1 = n1 >= 32 ? ~__mmask32(0) : ((__mmask32(1) << n1) - 1);
    __m512 acc[NB][2];
    for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < Np; ++p) {
      const at::BFloat16* row = chunk + p * 2 * w;
      const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi16(m0, row);
      const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi16(m1, row + 32);
      for (int64_t b = 0; b < NB; ++b) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(lp[b * lp_stride + p]));
        acc[b][0] = _mm512_dpbf16_ps(acc[b][0], b0, a);
        acc[b][1] = _mm512_dpbf16_ps(acc[b][1], b1, a);
      }
    }
    const int64_t w0 = std::min<int64_t>(16, w), w1 = w - w0;
    const __mmask16 k0 = static_cast<__mmask16>((1u << w0) - 1), k1 = static_cast<__mmask16>((1u << w1) - 1);
    for (int64_t b = 0; b < NB; ++b) {
      uint16_t* dst = out + b * out_stride + c0;
      const __m512 v0 = _mm512_add_ps(load_bf16_as_f32(dst, k0), acc[b][0]);
      _mm256_mask_storeu_epi16(dst, k0, (__m256i)_mm512_cvtneps_pbh(v0));
      if (w1 > 0) {
        const __m512 v1 = _mm512_add_ps(load_bf16_as_f32(dst + 16, k1), acc[b][1]);
        _mm256_mask_storeu_epi16(dst + 16, k1, (__m256i)_mm512_cvtneps_pbh(v1));
      }
    }
  }
}

}  // namespace mtlora_rows

#endif
