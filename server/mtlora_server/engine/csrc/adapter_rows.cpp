// Adapter deltas of decode-sized slots in one call per site group (issue 15): every slot with a few rows in the
// step (the decode case), all the sites that read one input, shrink + router softmax + routed expand + the add
// into each site's output, without the ~5 small torch ops per slot and site that cost more in fixed overhead than
// in arithmetic.
//
// Contract (the Python side: mtlora_server/engine/cpu_adapters.py builds `arenas` and `meta`):
//   x      [T, d_in]         float32 or bfloat16, row stride any, column stride 1
//   outs   list of nsite [T, d_out_s] tensors (x's dtype, column stride 1; may be column views of one fused
//          projection output): each site's delta is added in place
//   arenas list of S vectors, one per slot (row of meta): that slot's packed weights (mtlora.grouped.Pack),
//          float32 or x's dtype (one dtype for all): W [rows, d_in] (the shrink rows of all its sites and their
//          routers), then per site B [g, N*r, d_out/g] (scaling folded in) stored chunk-major: for each group j,
//          the columns in chunks of CW (the last one narrower), each chunk's [N*r, width] rows contiguous, so the
//          expand streams its weights in order (layout 0); bf16 weights are widened to fp32 as they are read (the
//          same values as an fp32 copy: half the bytes). Layout 1 (bf16 arenas, AVX-512 BF16 builds only): each
//          chunk's rows in pairs, [ceil(N*r / 2), width, 2] (element (p, c, t) = B[2p + t, c], a zero row padding
//          an odd N*r)
//   meta   [S, 3 + 7*nsite] int64, per slot (offsets into its arena): w_off, rows (0: the slot adapts none of
//          these sites), layout (0 | 1), then per site: used, a_off, r, r_off (-1: no router, N == 1), N, g, b_off.
//          Indexed by slot, so an adapter swap patches one row (and one arena) of a table kept across steps; rows
//          of slots no segment names are never read (they may be stale: only the named ones are checked)
//   segs   [P, 3] int64: (slot in [0, S), first row, end row) of each slot's contiguous rows in this call
//   wout, woff  routing weights for statistics: wout float32 [numel] (empty: none wanted), woff [P, nsite] int64,
//          the offset in wout of segment p's [n, g, N] softmax weights at site s (-1: none; routed sites only)
// Math per row t of slot s (exactly mtlora.grouped.expand_into in fp32): hz = W x_t; per site h = hz[a_off:+r];
// with a router w[j] = softmax(hz[r_off + j*N : +N]) per group j and u_j = (w[j, i] * h) over experts i, else
// u_j = h; out[t, group j's columns] += u_j @ B[j], accumulated in fp32 and rounded to the output dtype once.
// Work is split over blocks of up to 4 rows of one slot (rows of a block share every weight read) with
// at::parallel_for (the calling thread's OpenMP pool). Offsets are checked against the arenas before any write.
// With bf16 x and bf16 weights on a CPU with AVX-512 BF16, the shrink uses its dot products (vdpbf16ps: products
// of bf16 pairs exact in fp32, sums in fp32 -- the same arithmetic in another summation order, no widening); with
// layout 1 the expand does too, on u_j rounded to bf16 once (as the torch path's bf16 matmul rounds its input):
// two rows of B per instruction instead of one fp32 FMA per row; and, the groups of a site owning disjoint columns,
// each chunk's sums are added straight into the bf16 output (no fp32 delta buffer to zero and add back).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "adapter_rows_bf16.h"

#if defined(__AVX512BF16__)
constexpr bool BF16_DOT = true;
#else
constexpr bool BF16_DOT = false;
#endif

