// SVE kernels for aarch64 (A64FX and later), vector-length agnostic: every
// loop steps by svcntw() and masks its last iteration with svwhilelt, so the
// same binary runs at any vector length from 128 to 2048 bits. The operations
// and their order match scalar.cpp exactly (svmla is the explicit fused
// multiply-add where the scalar code calls std::fma).
//
// The file compiles without -march=...+sve: SVE is enabled for these functions
// only, and dispatch.cpp calls them only when the CPU reports SVE.
#include "kernels/fp_contract_off.h"
#include "kernels/impl.h"

// Without -march=...+sve, GCC (10+) and clang 18+ can still enable SVE per
// function; older clang refuses arm_sve.h, so such a build has no SVE path.
#if defined(__aarch64__) &&                                                  \
    (defined(__ARM_FEATURE_SVE) || (defined(__clang__) && __clang_major__ >= 18) || \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define RANNC_HAVE_SVE 1
#endif

#if defined(RANNC_HAVE_SVE)

#if !defined(__ARM_FEATURE_SVE)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("sve"))), apply_to = function)
#define RANNC_SVE_ATTRIBUTE_PUSHED 1
#else
#pragma GCC target("+sve")
#endif
#endif

#include <arm_sve.h>
#include <sys/auxv.h>

#include <cstring>

#ifndef HWCAP_SVE
#define HWCAP_SVE (1UL << 22)  // Linux arm64 hwcap bit, for older libc headers
#endif

namespace rannc::kernels::detail {

namespace {

void sum_into(float* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; i += svcntw()) {
    const svbool_t pg = svwhilelt_b32_u64(i, n);
    svst1_f32(pg, dst + i, svadd_f32_x(pg, svld1_f32(pg, dst + i), svld1_f32(pg, src + i)));
  }
}

void sum_buffers(float* dst, const float* const* srcs, size_t k, size_t begin, size_t n) {
  for (size_t i = 0; i < n; i += svcntw()) {
    const svbool_t pg = svwhilelt_b32_u64(i, n);
    svfloat32_t acc = svld1_f32(pg, srcs[0] + begin + i);
    for (size_t j = 1; j < k; ++j) acc = svadd_f32_x(pg, acc, svld1_f32(pg, srcs[j] + begin + i));
    svst1_f32(pg, dst + i, acc);
  }
}

void scale(float* x, float alpha, size_t n) {
  for (size_t i = 0; i < n; i += svcntw()) {
    const svbool_t pg = svwhilelt_b32_u64(i, n);
    svst1_f32(pg, x + i, svmul_n_f32_x(pg, svld1_f32(pg, x + i), alpha));
  }
}

// Loads floats i.. (one per 64-bit lane) and widens them to double.
inline svfloat64_t load_widen(svbool_t pg, const float* x, size_t i) {
  const svuint64_t bits = svld1uw_u64(pg, reinterpret_cast<const uint32_t*>(x) + i);
  return svcvt_f64_f32_x(pg, svreinterpret_f32_u64(bits));
}

double sum_squares(const float* x, size_t n) {
  // Four accumulators hide the FMA latency (9 cycles on A64FX).
  const size_t vd = svcntd();
  svfloat64_t a0 = svdup_n_f64(0.0), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 4 * vd) {
    const svbool_t p0 = svwhilelt_b64_u64(i, n), p1 = svwhilelt_b64_u64(i + vd, n);
    const svbool_t p2 = svwhilelt_b64_u64(i + 2 * vd, n), p3 = svwhilelt_b64_u64(i + 3 * vd, n);
    const svfloat64_t x0 = load_widen(p0, x, i), x1 = load_widen(p1, x, i + vd);
    const svfloat64_t x2 = load_widen(p2, x, i + 2 * vd), x3 = load_widen(p3, x, i + 3 * vd);
    a0 = svmla_f64_m(p0, a0, x0, x0);
    a1 = svmla_f64_m(p1, a1, x1, x1);
    a2 = svmla_f64_m(p2, a2, x2, x2);
    a3 = svmla_f64_m(p3, a3, x3, x3);
  }
  const svbool_t all = svptrue_b64();
  const svfloat64_t s = svadd_f64_x(all, svadd_f64_x(all, a0, a1), svadd_f64_x(all, a2, a3));
  return svaddv_f64(all, s);
}

void copy(float* dst, const float* src, size_t n) {
  if (n) std::memmove(dst, src, n * sizeof(float));
}

void f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
  const svuint32_t quiet_nan = svdup_n_u32(0x7FC0);
  for (size_t i = 0; i < n; i += svcntw()) {
    const svbool_t pg = svwhilelt_b32_u64(i, n);
    const svfloat32_t x = svld1_f32(pg, src + i);
    const svuint32_t u = svreinterpret_u32_f32(x);
    const svuint32_t lsb = svand_n_u32_x(pg, svlsr_n_u32_x(pg, u, 16), 1);
    const svuint32_t biased = svadd_u32_x(pg, u, svadd_n_u32_x(pg, lsb, 0x7FFF));
    svuint32_t r = svlsr_n_u32_x(pg, biased, 16);
    r = svsel_u32(svcmpuo_f32(pg, x, x), quiet_nan, r);
    svst1h_u32(pg, dst + i, r);  // stores the low 16 bits of each lane
  }
}

