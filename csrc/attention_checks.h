// Checks that the CPU and CUDA flash attention entry points share (no CPU-only headers here).

#pragma once

#include <ATen/core/Tensor.h>

namespace gpt_attention {

// q (B, H, T, D); k and v (B, H_kv, T, D) with H a multiple of H_kv; one dtype; a positive scale.
inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be (B, H, T, D), got ",
              q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "q ", q.sizes(), " and k ", k.sizes(), " must agree in B, T and D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "the ", q.size(1),
              " query heads must be a multiple of the ", k.size(1), " key/value heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k and v must have the same dtype");
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
}

// The backward's extra inputs: the gradient and the output like q, the log-sum-exp (B, H, T).
inline void check_backward_inputs(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& out,
                                  const at::Tensor& lse) {
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad ", grad.sizes(), " and out ",
              out.sizes(), " must have the shape of q ", q.sizes());
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad and out must have the dtype of q");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must be (B, H, T), got ", lse.sizes());
}

}  // namespace gpt_attention
