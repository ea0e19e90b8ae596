// Helpers shared by the communication code: communicators from mpi4py, errors.
#pragma once

#include <mpi.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace rannc {

// mpi4py hands communicators over as Fortran handles (comm.py2f()); this is
// portable across MPICH and Open MPI, unlike passing the C handle.
inline MPI_Comm comm_from_fortran(long long handle) {
  return MPI_Comm_f2c(static_cast<MPI_Fint>(handle));
}

inline std::string mpi_error_string(int rc) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  return std::string(msg, len);
}

inline void check_mpi(int rc, const char* what) {
  if (rc != MPI_SUCCESS) throw std::runtime_error(std::string(what) + " failed: " + mpi_error_string(rc));
}

// A writable, C-contiguous float32 buffer from a Python object (numpy array,
// or a torch tensor's .numpy() view), without copying.
inline pybind11::buffer_info float32_buffer(pybind11::buffer b, const char* name) {
  pybind11::buffer_info info = b.request(true);
  if (info.format != pybind11::format_descriptor<float>::format()) {
    throw std::invalid_argument(std::string(name) + ": expected a float32 buffer, got format '" +
                                info.format + "'");
  }
  pybind11::ssize_t expected = info.itemsize;
  for (pybind11::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expected) {
      throw std::invalid_argument(std::string(name) +
                                  ": buffer is not contiguous; pass tensor.contiguous()");
    }
    expected *= info.shape[d];
  }
  return info;
}

}  // namespace rannc
