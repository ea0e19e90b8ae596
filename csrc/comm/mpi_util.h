// Helpers shared by the communication code: communicators from mpi4py, errors.
#pragma once

#include <mpi.h>

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

}  // namespace rannc
