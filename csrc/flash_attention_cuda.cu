// Flash attention on NVIDIA GPUs: the same algorithm as csrc/flash_attention.cpp, cut for a GPU.
//
// A warp (32 threads) owns one query row and a block owns WARPS neighbouring rows, which share tiles
// of KT = 32 keys and values staged in shared memory, one key per lane. For each tile a lane
// computes the score of its key, the warp reduces the tile's maximum and sum with register
// shuffles and updates the row's running maximum m and sum l (the online softmax), and then every
// lane adds the 32 weighted value rows to the output columns it owns: column c belongs to lane
// c % 32, so a lane holds NU = ceil(D / 32) <= 4 output values in registers. Tiles after the row's
// diagonal are skipped. The forward writes the output and the log-sum-exp m + log l per row.
//
// The backward recomputes the probabilities from the log-sum-exp in two kernels with no atomics:
// one where a warp owns a query row and sums dQ over its keys, one where a warp owns a key row and
// sums dK and dV over the queries at or after it (and over the query heads of its group). Shared
// tiles that a lane reads along a row are padded by one value, so the 32 lanes hit 32 banks.
//
// Sums are float32 for bfloat16 and float16 and float64 for float64; head dims up to 128.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "attention_checks.h"

namespace {

using gpt_attention::check_backward_inputs;
using gpt_attention::check_inputs;

constexpr int WARP = 32;
constexpr int WARPS = 8;  // query (or key) rows per block
constexpr int KT = 32;    // keys (or queries) per shared tile: one per lane
constexpr int MAX_D = 128;
constexpr unsigned FULL = 0xffffffffu;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A (B, H, T, D) tensor with any strides.
template <typename T>
struct View {
  T* data;
  int64_t sb, sh, st, sd;
  __device__ T& at(int64_t b, int64_t h, int64_t t, int64_t c) const { return data[b * sb + h * sh + t * st + c * sd]; }
};

template <typename T>
View<T> view(const at::Tensor& t) {
  return {const_cast<T*>(t.const_data_ptr<T>()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Sizes {
  int B, H, Hkv, T, D;
  __device__ int rep() const { return H / Hkv; }
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(FULL, v, offset));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL, v, offset);
  return v;
}

// Rows t0..t0+KT-1 of head (b, h) into a shared tile of row stride `stride`, times mul; zeros past
// T and past D. Every thread of the block takes part.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(View<scalar_t> x, int b, int h, int t0, const Sizes& s, int Dp, int stride,
                          acc_t mul, acc_t* tile) {
  for (int idx = threadIdx.x; idx < KT * Dp; idx += blockDim.x) {
    const int r = idx / Dp, c = idx % Dp, t = t0 + r;
    tile[r * stride + c] = t < s.T && c < s.D ? acc_t(x.at(b, h, t, c)) * mul : acc_t(0);
  }
}

// One row of D values into this warp's shared row, times mul, zeros past D.
template <typename scalar_t, typename acc_t>
__device__ void load_row(View<scalar_t> x, int b, int h, int t, bool active, const Sizes& s, int Dp,
                         acc_t mul, acc_t* row) {
  for (int c = threadIdx.x % WARP; c < Dp; c += WARP)
    row[c] = active && c < s.D ? acc_t(x.at(b, h, t, c)) * mul : acc_t(0);
}

// --8<-- [start:cuda_forward]
template <typename scalar_t, typename acc_t, int NU>
__global__ void __launch_bounds__(WARP * WARPS)
flash_forward_kernel(View<scalar_t> q, View<scalar_t> k, View<scalar_t> v, View<scalar_t> out, acc_t* lse, Sizes s,
                     acc_t scale) {
  constexpr int Dp = NU * WARP;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem);  // [WARPS][Dp]: each warp's query row, scaled
  acc_t* k_s = q_s + WARPS * Dp;                 // [KT][Dp + 1]: lane l reads key l along its row
  acc_t* v_s = k_s + KT * (Dp + 1);              // [KT][Dp]: lane l reads columns l, l + 32, ...
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const int b = blockIdx.y / s.H, h = blockIdx.y % s.H, g = h / s.rep();
  const int row0 = blockIdx.x * WARPS, i = row0 + warp;
  const bool active = i < s.T;
  load_row(q, b, h, i, active, s, Dp, scale, q_s + warp * Dp);
  acc_t o[NU] = {};
  acc_t m = -INFINITY, l = 0;
  const int last = min(s.T - 1, row0 + WARPS - 1);  // the block's last row: no tile after it
  for (int j0 = 0; j0 <= last; j0 += KT) {
    __syncthreads();  // every warp is done with the previous tile
    load_tile(k, b, g, j0, s, Dp, Dp + 1, acc_t(1), k_s);
    load_tile(v, b, g, j0, s, Dp, Dp, acc_t(1), v_s);
    __syncthreads();
    if (!active || j0 > i) continue;  // the whole tile is after this row's diagonal
    const int j = j0 + lane;          // this lane's key
    acc_t score = -INFINITY;
    if (j <= i) {
      score = 0;
      for (int c = 0; c < Dp; ++c) score += q_s[warp * Dp + c] * k_s[lane * (Dp + 1) + c];  // s_j = scale q . k_j
    }
    const acc_t m_new = fmax(m, warp_max(score));             // m' = max(m, max_j s_j)
    const acc_t p = j <= i ? exp(score - m_new) : acc_t(0);  // p_j = exp(s_j - m')
    const acc_t alpha = exp(m - m_new);                       // exp(-inf) = 0 on the first tile
    l = l * alpha + warp_sum(p);                              // l' = l exp(m - m') + sum_j p_j
    m = m_new;
#pragma unroll
    for (int u = 0; u < NU; ++u) o[u] *= alpha;
    for (int jj = 0; jj < min(KT, i - j0 + 1); ++jj) {
      const acc_t pj = __shfl_sync(FULL, p, jj);
#pragma unroll
      for (int u = 0; u < NU; ++u) o[u] += pj * v_s[jj * Dp + lane + u * WARP];  // o += p_j v_j
    }
  }
  if (!active) return;
#pragma unroll
  for (int u = 0; u < NU; ++u)
    if (lane + u * WARP < s.D) out.at(b, h, i, lane + u * WARP) = scalar_t(o[u] / l);
  if (lane == 0) lse[(int64_t(b) * s.H + h) * s.T + i] = m + log(l);
}
// --8<-- [end:cuda_forward]

