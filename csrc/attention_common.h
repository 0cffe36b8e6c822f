// What the CPU attention kernels share: the scalar loops of the reference version, the vector
// helpers, and how a (B, H, T, D) tensor with any strides is read into a padded float buffer.
//
// The scalar loops are the first rung of the version ladder (csrc/attention_versions.cpp) and
// also the float64 path of the flash kernel (csrc/flash_attention.cpp): gradcheck runs the
// flash algorithm with them, so they never fall out of use.

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace gpt_attention {

// float32 accumulation for the half types, the type itself otherwise.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

// --8<-- [start:scalar_ops]
// sum_c a[c] * b[c]: one score q_i . k_j, one multiply-add at a time.
template <typename acc_t>
acc_t dot_scalar(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

// y += alpha * x: one weighted value row added to an output row.
template <typename acc_t>
void axpy_scalar(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}
// --8<-- [end:scalar_ops]

// exp on a vector: PyTorch's faster float32 variant (within 2 ulp), the exact one for float64.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& z) {
  if constexpr (std::is_same_v<acc_t, double>) return z.exp(); else return z.exp_u20();
}

template <typename acc_t>
acc_t reduce_max(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
acc_t reduce_sum(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A (B, H, T, D) tensor as a base pointer and four strides, in elements: any layout works,
// transposed views of a (B, T, H, D) projection included.
template <typename scalar_t>
struct Strided {
  scalar_t* data;
  int64_t sb, sh, st, sd;
  scalar_t* row(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
};

// Row t of a strided tensor as D values of acc_t, times mul, then zeros up to Dp.
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, int64_t sd, int64_t D, int64_t Dp, acc_t mul, acc_t* dst) {
  for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<acc_t>(src[c * sd]) * mul;
  for (int64_t c = D; c < Dp; ++c) dst[c] = acc_t(0);
}

// The first D values of a padded row, times mul, into a strided row of the output's type.
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t D, acc_t mul, scalar_t* dst, int64_t sd) {
  for (int64_t c = 0; c < D; ++c) dst[c * sd] = static_cast<scalar_t>(src[c] * mul);
}

}  // namespace gpt_attention
