// Flash attention on the CPU: the whole causal attention core, softmax(mask(q k^T * scale)) v, in
// one kernel that never writes the (T, T) scores to memory and never computes the masked half.
//
// Forward (FlashAttention, Dao et al. 2022, with FlashAttention-2's loop order): the queries are cut
// into tiles of BQ rows and the keys into tiles of BK. A query tile visits the key tiles from the
// first to the one on its diagonal, never beyond. Each visit computes a (BQ, BK) tile of scores in a
// buffer that stays in cache, folds it into a running row maximum m and sum l (the online softmax of
// Milakov & Gimelshein), rescales the output rows already accumulated, and adds the tile's
// probabilities times the values. Only the output and the log-sum-exp per row, m + log l, are kept.
//
// Backward (FlashAttention-2): a task owns a range of key tiles and, for each, visits the query
// tiles at or after it, recomputing the probabilities from the saved log-sum-exp; it accumulates the
// key and value gradients of its tiles in cache and the query gradient in a buffer of its own.
//
// The matrix products of a tile are a register-blocked micro-kernel on at::vec::Vectorized
// (MR rows by MNC vectors of accumulators), on operands packed into float32 with the head
// dimension padded to a whole number of vectors. float16 is widened when packed, so every sum is a
// float32 sum; float64 runs the same tiles with the scalar loops of attention_common.h, for
// gradcheck. bfloat16 is widened too, except where the CPU has AVX512-BF16: there the operands
// stay bfloat16, packed in pairs along the summed dimension, and a second micro-kernel multiplies
// them with vdpbf16ps (two products per float32 lane and instruction) into float32 sums; the
// probabilities and score gradients are rounded to bfloat16 before their products, as
// FlashAttention does on GPUs. Grouped key/value heads: query head h reads key/value head
// h / (H / H_kv), and the backward sums the gradients of the query heads that share one.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "attention_checks.h"
#include "attention_common.h"

namespace {

using namespace gpt_attention;

constexpr int64_t BQ = 64;  // query rows per tile
constexpr int64_t BK = 128;  // key columns per tile
#if defined(CPU_CAPABILITY_AVX512)
constexpr int MR = 6, MNC = 4;  // 24 accumulators and 4 loaded vectors of the 32 zmm registers
#else
constexpr int MR = 6, MNC = 2;  // 12 accumulators, 2 loaded vectors and a broadcast of 16 ymm
#endif

// The bfloat16 dot-product kernels exist in the AVX-512 build (with GCC or Clang, which compile
// single functions for an extra instruction set); the rest of the library keeps its flags, and a
// CPU without AVX512-BF16 never calls them (bf16_dot_products, checked at run time).
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
#define GPT_BF16_DOT 1
#include <immintrin.h>
#define BF16_TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
#else
#define GPT_BF16_DOT 0
#endif

// --8<-- [start:bf16_switch]
// True where bfloat16 inputs run the dot-product kernels: the CPU has AVX512-BF16 and the
// environment does not ask for the widened float32 products (GPT_FLASH_BF16_WIDEN, set by the tests
// and benchmarks that compare the two on one machine).
bool bf16_dot_products() {
#if GPT_BF16_DOT
  static const bool cpu = __builtin_cpu_supports("avx512bf16");
  return cpu && std::getenv("GPT_FLASH_BF16_WIDEN") == nullptr;
#else
  return false;
#endif
}

// Where the tile products of one call take their operands: packed in the dot-product layout, as
// bfloat16 (op_t), or widened to the accumulation type. Calls f with a value of that type.
template <typename scalar_t, typename F>
void with_operand_type(F&& f) {
#if GPT_BF16_DOT
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (bf16_dot_products()) return f(c10::BFloat16());
  }
#endif
  f(acc_type<scalar_t>());
}
// --8<-- [end:bf16_switch]

// --8<-- [start:pair_layout]
// bfloat16 operands of the products are kept in pairs along the dimension a product sums over:
// element (i, j) of a matrix with ld columns is at [i / 2][j][i % 2], so (M[i][j], M[i+1][j]) are
// side by side. Widened operands are kept row by row.
template <typename op_t>
constexpr bool paired = std::is_same_v<op_t, c10::BFloat16>;

inline int64_t at_(int64_t i, int64_t j, int64_t ld, bool pairs) {
  return pairs ? (i / 2 * ld + j) * 2 + i % 2 : i * ld + j;
}

template <typename op_t>
int64_t at_(int64_t i, int64_t j, int64_t ld) {
  return at_(i, j, ld, paired<op_t>);
}
// --8<-- [end:pair_layout]

// --8<-- [start:micro_kernel]
// C (+)= A B for one tile, where A[r][k] = a[r * a_rs + k * a_ks] (so A can be read transposed),
// B[k][c] = b[k * ldb + c] and C[r][c] = c[r * ldc + c]. In the pair layout (op_t bfloat16) B is
// b[at_(k, c, ldb)], and A read transposed (a_ks != 1) is a[at_(k, r, a_ks)].
template <typename op_t, typename acc_t = op_t>
struct Operands {
  const op_t* a;
  int64_t a_rs, a_ks;
  const op_t* b;
  int64_t ldb;
  acc_t* c;
  int64_t ldc;
  bool accumulate;
};