// --8<-- [start:cuda_backward]
// D_i = sum_c dO_ic O_ic for every row, one warp per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(WARP * WARPS)
flash_backward_dot_kernel(View<scalar_t> grad, View<scalar_t> out, acc_t* dd, Sizes s) {
  const int64_t row = int64_t(blockIdx.x) * WARPS + threadIdx.x / WARP;
  if (row >= int64_t(s.B) * s.H * s.T) return;
  const int b = int(row / (int64_t(s.H) * s.T)), h = int(row / s.T % s.H), t = int(row % s.T);
  acc_t d = 0;
  for (int c = threadIdx.x % WARP; c < s.D; c += WARP) d += acc_t(grad.at(b, h, t, c)) * acc_t(out.at(b, h, t, c));
  d = warp_sum(d);
  if (threadIdx.x % WARP == 0) dd[row] = d;
}

// dQ_i = scale sum_j dS_ij k_j, dS_ij = p_ij (dO_i . v_j - D_i): a warp per query row, a lane per key.
template <typename scalar_t, typename acc_t, int NU>
__global__ void __launch_bounds__(WARP * WARPS)
flash_backward_dq_kernel(View<scalar_t> q, View<scalar_t> k, View<scalar_t> v, View<scalar_t> grad,
                         const acc_t* lse, const acc_t* dd, View<scalar_t> dq, Sizes s, acc_t scale) {
  constexpr int Dp = NU * WARP;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem);  // [WARPS][Dp], scaled
  acc_t* do_s = q_s + WARPS * Dp;                // [WARPS][Dp]
  acc_t* k_s = do_s + WARPS * Dp;                // [KT][Dp + 1]
  acc_t* v_s = k_s + KT * (Dp + 1);              // [KT][Dp + 1]
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const int b = blockIdx.y / s.H, h = blockIdx.y % s.H, g = h / s.rep();
  const int row0 = blockIdx.x * WARPS, i = row0 + warp;
  const bool active = i < s.T;
  const int64_t row = (int64_t(b) * s.H + h) * s.T + i;
  load_row(q, b, h, i, active, s, Dp, scale, q_s + warp * Dp);
  load_row(grad, b, h, i, active, s, Dp, acc_t(1), do_s + warp * Dp);
  const acc_t lse_i = active ? lse[row] : acc_t(0), d_i = active ? dd[row] : acc_t(0);
  acc_t acc[NU] = {};
  const int last = min(s.T - 1, row0 + WARPS - 1);
  for (int j0 = 0; j0 <= last; j0 += KT) {
    __syncthreads();
    load_tile(k, b, g, j0, s, Dp, Dp + 1, acc_t(1), k_s);
    load_tile(v, b, g, j0, s, Dp, Dp + 1, acc_t(1), v_s);
    __syncthreads();
    if (!active || j0 > i) continue;
    const int j = j0 + lane;
    acc_t ds = 0;
    if (j <= i) {
      acc_t score = 0, dp = 0;
      for (int c = 0; c < Dp; ++c) {
        score += q_s[warp * Dp + c] * k_s[lane * (Dp + 1) + c];  // s_ij = scale q_i . k_j
        dp += do_s[warp * Dp + c] * v_s[lane * (Dp + 1) + c];    // dP_ij = dO_i . v_j
      }
      ds = exp(score - lse_i) * (dp - d_i);  // dS_ij = p_ij (dP_ij - D_i)
    }
    for (int jj = 0; jj < min(KT, i - j0 + 1); ++jj) {
      const acc_t dsj = __shfl_sync(FULL, ds, jj);
#pragma unroll
      for (int u = 0; u < NU; ++u) acc[u] += dsj * k_s[jj * (Dp + 1) + lane + u * WARP];
    }
  }
  if (!active) return;
