// Standalone check that every kernel path this CPU offers (AVX2, SVE) agrees
// with the scalar reference: bitwise for elementwise kernels, to 1e-12
// relative for the double-accumulated sum of squares. Sizes are not multiples
// of any vector length, buffers start at misaligned offsets, and large sizes
// run on several threads.
//
// Built and run by tests/test_sve_qemu.py (cross-compiled for aarch64 and run
// under qemu-aarch64 at several SVE vector lengths) and
// tests/test_kernels_native.py (native build). Exit status 0 means all passed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#if defined(__ARM_FEATURE_SVE)
#include <arm_sve.h>
#endif

#include "kernels/kernels.h"

using namespace rannc::kernels;

namespace {

int g_failures = 0;
// xorshift64: cheap enough for millions of values under qemu emulation.
uint64_t g_state = 0x9E3779B97F4A7C15ull;
uint32_t next_u32() {
  g_state ^= g_state << 13;
  g_state ^= g_state >> 7;
  g_state ^= g_state << 17;
  return static_cast<uint32_t>(g_state >> 32);
}

void fail(const char* what, Isa isa, size_t n, size_t off, const char* detail) {
  ++g_failures;
  if (g_failures <= 20) {
    std::printf("FAIL %s isa=%s n=%zu offset=%zu threads=%d: %s\n", what, isa_name(isa), n, off,
                num_threads(), detail);
  }
}

std::vector<float> random_floats(size_t n, float lo, float hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = lo + (hi - lo) * static_cast<float>(next_u32() >> 8) * 0x1p-24f;
  if (n > 3) v[n / 2] = 0.0f;
  return v;
}

bool same_bits(const void* a, const void* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

// Runs fn(isa) on fresh copies of the inputs for the scalar path and for
// `isa`, and compares the outputs bitwise.
template <typename Setup, typename Run>
void compare(const char* what, Isa isa, size_t n, size_t off, Setup setup, Run run) {
  auto ref = setup();
  auto got = ref;
  set_isa(Isa::Scalar);
  run(ref);
  set_isa(isa);
  run(got);
  for (size_t b = 0; b < ref.size(); ++b) {
    if (!same_bits(ref[b].data() + off, got[b].data() + off, n * sizeof(float))) {
      char msg[128];
      std::snprintf(msg, sizeof msg, "output buffer %zu differs from scalar", b);
      fail(what, isa, n, off, msg);
      return;
    }
  }
}

using Bufs = std::vector<std::vector<float>>;

// `stride` > 1 tests every stride-th optimizer variant only (large sizes).
void check_sizes(Isa isa, size_t n, size_t off, int stride = 1) {
  const size_t len = n + off;
  compare("sum_into", isa, n, off,
          [&] { return Bufs{random_floats(len, -2, 2), random_floats(len, -2, 2)}; },
          [&](Bufs& b) { sum_into(b[0].data() + off, b[1].data() + off, n); });
  compare("sum_buffers", isa, n, off,
          [&] { return Bufs{random_floats(len, -2, 2), random_floats(len, -2, 2),
                            random_floats(len, -2, 2), random_floats(len, -2, 2)}; },
          [&](Bufs& b) {
            const float* srcs[3] = {b[1].data() + off, b[2].data() + off, b[3].data() + off};
            sum_buffers(b[0].data() + off, srcs, 3, n);
          });
  compare("scale", isa, n, off, [&] { return Bufs{random_floats(len, -2, 2)}; },
          [&](Bufs& b) { scale(b[0].data() + off, 0.37f, n); });
  compare("pack/unpack", isa, n, off,
          [&] { return Bufs{random_floats(len, -2, 2), random_floats(2 * len + 8, -2, 2),
                            std::vector<float>(len, 0.0f)}; },
          [&](Bufs& b) {
            // Two pieces of sizes n/3 and n - n/3 into one buffer and back out.
            const size_t sizes[2] = {n / 3, n - n / 3};
            const float* srcs[2] = {b[0].data() + off, b[1].data() + off + 5};
            pack(b[2].data() + off, srcs, sizes, 2);
            float* dsts[2] = {b[1].data() + off, b[0].data() + off + n / 3};
            unpack(b[2].data() + off, dsts, sizes, 2);
          });

  // sum of squares: accumulation order differs between paths.
  {
    auto x = random_floats(len, -3, 3);
    set_isa(Isa::Scalar);
    const double ref = sum_squares(x.data() + off, n);
    set_isa(isa);
    const double got = sum_squares(x.data() + off, n);
    if (std::fabs(got - ref) > 1e-12 * std::fabs(ref)) {
      char msg[128];
      std::snprintf(msg, sizeof msg, "got %.17g want %.17g", got, ref);
      fail("sum_squares", isa, n, off, msg);
    }
  }

  // bf16 casts on arbitrary bit patterns: NaNs, infinities, subnormals, ties.
  {
    std::vector<float> src(len);
    for (auto& x : src) {
      // A quarter of the values are exact ties between two bf16 neighbours.
      const uint32_t u = next_u32() & (next_u32() % 4 == 0 ? 0xFFFF8000u : 0xFFFFFFFFu);
      std::memcpy(&x, &u, sizeof u);
    }
    std::vector<uint16_t> ref(len), got(len), h(len);
    set_isa(Isa::Scalar);
    f32_to_bf16(src.data() + off, ref.data() + off, n);
    set_isa(isa);
    f32_to_bf16(src.data() + off, got.data() + off, n);
    if (!same_bits(ref.data() + off, got.data() + off, n * 2)) fail("f32_to_bf16", isa, n, off, "differs");
    for (auto& x : h) x = static_cast<uint16_t>(next_u32());
    std::vector<float> fr(len), fg(len);
    set_isa(Isa::Scalar);
    bf16_to_f32(h.data() + off, fr.data() + off, n);
    set_isa(isa);
    bf16_to_f32(h.data() + off, fg.data() + off, n);
    if (!same_bits(fr.data() + off, fg.data() + off, n * 4)) fail("bf16_to_f32", isa, n, off, "differs");
  }

  for (int variant = 0; variant < 12; variant += stride) {
    AdamConfig c;
    c.lr = 1e-2;
    c.beta1 = (variant & 4) ? 0.3 : 0.9;  // 0.3: torch's other lerp formula
    c.weight_decay = (variant & 3) ? 0.05 : 0.0;
    c.decoupled_weight_decay = (variant & 1) != 0;
    c.maximize = (variant & 2) != 0;
    c.step = 1 + variant % 3;
    c.eps = 1e-6;
    compare("adam_step", isa, n, off,
            [&] { return Bufs{random_floats(len, -2, 2), random_floats(len, -2, 2),
                              random_floats(len, -1, 1), random_floats(len, 0, 1)}; },
            [&](Bufs& b) {
              float* p = b[0].data() + off;
              const float* g = b[1].data() + off;
              float* m = b[2].data() + off;
              float* v = b[3].data() + off;
              adam_step(&p, &g, &m, &v, &n, 1, c);
            });
  }
  for (int variant = 0; variant < 32; variant += stride) {
    SgdConfig c;
    c.lr = 0.1;
    c.momentum = (variant & 1) ? 0.9 : 0.0;
    c.dampening = (variant & 2) ? 0.1 : 0.0;
    c.nesterov = (variant & 4) != 0 && c.momentum != 0.0 && c.dampening == 0.0;
    c.weight_decay = (variant & 8) ? 0.01 : 0.0;
    c.maximize = (variant & 16) != 0;
    c.first_step = (variant % 3) == 0;
    compare("sgd_step", isa, n, off,
            [&] { return Bufs{random_floats(len, -2, 2), random_floats(len, -2, 2),
                              random_floats(len, -1, 1)}; },
            [&](Bufs& b) {
              float* p = b[0].data() + off;
              const float* g = b[1].data() + off;
              float* buf = b[2].data() + off;
              sgd_step(&p, &g, &buf, &n, 1, c);
            });
  }
}

}  // namespace

int main() {
#if defined(__ARM_FEATURE_SVE)
  std::printf("SVE vector length: %u bits\n", static_cast<unsigned>(svcntb() * 8));
#endif
  const size_t sizes[] = {0, 1, 3, 7, 15, 17, 31, 33, 63, 65, 127, 129, 257, 1000, 4099};
  int tested = 0;
  for (Isa isa : {Isa::Avx2, Isa::Sve}) {
    if (!isa_available(isa)) continue;
    ++tested;
    for (size_t n : sizes) {
      for (size_t off : {0, 1, 3}) check_sizes(isa, n, off);
    }
    // Large enough to be split across threads, with chunk ends mid-vector.
    for (int threads : {1, 3}) {
      set_num_threads(threads);
      check_sizes(isa, 100003, 1, 5);
    }
    set_num_threads(1);
    std::printf("%s: %s\n", isa_name(isa), g_failures ? "FAILED" : "all kernels match scalar");
  }
  if (tested == 0) {
    std::printf("no vector path available on this CPU; nothing to compare\n");
    return 2;
  }
  return g_failures ? 1 : 0;
}