// R rows by NC vectors of C, over the terms k0..k1-1: R * NC accumulators stay in registers while
// each step loads NC vectors of B and broadcasts R values of A, R * NC multiply-adds per step.
template <int R, int NC>
void mm_block(const Operands<float>& o, int64_t r0, int64_t c0, int64_t k0, int64_t k1) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  Vec acc[R][NC];
  float* c = o.c + r0 * o.ldc + c0;
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NC; ++n) acc[r][n] = o.accumulate ? Vec::loadu(c + r * o.ldc + n * W) : Vec(0.f);
  const float* a = o.a + r0 * o.a_rs;
  for (int64_t k = k0; k < k1; ++k) {
    const float* b = o.b + k * o.ldb + c0;
    Vec bv[NC];
    for (int n = 0; n < NC; ++n) bv[n] = Vec::loadu(b + n * W);
    for (int r = 0; r < R; ++r) {
      const Vec ar(a[r * o.a_rs + k * o.a_ks]);
      for (int n = 0; n < NC; ++n) acc[r][n] = at::vec::fmadd(ar, bv[n], acc[r][n]);  // C[r][c] += A[r][k] B[k][c]
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NC; ++n) acc[r][n].store(c + r * o.ldc + n * W);
}
// --8<-- [end:micro_kernel]

#if GPT_BF16_DOT
// --8<-- [start:dot_kernel]
// The same block on bfloat16 operands in the pair layout, one step per pair of terms k, k+1: a
// vector of B holds (B[k][c], B[k+1][c]) for 16 columns, A's (A[r][k], A[r][k+1]) is one 32-bit
// value broadcast, and vdpbf16ps does acc[c] += A[r][k] B[k][c] + A[r][k+1] B[k+1][c] in float32.
// Terms k0..k1-1 are rounded out to whole pairs; the packing put zeros (or a masked 0) in the
// extra term.
template <int R, int NC>
BF16_TARGET void mm_block(const Operands<c10::BFloat16, float>& o, int64_t r0, int64_t c0, int64_t k0, int64_t k1) {
  constexpr int64_t W = 16;  // float32 lanes of a zmm register
  // Pair kk of row r of A: 2 * kk along a row, or [kk][r] when A is read transposed.
  const int64_t ra = o.a_ks == 1 ? o.a_rs : 2, ka = o.a_ks == 1 ? 2 : 2 * o.a_ks;
  const int64_t ldb = o.ldb, ldc = o.ldc;  // locals: the stores below may alias any memory
  __m512 acc[R][NC];
  float* c = o.c + r0 * ldc + c0;
  const __mmask16 keep = o.accumulate ? 0xFFFF : 0;  // C's old values, or zeros
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) acc[r][n] = _mm512_maskz_loadu_ps(keep, c + r * ldc + n * W);
  const c10::BFloat16* a = o.a + r0 * ra;
  for (int64_t kk = k0 / 2; kk < (k1 + 1) / 2; ++kk) {
    const c10::BFloat16* b = o.b + (kk * ldb + c0) * 2;  // B's pair row kk, from column c0
    __m512bh bv[NC];
    for (int n = 0; n < NC; ++n) bv[n] = (__m512bh)_mm512_loadu_si512(b + n * 2 * W);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * ra + kk * ka, sizeof pair);
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(pair);
      for (int n = 0; n < NC; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], ar, bv[n]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NC; ++n) _mm512_storeu_ps(c + r * ldc + n * W, acc[r][n]);
}

// The order that puts two rows x, y of 16 bfloat16, held as one vector (x low, y high), side by
// side: (x_0, y_0, x_1, y_1, ...), for _mm512_permutexvar_epi16.
BF16_TARGET __m512i side_by_side() {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(order);
}

// Two contiguous rows x, y of D bfloat16 (zeros for a null row) side by side, into one row of the
// pair layout padded with zeros to Dp (a multiple of 16): dst[2c] = x[c], dst[2c + 1] = y[c].
BF16_TARGET void pair_of_rows(const c10::BFloat16* x, const c10::BFloat16* y, int64_t D, int64_t Dp, c10::BFloat16* dst) {
  const __m512i order = side_by_side();
  for (int64_t c = 0; c < Dp; c += 16) {
    const __mmask16 m = D - c >= 16 ? 0xFFFF : D > c ? (1u << (D - c)) - 1 : 0;  // columns from D: 0
    const __m256i xv = x ? _mm256_maskz_loadu_epi16(m, x + c) : _mm256_setzero_si256();
    const __m256i yv = y ? _mm256_maskz_loadu_epi16(m, y + c) : _mm256_setzero_si256();
    const __m512i xy = _mm512_inserti64x4(_mm512_castsi256_si512(xv), yv, 1);
    _mm512_storeu_si512(dst + 2 * c, _mm512_permutexvar_epi16(order, xy));
  }
}

