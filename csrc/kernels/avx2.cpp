// AVX2 + FMA kernels for x86-64. Each function carries its own target
// attribute, so the file needs no special compiler flags and the rest of the
// module still runs on CPUs without AVX2 (dispatch.cpp checks at run time).
// Tails shorter than a vector go through the scalar formulas, which perform
// the same operations, so results are bitwise those of scalar.cpp.
#include "kernels/fp_contract_off.h"
#include "kernels/impl.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <cmath>
#include <cstring>

#define RANNC_AVX2 __attribute__((target("avx2,fma")))

namespace rannc::kernels::detail {

namespace {

constexpr size_t W = 8;  // floats per __m256

RANNC_AVX2 void sum_into(float* dst, const float* src, size_t n) {
  size_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    __m256 a0 = _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i));
    __m256 a1 = _mm256_add_ps(_mm256_loadu_ps(dst + i + W), _mm256_loadu_ps(src + i + W));
    _mm256_storeu_ps(dst + i, a0);
    _mm256_storeu_ps(dst + i + W, a1);
  }
  for (; i + W <= n; i += W) {
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
  }
  scalar_impl().sum_into(dst + i, src + i, n - i);
}

RANNC_AVX2 void sum_buffers(float* dst, const float* const* srcs, size_t k, size_t begin,
                            size_t n) {
  size_t i = 0;
  for (; i + W <= n; i += W) {
    __m256 acc = _mm256_loadu_ps(srcs[0] + begin + i);
    for (size_t j = 1; j < k; ++j) acc = _mm256_add_ps(acc, _mm256_loadu_ps(srcs[j] + begin + i));
    _mm256_storeu_ps(dst + i, acc);
  }
  scalar_impl().sum_buffers(dst + i, srcs, k, begin + i, n - i);
}

RANNC_AVX2 void scale(float* x, float alpha, size_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  size_t i = 0;
  for (; i + W <= n; i += W) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), a));
  scalar_impl().scale(x + i, alpha, n - i);
}

RANNC_AVX2 double sum_squares(const float* x, size_t n) {
  // Four double accumulators hide the FMA latency.
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  __m256d acc2 = _mm256_setzero_pd(), acc3 = _mm256_setzero_pd();
  size_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + W);
    const __m256d a0 = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
    const __m256d a1 = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
    const __m256d b0 = _mm256_cvtps_pd(_mm256_castps256_ps128(b));
    const __m256d b1 = _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1));
    acc0 = _mm256_fmadd_pd(a0, a0, acc0);
    acc1 = _mm256_fmadd_pd(a1, a1, acc1);
    acc2 = _mm256_fmadd_pd(b0, b0, acc2);
    acc3 = _mm256_fmadd_pd(b1, b1, acc3);
  }
  const __m256d s = _mm256_add_pd(_mm256_add_pd(acc0, acc1), _mm256_add_pd(acc2, acc3));
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, s);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + scalar_impl().sum_squares(x + i, n - i);
}

RANNC_AVX2 void copy(float* dst, const float* src, size_t n) {
  // memmove is already optimal for copies; the overlap rule needs it anyway.
  if (n) std::memmove(dst, src, n * sizeof(float));
}

RANNC_AVX2 inline __m256i bf16_round(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i r = _mm256_srli_epi32(biased, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

RANNC_AVX2 void f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m256i lo = bf16_round(_mm256_loadu_ps(src + i));
    const __m256i hi = bf16_round(_mm256_loadu_ps(src + i + W));
    // packus works per 128-bit lane; the permute restores element order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  scalar_impl().f32_to_bf16(src + i, dst + i, n - i);
}

RANNC_AVX2 void bf16_to_f32(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + W <= n; i += W) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(u));
  }
  scalar_impl().bf16_to_f32(src + i, dst + i, n - i);
}