#pragma unroll
  for (int u = 0; u < NU; ++u)
    if (lane + u * WARP < s.D) dq.at(b, h, i, lane + u * WARP) = scalar_t(acc[u] * scale);
}

// dV_j = sum_i p_ij dO_i and dK_j = scale sum_i dS_ij q_i over the queries i >= j of every query head
// that reads key/value head g: a warp per key row, a lane per query.
template <typename scalar_t, typename acc_t, int NU>
__global__ void __launch_bounds__(WARP * WARPS)
flash_backward_dkdv_kernel(View<scalar_t> q, View<scalar_t> k, View<scalar_t> v, View<scalar_t> grad,
                           const acc_t* lse, const acc_t* dd, View<scalar_t> dk, View<scalar_t> dv, Sizes s,
                           acc_t scale) {
  constexpr int Dp = NU * WARP;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* k_s = reinterpret_cast<acc_t*>(smem);  // [WARPS][Dp]: each warp's key row
  acc_t* v_s = k_s + WARPS * Dp;                 // [WARPS][Dp]
  acc_t* q_s = v_s + WARPS * Dp;                 // [KT][Dp + 1], scaled
  acc_t* do_s = q_s + KT * (Dp + 1);             // [KT][Dp + 1]
  acc_t* lse_s = do_s + KT * (Dp + 1);           // [KT]
  acc_t* d_s = lse_s + KT;                       // [KT]
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const int b = blockIdx.y / s.Hkv, g = blockIdx.y % s.Hkv;
  const int row0 = blockIdx.x * WARPS, j = row0 + warp;
  const bool active = j < s.T;
  load_row(k, b, g, j, active, s, Dp, acc_t(1), k_s + warp * Dp);
  load_row(v, b, g, j, active, s, Dp, acc_t(1), v_s + warp * Dp);
  acc_t dk_acc[NU] = {}, dv_acc[NU] = {};
  for (int h = g * s.rep(); h < (g + 1) * s.rep(); ++h) {
    for (int i0 = row0 / KT * KT; i0 < s.T; i0 += KT) {  // from the tile of the block's first key
      __syncthreads();
      load_tile(q, b, h, i0, s, Dp, Dp + 1, scale, q_s);
      load_tile(grad, b, h, i0, s, Dp, Dp + 1, acc_t(1), do_s);
      if (threadIdx.x < KT) {
        const int i = i0 + threadIdx.x;
        const int64_t row = (int64_t(b) * s.H + h) * s.T + i;
        lse_s[threadIdx.x] = i < s.T ? lse[row] : acc_t(0);
        d_s[threadIdx.x] = i < s.T ? dd[row] : acc_t(0);
      }
      __syncthreads();
      if (!active || i0 + KT - 1 < j) continue;  // the whole tile is before this key
      const int i = i0 + lane;  // this lane's query
      acc_t p = 0, ds = 0;
      if (i < s.T && i >= j) {
        acc_t score = 0, dp = 0;
        for (int c = 0; c < Dp; ++c) {
          score += q_s[lane * (Dp + 1) + c] * k_s[warp * Dp + c];
          dp += do_s[lane * (Dp + 1) + c] * v_s[warp * Dp + c];
        }
        p = exp(score - lse_s[lane]);  // p_ij, recomputed
        ds = p * (dp - d_s[lane]);     // dS_ij
      }
      for (int ii = max(0, j - i0); ii < KT; ++ii) {
        const acc_t pi = __shfl_sync(FULL, p, ii), dsi = __shfl_sync(FULL, ds, ii);
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          dv_acc[u] += pi * do_s[ii * (Dp + 1) + lane + u * WARP];  // dV_j += p_ij dO_i
          dk_acc[u] += dsi * q_s[ii * (Dp + 1) + lane + u * WARP];  // dK_j += dS_ij (scale q_i)
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int u = 0; u < NU; ++u) {
    if (lane + u * WARP < s.D) {
      dk.at(b, g, j, lane + u * WARP) = scalar_t(dk_acc[u]);
      dv.at(b, g, j, lane + u * WARP) = scalar_t(dv_acc[u]);
    }
  }
}
// --8<-- [end:cuda_backward]

// Launches with `smem` bytes of dynamic shared memory, opting in above the default 48 KiB.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, Args... args) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<grid, WARP * WARPS, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Sizes sizes_of(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.size(3) <= MAX_D, "the CUDA kernel takes head dims up to ", MAX_D, ", got ", q.size(3));
  TORCH_CHECK(q.size(2) < (int64_t(1) << 31) && q.size(0) * q.size(1) < 65536, "too many rows or heads");
  return {int(q.size(0)), int(q.size(1)), int(k.size(1)), int(q.size(2)), int(q.size(3))};
}

// Calls fn.template operator()<NU>() with NU = ceil(D / 32), the output values a lane holds.
template <typename Fn>
void with_lane_width(int D, Fn&& fn) {
  switch ((D + WARP - 1) / WARP) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 4>{}); break;
  }
}

