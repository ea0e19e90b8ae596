// Python bindings for the SIMD kernels.
#include "register.h"

namespace py = pybind11;

namespace rannc {

void register_kernels(py::module_& m) { (void)m; }

}  // namespace rannc