void bf16_to_f32(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; i += svcntw()) {
    const svbool_t pg = svwhilelt_b32_u64(i, n);
    const svuint32_t u = svlsl_n_u32_x(pg, svld1uh_u32(pg, src + i), 16);
    svst1_f32(pg, dst + i, svreinterpret_f32_u32(u));
  }
}

void adam(float* p, const float* g, float* m, float* v, size_t n, const AdamConsts& c) {
  const bool l2 = c.has_weight_decay && !c.decoupled, dec = c.has_weight_decay && c.decoupled;
  const float coeff = c.lerp_small ? c.lerp_weight : c.lerp_weight - 1.0f;
  for (size_t i = 0; i < n; i += svcntw()) {
    const svbool_t pg = svwhilelt_b32_u64(i, n);
    svfloat32_t grad = svld1_f32(pg, g + i);
    if (c.maximize) grad = svneg_f32_x(pg, grad);
    svfloat32_t param = svld1_f32(pg, p + i);
    if (dec) param = svmul_n_f32_x(pg, param, c.decay);
    if (l2) grad = svmla_n_f32_x(pg, grad, param, c.weight_decay);  // grad + param*wd, fused
    const svfloat32_t avg0 = svld1_f32(pg, m + i);
    const svfloat32_t diff = svsub_f32_x(pg, grad, avg0);
    const svfloat32_t avg = svmla_n_f32_x(pg, c.lerp_small ? avg0 : grad, diff, coeff);
    svfloat32_t sq = svmul_n_f32_x(pg, svld1_f32(pg, v + i), c.beta2);
    sq = svmla_f32_x(pg, sq, svmul_n_f32_x(pg, grad, c.one_minus_beta2), grad);
    svfloat32_t denom = svdiv_n_f32_x(pg, svsqrt_f32_x(pg, sq), c.bc2_sqrt);
    denom = svadd_n_f32_x(pg, denom, c.eps);
    const svfloat32_t upd = svdiv_f32_x(pg, svmul_n_f32_x(pg, avg, c.neg_step_size), denom);
    svst1_f32(pg, p + i, svadd_f32_x(pg, param, upd));
    svst1_f32(pg, m + i, avg);
    svst1_f32(pg, v + i, sq);
  }
}

void sgd(float* p, const float* g, float* buf, size_t n, const SgdConsts& c) {
  for (size_t i = 0; i < n; i += svcntw()) {
    const svbool_t pg = svwhilelt_b32_u64(i, n);
    svfloat32_t grad = svld1_f32(pg, g + i);
    if (c.maximize) grad = svneg_f32_x(pg, grad);
    const svfloat32_t param = svld1_f32(pg, p + i);
    if (c.has_weight_decay) grad = svmla_n_f32_x(pg, grad, param, c.weight_decay);
    if (c.has_momentum) {
      svfloat32_t b = grad;
      if (!c.first_step) {
        const svfloat32_t decayed = svmul_n_f32_x(pg, svld1_f32(pg, buf + i), c.momentum);
        b = svmla_n_f32_x(pg, decayed, grad, c.one_minus_dampening);
      }
      svst1_f32(pg, buf + i, b);
      grad = c.nesterov ? svmla_n_f32_x(pg, grad, b, c.momentum) : b;
    }
    svst1_f32(pg, p + i, svmla_n_f32_x(pg, param, grad, c.neg_lr));
  }
}

}  // namespace

#if defined(RANNC_SVE_ATTRIBUTE_PUSHED)
#pragma clang attribute pop
#endif

const Impl* sve_impl() {
  static const bool ok = (getauxval(AT_HWCAP) & HWCAP_SVE) != 0;
  static const Impl impl{sum_into, sum_buffers, scale, sum_squares, copy,
                         f32_to_bf16, bf16_to_f32, adam, sgd};
  return ok ? &impl : nullptr;
}

}  // namespace rannc::kernels::detail

#else

namespace rannc::kernels::detail {
const Impl* sve_impl() { return nullptr; }
}  // namespace rannc::kernels::detail

#endif
