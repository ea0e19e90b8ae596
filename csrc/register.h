// Each part of the C++ core adds its Python bindings through one of these.
#pragma once

#include <pybind11/pybind11.h>

namespace rannc {

void register_comm(pybind11::module_& m);     // csrc/comm/
void register_kernels(pybind11::module_& m);  // csrc/kernels/

}  // namespace rannc
