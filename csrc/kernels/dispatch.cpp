// Run-time choice of the kernel path, splitting of large calls over threads,
// and the derivation of optimizer constants in torch's precision.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/impl.h"
#include "kernels/kernels.h"

namespace rannc::kernels {

namespace {

using detail::Impl;

const Impl* impl_for(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return &detail::scalar_impl();
    case Isa::Avx2: return detail::avx2_impl();
    case Isa::Sve: return detail::sve_impl();
  }
  return nullptr;
}

Isa best_isa() {
  if (isa_available(Isa::Sve)) return Isa::Sve;
  if (isa_available(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

std::atomic<int> g_isa{-1};  // -1: not chosen yet
std::atomic<int> g_threads{1};

const Impl& impl() { return *impl_for(active_isa()); }

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr size_t kGrain = size_t{1} << 15;
// Chunk boundaries fall on multiples of 16 floats (64 bytes) so that threads
// never write to the same cache line.
constexpr size_t kAlign = 16;

// Splits [0, total) into up to `threads` chunks and calls fn(t, begin, end)
// for chunk t; the calling thread takes chunk 0. Returns the number of chunks.
template <typename Fn>
size_t parallel_chunks(size_t total, size_t threads, Fn&& fn) {
  const size_t want = std::max<size_t>(1, total / kGrain);
  const size_t nt = std::min<size_t>(threads, want);
  if (nt <= 1) {
    fn(size_t{0}, size_t{0}, total);
    return 1;
  }
  size_t chunk = (total + nt - 1) / nt;
  chunk = (chunk + kAlign - 1) / kAlign * kAlign;
  std::vector<std::thread> workers;
  workers.reserve(nt - 1);
  for (size_t t = 1; t < nt; ++t) {
    const size_t b = std::min(total, t * chunk), e = std::min(total, (t + 1) * chunk);
    if (b < e) workers.emplace_back([&fn, t, b, e] { fn(t, b, e); });
  }
  fn(size_t{0}, size_t{0}, std::min(total, chunk));
  for (auto& w : workers) w.join();
  return nt;
}

template <typename Fn>
void parallel_for(size_t total, Fn&& fn) {
  parallel_chunks(total, static_cast<size_t>(num_threads()), [&fn](size_t, size_t b, size_t e) { fn(b, e); });
}

// Calls fn(j, lo, hi) for the parts of segments j (of sizes[j] elements,
// laid end to end) that fall inside [begin, end).
template <typename Fn>
void for_segments(const size_t* sizes, size_t k, size_t begin, size_t end, Fn&& fn) {
  size_t base = 0;
  for (size_t j = 0; j < k && base < end; ++j) {
    const size_t lo = std::max(begin, base), hi = std::min(end, base + sizes[j]);
    if (lo < hi) fn(j, lo - base, hi - base);
    base += sizes[j];
  }
}

size_t total_of(const size_t* sizes, size_t k) {
  size_t t = 0;
  for (size_t j = 0; j < k; ++j) t += sizes[j];
  return t;
}

detail::AdamConsts make_adam_consts(const AdamConfig& c) {
  // Python computes these in double and torch casts them to float when it
  // applies them; do the same so results match torch.optim.Adam.
  const double bc1 = 1.0 - std::pow(c.beta1, c.step);
  const double bc2 = 1.0 - std::pow(c.beta2, c.step);
  const double step_size = c.lr / bc1;
  const float w = static_cast<float>(1.0 - c.beta1);
  detail::AdamConsts k{};
  k.neg_step_size = static_cast<float>(-step_size);
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  k.eps = static_cast<float>(c.eps);
  k.lerp_weight = w;
  k.lerp_small = std::fabs(w) < 0.5f;
  k.beta2 = static_cast<float>(c.beta2);
  k.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  k.weight_decay = static_cast<float>(c.weight_decay);
  k.decay = static_cast<float>(1.0 - c.lr * c.weight_decay);
  k.has_weight_decay = c.weight_decay != 0.0;
  k.decoupled = c.decoupled_weight_decay;
  k.maximize = c.maximize;
  return k;
}

detail::SgdConsts make_sgd_consts(const SgdConfig& c) {
  detail::SgdConsts k{};
  k.neg_lr = static_cast<float>(-c.lr);
  k.momentum = static_cast<float>(c.momentum);
  k.one_minus_dampening = static_cast<float>(1.0 - c.dampening);
  k.weight_decay = static_cast<float>(c.weight_decay);
  k.has_weight_decay = c.weight_decay != 0.0;
  k.has_momentum = c.momentum != 0.0;
  k.nesterov = c.nesterov;
  k.maximize = c.maximize;
  k.first_step = c.first_step;
  return k;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Sve: return "sve";
  }
  return "unknown";
}

bool isa_available(Isa isa) { return impl_for(isa) != nullptr; }

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(best_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) {
  if (!isa_available(isa)) {
    throw std::invalid_argument(std::string("kernel path '") + isa_name(isa) +
                                "' is not available on this CPU/build; use one of those "
                                "isa_available() reports");
  }
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

void set_num_threads(int n) {
  if (n < 1) {
    throw std::invalid_argument("kernel thread count must be >= 1, got " + std::to_string(n));
  }
  g_threads.store(n, std::memory_order_relaxed);
}

int num_threads() { return g_threads.load(std::memory_order_relaxed); }

void sum_into(float* dst, const float* src, size_t n) {
  const Impl& k = impl();
  parallel_for(n, [&](size_t b, size_t e) { k.sum_into(dst + b, src + b, e - b); });
}

void sum_buffers(float* dst, const float* const* srcs, size_t k, size_t n) {
  if (k == 0) throw std::invalid_argument("sum_buffers needs at least one source buffer, got 0");
  const Impl& im = impl();
  parallel_for(n, [&](size_t b, size_t e) { im.sum_buffers(dst + b, srcs, k, b, e - b); });
}

void scale(float* x, float alpha, size_t n) {
  const Impl& k = impl();
  parallel_for(n, [&](size_t b, size_t e) { k.scale(x + b, alpha, e - b); });
}

double sum_squares(const float* x, size_t n) {
  const Impl& k = impl();
  const size_t threads = static_cast<size_t>(num_threads());
  std::vector<double> partial(threads, 0.0);
  parallel_chunks(n, threads, [&](size_t t, size_t b, size_t e) { partial[t] = k.sum_squares(x + b, e - b); });
  double total = 0.0;
  for (double p : partial) total += p;  // fixed order: deterministic for a thread count
  return total;
}

void copy(float* dst, const float* src, size_t n) {
  const Impl& k = impl();
  parallel_for(n, [&](size_t b, size_t e) { k.copy(dst + b, src + b, e - b); });
}

void f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
  const Impl& k = impl();
  parallel_for(n, [&](size_t b, size_t e) { k.f32_to_bf16(src + b, dst + b, e - b); });
}

void bf16_to_f32(const uint16_t* src, float* dst, size_t n) {
  const Impl& k = impl();
  parallel_for(n, [&](size_t b, size_t e) { k.bf16_to_f32(src + b, dst + b, e - b); });
}

void pack(float* dst, const float* const* srcs, const size_t* sizes, size_t k) {
  const Impl& im = impl();
  parallel_for(total_of(sizes, k), [&](size_t b, size_t e) {
    size_t offset = 0, j_seen = 0;
    for_segments(sizes, k, b, e, [&](size_t j, size_t lo, size_t hi) {
      for (; j_seen < j; ++j_seen) offset += sizes[j_seen];
      im.copy(dst + offset + lo, srcs[j] + lo, hi - lo);
    });
  });
}

void unpack(const float* src, float* const* dsts, const size_t* sizes, size_t k) {
  const Impl& im = impl();
  parallel_for(total_of(sizes, k), [&](size_t b, size_t e) {
    size_t offset = 0, j_seen = 0;
    for_segments(sizes, k, b, e, [&](size_t j, size_t lo, size_t hi) {
      for (; j_seen < j; ++j_seen) offset += sizes[j_seen];
      im.copy(dsts[j] + lo, src + offset + lo, hi - lo);
    });
  });
}

void adam_step(float* const* params, const float* const* grads, float* const* exp_avgs,
               float* const* exp_avg_sqs, const size_t* sizes, size_t k, const AdamConfig& cfg) {
  const Impl& im = impl();
  const detail::AdamConsts c = make_adam_consts(cfg);
  parallel_for(total_of(sizes, k), [&](size_t b, size_t e) {
    for_segments(sizes, k, b, e, [&](size_t j, size_t lo, size_t hi) {
      im.adam(params[j] + lo, grads[j] + lo, exp_avgs[j] + lo, exp_avg_sqs[j] + lo, hi - lo, c);
    });
  });
}

void sgd_step(float* const* params, const float* const* grads, float* const* momentum_bufs,
              const size_t* sizes, size_t k, const SgdConfig& cfg) {
  const Impl& im = impl();
  const detail::SgdConsts c = make_sgd_consts(cfg);
  if (c.has_momentum && momentum_bufs == nullptr) {
    throw std::invalid_argument("sgd_step with momentum != 0 needs momentum buffers, got none");
  }
  parallel_for(total_of(sizes, k), [&](size_t b, size_t e) {
    for_segments(sizes, k, b, e, [&](size_t j, size_t lo, size_t hi) {
      float* buf = c.has_momentum ? momentum_bufs[j] + lo : nullptr;
      im.sgd(params[j] + lo, grads[j] + lo, buf, hi - lo, c);
    });
  });
}

}  // namespace rannc::kernels