// --8<-- [start:cuda_entry]
std::tuple<at::Tensor, at::Tensor> causal_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  check_inputs(q, k, v, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const Sizes s = sizes_of(q, k);
  at::Tensor out = at::empty({s.B, s.T, s.H, s.D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({s.B, s.H, s.T}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    with_lane_width(s.D, [&](auto nu) {
      constexpr int NU = decltype(nu)::value, Dp = NU * WARP;
      const size_t smem = (WARPS * Dp + KT * (Dp + 1) + KT * Dp) * sizeof(acc_t);
      launch(flash_forward_kernel<scalar_t, acc_t, NU>, dim3((s.T + WARPS - 1) / WARPS, s.B * s.H), smem, stream,
             view<scalar_t>(q), view<scalar_t>(k), view<scalar_t>(v), view<scalar_t>(out), lse.data_ptr<acc_t>(), s,
             acc_t(scale));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  check_inputs(q, k, v, scale);
  check_backward_inputs(grad, q, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const Sizes s = sizes_of(q, k);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor L = lse.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor dd = at::empty({s.B, s.H, s.T}, L.options());
    const int64_t rows = int64_t(s.B) * s.H * s.T;
    launch(flash_backward_dot_kernel<scalar_t, acc_t>, dim3(unsigned((rows + WARPS - 1) / WARPS)), 0, stream,
           view<scalar_t>(grad), view<scalar_t>(out), dd.data_ptr<acc_t>(), s);
    with_lane_width(s.D, [&](auto nu) {
      constexpr int NU = decltype(nu)::value, Dp = NU * WARP;
      const dim3 blocks((s.T + WARPS - 1) / WARPS, s.B * s.H), kv_blocks((s.T + WARPS - 1) / WARPS, s.B * s.Hkv);
      launch(flash_backward_dq_kernel<scalar_t, acc_t, NU>, blocks,
             (2 * WARPS * Dp + 2 * KT * (Dp + 1)) * sizeof(acc_t), stream, view<scalar_t>(q), view<scalar_t>(k),
             view<scalar_t>(v), view<scalar_t>(grad), L.const_data_ptr<acc_t>(), dd.const_data_ptr<acc_t>(),
             view<scalar_t>(dq), s, acc_t(scale));
      launch(flash_backward_dkdv_kernel<scalar_t, acc_t, NU>, kv_blocks,
             (2 * WARPS * Dp + 2 * KT * (Dp + 1) + 2 * KT) * sizeof(acc_t), stream, view<scalar_t>(q),
             view<scalar_t>(k), view<scalar_t>(v), view<scalar_t>(grad), L.const_data_ptr<acc_t>(),
             dd.const_data_ptr<acc_t>(), view<scalar_t>(dk), view<scalar_t>(dv), s, acc_t(scale));
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt_flash, CUDA, m) {
  m.impl("causal_attention", &causal_attention_cuda);
  m.impl("causal_attention_backward", &causal_attention_backward_cuda);
}
// --8<-- [end:cuda_entry]