namespace {

using namespace mtlora_rows;      // RB (rows per block), CW (columns per chunk), the AVX-512 BF16 helpers
constexpr int64_t HEAD = 3;        // meta: w_off, rows, layout (0: B rows, 1: B row pairs)
constexpr int64_t SITE = 7;        // meta per site: used, a_off, r, r_off, N, g, b_off

struct Site {
  int64_t used, a_off, r, r_off, N, g, b_off;
};

inline Site site_of(const int64_t* m, int64_t s) {
  const int64_t* p = m + HEAD + s * SITE;
  return {p[0], p[1], p[2], p[3], p[4], p[5], p[6]};
}

struct Out {
  void* ptr;
  int64_t stride, d_out;
};

struct Block {
  int64_t slot, lo, n, seg, row0;   // row0: the block's first row within its segment
};

struct WeightsOut {                 // routing weights for statistics (ptr null: not wanted)
  float* ptr;
  const int64_t* off;               // [P, nsite] offset of segment p's [n, g, N] block for site s, -1: none
};

struct Sizes {
  int64_t d_in, rows, lhs, d_out;    // maxima over the slots used: buffer sizes per row
};

// hz[b][k] = W[k] . xf[b] for the block's nb rows: each weight row read once for all of them. Full blocks take
// 4 weight rows x 4 input rows at a time (16 accumulators: 8 loads feed 16 FMAs).
template <typename WT>
void shrink(const WT* W, int64_t rows, const float* xf, int64_t nb, int64_t d_in, float* hz, int64_t hz_stride) {
  int64_t k = 0;
  if (nb == RB) {
    const float *x0 = xf, *x1 = xf + d_in, *x2 = xf + 2 * d_in, *x3 = xf + 3 * d_in;
    for (; k + 4 <= rows; k += 4) {
      const WT *w0 = W + k * d_in, *w1 = w0 + d_in, *w2 = w1 + d_in, *w3 = w2 + d_in;
      float a00 = 0.f, a01 = 0.f, a02 = 0.f, a03 = 0.f, a10 = 0.f, a11 = 0.f, a12 = 0.f, a13 = 0.f;
      float a20 = 0.f, a21 = 0.f, a22 = 0.f, a23 = 0.f, a30 = 0.f, a31 = 0.f, a32 = 0.f, a33 = 0.f;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
      for (int64_t i = 0; i < d_in; ++i) {
        const float v0 = x0[i], v1 = x1[i], v2 = x2[i], v3 = x3[i];
        const float u0 = static_cast<float>(w0[i]), u1 = static_cast<float>(w1[i]);
        const float u2 = static_cast<float>(w2[i]), u3 = static_cast<float>(w3[i]);
        a00 += u0 * v0; a01 += u0 * v1; a02 += u0 * v2; a03 += u0 * v3;
        a10 += u1 * v0; a11 += u1 * v1; a12 += u1 * v2; a13 += u1 * v3;
        a20 += u2 * v0; a21 += u2 * v1; a22 += u2 * v2; a23 += u2 * v3;
        a30 += u3 * v0; a31 += u3 * v1; a32 += u3 * v2; a33 += u3 * v3;
      }
      const float acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23},
                               {a30, a31, a32, a33}};
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t b = 0; b < RB; ++b) hz[b * hz_stride + k + q] = acc[q][b];
    }
  }
  for (; k < rows; ++k) {
    const WT* w = W + k * d_in;
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = xf + b * d_in;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t i = 0; i < d_in; ++i) a += static_cast<float>(w[i]) * x[i];
      hz[b * hz_stride + k] = a;
    }
  }
}


// lhs = the routed input of group j for one row: w[j, i] * h over experts i (softmax of the group's logits), or h.
void routed(const float* hz, const Site& s, int64_t j, float* lhs, float* wrow) {
  const float* h = hz + s.a_off;
  if (s.r_off < 0) {
    std::copy(h, h + s.r, lhs);
    return;
  }
  const float* z = hz + s.r_off + j * s.N;
  float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
  for (int64_t i = 0; i < s.N; ++i) mx = std::max(mx, z[i]);
  for (int64_t i = 0; i < s.N; ++i) {
    const float w = std::exp(z[i] - mx);
    sum += w;
    for (int64_t q = 0; q < s.r; ++q) lhs[i * s.r + q] = w * h[q];
  }
  const float inv = 1.f / sum;
  for (int64_t q = 0; q < s.N * s.r; ++q) lhs[q] *= inv;
  if (wrow) {
    for (int64_t i = 0; i < s.N; ++i) wrow[i] = std::exp(z[i] - mx) * inv;
  }
}

