// Scalar reference kernels. The vector paths must match these bit for bit, so
// the compiler may not fuse a multiply and an add here on its own
// (fp_contract_off.h): every fused multiply-add is an explicit std::fma,
// placed where torch's compiled CPU kernels have one (lerp, addcmul, add
// with alpha).
#include "kernels/fp_contract_off.h"

#include <cmath>
#include <cstring>

#include "kernels/impl.h"

namespace rannc::kernels::detail {

uint16_t f32_to_bf16_one(float x) {
  if (std::isnan(x)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  // Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit.
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

namespace {

void sum_into(float* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

void sum_buffers(float* dst, const float* const* srcs, size_t k, size_t begin, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float acc = srcs[0][begin + i];
    for (size_t j = 1; j < k; ++j) acc += srcs[j][begin + i];
    dst[i] = acc;
  }
}

void scale(float* x, float alpha, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] *= alpha;
}

double sum_squares(const float* x, size_t n) {
  double acc = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double v = x[i];
    acc += v * v;
  }
  return acc;
}

void copy(float* dst, const float* src, size_t n) {
  if (n) std::memmove(dst, src, n * sizeof(float));
}

void f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16_one(src[i]);
}

void bf16_to_f32(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof u);
  }
}

void adam(float* p, const float* g, float* m, float* v, size_t n, const AdamConsts& c) {
  for (size_t i = 0; i < n; ++i) {
    float grad = c.maximize ? -g[i] : g[i];
    float param = p[i];
    if (c.has_weight_decay) {
      if (c.decoupled) {
        param = param * c.decay;
      } else {
        grad = std::fma(param, c.weight_decay, grad);
      }
    }
    // exp_avg.lerp_(grad, 1 - beta1), as torch's vectorised lerp computes it.
    const float diff = grad - m[i];
    const float avg = c.lerp_small ? std::fma(c.lerp_weight, diff, m[i])
                                   : std::fma(c.lerp_weight - 1.0f, diff, grad);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2); torch's
    // compiled addcmul fuses its last multiply with the add.
    const float decayed = v[i] * c.beta2;
    const float scaled = c.one_minus_beta2 * grad;
    const float sq = std::fma(scaled, grad, decayed);
    // denom = sqrt(exp_avg_sq) / bias_correction2_sqrt + eps, with a correctly
    // rounded sqrt (torch's vectorised sqrt may differ from it by 1 ulp)
    float denom = std::sqrt(sq) / c.bc2_sqrt;
    denom = denom + c.eps;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    const float num = c.neg_step_size * avg;
    const float upd = num / denom;
    p[i] = param + upd;
    m[i] = avg;
    v[i] = sq;
  }
}

void sgd(float* p, const float* g, float* buf, size_t n, const SgdConsts& c) {
  for (size_t i = 0; i < n; ++i) {
    float grad = c.maximize ? -g[i] : g[i];
    const float param = p[i];
    if (c.has_weight_decay) grad = std::fma(param, c.weight_decay, grad);
    if (c.has_momentum) {
      float b;
      if (c.first_step) {
        b = grad;
      } else {
        const float decayed = buf[i] * c.momentum;
        b = std::fma(grad, c.one_minus_dampening, decayed);
      }
      buf[i] = b;
      grad = c.nesterov ? std::fma(b, c.momentum, grad) : b;
    }
    p[i] = std::fma(grad, c.neg_lr, param);
  }
}

}  // namespace

const Impl& scalar_impl() {
  static const Impl impl{sum_into, sum_buffers, scale, sum_squares, copy,
                         f32_to_bf16, bf16_to_f32, adam, sgd};
  return impl;
}

}  // namespace rannc::kernels::detail
