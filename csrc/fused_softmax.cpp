// Fused causal masked softmax on the CPU: forward and backward kernels, and the op registration.
//
// The plain path computes softmax(mask(scale * scores)) in three passes over a (..., T, T) tensor,
// each of which allocates a new one. Here each row is done in one visit: row i reads only its
// causal prefix, columns 0..i, works on it while it sits in L1, writes the probabilities and
// zeros after the diagonal. The backward reads y and dy once and writes dx.
//
// Rows are independent, so they are split across threads with at::parallel_for, and every pass
// over a row is vectorised with at::vec::Vectorized (AVX2 or AVX-512, picked when the extension
// is built). bfloat16 and float16 rows are widened to float32 in a per-thread buffer, so all
// sums are accumulated in float32; float64 runs in float64 so gradcheck can use it.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// float32 accumulation for the half types, the type itself otherwise.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Rows per task: enough work per thread to pay for the scheduling.
int64_t grain_size(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

// Checks shared by both directions: a stack of square (T, T) matrices and a positive scale.
void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, name, " must have at least 2 dimensions, got ", t.dim());
  TORCH_CHECK(t.size(-1) == t.size(-2), name, " must be (..., T, T), got ", t.sizes());
}

// --8<-- [start:cpu_forward_row]
// One row of the forward pass on float data: x and y hold T values, of which 0..i are visible.
// The last, partial vector of the prefix is loaded with a count and its unused lanes blended
// away, so the whole row runs vectorised (short rows are mostly tail).
template <typename acc_t>
void forward_row(const acc_t* x, acc_t* y, int64_t i, int64_t T, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t n = i + 1;  // the causal prefix
  const int64_t tail = n % W, body = n - tail;
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity()), zero(0);
  // Pass 1: the row maximum. scale > 0, so max(scale * x) = scale * max(x): the scale is folded
  // into the exponent below instead of costing a pass of its own. Four running maxima, not one:
  // each maximum waits for the one before it, so a single chain would leave the loads idle.
  Vec vmax[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
  int64_t j = 0;
  for (; j + 4 * W <= body; j += 4 * W)
    for (int u = 0; u < 4; ++u) vmax[u] = at::vec::maximum(vmax[u], Vec::loadu(x + j + u * W));
  for (; j < body; j += W) vmax[0] = at::vec::maximum(vmax[0], Vec::loadu(x + j));
  if (tail) vmax[1] = at::vec::maximum(vmax[1], Vec::set(neg_inf, Vec::loadu(x + body, tail), tail));
  const Vec vmax_all = at::vec::maximum(at::vec::maximum(vmax[0], vmax[1]), at::vec::maximum(vmax[2], vmax[3]));
  const acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax_all);
  // Pass 2: e = exp(scale * x - scale * max), one multiply-add and an exp, stored in y; their sum.
  const Vec vscale(scale), shift(-scale * m);
  auto exp = [](Vec z) {
    if constexpr (std::is_same_v<acc_t, double>) return z.exp(); else return z.exp_u20();
  };
  Vec vsum[2] = {zero, zero};
  for (j = 0; j < body; j += W) {
    const Vec e = exp(at::vec::fmadd(Vec::loadu(x + j), vscale, shift));
    e.store(y + j);
    vsum[(j / W) % 2] = vsum[(j / W) % 2] + e;
  }
  if (tail) {
    const Vec e = Vec::set(zero, exp(at::vec::fmadd(Vec::loadu(x + body, tail), vscale, shift)), tail);
    e.store(y + body, tail);
    vsum[0] = vsum[0] + e;
  }
  const acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum[0] + vsum[1]);
  // Pass 3: normalise the prefix; the future gets exactly zero.
  const Vec inv(acc_t(1) / sum);
  at::vec::map([inv](Vec v) { return v * inv; }, y, y, n);
  std::fill(y + n, y + T, acc_t(0));
}
// --8<-- [end:cpu_forward_row]