// delta[b][group j's columns] = lhs[b] @ B[j] for the block's rows: columns in chunks of CW held in local
// accumulators across all N*r rows of B (each B chunk read once for all rows, no stores inside the k loop). B[j]
// is chunk-major (file header): chunk c0's rows start at c0 * N*r, each `width` long.
// NB (the block's rows) and W (the chunk's columns; 0 = runtime cw) are compile-time constants in the common
// case, so the accumulators stay in registers; each B row chunk is widened to fp32 once for all NB rows.
template <int64_t NB, int64_t W, typename WT>
inline void expand_chunk(const WT* Bj, int64_t Nr, int64_t dg, int64_t c0, const float* lhs, int64_t lhs_stride,
                         float* d, int64_t delta_stride, int64_t cw) {
  constexpr int64_t CAP = W > 0 ? W : CW;
  float acc[NB][CAP] = {};
  float bf[CAP];
  const int64_t w = W > 0 ? W : cw;
  for (int64_t k = 0; k < Nr; ++k) {
    const WT* brow = Bj + c0 * Nr + k * w;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) bf[c] = static_cast<float>(brow[c]);
    for (int64_t b = 0; b < NB; ++b) {
      const float a = lhs[b * lhs_stride + k];
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) acc[b][c] += a * bf[c];
    }
  }
  for (int64_t b = 0; b < NB; ++b)
    for (int64_t c = 0; c < w; ++c) d[b * delta_stride + c0 + c] += acc[b][c];
}

template <int64_t NB, typename WT>
void expand_rows(const WT* Bj, int64_t Nr, int64_t dg, const float* lhs, int64_t lhs_stride, float* d,
                 int64_t delta_stride) {
  int64_t c0 = 0;
  for (; c0 + CW <= dg; c0 += CW) expand_chunk<NB, CW, WT>(Bj, Nr, dg, c0, lhs, lhs_stride, d, delta_stride, CW);
  if (c0 < dg) expand_chunk<NB, 0, WT>(Bj, Nr, dg, c0, lhs, lhs_stride, d, delta_stride, dg - c0);
}

template <typename WT>
void expand(const WT* B, const Site& s, int64_t d_out, const float* lhs, int64_t lhs_stride, int64_t nb,
            float* delta, int64_t delta_stride, int64_t j) {
  const int64_t Nr = s.N * s.r, dg = d_out / s.g;
  const WT* Bj = B + j * Nr * dg;
  float* d = delta + j * dg;
  switch (nb) {
    case 4: expand_rows<4, WT>(Bj, Nr, dg, lhs, lhs_stride, d, delta_stride); break;
    case 3: expand_rows<3, WT>(Bj, Nr, dg, lhs, lhs_stride, d, delta_stride); break;
    case 2: expand_rows<2, WT>(Bj, Nr, dg, lhs, lhs_stride, d, delta_stride); break;
    default: expand_rows<1, WT>(Bj, Nr, dg, lhs, lhs_stride, d, delta_stride); break;
  }
}

#if defined(__AVX512BF16__)
// Group j of a layout-1 site for the block's nb rows, added straight into the bf16 output rows `out`.
void expand_bf16(const at::BFloat16* B, const Site& s, int64_t d_out, const float* lhs, int64_t lhs_stride,
                 int64_t nb, uint32_t* lp, uint16_t* out, int64_t out_stride, int64_t j) {
  const int64_t Nr = s.N * s.r, Np = (Nr + 1) / 2, dg = d_out / s.g;
  for (int64_t b = 0; b < nb; ++b) lhs_pairs(lhs + b * lhs_stride, Nr, lp + b * Np);
  const at::BFloat16* Bj = B + j * 2 * Np * dg;
  uint16_t* o = out + j * dg;
  switch (nb) {
    case 4: expand_pairs<4>(Bj, Np, dg, lp, Np, o, out_stride); break;
    case 3: expand_pairs<3>(Bj, Np, dg, lp, Np, o, out_stride); break;
    case 2: expand_pairs<2>(Bj, Np, dg, lp, Np, o, out_stride); break;
    default: expand_pairs<1>(Bj, Np, dg, lp, Np, o, out_stride); break;
  }
}
#endif

