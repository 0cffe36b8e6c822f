// Fused causal masked softmax on NVIDIA GPUs: forward and backward CUDA kernels.
//
// The same computation as csrc/fused_softmax.cpp, shaped for a GPU. A GPU hides memory latency
// with many threads in flight, so the work is cut by rows:
//
// - Rows up to MAX_WARP_COLS long: one warp (32 threads) per row. The row is loaded once into
//   registers with 16-byte vector loads, and the max and the sum are reduced across the warp with
//   register shuffles; no shared memory, no second read.
// - Longer rows: one block per row, which strides over the row and reduces through shared memory.
//   It keeps a running max and sum in one pass (the "online" softmax), then writes in a second,
//   so there is no limit on the sequence length.
//
// Row i of each (T, T) matrix reads only columns 0..i; everything after is written as zero.
// bfloat16 and float16 are computed in float32; float64 (for gradcheck) in float64, by the
// block kernels only.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace {

constexpr int WARP = 32;
constexpr int MAX_WARP_COLS = 1024;  // longest row kept in registers: 32 values per lane
constexpr int ROWS_PER_BLOCK = 4;    // warps (= rows) per block in the warp-per-row kernels
constexpr int BLOCK_THREADS = 256;   // threads per row in the block-per-row kernels

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// VEC values moved by one load or store instruction (16 bytes for the widest).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return acc_t(-INFINITY);
}

// Butterfly reductions: after log2(32) exchanges every lane holds the warp's result.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffff, v, offset));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// --8<-- [start:cuda_forward_warp]
// One warp per row. Lane `lane` holds the chunks c = 0..COLS/VEC-1 of VEC values that start at
// column (c * 32 + lane) * VEC, so the 32 lanes of a warp load 32 neighbouring vectors at once.
template <typename scalar_t, int COLS, int VEC>
__global__ void __launch_bounds__(WARP * ROWS_PER_BLOCK)
forward_warp_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t rows, int T, float scale) {
  constexpr int CHUNKS = COLS / VEC;
  const int64_t r = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
  if (r >= rows) return;  // the whole warp leaves together: threadIdx.y is the warp's row
  const int i = int(r % T);  // the row's position in its matrix: it sees columns 0..i
  const int lane = threadIdx.x;
  x += r * T;
  y += r * T;

  float v[COLS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * WARP + lane) * VEC;
    if (col + VEC - 1 <= i) {  // the whole vector is visible: one wide load
      const Pack<scalar_t, VEC> p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[c * VEC + k] = float(p.v[k]);
    } else {  // on or past the diagonal: read the visible values only
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[c * VEC + k] = col + k <= i ? float(x[col + k]) : neg_inf<float>();
    }
  }
  // max(scale * x) = scale * max(x) for scale > 0: the scale is folded into the exponent.
  float m = neg_inf<float>();
#pragma unroll
  for (int j = 0; j < COLS; ++j) m = fmax(m, v[j]);
  m = warp_max(m);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < COLS; ++j) {
    v[j] = exp((v[j] - m) * scale);  // exp(-inf) = 0 for the hidden columns
    sum += v[j];
  }
  const float inv = 1.f / warp_sum(sum);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * WARP + lane) * VEC;
    if (col >= T) continue;  // T is a multiple of VEC, so a chunk is wholly inside or outside
    Pack<scalar_t, VEC> p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = scalar_t(col + k <= i ? v[c * VEC + k] * inv : 0.f);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(y + col) = p;
  }
}
// --8<-- [end:cuda_forward_warp]

// --8<-- [start:cuda_backward_warp]
// dx = scale * y * (dy - sum_j dy_j y_j) over columns 0..i, zero after; same layout as above.
template <typename scalar_t, int COLS, int VEC>
__global__ void __launch_bounds__(WARP * ROWS_PER_BLOCK)
backward_warp_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y, scalar_t* __restrict__ dx,
                     int64_t rows, int T, float scale) {
  constexpr int CHUNKS = COLS / VEC;
  const int64_t r = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
  if (r >= rows) return;
  const int i = int(r % T);
  const int lane = threadIdx.x;
  dy += r * T;
  y += r * T;
  dx += r * T;

  float g[COLS], p[COLS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * WARP + lane) * VEC;
    if (col + VEC - 1 <= i) {
      const Pack<scalar_t, VEC> gp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(dy + col);
      const Pack<scalar_t, VEC> pp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(y + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        g[c * VEC + k] = float(gp.v[k]);
        p[c * VEC + k] = float(pp.v[k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const bool visible = col + k <= i;
        g[c * VEC + k] = visible ? float(dy[col + k]) : 0.f;
        p[c * VEC + k] = visible ? float(y[col + k]) : 0.f;
      }
    }
  }
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < COLS; ++j) dot += g[j] * p[j];
  dot = warp_sum(dot);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * WARP + lane) * VEC;
    if (col >= T) continue;
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = c * VEC + k;
      out.v[k] = scalar_t(col + k <= i ? scale * p[j] * (g[j] - dot) : 0.f);
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(dx + col) = out;
  }
}
// --8<-- [end:cuda_backward_warp]

