// Per-ISA kernel tables: each entry works on one contiguous range on the
// calling thread. dispatch.cpp picks a table and splits work over threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rannc::kernels::detail {

// Adam constants in the precision torch applies them (fp32 scalars derived
// from double hyperparameters, see make_adam_consts in dispatch.cpp).
struct AdamConsts {
  float neg_step_size;  // -(lr / (1 - beta1^step))
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float lerp_weight;     // 1 - beta1
  bool lerp_small;       // |lerp_weight| < 0.5 selects torch's lerp formula
  float beta2;
  float one_minus_beta2;
  float weight_decay;   // L2 term added to the gradient (Adam)
  float decay;          // 1 - lr * weight_decay multiplying the param (AdamW)
  bool has_weight_decay;
  bool decoupled;
  bool maximize;
};

struct SgdConsts {
  float neg_lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  bool has_weight_decay;
  bool has_momentum;
  bool nesterov;
  bool maximize;
  bool first_step;
};

struct Impl {
  void (*sum_into)(float* dst, const float* src, size_t n);
  // dst[i] = srcs[0][begin+i] + ... + srcs[k-1][begin+i] for i < n; dst is already offset.
  void (*sum_buffers)(float* dst, const float* const* srcs, size_t k, size_t begin, size_t n);
  void (*scale)(float* x, float alpha, size_t n);
  double (*sum_squares)(const float* x, size_t n);
  void (*copy)(float* dst, const float* src, size_t n);
  void (*f32_to_bf16)(const float* src, uint16_t* dst, size_t n);
  void (*bf16_to_f32)(const uint16_t* src, float* dst, size_t n);
  void (*adam)(float* p, const float* g, float* m, float* v, size_t n, const AdamConsts& c);
  void (*sgd)(float* p, const float* g, float* buf, size_t n, const SgdConsts& c);
};

const Impl& scalar_impl();
// Null where the build has no such path (wrong architecture or compiler).
const Impl* avx2_impl();
const Impl* sve_impl();

// Scalar element formulas shared by every path's tail handling.
uint16_t f32_to_bf16_one(float x);

}  // namespace rannc::kernels::detail