template <typename T, typename WT>
void run_block(const Block& blk, const T* xp, int64_t x_stride, const WT* arena, const int64_t* meta,
               int64_t nsite, const std::vector<Out>& outs, const Sizes& z, const WeightsOut& wo,
               std::vector<float>& buf, std::vector<uint32_t>& pbuf) {
  const int64_t* m = meta;
  const int64_t nb = blk.n, d_in = z.d_in;
  buf.resize(RB * (d_in + z.rows + z.lhs + z.d_out));
  float* xf = buf.data();                 // [RB, d_in]
  float* hz = xf + RB * d_in;             // [RB, rows]
  float* lhs = hz + RB * z.rows;          // [RB, lhs]
  float* delta = lhs + RB * z.lhs;        // [RB, d_out]
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<WT, at::BFloat16>) {
    const at::BFloat16* xr[RB];
    for (int64_t b = 0; b < nb; ++b) xr[b] = xp + (blk.lo + b) * x_stride;
    shrink_bf16(arena + m[0], m[1], xr, nb, d_in, hz, z.rows);
  } else
#endif
  {
    for (int64_t b = 0; b < nb; ++b) {
      const T* src = xp + (blk.lo + b) * x_stride;
#pragma omp simd
      for (int64_t i = 0; i < d_in; ++i) xf[b * d_in + i] = static_cast<float>(src[i]);
    }
    shrink(arena + m[0], m[1], xf, nb, d_in, hz, z.rows);
  }
  for (int64_t si = 0; si < nsite; ++si) {
    const Site s = site_of(m, si);
    if (!s.used) continue;
    const Out& o = outs[si];
    const int64_t woff = wo.ptr && s.r_off >= 0 ? wo.off[blk.seg * nsite + si] : -1;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<WT, at::BFloat16>) {
      if (m[2] == 1) {                    // bf16 pairs: every group adds straight into its output columns
        pbuf.resize(RB * z.lhs);
        uint16_t* out = reinterpret_cast<uint16_t*>(static_cast<T*>(o.ptr) + blk.lo * o.stride);
        for (int64_t j = 0; j < s.g; ++j) {
          for (int64_t b = 0; b < nb; ++b) {
            float* wrow = woff < 0 ? nullptr : wo.ptr + woff + ((blk.row0 + b) * s.g + j) * s.N;
            routed(hz + b * z.rows, s, j, lhs + b * z.lhs, wrow);
          }
          expand_bf16(arena + s.b_off, s, o.d_out, lhs, z.lhs, nb, pbuf.data(), out, o.stride, j);
        }
        continue;
      }
    }
#endif
    std::fill(delta, delta + RB * z.d_out, 0.f);
    for (int64_t j = 0; j < s.g; ++j) {
      for (int64_t b = 0; b < nb; ++b) {
        float* wrow = woff < 0 ? nullptr : wo.ptr + woff + ((blk.row0 + b) * s.g + j) * s.N;
        routed(hz + b * z.rows, s, j, lhs + b * z.lhs, wrow);
      }
      expand(arena + s.b_off, s, o.d_out, lhs, z.lhs, nb, delta, z.d_out, j);
    }
    for (int64_t b = 0; b < nb; ++b) {
      T* dst = static_cast<T*>(o.ptr) + (blk.lo + b) * o.stride;
      const float* d = delta + b * z.d_out;
      int64_t c = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        auto* u = reinterpret_cast<uint16_t*>(dst);
        for (; c + 16 <= o.d_out; c += 16) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + c));
          __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));   // bf16 -> fp32
          v = _mm512_add_ps(v, _mm512_loadu_ps(d + c));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + c), (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
#endif
      for (; c < o.d_out; ++c) dst[c] = static_cast<T>(static_cast<float>(dst[c]) + d[c]);
    }
  }
}

