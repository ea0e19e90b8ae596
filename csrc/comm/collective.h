// Collectives executed by the progress thread: a cheap agreement check across
// ranks, then either MPI's own nonblocking collective or a step list from
// schedule.h run with nonblocking point-to-point messages.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/engine.h"
#include "comm/schedule.h"

namespace rannc::comm {

// The communicator rannc_py's collectives use for a caller's communicator: a
// duplicate, so their messages never match the caller's own point-to-point
// traffic. It is started with MPI_Comm_idup on first use (by the calling
// thread, so in program order among the caller's collectives, without
// blocking) and cached on the caller's communicator as an attribute; it is
// freed with that communicator.
struct CommState {
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request pending = MPI_REQUEST_NULL;  // the MPI_Comm_idup, until the first collective sees it done
};
std::shared_ptr<CommState> collective_comm(MPI_Comm user);

// What every rank must agree on before data moves; checked with one small
// MPI_Iallreduce (a few microseconds) so a mismatch fails on every rank
// instead of hanging.
struct Agreement {
  std::string what;             // e.g. "allreduce"
  int64_t count = 0;            // elements per rank (or per block)
  int64_t algorithm = 0;        // an algorithm code
  int64_t shape_fingerprint = 0;
};

class CollectiveOp : public Op {
 public:
  // Run `steps` over `buf` (elements of `elem_size` bytes; reduce steps sum
  // float32) on `comm`. `prologue` runs on the progress thread before the
  // first message (e.g. copy an input into the work buffer) and `epilogue`
  // after the last. Messages are cut into pieces of at most `segment_bytes`
  // so reductions overlap the transfer of later pieces.
  CollectiveOp(MPI_Comm user, std::shared_ptr<CommState> state, Agreement agreement, bool check, char* buf, size_t elem_size,
               std::vector<Step> steps, size_t segment_bytes, std::function<void()> prologue,
               std::function<void()> epilogue);
  // Run MPI's own collective, started by `native` on the progress thread.
  CollectiveOp(MPI_Comm user, std::shared_ptr<CommState> state, Agreement agreement, bool check,
               std::function<int(MPI_Comm, MPI_Request*)> native, std::function<void()> prologue,
               std::function<void()> epilogue);

  void start() override;
  bool progress() override;
  MPI_Comm serial_comm() const override { return user_; }
  void abandon() override;

 private:
  struct PendingRecv {
    size_t dst_off;      // elements into buf_
    size_t scratch_off;  // elements into scratch_ (reduce steps)
    size_t len;          // elements
  };

  void begin();
  void start_data();
  bool finish_if_disagreed();
  void post_step();
  bool advance_step();

  MPI_Comm user_;
  std::shared_ptr<CommState> state_;
  MPI_Comm comm_ = MPI_COMM_NULL;  // state_->dup, once it exists
  bool awaiting_dup_ = false;
  Agreement agreement_;
  bool check_;
  int64_t check_send_[6] = {};
  int64_t check_recv_[6] = {};
  MPI_Request check_req_ = MPI_REQUEST_NULL;
  bool checking_ = false;

  char* buf_ = nullptr;
  size_t elem_size_ = 1;
  std::vector<Step> steps_;
  size_t segment_elems_ = 1;
  size_t step_ = 0;
  std::vector<MPI_Request> reqs_;
  std::vector<PendingRecv> recv_of_req_;  // parallel to reqs_; len 0 entries for sends
  std::vector<char> scratch_;
  int outstanding_ = 0;

  std::function<int(MPI_Comm, MPI_Request*)> native_;
  MPI_Request native_req_ = MPI_REQUEST_NULL;
  std::function<void()> prologue_, epilogue_;
};

}  // namespace rannc::comm