// The first kn columns of rows 0..rows-1 of a (rows, BK) float32 tile, rounded to bfloat16 (to
// nearest even) with zeros up to the next 16 columns: as rows (dst[r][j]) for a product that sums
// over j, or in the pair layout (dst[at_(r, j, BK)], a missing last row zeros) for one that sums
// over r, that is, reads the tile transposed.
BF16_TARGET void round_tile(const float* S, int64_t rows, int64_t kn, bool pairs, c10::BFloat16* dst) {
  const __m512i order = side_by_side();
  for (int64_t r = 0; r < rows; r += pairs ? 2 : 1) {
    for (int64_t j = 0; j < kn; j += 16) {
      const __mmask16 m = kn - j >= 16 ? 0xFFFF : (1u << (kn - j)) - 1;  // columns from kn: 0
      const __m512 x = _mm512_maskz_loadu_ps(m, S + r * BK + j);
      if (!pairs) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * BK + j), (__m256i)_mm512_cvtneps_pbh(x));
        continue;
      }
      const __m512 y = r + 1 < rows ? _mm512_maskz_loadu_ps(m, S + (r + 1) * BK + j) : _mm512_setzero_ps();
      const __m512i xy = (__m512i)_mm512_cvtne2ps_pbh(y, x);  // x in the low half, y in the high
      _mm512_storeu_si512(dst + at_<c10::BFloat16>(r, j, BK), _mm512_permutexvar_epi16(order, xy));
    }
  }
}
// --8<-- [end:dot_kernel]
#endif

// The probabilities (or score gradients) of a tile as the A operand of a product: the float32
// tile itself when the products are widened, else rounded to bfloat16 into buf.
template <typename op_t, typename acc_t>
const op_t* operand(const acc_t* S, int64_t rows, int64_t kn, bool pairs, op_t* buf) {
  if constexpr (std::is_same_v<op_t, acc_t>) {
    return S;
  } else {
#if GPT_BF16_DOT
    round_tile(S, rows, kn, pairs, buf);
#endif
    return buf;
  }
}

// --8<-- [start:dispatch]
// The vectors left over after the blocks of MNC: one block of exactly that many.
// (op_t: float32, or bfloat16 for the dot-product block; either way a vector is 16 or 8 float32 columns.)
template <int R, int NC, typename op_t>
void mm_rest(const Operands<op_t, float>& o, int64_t r0, int64_t c0, int64_t nvec, int64_t k0, int64_t k1) {
  if constexpr (NC > 0) {
    if (nvec == NC) mm_block<R, NC>(o, r0, c0, k0, k1);
    else mm_rest<R, NC - 1>(o, r0, c0, nvec, k0, k1);
  }
}

template <int R, typename op_t>
void mm_row_block(const Operands<op_t, float>& o, int64_t r0, int64_t ncols, int64_t k0, int64_t k1) {
  constexpr int64_t W = at::vec::Vectorized<float>::size();
  int64_t c0 = 0;
  for (; c0 + MNC * W <= ncols; c0 += MNC * W) mm_block<R, MNC>(o, r0, c0, k0, k1);
  if (c0 < ncols) mm_rest<R, MNC - 1>(o, r0, c0, (ncols - c0) / W, k0, k1);
}

template <int R = MR, typename op_t>
void mm_rows(int64_t rr, const Operands<op_t, float>& o, int64_t r0, int64_t ncols, int64_t k0, int64_t k1) {
  if constexpr (R > 0) {
    if (rr == R) mm_row_block<R>(o, r0, ncols, k0, k1);
    else mm_rows<R - 1>(rr, o, r0, ncols, k0, k1);
  }
}

// --8<-- [end:dispatch]

// Which part of a tile on the diagonal is needed, for a query at row q0 + r and a key at k0 + c
// (visible when c <= r + diag, diag = q0 - k0): the products of scores need only the visible
// columns; a product that sums over keys needs only the visible terms, and one that sums over
// queries (for the key gradients) only the queries at or after the key.
enum class Causal { none, cols, k_end, k_begin };

// --8<-- [start:tile_mm]
// C[rows, ncols] (+)= A[rows, K] B[K, ncols] for one tile, ncols a multiple of the vector width.
// Outside the causal limit, C is left unwritten (cols) or the terms skipped are zeros (k_*).
template <typename op_t, typename acc_t>
void tile_mm(const Operands<op_t, acc_t>& o, int64_t rows, int64_t ncols, int64_t K, Causal causal, int64_t diag) {
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  constexpr int64_t R = std::is_same_v<acc_t, double> ? 1 : MR;  // float64: one row at a time
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const int64_t rr = std::min(R, rows - r0), last = r0 + rr - 1;
    int64_t n = ncols, k0 = 0, k1 = K;
    if (causal == Causal::cols) n = std::min(ncols, round_up(last + diag + 1, W));
    if (causal == Causal::k_end) k1 = std::min(K, last + diag + 1);
    if (causal == Causal::k_begin) k0 = std::max<int64_t>(0, r0 - diag);
    if (n <= 0 || (o.accumulate && k1 <= k0)) continue;
    if constexpr (std::is_same_v<acc_t, double>) {
      acc_t* c = o.c + r0 * o.ldc;  // the scalar reference loops: C row += A[r][k] * B row k
      if (!o.accumulate) std::fill(c, c + n, acc_t(0));
      for (int64_t k = k0; k < k1; ++k) axpy_scalar(o.a[r0 * o.a_rs + k * o.a_ks], o.b + k * o.ldb, c, n);
    } else {
      mm_rows(rr, o, r0, n, k0, k1);
    }
  }
}
// --8<-- [end:tile_mm]

// The sizes every loop needs, computed once.
struct Shape {
  int64_t B, H, Hkv, T, D, Dp, nq, nk, Tk, Tq;  // Tq: T rounded up to a whole pair of rows
  int64_t rep() const { return H / Hkv; }  // query heads per key/value head
};