// --8<-- [start:cuda_forward_block]
// Add one value to a running softmax (m = max so far, s = sum of exp(scale * (x - m))): a new
// maximum rescales the sum instead of needing a pass of its own.
template <typename acc_t>
__device__ __forceinline__ void add(acc_t& m, acc_t& s, acc_t x, acc_t scale) {
  if (x == neg_inf<acc_t>()) return;  // contributes exp(-inf) = 0
  if (x > m) {
    s = s * exp((m - x) * scale) + acc_t(1);  // s = 0 while m = -inf, and 0 * exp(-inf) = 0
    m = x;
  } else {
    s += exp((x - m) * scale);
  }
}

// Merge two partial softmaxes (m = running max, s = sum of exp(scale * (x - m))).
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2, acc_t scale) {
  if (m2 == neg_inf<acc_t>()) return;  // the other part saw nothing (or only -inf)
  if (m == neg_inf<acc_t>()) {
    m = m2;
    s = s2;
    return;
  }
  const acc_t mx = fmax(m, m2);
  s = s * exp((m - mx) * scale) + s2 * exp((m2 - mx) * scale);
  m = mx;
}

// One block per row, any length: a one-pass running (max, sum), reduced over the block, then a
// second pass that writes. Reads 2 x (i + 1) values, writes T.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(BLOCK_THREADS)
forward_block_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int T, acc_t scale) {
  __shared__ acc_t part_m[BLOCK_THREADS / WARP], part_s[BLOCK_THREADS / WARP];
  const int64_t r = blockIdx.x;
  const int i = int(r % T);
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  x += r * T;
  y += r * T;

  acc_t m = neg_inf<acc_t>(), s = 0;
  for (int j = threadIdx.x; j <= i; j += BLOCK_THREADS) add(m, s, acc_t(x[j]), scale);
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2)
    merge(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset), scale);
  if (lane == 0) {
    part_m[warp] = m;
    part_s[warp] = s;
  }
  __syncthreads();
  // Every warp reduces the per-warp partials, so every thread ends with the row's (max, sum).
  m = lane < BLOCK_THREADS / WARP ? part_m[lane] : neg_inf<acc_t>();
  s = lane < BLOCK_THREADS / WARP ? part_s[lane] : acc_t(0);
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2)
    merge(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset), scale);

  const acc_t inv = acc_t(1) / s;
  for (int j = threadIdx.x; j < T; j += BLOCK_THREADS)
    y[j] = scalar_t(j <= i ? exp((acc_t(x[j]) - m) * scale) * inv : acc_t(0));
}
// --8<-- [end:cuda_forward_block]

// --8<-- [start:cuda_backward_block]
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(BLOCK_THREADS)
backward_block_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y, scalar_t* __restrict__ dx,
                      int T, acc_t scale) {
  __shared__ acc_t part[BLOCK_THREADS / WARP];
  const int64_t r = blockIdx.x;
  const int i = int(r % T);
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  dy += r * T;
  y += r * T;
  dx += r * T;

  acc_t dot = 0;
  for (int j = threadIdx.x; j <= i; j += BLOCK_THREADS) dot += acc_t(dy[j]) * acc_t(y[j]);
  dot = warp_sum(dot);
  if (lane == 0) part[warp] = dot;
  __syncthreads();
  dot = warp_sum(lane < BLOCK_THREADS / WARP ? part[lane] : acc_t(0));

  for (int j = threadIdx.x; j < T; j += BLOCK_THREADS)
    dx[j] = scalar_t(j <= i ? scale * acc_t(y[j]) * (acc_t(dy[j]) - dot) : acc_t(0));
}
// --8<-- [end:cuda_backward_block]

// The widest vector that fits both the row (T a multiple of it) and every pointer's alignment.
template <typename scalar_t, int VEC>
bool can_vectorize(int T, std::initializer_list<const void*> ptrs) {
  if (T % VEC != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<std::uintptr_t>(p) % (sizeof(scalar_t) * VEC) != 0) return false;
  return true;
}