RANNC_AVX2 void adam(float* p, const float* g, float* m, float* v, size_t n, const AdamConsts& c) {
  const __m256 sign = _mm256_set1_ps(c.maximize ? -0.0f : 0.0f);
  const __m256 wd = _mm256_set1_ps(c.weight_decay), decay = _mm256_set1_ps(c.decay);
  const __m256 coeff = _mm256_set1_ps(c.lerp_small ? c.lerp_weight : c.lerp_weight - 1.0f);
  const __m256 beta2 = _mm256_set1_ps(c.beta2), omb2 = _mm256_set1_ps(c.one_minus_beta2);
  const __m256 bc2 = _mm256_set1_ps(c.bc2_sqrt), eps = _mm256_set1_ps(c.eps);
  const __m256 nss = _mm256_set1_ps(c.neg_step_size);
  const bool l2 = c.has_weight_decay && !c.decoupled, dec = c.has_weight_decay && c.decoupled;
  size_t i = 0;
  for (; i + W <= n; i += W) {
    __m256 grad = _mm256_xor_ps(_mm256_loadu_ps(g + i), sign);  // maximize: exact negation
    __m256 param = _mm256_loadu_ps(p + i);
    if (dec) param = _mm256_mul_ps(param, decay);
    if (l2) grad = _mm256_fmadd_ps(param, wd, grad);
    const __m256 avg0 = _mm256_loadu_ps(m + i);
    const __m256 diff = _mm256_sub_ps(grad, avg0);
    const __m256 avg = _mm256_fmadd_ps(coeff, diff, c.lerp_small ? avg0 : grad);
    __m256 sq = _mm256_mul_ps(_mm256_loadu_ps(v + i), beta2);
    sq = _mm256_fmadd_ps(_mm256_mul_ps(omb2, grad), grad, sq);
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(sq), bc2), eps);
    const __m256 upd = _mm256_div_ps(_mm256_mul_ps(nss, avg), denom);
    _mm256_storeu_ps(p + i, _mm256_add_ps(param, upd));
    _mm256_storeu_ps(m + i, avg);
    _mm256_storeu_ps(v + i, sq);
  }
  scalar_impl().adam(p + i, g + i, m + i, v + i, n - i, c);
}

RANNC_AVX2 void sgd(float* p, const float* g, float* buf, size_t n, const SgdConsts& c) {
  const __m256 sign = _mm256_set1_ps(c.maximize ? -0.0f : 0.0f);
  const __m256 wd = _mm256_set1_ps(c.weight_decay), mom = _mm256_set1_ps(c.momentum);
  const __m256 omd = _mm256_set1_ps(c.one_minus_dampening), nlr = _mm256_set1_ps(c.neg_lr);
  size_t i = 0;
  for (; i + W <= n; i += W) {
    __m256 grad = _mm256_xor_ps(_mm256_loadu_ps(g + i), sign);
    const __m256 param = _mm256_loadu_ps(p + i);
    if (c.has_weight_decay) grad = _mm256_fmadd_ps(param, wd, grad);
    if (c.has_momentum) {
      const __m256 b = c.first_step
                           ? grad
                           : _mm256_fmadd_ps(grad, omd, _mm256_mul_ps(_mm256_loadu_ps(buf + i), mom));
      _mm256_storeu_ps(buf + i, b);
      grad = c.nesterov ? _mm256_fmadd_ps(b, mom, grad) : b;
    }
    _mm256_storeu_ps(p + i, _mm256_fmadd_ps(grad, nlr, param));
  }
  scalar_impl().sgd(p + i, g + i, buf ? buf + i : nullptr, n - i, c);
}

}  // namespace

const Impl* avx2_impl() {
  // Both AVX2 and FMA must be present; the OS must also save the YMM state,
  // which __builtin_cpu_supports takes into account.
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const Impl impl{sum_into, sum_buffers, scale, sum_squares, copy,
                         f32_to_bf16, bf16_to_f32, adam, sgd};
  return ok ? &impl : nullptr;
}

}  // namespace rannc::kernels::detail

#else

namespace rannc::kernels::detail {
const Impl* avx2_impl() { return nullptr; }
}  // namespace rannc::kernels::detail

#endif
