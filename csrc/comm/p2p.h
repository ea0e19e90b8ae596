// Point-to-point sends and receives of raw bytes, posted by the caller and
// completed by the progress thread.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "comm/engine.h"

namespace rannc::comm {

class P2POp : public Op {
 public:
  // Post a nonblocking send (is_send) or receive of `nbytes` at `ptr` to/from
  // `peer` with `tag` on `comm`. Messages over 1 GiB travel as several
  // pieces; both sides split the same way. Throws std::runtime_error if MPI
  // refuses to post.
  P2POp(bool is_send, void* ptr, size_t nbytes, int peer, int tag, MPI_Comm comm);
  void start() override {}
  bool progress() override;
  void abandon() override;

 private:
  bool is_send_;
  int peer_;
  int tag_;
  std::vector<MPI_Request> reqs_;
  std::vector<int> piece_bytes_;
};

// Largest tag MPI accepts on `comm` (MPI_TAG_UB).
int tag_upper_bound(MPI_Comm comm);

}  // namespace rannc::comm
