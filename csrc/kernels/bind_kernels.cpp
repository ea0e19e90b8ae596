// Python bindings for the SIMD kernels, as the submodule _core.kernels.
//
// Buffers arrive as raw addresses (tensor.data_ptr()) plus element counts:
// the Python side (rannc_py/optim/kernels.py) checks dtype, device and
// contiguity, so these bindings copy nothing. Every kernel call releases the GIL.
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.h"
#include "register.h"

namespace py = pybind11;

namespace rannc {

namespace {

using namespace rannc::kernels;
using Addrs = std::vector<uintptr_t>;
using Sizes = std::vector<size_t>;

template <typename T>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

template <typename T>
std::vector<T*> ptrs(const Addrs& a) {
  std::vector<T*> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = reinterpret_cast<T*>(a[i]);
  return out;
}

void check_same_length(const char* what, size_t got, size_t want) {
  if (got != want) {
    throw std::invalid_argument(std::string(what) + ": got " + std::to_string(got) +
                                " addresses for " + std::to_string(want) + " sizes");
  }
}

Isa isa_from_name(const std::string& name) {
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Sve}) {
    if (name == isa_name(isa)) return isa;
  }
  throw std::invalid_argument("unknown kernel path '" + name + "'; use scalar, avx2 or sve");
}

}  // namespace

void register_kernels(py::module_& m) {
  auto k = m.def_submodule("kernels", "SIMD kernels on raw fp32/bf16 buffers (addresses + counts)");
  using gil = py::call_guard<py::gil_scoped_release>;

  k.def("isa", [] { return std::string(isa_name(active_isa())); });
  k.def("isa_available", [](const std::string& n) { return isa_available(isa_from_name(n)); });
  k.def("set_isa", [](const std::string& n) { set_isa(isa_from_name(n)); });
  k.def("set_num_threads", &set_num_threads);
  k.def("num_threads", &num_threads);

  k.def("sum_into", [](uintptr_t d, uintptr_t s, size_t n) { sum_into(ptr<float>(d), ptr<const float>(s), n); }, gil());
  k.def("sum_buffers", [](uintptr_t d, const Addrs& srcs, size_t n) {
    auto s = ptrs<const float>(srcs);
    sum_buffers(ptr<float>(d), s.data(), s.size(), n);
  }, gil());
  k.def("scale", [](uintptr_t x, float a, size_t n) { scale(ptr<float>(x), a, n); }, gil());
  k.def("sum_squares", [](uintptr_t x, size_t n) { return sum_squares(ptr<const float>(x), n); }, gil());
  k.def("copy", [](uintptr_t d, uintptr_t s, size_t n) { copy(ptr<float>(d), ptr<const float>(s), n); }, gil());
  k.def("f32_to_bf16", [](uintptr_t s, uintptr_t d, size_t n) {
    f32_to_bf16(ptr<const float>(s), ptr<uint16_t>(d), n);
  }, gil());
  k.def("bf16_to_f32", [](uintptr_t s, uintptr_t d, size_t n) {
    bf16_to_f32(ptr<const uint16_t>(s), ptr<float>(d), n);
  }, gil());
  k.def("pack", [](uintptr_t d, const Addrs& srcs, const Sizes& sizes) {
    check_same_length("pack", srcs.size(), sizes.size());
    auto s = ptrs<const float>(srcs);
    pack(ptr<float>(d), s.data(), sizes.data(), sizes.size());
  }, gil());
  k.def("unpack", [](uintptr_t s, const Addrs& dsts, const Sizes& sizes) {
    check_same_length("unpack", dsts.size(), sizes.size());
    auto d = ptrs<float>(dsts);
    unpack(ptr<const float>(s), d.data(), sizes.data(), sizes.size());
  }, gil());

  k.def("adam_step", [](const Addrs& params, const Addrs& grads, const Addrs& exp_avgs,
                        const Addrs& exp_avg_sqs, const Sizes& sizes, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double step,
                        bool decoupled_weight_decay, bool maximize) {
    const size_t n = sizes.size();
    check_same_length("adam_step params", params.size(), n);
    check_same_length("adam_step grads", grads.size(), n);
    check_same_length("adam_step exp_avgs", exp_avgs.size(), n);
    check_same_length("adam_step exp_avg_sqs", exp_avg_sqs.size(), n);
    AdamConfig c;
    c.lr = lr; c.beta1 = beta1; c.beta2 = beta2; c.eps = eps; c.weight_decay = weight_decay;
    c.step = step; c.decoupled_weight_decay = decoupled_weight_decay; c.maximize = maximize;
    auto p = ptrs<float>(params), m = ptrs<float>(exp_avgs), v = ptrs<float>(exp_avg_sqs);
    auto g = ptrs<const float>(grads);
    adam_step(p.data(), g.data(), m.data(), v.data(), sizes.data(), n, c);
  }, gil(), py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
     py::arg("sizes"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
     py::arg("weight_decay"), py::arg("step"), py::arg("decoupled_weight_decay"),
     py::arg("maximize"));

  k.def("sgd_step", [](const Addrs& params, const Addrs& grads, const Addrs& bufs,
                       const Sizes& sizes, double lr, double momentum, double dampening,
                       double weight_decay, bool nesterov, bool maximize, bool first_step) {
    const size_t n = sizes.size();
    check_same_length("sgd_step params", params.size(), n);
    check_same_length("sgd_step grads", grads.size(), n);
    if (momentum != 0.0) check_same_length("sgd_step momentum buffers", bufs.size(), n);
    SgdConfig c;
    c.lr = lr; c.momentum = momentum; c.dampening = dampening; c.weight_decay = weight_decay;
    c.nesterov = nesterov; c.maximize = maximize; c.first_step = first_step;
    auto p = ptrs<float>(params), b = ptrs<float>(bufs);
    auto g = ptrs<const float>(grads);
    sgd_step(p.data(), g.data(), momentum != 0.0 ? b.data() : nullptr, sizes.data(), n, c);
  }, gil(), py::arg("params"), py::arg("grads"), py::arg("momentum_bufs"), py::arg("sizes"),
     py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
     py::arg("nesterov"), py::arg("maximize"), py::arg("first_step"));
}

}  // namespace rannc