template <typename acc_t>
Shape shape_of(const at::Tensor& q, const at::Tensor& k) {
  const int64_t T = q.size(2), D = q.size(3);
  const int64_t nq = (T + BQ - 1) / BQ, nk = (T + BK - 1) / BK;
  return {q.size(0), q.size(1), k.size(1), T, D, round_up(D, at::vec::Vectorized<acc_t>::size()), nq, nk, nk * BK,
          round_up(T, 2)};
}

// --8<-- [start:pack]
// Rows 0..rows-1 of a (T, D) matrix, as (rows, Dp) with zeros after the first `valid` rows and
// D columns. Element (i, j) goes to dst[at_(i, j, Dp)]: row by row, or in the pair layout.
template <bool pairs, typename scalar_t, typename op_t>
void pack_rows(const scalar_t* src, int64_t st, int64_t sd, int64_t rows, int64_t valid, const Shape& s, op_t* dst) {
  constexpr int64_t step = pairs ? 2 : 1;  // from one column to the next in a packed row
#if GPT_BF16_DOT
  if constexpr (pairs && paired<op_t> && std::is_same_v<scalar_t, op_t>) {
    if (sd == 1) {  // the usual layout: two rows at a time, in vectors (rows is even)
      for (int64_t t = 0; t < rows; t += 2)
        pair_of_rows(t < valid ? src + t * st : nullptr, t + 1 < valid ? src + (t + 1) * st : nullptr, s.D, s.Dp,
                     dst + t * s.Dp);
      return;
    }
  }
#endif
  for (int64_t t = 0; t < rows; ++t) {
    op_t* out = dst + at_(t, 0, s.Dp, pairs);
    const scalar_t* in = src + t * st;
    const int64_t n = t < valid ? s.D : 0;
    if (sd == 1)  // the usual layout, a loop the compiler vectorises
      for (int64_t c = 0; c < n; ++c) out[c * step] = static_cast<op_t>(in[c]);
    else
      for (int64_t c = 0; c < n; ++c) out[c * step] = static_cast<op_t>(in[c * sd]);
    for (int64_t c = n; c < s.Dp; ++c) out[c * step] = op_t(0);
  }
}

// Keys transposed, (Dp, Tk): column t is key t, so a product's B operand reads keys along a row.
// A block of 16 keys is packed as rows, then transposed in units of one element, or of one pair
// of elements (32 bits) in the pair layout, where (K[t][c], K[t][c+1]) stay side by side.
template <typename scalar_t, typename op_t>
void pack_transposed(const scalar_t* src, int64_t st, int64_t sd, const Shape& s, op_t* dst) {
  constexpr int64_t TB = 16, unit = paired<op_t> ? 2 : 1;  // keys per block, elements per unit
  const int64_t units = s.Dp / unit;
  std::vector<op_t> block(TB * s.Dp);  // (TB, Dp)
  for (int64_t t0 = 0; t0 < s.Tk; t0 += TB) {
    pack_rows<false>(src + std::min(t0, s.T) * st, st, sd, TB, std::clamp<int64_t>(s.T - t0, 0, TB), s, block.data());
    for (int64_t u = 0; u < units; ++u)  // unit u of key t0 + t: dst[u][t0 + t] = block[t][u]
      for (int64_t t = 0; t < TB; ++t)
        std::memcpy(dst + (u * s.Tk + t0 + t) * unit, block.data() + t * s.Dp + u * unit, unit * sizeof(op_t));
  }
}
// --8<-- [end:pack]


// --8<-- [start:online_softmax]
// Folds the scores s_0..s_{n-1} that row r sees in one key tile (n >= 1) into its running maximum m
// and sum l, and leaves the probabilities in their place (zeros from n to kn):
//   m' = max(m, scale * max_j s_j),   p_j = exp(scale * s_j - m'),   l' = l * exp(m - m') + sum_j p_j
// Returns exp(m - m'): the output accumulated from earlier tiles was weighted by exp(. - m) and must
// be rescaled to exp(. - m') before this tile's p_j v_j are added to it.
template <typename acc_t>
acc_t online_softmax_row(acc_t* s, int64_t n, int64_t kn, acc_t scale, acc_t& m, acc_t& l) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t tail = n % W, body = n - tail;
  Vec vmax(neg_inf<acc_t>);
  for (int64_t j = 0; j < body; j += W) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
  if (tail) vmax = at::vec::maximum(vmax, Vec::set(Vec(neg_inf<acc_t>), Vec::loadu(s + body, tail), tail));
  const acc_t m_new = std::max(m, scale * reduce_max(vmax));  // scale > 0: max(scale s) = scale max(s)
  const Vec vscale(scale), shift(-m_new);
  Vec vsum(0);
  for (int64_t j = 0; j < body; j += W) {
    const Vec p = vexp(at::vec::fmadd(Vec::loadu(s + j), vscale, shift));  // exp(scale * s - m')
    p.store(s + j);
    vsum = vsum + p;
  }
  if (tail) {
    const Vec p = Vec::set(Vec(0), vexp(at::vec::fmadd(Vec::loadu(s + body, tail), vscale, shift)), tail);
    p.store(s + body, tail);
    vsum = vsum + p;
  }
  std::fill(s + n, s + kn, acc_t(0));  // keys after the diagonal: probability 0
  const acc_t alpha = m == neg_inf<acc_t> ? acc_t(0) : std::exp(m - m_new);
  l = l * alpha + reduce_sum(vsum);
  m = m_new;
  return alpha;
}
// --8<-- [end:online_softmax]

