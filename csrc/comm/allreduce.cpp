// Plain MPI_Allreduce on a float32 buffer, in place, with the GIL released.
#include "comm/mpi_util.h"
#include "register.h"

namespace py = pybind11;

namespace rannc {

static void allreduce_sum_f32(py::buffer buf, long long comm_f) {
  py::buffer_info info = float32_buffer(buf, "allreduce_sum_f32");
  MPI_Comm comm = comm_from_fortran(comm_f);
  {
    py::gil_scoped_release release;
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, info.ptr, static_cast<int>(info.size), MPI_FLOAT, MPI_SUM, comm),
              "MPI_Allreduce");
  }
}

void register_comm(py::module_& m) {
  m.def("allreduce_sum_f32", &allreduce_sum_f32, py::arg("buffer"), py::arg("comm"),
        "Sum a contiguous float32 buffer across the ranks of an mpi4py communicator "
        "(passed as comm.py2f()), in place.");
}

}  // namespace rannc
