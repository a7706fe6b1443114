// Decode attention straight from the paged KV pool (issue 15): one query per sequence, keys and values read in
// place through each sequence's flat slot table, never gathered into a dense [kv, B, Kmax, hd] copy.
//
// Contract (the Python side: mtlora_server/engine/cpu_attention.py):
//   q        [B, H, hd]      float32 or bfloat16, contiguous
//   k, v     [KV, S, hd]     one layer of the pool, q's dtype, contiguous
//   kv_slots [B, Kmax]       int64, flat slot of each key position (masked positions are never read)
//   mask     [B, Kmax]       bool, true = attend
//   returns  [B, H * hd]     q's dtype; query head h reads KV head h / (H / KV) (grouped-query attention)
// Arithmetic is float32 throughout (scores, softmax with exp_poly.h's vectorised exp, within ~2 ulp of expf,
// weighted sum), rounded to q's dtype once at the end. A row with no unmasked key returns zeros. Work is split
// over (sequence, KV head) with at::parallel_for, sequences taken in the pool order of their first key.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "exp_poly.h"

namespace {

// N is the head dim: a compile-time constant for the common sizes (fully unrolled, no remainder loops), 0 = runtime.
template <int N>
struct Dim {
  static int64_t get(int64_t) { return N; }
};
template <>
struct Dim<0> {
  static int64_t get(int64_t n) { return n; }
};

template <int N, typename T>
inline void to_float(const T* __restrict src, float* __restrict dst, int64_t n_) {
  const int64_t n = Dim<N>::get(n_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <int N>
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n_) {
  const int64_t n = Dim<N>::get(n_);
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <int N>
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n_) {
  const int64_t n = Dim<N>::get(n_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Eight keys at a time (KB rows of r, row stride n): eight independent accumulator chains per query head instead
// of one, and one pass over acc per eight value rows. 30 layers of 64 sequences x 192 keys, bf16, 2 threads: one
// key at a time 33 ms, four 23-25 ms, eight 19.6-20 ms (docs/benchmarks.md).
constexpr int64_t KB = 8;

template <int N>
inline void dot8(const float* __restrict q, const float* __restrict r, int64_t n_, float* __restrict o) {
  const int64_t n = Dim<N>::get(n_);
  const float *r0 = r, *r1 = r + n, *r2 = r + 2 * n, *r3 = r + 3 * n;
  const float *r4 = r + 4 * n, *r5 = r + 5 * n, *r6 = r + 6 * n, *r7 = r + 7 * n;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
  for (int64_t i = 0; i < n; ++i) {
    const float x = q[i];
    a0 += x * r0[i];
    a1 += x * r1[i];
    a2 += x * r2[i];
    a3 += x * r3[i];
    a4 += x * r4[i];
    a5 += x * r5[i];
    a6 += x * r6[i];
    a7 += x * r7[i];
  }
  o[0] = a0;
  o[1] = a1;
  o[2] = a2;
  o[3] = a3;
  o[4] = a4;
  o[5] = a5;
  o[6] = a6;
  o[7] = a7;
}

template <int N>
inline void axpy8(float* __restrict y, const float* __restrict w, const float* __restrict r, int64_t n_) {
  const int64_t n = Dim<N>::get(n_);
  const float *r0 = r, *r1 = r + n, *r2 = r + 2 * n, *r3 = r + 3 * n;
  const float *r4 = r + 4 * n, *r5 = r + 5 * n, *r6 = r + 6 * n, *r7 = r + 7 * n;
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += ((w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i])) +
            ((w4 * r4[i] + w5 * r5[i]) + (w6 * r6[i] + w7 * r7[i]));
  }
}

struct Shape {
  int64_t B, H, KV, hd, S, K;
};

constexpr int64_t PF = 16;   // keys prefetched ahead of the one being read

// Every cache line of one key / value row (hd elements) into the caches ahead of its read.
template <typename T>
inline void prefetch_row(const T* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + o, 0, 3);
}

// One (sequence b, KV head h) task: its G = H / KV query heads against the n unmasked keys at slots sl[0..n).
template <typename T, int HD>
void attend_one(const T* q, const T* k, const T* v, const int64_t* sl, int64_t n, T* out, const Shape& s,
                float scale, int64_t b, int64_t h, std::vector<float>& buf) {
  const int64_t G = s.H / s.KV, hd = s.hd;
  buf.resize(G * hd * 2 + KB * hd + G + G * n);
  float* qf = buf.data();            // [G, hd] scaled queries
  float* acc = qf + G * hd;          // [G, hd] weighted values
  float* row = acc + G * hd;         // [KB, hd] key / value rows in float
  float* inv = row + KB * hd;        // [G] 1 / softmax denominator
  float* sc = inv + G;               // [G, n] scores, then exp(score - max)
  for (int64_t g = 0; g < G; ++g) {
    to_float<HD>(q + (b * s.H + h * G + g) * hd, qf + g * hd, hd);
    for (int64_t d = 0; d < hd; ++d) qf[g * hd + d] *= scale;
  }
  const T* kh = k + h * s.S * hd;
  const T* vh = v + h * s.S * hd;
  int64_t t = 0;
  for (; t + KB <= n; t += KB) {
    // Prefetch the keys PF ahead (and this group's values, for the second pass): a sequence's blocks lie anywhere
    // in the pool, so the hardware prefetcher loses the stream at every block boundary (docs/benchmarks.md).
    for (int64_t j = t + PF; j < std::min(n, t + PF + KB); ++j) prefetch_row(kh + sl[j] * hd, hd * sizeof(T));
    for (int64_t j = t; j < t + KB; ++j) prefetch_row(vh + sl[j] * hd, hd * sizeof(T));
    for (int64_t j = 0; j < KB; ++j) to_float<HD>(kh + sl[t + j] * hd, row + j * hd, hd);
    for (int64_t g = 0; g < G; ++g) dot8<HD>(qf + g * hd, row, hd, sc + g * n + t);
  }
  for (; t < n; ++t) {
    to_float<HD>(kh + sl[t] * hd, row, hd);
    for (int64_t g = 0; g < G; ++g) sc[g * n + t] = dot<HD>(qf + g * hd, row, hd);
  }
  std::fill(acc, acc + G * hd, 0.f);
  for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place; 1 / sum applied at the end
    float* x = sc + g * n;
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t t = 0; t < n; ++t) mx = x[t] > mx ? x[t] : mx;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      x[t] = exp_poly(x[t] - mx);  // std::exp does not vectorise (a scalar call per score)
      sum += x[t];
    }
    inv[g] = sum > 0.f ? 1.f / sum : 0.f;
  }
  for (t = 0; t + KB <= n; t += KB) {
    for (int64_t j = 0; j < KB; ++j) to_float<HD>(vh + sl[t + j] * hd, row + j * hd, hd);
    for (int64_t g = 0; g < G; ++g) axpy8<HD>(acc + g * hd, sc + g * n + t, row, hd);
  }
  for (; t < n; ++t) {
    to_float<HD>(vh + sl[t] * hd, row, hd);
    for (int64_t g = 0; g < G; ++g) axpy<HD>(acc + g * hd, sc[g * n + t], row, hd);
  }
  for (int64_t g = 0; g < G; ++g) {
    T* o = out + (b * s.H + h * G + g) * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<T>(acc[g * hd + d] * inv[g]);
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
         const at::Tensor& mask, at::Tensor& out, const Shape& s, float scale) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const bool* mp = mask.data_ptr<bool>();
  T* op = out.data_ptr<T>();
  // Each sequence's unmasked slots, compacted once for all its KV heads: [B, K] with counts [B].
  std::vector<int64_t> valid(s.B * s.K), count(s.B);
  int64_t bad = 0;  // unmasked slots outside [0, S): refused before any read
  for (int64_t b = 0; b < s.B; ++b) {
    int64_t c = 0;
    for (int64_t j = 0; j < s.K; ++j) {
      const int64_t slot = sp[b * s.K + j];
      if (!mp[b * s.K + j]) continue;
      bad += (slot < 0) | (slot >= s.S);
      valid[b * s.K + c++] = slot;
    }
    count[b] = c;
  }
  TORCH_CHECK(bad == 0, "paged_decode_attention: ", bad, " unmasked kv_slots outside the pool's ", s.S, " slots");
  // Sequences are visited in the order of their first key's slot, not in batch order: the engine lays a step's
  // rows out grouped by adapter, so batch order jumps back and forth through the pool (the 4-adapter mix's decode
  // attention took ~8 % longer than the same sequences in admission order; in pool order both cost the same,
  // docs/benchmarks.md). Each task writes its own output rows, so the order changes no value.
  std::vector<int64_t> order(s.B);
  for (int64_t b = 0; b < s.B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
    return (count[a] ? valid[a * s.K] : 0) < (count[c] ? valid[c * s.K] : 0);
  });
  at::parallel_for(0, s.B * s.KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = order[t / s.KV];
      const int64_t* sl = valid.data() + b * s.K;
      if (s.hd == 64) {
        attend_one<T, 64>(qp, kp, vp, sl, count[b], op, s, scale, b, t % s.KV, buf);
      } else if (s.hd == 128) {
        attend_one<T, 128>(qp, kp, vp, sl, count[b], op, s, scale, b, t % s.KV, buf);
      } else {
        attend_one<T, 0>(qp, kp, vp, sl, count[b], op, s, scale, b, t % s.KV, buf);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& kv_slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "q [B, H, hd], k / v [KV, S, hd]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(kv_slots.scalar_type() == at::kLong && kv_slots.is_contiguous() && kv_slots.dim() == 2,
              "kv_slots: contiguous int64 [B, Kmax]");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == kv_slots.sizes(),
              "mask: contiguous bool [B, Kmax]");
  const Shape s{q.size(0), q.size(1), k.size(0), q.size(2), k.size(1), kv_slots.size(1)};
  TORCH_CHECK(kv_slots.size(0) == s.B && k.size(2) == s.hd && s.H % s.KV == 0, "shapes disagree");
  auto out = at::empty({s.B, s.H * s.hd}, q.options());
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k, v, kv_slots, mask, out, s, static_cast<float>(scale));
  } else if (q.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(q, k, v, kv_slots, mask, out, s, static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16, got ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV pool (CPU)");
}
