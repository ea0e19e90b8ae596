// The rannc_py._core extension: communication over MPI and SIMD kernels.
#include "register.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "rannc_py C++ core: MPI communication engine, collectives and SIMD kernels";
  rannc::register_comm(m);
  rannc::register_kernels(m);
}