// The meta row of every slot a segment names checked against its arena and the outputs; returns the buffer sizes.
Sizes check_meta(const at::Tensor& meta, const at::Tensor& segs, int64_t nsite, const std::vector<int64_t>& numel,
                 int64_t d_in, const std::vector<Out>& outs, bool bf16_arenas) {
  Sizes z{d_in, 1, 1, 1};
  for (const Out& o : outs) z.d_out = std::max(z.d_out, o.d_out);
  const int64_t* mp = meta.data_ptr<int64_t>();
  const int64_t* sp = segs.data_ptr<int64_t>();
  for (int64_t q = 0; q < segs.size(0); ++q) {
    const int64_t p = sp[3 * q];      // the slot: its meta row and arena
    const int64_t* m = mp + p * meta.size(1);
    if (m[1] == 0) continue;
    TORCH_CHECK(m[0] >= 0 && m[1] > 0 && m[0] + m[1] * d_in <= numel[p], "adapter_rows: slot ", p,
                " shrink rows outside the arena");
    TORCH_CHECK(m[2] == 0 || (m[2] == 1 && bf16_arenas && BF16_DOT), "adapter_rows: slot ", p, " layout ", m[2],
                ": 0 (B rows), or 1 (B row pairs) with bfloat16 arenas where the kernel has AVX-512 BF16");
    z.rows = std::max(z.rows, m[1]);
    for (int64_t si = 0; si < nsite; ++si) {
      const Site s = site_of(m, si);
      if (!s.used) continue;
      const int64_t d_out = outs[si].d_out;
      TORCH_CHECK(s.r > 0 && s.N > 0 && s.g > 0 && d_out % s.g == 0, "adapter_rows: slot ", p, " site ", si,
                  ": bad r / N / g for d_out ", d_out);
      TORCH_CHECK(s.a_off >= 0 && s.a_off + s.r <= m[1], "adapter_rows: slot ", p, " site ", si,
                  ": shrink rows out of range");
      TORCH_CHECK(s.r_off < 0 ? s.N == 1 : s.r_off + s.g * s.N <= m[1], "adapter_rows: slot ", p, " site ",
                  si, ": router rows out of range");
      const int64_t b_rows = m[2] == 1 ? (s.N * s.r + 1) / 2 * 2 : s.N * s.r;
      TORCH_CHECK(s.b_off >= 0 && s.b_off + b_rows * d_out <= numel[p], "adapter_rows: slot ", p, " site ",
                  si, ": B outside the arena");
      z.lhs = std::max(z.lhs, s.N * s.r);
    }
  }
  return z;
}

struct Arenas {                     // one table's slot arenas: data pointers (kept alive by the caller), sizes
  std::vector<const void*> ptr;
  std::vector<int64_t> numel;
  at::ScalarType dtype = at::kFloat;
};

Arenas arenas_of(const std::vector<at::Tensor>& arenas) {
  Arenas a;
  for (const at::Tensor& t : arenas) {
    TORCH_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) &&
                t.scalar_type() == arenas[0].scalar_type() && t.is_contiguous() && t.dim() == 1,
                "adapter_rows: arenas must be contiguous vectors of one dtype, float32 or bfloat16");
    a.ptr.push_back(t.data_ptr());
    a.numel.push_back(t.numel());
  }
  if (!arenas.empty()) a.dtype = arenas[0].scalar_type();
  return a;
}

template <typename T, typename WT>
void run(const at::Tensor& x, const std::vector<Out>& outs, const Arenas& arenas, const at::Tensor& meta,
         const std::vector<Block>& blocks, const Sizes& z, const WeightsOut& wo) {
  const T* xp = x.data_ptr<T>();
  const int64_t* mp = meta.data_ptr<int64_t>();
  const int64_t nsite = static_cast<int64_t>(outs.size()), mstride = meta.size(1), xs = x.stride(0);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    std::vector<uint32_t> pbuf;
    for (int64_t i = begin; i < end; ++i) {
      const Block& b = blocks[i];
      run_block<T, WT>(b, xp, xs, static_cast<const WT*>(arenas.ptr[b.slot]), mp + b.slot * mstride, nsite, outs,
                       z, wo, buf, pbuf);
    }
  });
}

