// The attention forward as a ladder of versions, each one step faster than the last, each tested
// against the same reference (tests/test_flash_attention.py) and timed by one command
// (benchmarks/attention_versions.py):
//
//   1. scalar reference: one query row at a time, plain loops, the eager path's order of work;
//   2. vectorised: the same loops on at::vec::Vectorized, 8 or 16 floats per instruction;
//   3. multi-threaded: rows split across threads with at::parallel_for;
//   4. causal skip, scale folded: row i computes only its i + 1 visible scores, and the scale
//      moves into the exponent;
//   5. fused softmax: q k^T and P v as blocked matrix products, our softmax kernel between them
//      (composed in src/flash_attention.py);
//   6. flash: tiles, an online softmax, no (T, T) scores at all (csrc/flash_attention.cpp).
//
// Versions 1 to 4 are here, for float32 and float64 and contiguous (B, H, T, D) inputs with as many
// key/value heads as query heads. Their scalar loops (attention_common.h) are also the float64
// path of the flash kernel.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention_common.h"

namespace {

using namespace gpt_attention;

// --8<-- [start:scalar_row]
// Version 1. Query row i (q: D values) against all T keys; s holds T scores.
template <typename acc_t>
void scalar_row(const acc_t* q, const acc_t* k, const acc_t* v, acc_t* out, acc_t* s, int64_t i, int64_t T,
                int64_t D, acc_t scale) {
  for (int64_t j = 0; j < T; ++j) s[j] = scale * dot_scalar(q, k + j * D, D);  // s_j = scale q . k_j
  for (int64_t j = i + 1; j < T; ++j) s[j] = neg_inf<acc_t>;                  // the future, masked
  acc_t m = neg_inf<acc_t>, l = 0;
  for (int64_t j = 0; j < T; ++j) m = std::max(m, s[j]);  // m = max_j s_j
  for (int64_t j = 0; j < T; ++j) {
    s[j] = std::exp(s[j] - m);  // e_j = exp(s_j - m), 0 for the masked
    l += s[j];                  // l = sum_j e_j
  }
  std::fill(out, out + D, acc_t(0));
  for (int64_t j = 0; j < T; ++j) axpy_scalar(s[j] / l, v + j * D, out, D);  // out = sum_j (e_j / l) v_j
}
// --8<-- [end:scalar_row]

// --8<-- [start:vectorised_row]
// Version 2 (and 3, on many threads): version 1 with every loop on vectors.
template <typename acc_t>
void vectorised_row(const acc_t* q, const acc_t* k, const acc_t* v, acc_t* out, acc_t* s, int64_t i, int64_t T,
                    int64_t D, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  auto mul = [](Vec a, Vec b) { return a * b; };
  auto add = [](Vec a, Vec b) { return a + b; };
  for (int64_t j = 0; j < T; ++j) s[j] = scale * at::vec::map2_reduce_all<acc_t>(mul, add, q, k + j * D, D);
  std::fill(s + i + 1, s + T, neg_inf<acc_t>);
  const acc_t m = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, T);
  const Vec vm(m);
  at::vec::map([vm](Vec x) { return vexp(x - vm); }, s, s, T);
  const acc_t l = at::vec::reduce_all<acc_t>(add, s, T);
  std::fill(out, out + D, acc_t(0));
  for (int64_t j = 0; j < T; ++j) {
    const Vec p(s[j] / l);
    at::vec::map2([p](Vec o, Vec x) { return at::vec::fmadd(p, x, o); }, out, out, v + j * D, D);
  }
}
// --8<-- [end:vectorised_row]

// --8<-- [start:causal_row]
// Version 4: only the i + 1 visible scores are computed, and scale * (s_j - m) is one
// multiply-add inside the exponent instead of a pass over the row.
template <typename acc_t>
void causal_row(const acc_t* q, const acc_t* k, const acc_t* v, acc_t* out, acc_t* s, int64_t i, int64_t T,
                int64_t D, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  auto mul = [](Vec a, Vec b) { return a * b; };
  auto add = [](Vec a, Vec b) { return a + b; };
  const int64_t n = i + 1;
  for (int64_t j = 0; j < n; ++j) s[j] = at::vec::map2_reduce_all<acc_t>(mul, add, q, k + j * D, D);
  const acc_t m = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, n);
  const Vec vscale(scale), shift(-scale * m);
  at::vec::map([=](Vec x) { return vexp(at::vec::fmadd(x, vscale, shift)); }, s, s, n);  // exp(scale (s - m))
  const acc_t l = at::vec::reduce_all<acc_t>(add, s, n);
  std::fill(out, out + D, acc_t(0));
  for (int64_t j = 0; j < n; ++j) {
    const Vec p(s[j] / l);
    at::vec::map2([p](Vec o, Vec x) { return at::vec::fmadd(p, x, o); }, out, out, v + j * D, D);
  }
}
// --8<-- [end:causal_row]

// --8<-- [start:versions]
template <typename acc_t>
using RowKernel = void (*)(const acc_t*, const acc_t*, const acc_t*, acc_t*, acc_t*, int64_t, int64_t, int64_t, acc_t);

// Every (head, query) row of the input, through one version's row kernel, on one thread or many.
template <typename acc_t>
void version_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, double scale,
                  int64_t version) {
  const RowKernel<acc_t> row = version == 1 ? scalar_row<acc_t> : version == 4 ? causal_row<acc_t> : vectorised_row<acc_t>;
  const int64_t T = q.size(2), D = q.size(3), rows = q.numel() / D;
  const acc_t *qp = q.const_data_ptr<acc_t>(), *kp = k.const_data_ptr<acc_t>(), *vp = v.const_data_ptr<acc_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();
  auto run = [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(T);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t head = r / T * T * D;  // the row's (b, h) block of keys and values
      row(qp + r * D, kp + head, vp + head, op + r * D, s.data(), r % T, T, D, acc_t(scale));
    }
  };
  if (version <= 2) run(0, rows);
  else at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(T * D / 64, 1)), run);
}

at::Tensor attention_version_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                 int64_t version) {
  TORCH_CHECK(version >= 1 && version <= 4, "versions 1 to 4 run in C++, got ", version);
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "q, k and v must all be (B, H, T, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k and v must have the same dtype");
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(qc);
  if (q.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_version_cpu",
                             [&] { version_rows<scalar_t>(qc, kc, vc, out, scale, version); });
  return out;
}
// --8<-- [end:versions]

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt_flash, m) {
  m.def("attention_version(Tensor q, Tensor k, Tensor v, float scale, int version) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_flash, CPU, m) { m.impl("attention_version", &attention_version_cpu); }