template <typename scalar_t, typename op_t, typename acc_t>
struct ForwardArgs {
  Shape s;
  Strided<const scalar_t> q;
  const op_t* kt;  // (B * Hkv, Dp, Tk): keys transposed
  const op_t* v;   // (B * Hkv, Tk, Dp)
  Strided<scalar_t> out;
  acc_t* lse;  // (B, H, T)
  acc_t scale;
};

// --8<-- [start:forward_tile]
// One query tile (rows q0..q0+qn-1 of head h) against the key tiles up to its diagonal. The scores
// S, the output O and the queries live in buffers of a few tens of KiB that stay in cache. With
// bfloat16 products the probabilities are rounded into P for their product with V.
template <typename scalar_t, typename op_t, typename acc_t>
void forward_tile(const ForwardArgs<scalar_t, op_t, acc_t>& a, int64_t b, int64_t h, int64_t qt, op_t* Q, acc_t* S,
                  op_t* P, acc_t* O, acc_t* m, acc_t* l) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Shape& s = a.s;
  const int64_t g = h / s.rep(), q0 = qt * BQ, qn = std::min(BQ, s.T - q0), Dp = s.Dp;
  pack_rows<false>(a.q.row(b, h, q0), a.q.st, a.q.sd, qn, qn, s, Q);
  std::fill(O, O + qn * Dp, acc_t(0));
  std::fill(m, m + qn, neg_inf<acc_t>);
  std::fill(l, l + qn, acc_t(0));
  const op_t* Kt = a.kt + (b * s.Hkv + g) * Dp * s.Tk;
  const op_t* V = a.v + (b * s.Hkv + g) * s.Tk * Dp;
  for (int64_t kt = 0; kt * BK <= q0 + qn - 1; ++kt) {  // no tile after the diagonal
    const int64_t k0 = kt * BK, kn = std::min(BK, s.T - k0), diag = q0 - k0;
    const bool on_diag = kn - 1 > diag;  // some key of the tile comes after some query
    // S = Q K^T: (qn, BK), unscaled; on the diagonal only the visible columns.
    tile_mm<op_t, acc_t>({Q, Dp, 1, Kt + at_<op_t>(0, k0, s.Tk), s.Tk, S, BK, false}, qn, BK, Dp,
                         on_diag ? Causal::cols : Causal::none, diag);
    for (int64_t r = 0; r < qn; ++r) {
      const int64_t n = std::min(kn, r + diag + 1);  // keys k0..k0+n-1 are visible to query q0+r
      if (n <= 0) {
        std::fill(S + r * BK, S + r * BK + kn, acc_t(0));
        continue;
      }
      const acc_t alpha = online_softmax_row(S + r * BK, n, kn, a.scale, m[r], l[r]);
      if (alpha != acc_t(1))  // O_r = O_r * exp(m - m')
        at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, O + r * Dp, O + r * Dp, Dp);
    }
    // O += P V: (qn, Dp), a sum over the tile's keys, on the diagonal only up to each row's own.
    tile_mm<op_t, acc_t>({operand(S, qn, kn, false, P), BK, 1, V + at_<op_t>(k0, 0, Dp), Dp, O, Dp, true}, qn, Dp, kn,
                         on_diag ? Causal::k_end : Causal::none, diag);
  }
  for (int64_t r = 0; r < qn; ++r) {  // out = O / l, lse = m + log l
    store_row(O + r * Dp, s.D, acc_t(1) / l[r], a.out.row(b, h, q0 + r), a.out.sd);
    a.lse[(b * s.H + h) * s.T + q0 + r] = m[r] + std::log(l[r]);
  }
}
// --8<-- [end:forward_tile]

template <typename scalar_t>
Strided<const scalar_t> strided_in(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
Strided<scalar_t> strided_out(at::Tensor& t) {
  return {t.mutable_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Packs the keys transposed and the values of every key/value head, in parallel.
template <typename scalar_t, typename op_t>
void pack_keys_values(const Shape& s, const at::Tensor& k, const at::Tensor& v, op_t* kt, op_t* kp, op_t* vt,
                      op_t* vp) {
  const Strided<const scalar_t> K = strided_in<scalar_t>(k), V = strided_in<scalar_t>(v);
  const int64_t size = s.Dp * s.Tk;
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / s.Hkv, g = i % s.Hkv;
      if (kt) pack_transposed(K.row(b, g, 0), K.st, K.sd, s, kt + i * size);
      if (kp) pack_rows<paired<op_t>>(K.row(b, g, 0), K.st, K.sd, s.Tk, s.T, s, kp + i * size);
      if (vt) pack_transposed(V.row(b, g, 0), V.st, V.sd, s, vt + i * size);
      if (vp) pack_rows<paired<op_t>>(V.row(b, g, 0), V.st, V.sd, s.Tk, s.T, s, vp + i * size);
    }
  });
}

template <typename buf_t>
at::Tensor buffer(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().dtype(c10::CppTypeToScalarType<buf_t>::value));
}

