// Memory-bound kernels of a training step on flat, contiguous fp32 buffers:
// fused optimizer updates, reductions, scaling, bf16 casts and bucket packing.
//
// Every kernel has a scalar reference, an AVX2+FMA path (x86-64) and a
// vector-length-agnostic SVE path (aarch64). The fastest one the CPU supports
// is chosen at run time; set_isa() forces another (tests compare them).
// Elementwise kernels give bitwise the same result on every path: the vector
// code performs the same IEEE operations in the same order as the scalar
// reference (fused multiply-adds exactly where the scalar code calls std::fma).
// Large calls are split over num_threads() threads; pointers need no alignment.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rannc::kernels {

// ---- dispatch and threading ----------------------------------------------

enum class Isa { Scalar = 0, Avx2 = 1, Sve = 2 };

// Name of an ISA ("scalar", "avx2", "sve").
const char* isa_name(Isa isa);
// Whether this build and this CPU can run `isa`.
bool isa_available(Isa isa);
// The ISA the kernels currently use (the best available unless set_isa was called).
Isa active_isa();
// Force the kernels onto `isa`; throws std::invalid_argument if unavailable.
void set_isa(Isa isa);

// Threads used by one kernel call over a large buffer (default 1); n >= 1,
// throws std::invalid_argument otherwise.
void set_num_threads(int n);
int num_threads();

// ---- reductions, scaling, copies -------------------------------------------

// dst[i] += src[i].
void sum_into(float* dst, const float* src, size_t n);
// dst[i] = srcs[0][i] + srcs[1][i] + ... + srcs[k-1][i], added left to right
// (so equal to copying srcs[0] and calling sum_into for each further buffer).
// dst may alias srcs[0]. k >= 1.
void sum_buffers(float* dst, const float* const* srcs, size_t k, size_t n);
// x[i] *= alpha.
void scale(float* x, float alpha, size_t n);
// Sum of x[i]^2, accumulated in double (for the global gradient norm).
double sum_squares(const float* x, size_t n);
// dst[i] = src[i].
void copy(float* dst, const float* src, size_t n);

// fp32 -> bf16 with round-to-nearest-even (NaN becomes the quiet NaN 0x7FC0),
// and bf16 -> fp32 (exact). bf16 values are raw 16-bit patterns.
void f32_to_bf16(const float* src, uint16_t* dst, size_t n);
void bf16_to_f32(const uint16_t* src, float* dst, size_t n);

// Bucketing: concatenate k buffers of sizes[j] floats into dst, and back.
void pack(float* dst, const float* const* srcs, const size_t* sizes, size_t k);
void unpack(const float* src, float* const* dsts, const size_t* sizes, size_t k);

// ---- fused optimizer steps --------------------------------------------------

// Hyperparameters of one Adam/AdamW step, as torch.optim.Adam takes them.
// `step` is the step count after incrementing (1 on the first step).
struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double step = 1.0;
  bool decoupled_weight_decay = false;  // true: AdamW
  bool maximize = false;
};

// One Adam(W) step over k tensors (tensor j has sizes[j] elements), updating
// params, exp_avgs and exp_avg_sqs in place with torch.optim.Adam's operation
// order (torch's _single_tensor_adam, amsgrad=False).
void adam_step(float* const* params, const float* const* grads, float* const* exp_avgs,
               float* const* exp_avg_sqs, const size_t* sizes, size_t k, const AdamConfig& cfg);

// Hyperparameters of one SGD step, as torch.optim.SGD takes them.
struct SgdConfig {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
  // The momentum buffers are fresh: they are set to the gradient (torch's
  // `buf = grad.clone()` on the first step) instead of being decayed.
  bool first_step = false;
};

// One SGD step over k tensors. momentum_bufs may be null when momentum == 0.
void sgd_step(float* const* params, const float* const* grads, float* const* momentum_bufs,
              const size_t* sizes, size_t k, const SgdConfig& cfg);

}  // namespace rannc::kernels
