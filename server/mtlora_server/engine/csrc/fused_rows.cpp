// Row-wise elementwise work of a decoder layer fused into one pass each (issue 15): RMSNorm (optionally after the
// residual add), SiLU(gate) * up, and rotary embedding in place. In torch each of these is 4-8 ops, every one
// reading and writing the whole [T, width] activation (bf16 converted to fp32 and back on the way): at prefill they
// were ~25 % of a SmolLM2 step on CPU (aten::mul, silu, pow, copy_, add, cat, neg; docs/benchmarks.md).
//
// Contract (the Python side: mtlora_server/engine/cpu_fused.py), every tensor float32 or bfloat16, one dtype:
//   rms_norm(x [T, d], w [d], eps) -> y [T, d]
//       y = w * cast(xf * rsqrt(mean(xf^2) + eps)), xf = fp32(x), `cast` = rounding to x's dtype (as transformers'
//       LlamaRMSNorm and engine/model.rms_norm: normalise in fp32, cast, then scale in the dtype).
//   add_rms_norm(h [T, d], delta [T, d], w, eps) -> y: first h += delta in place (rounded to h's dtype, as
//       `h = h + delta`), then y = rms_norm(h).
//   silu_mul(gu [T, 2F]) -> [T, F]: silu(gate) * up with gate = gu[:, :F], up = gu[:, F:], each op rounded to the
//       dtype as torch's `F.silu(gate) * up` does.
//   rope_(x [T, heads, hd] (row stride any, heads and hd contiguous), cos, sin [T, hd]) in place:
//       x = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[hd/2:], x[:hd/2]), each product rounded to the
//       dtype and the sum rounded, as engine/model.apply_rope in torch.
// Rows are split over at::parallel_for (the calling thread's OpenMP pool).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "exp_poly.h"

namespace {

template <typename T>
inline T rnd(float v) {
  return static_cast<T>(v);
}

template <typename T>
void norm_row(const T* x, const T* w, T* y, int64_t d, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) {
    const float v = static_cast<float>(x[i]);
    ss += v * v;
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const float n = static_cast<float>(rnd<T>(static_cast<float>(x[i]) * r));
    y[i] = rnd<T>(static_cast<float>(w[i]) * n);
  }
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [T, d] with column stride 1");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              ": float32 or bfloat16, got ", x.scalar_type());
}

template <typename T>
void run_norm(at::Tensor& h, const at::Tensor* delta, const at::Tensor& w, at::Tensor& y, float eps) {
  const int64_t T_ = h.size(0), d = h.size(1), hs = h.stride(0);
  T* hp = h.data_ptr<T>();
  const T* dp = delta ? delta->data_ptr<T>() : nullptr;
  const int64_t ds = delta ? delta->stride(0) : 0;
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      T* row = hp + t * hs;
      if (dp) {
        const T* dr = dp + t * ds;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) row[i] = rnd<T>(static_cast<float>(row[i]) + static_cast<float>(dr[i]));
      }
      norm_row<T>(row, wp, yp + t * d, d, eps);
    }
  });
}

at::Tensor norm_impl(at::Tensor h, const at::Tensor* delta, const at::Tensor& w, double eps) {
  check_rows(h, "x");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == h.size(1) && w.scalar_type() == h.scalar_type(),
              "rms_norm: weight must be a contiguous [d] vector in x's dtype");
  if (delta) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type(),
                "add_rms_norm: delta must match h");
  }
  auto y = at::empty(h.sizes(), h.options());
  if (h.scalar_type() == at::kFloat) {
    run_norm<float>(h, delta, w, y, static_cast<float>(eps));
  } else {
    run_norm<at::BFloat16>(h, delta, w, y, static_cast<float>(eps));
  }
  return y;
}

template <typename T>
void run_silu_mul(const at::Tensor& gu, at::Tensor& out) {
  const int64_t T_ = gu.size(0), F = out.size(1), gs = gu.stride(0);
  const T* gp = gu.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t b, int64_t e) {
    std::vector<float> buf(F);
    float* sv = buf.data();
    for (int64_t t = b; t < e; ++t) {
      const T* g = gp + t * gs;
      const T* u = g + F;
      T* o = op + t * F;
#pragma omp simd
      for (int64_t i = 0; i < F; ++i) {
        const float v = static_cast<float>(g[i]);
        sv[i] = v / (1.f + exp_poly(-v));
      }
      for (int64_t i = 0; i < F; ++i) o[i] = rnd<T>(static_cast<float>(rnd<T>(sv[i])) * static_cast<float>(u[i]));
    }
  });
}

template <typename T>
void run_rope(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t T_ = x.size(0), H = x.size(1), hd = x.size(2), half = hd / 2, xs = x.stride(0);
  T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const T* c = cp + t * hd;
      const T* s = sp + t * hd;
      for (int64_t h = 0; h < H; ++h) {
        T* v = xp + t * xs + h * hd;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = static_cast<float>(v[i]), z = static_cast<float>(v[i + half]);
          const float lo = static_cast<float>(rnd<T>(a * static_cast<float>(c[i]))) +
                           static_cast<float>(rnd<T>(-z * static_cast<float>(s[i])));
          const float hi = static_cast<float>(rnd<T>(z * static_cast<float>(c[i + half]))) +
                           static_cast<float>(rnd<T>(a * static_cast<float>(s[i + half])));
          v[i] = rnd<T>(lo);
          v[i + half] = rnd<T>(hi);
        }
      }
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) { return norm_impl(x, nullptr, w, eps); }

at::Tensor add_rms_norm(at::Tensor h, const at::Tensor& delta, const at::Tensor& w, double eps) {
  return norm_impl(h, &delta, w, eps);
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_rows(gu, "gu");
  TORCH_CHECK(gu.size(1) % 2 == 0, "silu_mul: gu must have an even width [T, 2F]");
  auto out = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  if (gu.scalar_type() == at::kFloat) {
    run_silu_mul<float>(gu, out);
  } else {
    run_silu_mul<at::BFloat16>(gu, out);
  }
  return out;
}

void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rope_: x must be [T, heads, hd] with heads and hd contiguous and hd even");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "rope_: float32 or bfloat16");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2) &&
                t->scalar_type() == x.scalar_type(), "rope_: cos / sin must be contiguous [T, hd] in x's dtype");
  }
  if (x.scalar_type() == at::kFloat) {
    run_rope<float>(x, cos, sin);
  } else {
    run_rope<at::BFloat16>(x, cos, sin);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (CPU)");
  m.def("add_rms_norm", &add_rms_norm, "h += delta in place, then RMSNorm of h (CPU)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [T, 2F] rows (CPU)");
  m.def("rope_", &rope_, "rotary embedding in place (CPU)");
}
