// Python bindings of the communication engine: rannc_py._core's point-to-point
// operations, collectives and their Work handles. Buffers travel as raw
// addresses and sizes (the Python side keeps the tensors alive until the work
// completes); communicators as mpi4py's comm.py2f(). Every call releases the GIL.
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/collective.h"
#include "comm/engine.h"
#include "comm/mpi_util.h"
#include "comm/p2p.h"
#include "comm/schedule.h"
#include "register.h"

#include <pybind11/stl.h>

namespace py = pybind11;

namespace rannc {

namespace {

using comm::Agreement;
using comm::CollectiveOp;
using comm::Engine;
using comm::Op;

int algorithm_code(const std::string& name) {
  if (name == "mpi") return 0;
  if (name == "ring") return 1;
  if (name == "halving_doubling") return 2;
  if (name == "torus") return 3;
  throw std::invalid_argument("unknown collective algorithm '" + name +
                              "'; use 'mpi', 'ring', 'halving_doubling' or 'torus'");
}

int64_t fingerprint(const std::vector<int>& shape) {
  int64_t h = static_cast<int64_t>(shape.size());
  for (int d : shape) h = (h * 1000003 + d) & ((int64_t(1) << 61) - 1);
  return h;
}

void check_int_count(int64_t count, const char* what) {
  if (count > INT32_MAX)
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(count) +
                                " elements exceed what MPI's collective takes in one call (2^31-1); "
                                "use another algorithm or split the tensor");
}

// The torus algorithm's grid (its product must be the rank count); empty for the other algorithms.
std::vector<int> grid_of(const char* what, int code, std::vector<int> torus_shape, int size) {
  if (code != 3) return {};
  long long prod = 1;
  for (int d : torus_shape) prod *= d;
  if (torus_shape.empty() || prod != size)
    throw std::invalid_argument(std::string(what) + ": torus_shape's product must equal the rank count " +
                                std::to_string(size));
  return torus_shape;
}

struct CommInfo {
  MPI_Comm user;
  std::shared_ptr<comm::CommState> state;
  int rank;
  int size;
};

CommInfo open_collective(long long comm_f) {
  MPI_Comm user = comm_from_fortran(comm_f);
  CommInfo info{user, comm::collective_comm(user), 0, 1};
  check_mpi(MPI_Comm_rank(user, &info.rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(user, &info.size), "MPI_Comm_size");
  return info;
}

std::shared_ptr<Op> submit(std::shared_ptr<Op> op) {
  Engine::get().submit(op);
  return op;
}

std::shared_ptr<Op> p2p(bool is_send, uintptr_t ptr, size_t nbytes, int peer, int tag, long long comm_f) {
  py::gil_scoped_release release;
  return submit(std::make_shared<comm::P2POp>(is_send, reinterpret_cast<void*>(ptr), nbytes, peer, tag,
                                              comm_from_fortran(comm_f)));
}

std::shared_ptr<Op> allreduce(uintptr_t ptr, int64_t count, long long comm_f, const std::string& algorithm,
                              std::vector<int> torus_shape, bool check, size_t segment_bytes) {
  const int code = algorithm_code(algorithm);
  py::gil_scoped_release release;
  CommInfo ci = open_collective(comm_f);
  torus_shape = grid_of("allreduce", code, std::move(torus_shape), ci.size);
  Agreement ag{"allreduce", count, code, fingerprint(torus_shape)};
  float* buf = reinterpret_cast<float*>(ptr);
  std::shared_ptr<Op> op;
  if (code == 0) {
    check_int_count(count, "allreduce");
    op = std::make_shared<CollectiveOp>(
        ci.user, ci.state, ag, check,
        [buf, count](MPI_Comm c, MPI_Request* r) {
          return MPI_Iallreduce(MPI_IN_PLACE, buf, static_cast<int>(count), MPI_FLOAT, MPI_SUM, c, r);
        },
        nullptr, nullptr);
  } else {
    size_t n = static_cast<size_t>(count);
    std::vector<comm::Step> steps = code == 1   ? comm::ring_allreduce(n, ci.rank, ci.size)
                                    : code == 2 ? comm::halving_doubling_allreduce(n, ci.rank, ci.size)
                                                : comm::torus_allreduce(n, ci.rank, torus_shape);
    op = std::make_shared<CollectiveOp>(ci.user, ci.state, ag, check, reinterpret_cast<char*>(buf), sizeof(float),
                                        std::move(steps), segment_bytes, nullptr, nullptr);
  }
  return submit(op);
}

std::shared_ptr<Op> reduce_scatter(uintptr_t in_ptr, uintptr_t out_ptr, int64_t block, long long comm_f,
                                   const std::string& algorithm, std::vector<int> torus_shape, bool check,
                                   size_t segment_bytes) {
  const int code = algorithm_code(algorithm);
  if (code == 2)
    throw std::invalid_argument("reduce_scatter: algorithm must be 'mpi', 'ring' or 'torus', got '" + algorithm + "'");
  py::gil_scoped_release release;
  CommInfo ci = open_collective(comm_f);
  torus_shape = grid_of("reduce_scatter", code, std::move(torus_shape), ci.size);
  Agreement ag{"reduce_scatter", block, code, fingerprint(torus_shape)};
  const float* in = reinterpret_cast<const float*>(in_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  if (code == 0) {
    check_int_count(block, "reduce_scatter");
    return submit(std::make_shared<CollectiveOp>(
        ci.user, ci.state, ag, check,
        [in, out, block](MPI_Comm c, MPI_Request* r) {
          return MPI_Ireduce_scatter_block(in, out, static_cast<int>(block), MPI_FLOAT, MPI_SUM, c, r);
        },
        nullptr, nullptr));
  }
  // The ring and the torus reduce in place, so they work on a copy and leave the input intact.
  size_t b = static_cast<size_t>(block), total = b * ci.size;
  auto work = std::make_shared<std::vector<float>>(total);
  float* w = work->data();
  int rank = ci.rank;
  std::vector<comm::Step> steps = code == 3 ? comm::torus_reduce_scatter(b, rank, torus_shape)
                                            : comm::ring_reduce_scatter(b, rank, ci.size);
  return submit(std::make_shared<CollectiveOp>(
      ci.user, ci.state, ag, check, reinterpret_cast<char*>(w), sizeof(float), std::move(steps), segment_bytes, [w, in, total] { std::memcpy(w, in, total * sizeof(float)); },
      [work, out, b, rank] { std::memcpy(out, work->data() + b * rank, b * sizeof(float)); }));
}

std::shared_ptr<Op> allgather(uintptr_t in_ptr, uintptr_t out_ptr, int64_t block_bytes, long long comm_f,
                              const std::string& algorithm, std::vector<int> torus_shape, bool check,
                              size_t segment_bytes) {
  const int code = algorithm_code(algorithm);
  if (code == 2)
    throw std::invalid_argument("allgather: algorithm must be 'mpi', 'ring' or 'torus', got '" + algorithm + "'");
  py::gil_scoped_release release;
  CommInfo ci = open_collective(comm_f);
  torus_shape = grid_of("allgather", code, std::move(torus_shape), ci.size);
  Agreement ag{"allgather", block_bytes, code, fingerprint(torus_shape)};
  const char* in = reinterpret_cast<const char*>(in_ptr);
  char* out = reinterpret_cast<char*>(out_ptr);
  if (code == 0) {
    check_int_count(block_bytes, "allgather");
    return submit(std::make_shared<CollectiveOp>(
        ci.user, ci.state, ag, check,
        [in, out, block_bytes, rank = ci.rank](MPI_Comm c, MPI_Request* r) {
          int n = static_cast<int>(block_bytes);
          // MPI forbids overlapping buffers; the own-block case has a spelling.
          const void* send = in == out + block_bytes * rank ? MPI_IN_PLACE : in;
          return MPI_Iallgather(send, n, MPI_BYTE, out, n, MPI_BYTE, c, r);
        },
        nullptr, nullptr));
  }
  size_t b = static_cast<size_t>(block_bytes);
  char* mine = out + b * ci.rank;
  std::vector<comm::Step> steps = code == 3 ? comm::torus_allgather(b, ci.rank, torus_shape)
                                            : comm::ring_allgather(b, ci.rank, ci.size);
  return submit(std::make_shared<CollectiveOp>(
      ci.user, ci.state, ag, check, out, 1, std::move(steps), segment_bytes,
      [mine, in, b] {
        if (mine != in) std::memmove(mine, in, b);
      },
      nullptr));
}

}  // namespace

void register_comm(py::module_& m) {
  py::class_<Op, std::shared_ptr<Op>>(m, "CommWork",
                                       "A communication in flight; status 0 pending, 1 ok, 2 bad input, 3 failed.")
      .def("wait", &Op::wait, py::call_guard<py::gil_scoped_release>(), "Block until the operation completes.")
      .def("is_completed", &Op::completed)
      .def_property_readonly("status", [](const Op& op) { return static_cast<int>(op.status()); })
      .def_property_readonly("message", &Op::message);

  m.def(
      "comm_isend",
      [](uintptr_t ptr, size_t nbytes, int dest, int tag, long long comm_f) {
        return p2p(true, ptr, nbytes, dest, tag, comm_f);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("dest"), py::arg("tag"), py::arg("comm"),
      "Start sending nbytes at address ptr to rank dest.");
  m.def(
      "comm_irecv",
      [](uintptr_t ptr, size_t nbytes, int source, int tag, long long comm_f) {
        return p2p(false, ptr, nbytes, source, tag, comm_f);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("source"), py::arg("tag"), py::arg("comm"),
      "Start receiving exactly nbytes at address ptr from rank source.");
  m.def("comm_allreduce", &allreduce, py::arg("ptr"), py::arg("count"), py::arg("comm"), py::arg("algorithm"),
        py::arg("torus_shape"), py::arg("check"), py::arg("segment_bytes"),
        "Start a float32 sum allreduce in place.");
  m.def("comm_reduce_scatter", &reduce_scatter, py::arg("in_ptr"), py::arg("out_ptr"), py::arg("block"),
        py::arg("comm"), py::arg("algorithm"), py::arg("torus_shape"), py::arg("check"), py::arg("segment_bytes"),
        "Start a float32 sum reduce-scatter of size*block elements into block elements.");
  m.def("comm_allgather", &allgather, py::arg("in_ptr"), py::arg("out_ptr"), py::arg("block_bytes"),
        py::arg("comm"), py::arg("algorithm"), py::arg("torus_shape"), py::arg("check"), py::arg("segment_bytes"),
        "Start an allgather of block_bytes per rank.");
  m.def(
      "comm_tag_ub", [](long long comm_f) { return comm::tag_upper_bound(comm_from_fortran(comm_f)); },
      py::arg("comm"), "Largest message tag MPI accepts on this communicator.");
  m.def(
      "comm_set_dedicated", [](bool dedicated) { Engine::get().set_dedicated(dedicated); }, py::arg("dedicated"),
      "Tell the progress thread whether this rank has a core to itself: then it polls without napping "
      "while a thread waits on an operation.");
  m.def(
      "comm_shutdown", [] { Engine::get().shutdown(); }, py::call_guard<py::gil_scoped_release>(),
      "Stop the progress thread (before MPI_Finalize).");
}

}  // namespace rannc