// --8<-- [start:cpu_forward]
template <typename scalar_t, typename op_t>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out,
             at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  const Shape s = shape_of<acc_t>(q, k);
  at::Tensor kt = buffer<op_t>(q, {s.B * s.Hkv, s.Dp, s.Tk}), vp = buffer<op_t>(q, {s.B * s.Hkv, s.Tk, s.Dp});
  pack_keys_values<scalar_t, op_t>(s, k, v, kt.data_ptr<op_t>(), nullptr, nullptr, vp.data_ptr<op_t>());
  const ForwardArgs<scalar_t, op_t, acc_t> args{s, strided_in<scalar_t>(q), kt.data_ptr<op_t>(), vp.data_ptr<op_t>(),
                                                strided_out<scalar_t>(out), lse.data_ptr<acc_t>(), acc_t(scale)};
  // One task per (head, query tile). Tile i costs i + 1 key tiles, so each head's tiles are taken
  // in the order 0, nq-1, 1, nq-2, ...: any contiguous run of tasks, which is what a thread gets,
  // holds cheap and dear tiles alike.
  at::parallel_for(0, s.B * s.H * s.nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<op_t> Q(BQ * s.Dp), P(paired<op_t> ? BQ * BK : 0);
    std::vector<acc_t> S(BQ * BK), O(BQ * s.Dp), m(BQ), l(BQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / s.nq, j = t % s.nq, qt = j % 2 == 0 ? j / 2 : s.nq - 1 - j / 2;
      forward_tile(args, bh / s.H, bh % s.H, qt, Q.data(), S.data(), P.data(), O.data(), m.data(), l.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        double scale) {
  check_inputs(q, k, v, scale);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  // The output is (B, T, H, D) in memory, seen as (B, H, T, D): merging the heads afterwards is free.
  at::Tensor out = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_cpu", [&] {
    with_operand_type<scalar_t>([&](auto op) { forward<scalar_t, decltype(op)>(q, k, v, scale, out, lse); });
  });
  return {out, lse};
}
// --8<-- [end:cpu_forward]

template <typename scalar_t, typename op_t, typename acc_t>
struct BackwardArgs {
  Shape s;
  // Per query head, (Tq, Dp) each: queries and output gradients as rows, for products that sum
  // over the head dimension, and as B operands of the sums over queries (the same buffers unless
  // the products take bfloat16 pairs).
  const op_t *qa, *qb, *doa, *dob;
  const acc_t *dd, *lse;      // per query head: (T), (T)
  const op_t *kp, *kt, *vt;  // per key/value head: (Tk, Dp), (Dp, Tk), (Dp, Tk)
  Strided<scalar_t> dk, dv;
  acc_t scale;
};

// A task's tile buffers: float32 scores and their gradients, the key and value gradients of one
// key tile, and for bfloat16 products the rounded P (pairs), dS (rows) and dS (pairs).
template <typename op_t, typename acc_t>
struct BackwardBuffers {
  std::vector<acc_t> S, dP, dK, dV;
  std::vector<op_t> P, dS, dSt;
  explicit BackwardBuffers(int64_t Dp)
      : S(BQ * BK), dP(BQ * BK), dK(BK * Dp), dV(BK * Dp), P(paired<op_t> ? BQ * BK : 0), dS(P.size()), dSt(P.size()) {}
};

// --8<-- [start:backward_rows]
// p_j = exp(scale * s_j - lse) for the n visible keys of a row, zeros up to kn: the forward's
// probabilities, recomputed from the scores and the saved log-sum-exp.
template <typename acc_t>
void probs_row(acc_t* s, int64_t n, int64_t kn, acc_t scale, acc_t lse) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (n > 0) {
    const Vec vscale(scale), shift(-lse);
    at::vec::map([=](Vec x) { return vexp(at::vec::fmadd(x, vscale, shift)); }, s, s, n);
  }
  std::fill(s + std::max<int64_t>(n, 0), s + kn, acc_t(0));
}

// dS_j = p_j (dP_j - D), D = sum_c dO_c O_c: the softmax backward of the row, written over dP.
template <typename acc_t>
void dscores_row(const acc_t* p, acc_t* dp, int64_t n, int64_t kn, acc_t d) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (n > 0) {
    const Vec vd(d);
    at::vec::map2([=](Vec pj, Vec dpj) { return pj * (dpj - vd); }, dp, p, dp, n);
  }
  std::fill(dp + std::max<int64_t>(n, 0), dp + kn, acc_t(0));
}
// --8<-- [end:backward_rows]