// The routing-weight outputs checked against the segments (module header: wout, woff).
WeightsOut weights_out(const at::Tensor& wout, const at::Tensor& woff, const at::Tensor& meta, const at::Tensor& segs,
                       int64_t nsite) {
  if (wout.numel() == 0) return {nullptr, nullptr};
  const int64_t P = segs.size(0), *sp = segs.data_ptr<int64_t>(), *mp = meta.data_ptr<int64_t>();
  TORCH_CHECK(wout.scalar_type() == at::kFloat && wout.is_contiguous() && wout.dim() == 1,
              "adapter_rows: wout must be a contiguous float32 vector");
  TORCH_CHECK(woff.scalar_type() == at::kLong && woff.is_contiguous() && woff.dim() == 2 && woff.size(0) == P &&
              woff.size(1) == nsite, "adapter_rows: woff must be int64 [P, sites]");
  const int64_t* op = woff.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* m = mp + sp[3 * p] * meta.size(1);
    if (m[1] == 0) continue;
    for (int64_t si = 0; si < nsite; ++si) {
      const Site s = site_of(m, si);
      const int64_t off = op[p * nsite + si];
      if (!s.used || s.r_off < 0 || off < 0) continue;
      TORCH_CHECK(off + (sp[3 * p + 2] - sp[3 * p + 1]) * s.g * s.N <= wout.numel(), "adapter_rows: segment ",
                  p, " site ", si, ": routing weights outside wout");
    }
  }
  return {wout.data_ptr<float>(), op};
}

// Everything after the operands are resolved: segments and meta checked, blocks formed, the kernel run.
void rows(const at::Tensor& x, const std::vector<Out>& o, const Arenas& arenas, const at::Tensor& meta,
          const at::Tensor& segs, const at::Tensor& wout, const at::Tensor& woff) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "adapter_rows: x must be [T, d_in] with column stride 1");
  const int64_t nsite = static_cast<int64_t>(o.size()), T_ = x.size(0), d_in = x.size(1);
  TORCH_CHECK(segs.scalar_type() == at::kLong && segs.is_contiguous() && segs.dim() == 2 && segs.size(1) == 3,
              "adapter_rows: segs must be contiguous int64 [P, 3]");
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.dim() == 2 &&
              meta.size(1) == HEAD + SITE * nsite, "adapter_rows: meta must be contiguous int64 [S, 3 + 7 * sites]");
  const int64_t S = meta.size(0), P = segs.size(0);
  TORCH_CHECK(static_cast<int64_t>(arenas.ptr.size()) == S, "adapter_rows: one arena per meta row (slot)");
  TORCH_CHECK(arenas.dtype == at::kFloat || arenas.dtype == x.scalar_type(),
              "adapter_rows: arenas must be float32 or x's dtype");
  const int64_t* mp = meta.data_ptr<int64_t>();
  const int64_t* sp = segs.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t lo = sp[3 * p + 1], hi = sp[3 * p + 2];
    TORCH_CHECK(sp[3 * p] >= 0 && sp[3 * p] < S, "adapter_rows: segment ", p, " names slot ", sp[3 * p],
                " outside the ", S, " meta rows");
    TORCH_CHECK(lo >= 0 && lo <= hi && hi <= T_, "adapter_rows: segment ", p, " (rows ", lo, "..", hi,
                ") out of range");
  }
  const Sizes z = check_meta(meta, segs, nsite, arenas.numel, d_in, o, arenas.dtype == at::kBFloat16);
  std::vector<Block> blocks;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t lo = sp[3 * p + 1], hi = sp[3 * p + 2];
    if (mp[sp[3 * p] * meta.size(1) + 1] == 0) continue;
    for (int64_t r = lo; r < hi; r += RB) blocks.push_back({sp[3 * p], r, std::min(RB, hi - r), p, r - lo});
  }
  const WeightsOut wo = weights_out(wout, woff, meta, segs, nsite);
  if (blocks.empty()) return;
  const bool wf = arenas.dtype == at::kFloat;
  if (x.scalar_type() == at::kFloat) {
    run<float, float>(x, o, arenas, meta, blocks, z, wo);
  } else if (x.scalar_type() == at::kBFloat16) {
    wf ? run<at::BFloat16, float>(x, o, arenas, meta, blocks, z, wo)
       : run<at::BFloat16, at::BFloat16>(x, o, arenas, meta, blocks, z, wo);
  } else {
    TORCH_CHECK(false, "adapter_rows: float32 or bfloat16, got ", x.scalar_type());
  }
}

Out out_of(const at::Tensor& t, const at::Tensor& x, int64_t first, int64_t width) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.stride(1) == 1 && t.scalar_type() == x.scalar_type(),
              "adapter_rows: each out must be [T, d_out] in x's dtype with column stride 1");
  TORCH_CHECK(first >= 0 && width > 0 && first + width <= t.size(1), "adapter_rows: columns ", first, "..",
              first + width, " outside an out of ", t.size(1));
  return {static_cast<char*>(t.data_ptr()) + first * t.element_size(), t.stride(0), width};
}

}  // namespace