// --8<-- [start:cuda_launch]
// Warp-per-row for rows of up to COLS * 32 values, with 16-byte vectors when the layout allows.
template <typename scalar_t, int COLS>
void launch_forward_warp(const scalar_t* x, scalar_t* y, int64_t rows, int T, float scale, cudaStream_t stream) {
  constexpr int VEC = COLS < 16 / int(sizeof(scalar_t)) ? COLS : 16 / int(sizeof(scalar_t));
  const dim3 block(WARP, ROWS_PER_BLOCK);
  const dim3 grid(unsigned((rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK));
  if (can_vectorize<scalar_t, VEC>(T, {x, y}))
    forward_warp_kernel<scalar_t, COLS, VEC><<<grid, block, 0, stream>>>(x, y, rows, T, scale);
  else
    forward_warp_kernel<scalar_t, COLS, 1><<<grid, block, 0, stream>>>(x, y, rows, T, scale);
}

template <typename scalar_t>
void launch_forward(const scalar_t* x, scalar_t* y, int64_t rows, int T, double scale, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, double>) {
    forward_block_kernel<scalar_t, acc_t><<<unsigned(rows), BLOCK_THREADS, 0, stream>>>(x, y, T, scale);
  } else {
    if (T <= 32) launch_forward_warp<scalar_t, 1>(x, y, rows, T, scale, stream);
    else if (T <= 64) launch_forward_warp<scalar_t, 2>(x, y, rows, T, scale, stream);
    else if (T <= 128) launch_forward_warp<scalar_t, 4>(x, y, rows, T, scale, stream);
    else if (T <= 256) launch_forward_warp<scalar_t, 8>(x, y, rows, T, scale, stream);
    else if (T <= 512) launch_forward_warp<scalar_t, 16>(x, y, rows, T, scale, stream);
    else if (T <= MAX_WARP_COLS) launch_forward_warp<scalar_t, 32>(x, y, rows, T, scale, stream);
    else forward_block_kernel<scalar_t, acc_t><<<unsigned(rows), BLOCK_THREADS, 0, stream>>>(x, y, T, acc_t(scale));
  }
}
// --8<-- [end:cuda_launch]

template <typename scalar_t, int COLS>
void launch_backward_warp(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t rows, int T, float scale,
                          cudaStream_t stream) {
  constexpr int VEC = COLS < 16 / int(sizeof(scalar_t)) ? COLS : 16 / int(sizeof(scalar_t));
  const dim3 block(WARP, ROWS_PER_BLOCK);
  const dim3 grid(unsigned((rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK));
  if (can_vectorize<scalar_t, VEC>(T, {dy, y, dx}))
    backward_warp_kernel<scalar_t, COLS, VEC><<<grid, block, 0, stream>>>(dy, y, dx, rows, T, scale);
  else
    backward_warp_kernel<scalar_t, COLS, 1><<<grid, block, 0, stream>>>(dy, y, dx, rows, T, scale);
}

template <typename scalar_t>
void launch_backward(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t rows, int T, double scale,
                     cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, double>) {
    backward_block_kernel<scalar_t, acc_t><<<unsigned(rows), BLOCK_THREADS, 0, stream>>>(dy, y, dx, T, scale);
  } else {
    if (T <= 32) launch_backward_warp<scalar_t, 1>(dy, y, dx, rows, T, scale, stream);
    else if (T <= 64) launch_backward_warp<scalar_t, 2>(dy, y, dx, rows, T, scale, stream);
    else if (T <= 128) launch_backward_warp<scalar_t, 4>(dy, y, dx, rows, T, scale, stream);
    else if (T <= 256) launch_backward_warp<scalar_t, 8>(dy, y, dx, rows, T, scale, stream);
    else if (T <= 512) launch_backward_warp<scalar_t, 16>(dy, y, dx, rows, T, scale, stream);
    else if (T <= MAX_WARP_COLS) launch_backward_warp<scalar_t, 32>(dy, y, dx, rows, T, scale, stream);
    else backward_block_kernel<scalar_t, acc_t><<<unsigned(rows), BLOCK_THREADS, 0, stream>>>(dy, y, dx, T, acc_t(scale));
  }
}

void check_square(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, name, " must have at least 2 dimensions, got ", t.dim());
  TORCH_CHECK(t.size(-1) == t.size(-2), name, " must be (..., T, T), got ", t.sizes());
  TORCH_CHECK(t.size(-1) < (int64_t(1) << 31), name, ": T is too large");
  TORCH_CHECK(t.size(-1) == 0 || t.numel() / t.size(-1) < (int64_t(1) << 31), name, ": too many rows");
}

// --8<-- [start:cuda_entry]
at::Tensor causal_softmax_cuda(const at::Tensor& scores, double scale) {
  check_square(scores, "scores");
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int T = int(x.size(-1));
  const int64_t rows = T == 0 ? 0 : x.numel() / T;
  if (rows == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_softmax_cuda", [&] {
    launch_forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rows, T, scale, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor causal_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& probs, double scale) {
  check_square(probs, "probs");
  TORCH_CHECK(grad.sizes() == probs.sizes(), "grad ", grad.sizes(), " and probs ", probs.sizes(),
              " must have the same shape");
  TORCH_CHECK(grad.scalar_type() == probs.scalar_type(), "grad and probs must have the same dtype");
  const c10::cuda::CUDAGuard guard(probs.device());
  const at::Tensor dy = grad.contiguous();
  const at::Tensor y = probs.contiguous();
  at::Tensor dx = at::empty(y.sizes(), y.options());
  const int T = int(y.size(-1));
  const int64_t rows = T == 0 ? 0 : y.numel() / T;
  if (rows == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "causal_softmax_backward_cuda", [&] {
    launch_backward<scalar_t>(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                              dx.mutable_data_ptr<scalar_t>(), rows, T, scale, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt_fused, CUDA, m) {
  m.impl("causal_softmax", &causal_softmax_cuda);
  m.impl("causal_softmax_backward", &causal_softmax_backward_cuda);
}
// --8<-- [end:cuda_entry]