// --8<-- [start:backward_tile]
// One key tile (keys k0..k0+kn-1 of key/value head g) against every query tile at or after it, for
// each query head that reads it: FlashAttention-2's backward, five tile products per visit.
template <typename scalar_t, typename op_t, typename acc_t>
void backward_tile(const BackwardArgs<scalar_t, op_t, acc_t>& a, int64_t b, int64_t g, int64_t kt, acc_t* dq,
                   BackwardBuffers<op_t, acc_t>& t) {
  const Shape& s = a.s;
  const int64_t k0 = kt * BK, kn = std::min(BK, s.T - k0), Dp = s.Dp, kv = b * s.Hkv + g;
  const op_t *Kp = a.kp + kv * s.Tk * Dp, *Kt = a.kt + kv * Dp * s.Tk, *Vt = a.vt + kv * Dp * s.Tk;
  acc_t *S = t.S.data(), *dP = t.dP.data(), *dK = t.dK.data(), *dV = t.dV.data();
  std::fill(dK, dK + BK * Dp, acc_t(0));
  std::fill(dV, dV + BK * Dp, acc_t(0));
  for (int64_t hh = 0; hh < s.rep(); ++hh) {
    const int64_t bh = b * s.H + g * s.rep() + hh, head = bh * s.Tq * Dp;
    const op_t *Q = a.qa + head, *Qb = a.qb + head, *dO = a.doa + head, *dOb = a.dob + head;
    const acc_t *lse = a.lse + bh * s.T, *dd = a.dd + bh * s.T;
    acc_t* dQ = dq + hh * s.T * Dp;
    for (int64_t q0 = k0 / BQ * BQ; q0 < s.T; q0 += BQ) {
      const int64_t qn = std::min(BQ, s.T - q0), diag = q0 - k0;
      const bool on = kn - 1 > diag;
      const Causal cols = on ? Causal::cols : Causal::none, k_end = on ? Causal::k_end : Causal::none;
      const Causal k_begin = on ? Causal::k_begin : Causal::none;
      tile_mm<op_t, acc_t>({Q + q0 * Dp, Dp, 1, Kt + at_<op_t>(0, k0, s.Tk), s.Tk, S, BK, false}, qn, BK, Dp, cols,
                           diag);  // S = Q K^T
      for (int64_t r = 0; r < qn; ++r) probs_row(S + r * BK, std::min(kn, r + diag + 1), kn, a.scale, lse[q0 + r]);
      tile_mm<op_t, acc_t>({operand(S, qn, kn, true, t.P.data()), 1, BK, dOb + at_<op_t>(q0, 0, Dp), Dp, dV, Dp, true},
                           kn, Dp, qn, k_begin, diag);  // dV += P^T dO
      tile_mm<op_t, acc_t>({dO + q0 * Dp, Dp, 1, Vt + at_<op_t>(0, k0, s.Tk), s.Tk, dP, BK, false}, qn, BK, Dp, cols,
                           diag);  // dP = dO V^T
      for (int64_t r = 0; r < qn; ++r)
        dscores_row(S + r * BK, dP + r * BK, std::min(kn, r + diag + 1), kn, dd[q0 + r]);  // dS = P (dP - D)
      tile_mm<op_t, acc_t>({operand(dP, qn, kn, false, t.dS.data()), BK, 1, Kp + at_<op_t>(k0, 0, Dp), Dp,
                            dQ + q0 * Dp, Dp, true}, qn, Dp, kn, k_end, diag);  // dQ += dS K
      tile_mm<op_t, acc_t>({operand(dP, qn, kn, true, t.dSt.data()), 1, BK, Qb + at_<op_t>(q0, 0, Dp), Dp, dK, Dp,
                            true}, kn, Dp, qn, k_begin, diag);  // dK += dS^T Q
    }
  }
  for (int64_t c = 0; c < kn; ++c) {  // the scale of the scores, folded out of the loop
    store_row(dK + c * Dp, s.D, a.scale, a.dk.row(b, g, k0 + c), a.dk.sd);
    store_row(dV + c * Dp, s.D, acc_t(1), a.dv.row(b, g, k0 + c), a.dv.sd);
  }
}
// --8<-- [end:backward_tile]

// Key tiles [first, last) of part `part` of `parts`, in equal shares of work: key tile kt meets
// the query tiles from its own to the last.
std::pair<int64_t, int64_t> key_tiles_of(int64_t part, int64_t parts, const Shape& s) {
  std::vector<int64_t> before(s.nk + 1, 0);  // work of the key tiles before kt
  for (int64_t kt = 0; kt < s.nk; ++kt) before[kt + 1] = before[kt] + s.nq - kt * BK / BQ;
  auto start = [&](int64_t p) {
    return int64_t(std::lower_bound(before.begin(), before.end(), (before[s.nk] * p + parts - 1) / parts) -
                   before.begin());
  };
  return {std::min(start(part), s.nk), std::min(start(part + 1), s.nk)};
}

// Queries and output gradients per query head, as rows (qa, doa) and, for bfloat16 products, in
// the pair layout too (qb, dob; null otherwise), and D = rowsum(dO * O), packed in parallel.
template <typename scalar_t, typename op_t, typename acc_t>
void pack_queries(const Shape& s, const at::Tensor& q, const at::Tensor& grad, const at::Tensor& out, op_t* qa,
                  op_t* qb, op_t* doa, op_t* dob, acc_t* dd) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Strided<const scalar_t> Q = strided_in<scalar_t>(q), G = strided_in<scalar_t>(grad),
                                O = strided_in<scalar_t>(out);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dO(s.Dp), o(s.Dp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H, head = bh * s.Tq * s.Dp;
      pack_rows<false>(Q.row(b, h, 0), Q.st, Q.sd, s.Tq, s.T, s, qa + head);
      pack_rows<false>(G.row(b, h, 0), G.st, G.sd, s.Tq, s.T, s, doa + head);
      if (qb) pack_rows<true>(Q.row(b, h, 0), Q.st, Q.sd, s.Tq, s.T, s, qb + head);
      if (dob) pack_rows<true>(G.row(b, h, 0), G.st, G.sd, s.Tq, s.T, s, dob + head);
      for (int64_t t = 0; t < s.T; ++t) {
        load_row(G.row(b, h, t), G.sd, s.D, s.Dp, acc_t(1), dO.data());
        load_row(O.row(b, h, t), O.sd, s.D, s.Dp, acc_t(1), o.data());
        dd[bh * s.T + t] = at::vec::map2_reduce_all<acc_t>(  // D_t = sum_c dO_tc O_tc
            [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, dO.data(), o.data(), s.D);
      }
    }
  });
}