void adapter_rows(const at::Tensor& x, const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& arenas,
                  const at::Tensor& meta, const at::Tensor& segs, const at::Tensor& wout, const at::Tensor& woff) {
  std::vector<Out> o;
  for (const at::Tensor& t : outs) o.push_back(out_of(t, x, 0, t.size(1)));
  rows(x, o, arenas_of(arenas), meta, segs, wout, woff);
}

// One (layer, call site)'s operands bound once (cpu_kernel_path: rebuilt when its table changes), so a step's
// call passes only its tensors (and, on a step that samples them, the routing weights' buffer and offsets).
// cols [nsite, 3] int64: per site (source: 0 = `out`, 1 = `fused`; first column; width), the site's columns in
// that tensor. The arenas are held (kept alive) here; meta is the table's, patched in place.
class RowsCall {
 public:
  RowsCall(const std::vector<at::Tensor>& arenas, const at::Tensor& meta, const at::Tensor& cols)
      : held_(arenas), arenas_(arenas_of(arenas)), meta_(meta) {
    TORCH_CHECK(cols.scalar_type() == at::kLong && cols.dim() == 2 && cols.size(1) == 3 &&
                meta.dim() == 2 && meta.size(1) == HEAD + SITE * cols.size(0),
                "RowsCall: cols must be int64 [sites, 3] (source, first column, width), one per meta site");
    const at::Tensor c = cols.contiguous();
    for (int64_t i = 0; i < c.size(0); ++i) {
      const int64_t* r = c.data_ptr<int64_t>() + 3 * i;
      TORCH_CHECK(r[0] == 0 || r[0] == 1, "RowsCall: site ", i, " source ", r[0], ": 0 (out) or 1 (fused)");
      cols_.push_back({r[0], r[1], r[2]});
    }
  }

  // Add the deltas in place into out / fused (module header); fused may be None when no site reads it. wout /
  // woff (both or neither): the routing weights, as adapter_rows takes them.
  void operator()(const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& fused,
                  const at::Tensor& segs, const std::optional<at::Tensor>& wout,
                  const std::optional<at::Tensor>& woff) const {
    std::vector<Out> o;
    o.reserve(cols_.size());
    for (size_t i = 0; i < cols_.size(); ++i) {
      const Col& c = cols_[i];
      TORCH_CHECK(c.source == 0 || fused.has_value(), "RowsCall: site ", i, " reads the fused output; none given");
      o.push_back(out_of(c.source ? *fused : out, x, c.first, c.width));
    }
    TORCH_CHECK(wout.has_value() == woff.has_value(), "RowsCall: wout and woff go together");
    static const at::Tensor none = at::zeros({0}), no_off = at::zeros({0, 0}, at::kLong);
    rows(x, o, arenas_, meta_, segs, wout.value_or(none), woff.value_or(no_off));
  }

 private:
  struct Col {
    int64_t source, first, width;
  };
  std::vector<at::Tensor> held_;
  Arenas arenas_;
  at::Tensor meta_;
  std::vector<Col> cols_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adapter_rows", &adapter_rows, "adapter deltas of decode-sized slots, added in place (CPU)");
  pybind11::class_<RowsCall>(m, "RowsCall", pybind11::module_local(),   // two builds may share a process
                             "adapter_rows with one call site's arenas, meta and columns bound")
      .def(pybind11::init<const std::vector<at::Tensor>&, const at::Tensor&, const at::Tensor&>())
      .def("__call__", &RowsCall::operator(), pybind11::arg("x"), pybind11::arg("out"), pybind11::arg("fused"),
           pybind11::arg("segs"), pybind11::arg("wout") = pybind11::none(), pybind11::arg("woff") = pybind11::none());
  m.attr("CHUNK") = CW;   // the column chunk of the arenas' B layout (cpu_adapters.CHUNK must equal it)
  m.attr("BF16_DOT") = BF16_DOT;   // bf16 shrink on dot products; layout 1 accepted (cpu_adapters.pair_layout)
}