// --8<-- [start:cpu_backward_row]
// One row of the backward pass: dx = scale * y * (dy - sum_j dy_j y_j), over columns 0..i.
template <typename acc_t>
void backward_row(const acc_t* dy, const acc_t* y, acc_t* dx, int64_t i, int64_t T, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t n = i + 1;
  const acc_t dot = at::vec::map2_reduce_all<acc_t>(
      [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, dy, y, n);
  const Vec vdot(dot), vscale(scale);
  at::vec::map2([vdot, vscale](Vec g, Vec p) { return vscale * p * (g - vdot); }, dx, dy, y, n);
  std::fill(dx + n, dx + T, acc_t(0));
}
// --8<-- [end:cpu_backward_row]

// Widens the first n values of a half-type row to float32 (float and double are used in place).
// Vector by vector, the last one partial: PyTorch's generic at::vec::convert is a scalar loop.
template <typename scalar_t, typename acc_t>
const acc_t* widen(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t F = at::vec::Vectorized<float>::size();  // Vec holds 2 * F values
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(src + j, count));
      lo.store(buf + j, std::min(count, F));
      if (count > F) hi.store(buf + j + F, count - F);
    }
    return buf;
  }
}

// --8<-- [start:cpu_forward]
// Rows begin..end of a stack of (T, T) matrices; the row's position in its matrix is r % T.
template <typename scalar_t>
void forward_rows(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end, int64_t T, double scale) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool widened = !std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> buf(widened ? 2 * T : 0);  // the row in float32, for bfloat16 and float16
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i = r % T;
    if constexpr (widened) {
      forward_row<acc_t>(widen(x + r * T, buf.data(), i + 1), buf.data() + T, i, T, scale);
      at::vec::convert(buf.data() + T, y + r * T, T);
    } else {
      forward_row<acc_t>(x + r * T, y + r * T, i, T, scale);
    }
  }
}

at::Tensor causal_softmax_cpu(const at::Tensor& scores, double scale) {
  check_scores(scores, "scores");
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  const at::Tensor x = scores.contiguous();  // a copy only if the input is non-contiguous
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t T = x.size(-1);
  const int64_t rows = T == 0 ? 0 : x.numel() / T;  // every (matrix, row) pair
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_softmax_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_size(T), [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(xp, yp, begin, end, T, scale);
    });
  });
  return y;
}
// --8<-- [end:cpu_forward]

// --8<-- [start:cpu_backward]
template <typename scalar_t>
void backward_rows(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t begin, int64_t end,
                   int64_t T, double scale) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool widened = !std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> buf(widened ? 3 * T : 0);  // dy, y and dx in float32
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i = r % T;
    if constexpr (widened) {
      backward_row<acc_t>(widen(dy + r * T, buf.data(), i + 1), widen(y + r * T, buf.data() + T, i + 1),
                          buf.data() + 2 * T, i, T, scale);
      at::vec::convert(buf.data() + 2 * T, dx + r * T, T);
    } else {
      backward_row<acc_t>(dy + r * T, y + r * T, dx + r * T, i, T, scale);
    }
  }
}

at::Tensor causal_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& probs, double scale) {
  check_scores(probs, "probs");
  TORCH_CHECK(grad.sizes() == probs.sizes(), "grad ", grad.sizes(), " and probs ", probs.sizes(),
              " must have the same shape");
  TORCH_CHECK(grad.scalar_type() == probs.scalar_type(), "grad and probs must have the same dtype");
  const at::Tensor dy = grad.contiguous();
  const at::Tensor y = probs.contiguous();
  at::Tensor dx = at::empty(y.sizes(), y.options());  // never written into grad: a fresh tensor
  const int64_t T = y.size(-1);
  const int64_t rows = T == 0 ? 0 : y.numel() / T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "causal_softmax_backward_cpu", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_size(T), [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t>(dyp, yp, dxp, begin, end, T, scale);
    });
  });
  return dx;
}
// --8<-- [end:cpu_backward]

}  // namespace

// --8<-- [start:registration]
// The op's schema, and the CPU kernels behind it. csrc/fused_softmax_cuda.cu adds the CUDA kernels
// to the same ops; src/fused_softmax.py adds autograd and the shape-only (fake) implementation.
TORCH_LIBRARY(gpt_fused, m) {
  m.def("causal_softmax(Tensor scores, float scale) -> Tensor");
  m.def("causal_softmax_backward(Tensor grad, Tensor probs, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_fused, CPU, m) {
  m.impl("causal_softmax", &causal_softmax_cpu);
  m.impl("causal_softmax_backward", &causal_softmax_backward_cpu);
}
// --8<-- [end:registration]