// dq = scale * (the sum of the parts' query gradients), row by row in parallel.
template <typename scalar_t, typename acc_t>
void reduce_dq(const Shape& s, const acc_t* dqp, int64_t parts, acc_t scale, at::Tensor& dq) {
  const Strided<scalar_t> dQ = strided_out<scalar_t>(dq);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(s.Dp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H, g = h / s.rep(), hh = h % s.rep();
      const acc_t* first = dqp + ((b * s.Hkv + g) * parts * s.rep() + hh) * s.T * s.Dp;  // part 0
      const int64_t part_stride = s.rep() * s.T * s.Dp;
      for (int64_t t = 0; t < s.T; ++t) {
        std::copy(first + t * s.Dp, first + (t + 1) * s.Dp, sum.begin());
        for (int64_t p = 1; p < parts; ++p) axpy_scalar(acc_t(1), first + p * part_stride + t * s.Dp, sum.data(), s.D);
        store_row(sum.data(), s.D, scale, dQ.row(b, h, t), dQ.sd);
      }
    }
  });
}

// --8<-- [start:cpu_backward]
template <typename scalar_t, typename op_t>
void backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, double scale, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv) {
  using acc_t = acc_type<scalar_t>;
  const Shape s = shape_of<acc_t>(q, k);
  const int64_t BHkv = s.B * s.Hkv, size = s.Dp * s.Tk, layouts = paired<op_t> ? 2 : 1;
  // Queries and output gradients: [layout][head], rows and (for bfloat16 products) pairs.
  at::Tensor qp = buffer<op_t>(q, {layouts, s.B * s.H, s.Tq, s.Dp}), dop = at::empty_like(qp);
  at::Tensor dd = buffer<acc_t>(q, {s.B * s.H, s.T}), kvp = buffer<op_t>(q, {3, BHkv, size});
  op_t *kv = kvp.data_ptr<op_t>(), *qa = qp.data_ptr<op_t>(), *doa = dop.data_ptr<op_t>();
  op_t *qb = qa + (layouts - 1) * s.B * s.H * s.Tq * s.Dp, *dob = doa + (qb - qa);
  pack_queries<scalar_t, op_t, acc_t>(s, q, grad, out, qa, qb == qa ? nullptr : qb, doa, dob == doa ? nullptr : dob,
                                      dd.data_ptr<acc_t>());
  pack_keys_values<scalar_t, op_t>(s, k, v, kv + BHkv * size, kv, kv + 2 * BHkv * size, nullptr);
  // With fewer key/value heads than twice the threads, each head's key tiles are split into parts,
  // each with a query-gradient buffer of its own, summed at the end.
  const int64_t parts = std::clamp<int64_t>((2 * at::get_num_threads() + BHkv - 1) / BHkv, 1, s.nk);
  at::Tensor dqp = buffer<acc_t>(q, {BHkv * parts, s.rep(), s.T, s.Dp});
  const BackwardArgs<scalar_t, op_t, acc_t> args{s, qa, qb, doa, dob, dd.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
                                                 kv, kv + BHkv * size, kv + 2 * BHkv * size,
                                                 strided_out<scalar_t>(dk), strided_out<scalar_t>(dv), acc_t(scale)};
  at::parallel_for(0, BHkv * parts, 1, [&](int64_t begin, int64_t end) {
    BackwardBuffers<op_t, acc_t> buffers(s.Dp);
    for (int64_t t = begin; t < end; ++t) {
      acc_t* dq_part = dqp.data_ptr<acc_t>() + t * s.rep() * s.T * s.Dp;
      std::fill(dq_part, dq_part + s.rep() * s.T * s.Dp, acc_t(0));
      const auto [first, last] = key_tiles_of(t % parts, parts, s);
      for (int64_t kt = first; kt < last; ++kt)
        backward_tile(args, t / parts / s.Hkv, t / parts % s.Hkv, kt, dq_part, buffers);
    }
  });
  reduce_dq<scalar_t, acc_t>(s, dqp.data_ptr<acc_t>(), parts, acc_t(scale), dq);
}
// --8<-- [end:cpu_backward]

// --8<-- [start:backward_entry]
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  check_inputs(q, k, v, scale);
  check_backward_inputs(grad, q, out, lse);
  // Gradients laid out like their inputs (never written into grad): a transposed view stays free.
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  const at::Tensor L = lse.to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_backward_cpu", [&] {
    with_operand_type<scalar_t>(
        [&](auto op) { backward<scalar_t, decltype(op)>(grad, q, k, v, out, L, scale, dq, dk, dv); });
  });
  return {dq, dk, dv};
}
// --8<-- [end:backward_entry]

}  // namespace

// --8<-- [start:registration]
// The ops' schemas and their CPU kernels; csrc/flash_attention_cuda.cu adds the CUDA kernels and
// src/flash_attention.py the autograd formula and the shape-only (fake) implementations.
TORCH_LIBRARY(gpt_flash, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("bf16_dot_products() -> bool", &bf16_dot_products);  // which bfloat16 path runs here, for tests
}

TORCH_LIBRARY_IMPL(gpt_flash, CPU, m) {
  m.impl("causal_attention", &causal_attention_cpu);
  m.impl("causal_attention_backward", &causal_attention_backward_cpu);
}
// --8<-- [end:registration]
