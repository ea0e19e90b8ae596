#include "comm/collective.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>

#include "comm/mpi_util.h"
#include "kernels/kernels.h"

namespace rannc::comm {

namespace {

std::mutex keyval_mu;
int keyval = MPI_KEYVAL_INVALID;

int free_duplicate(MPI_Comm, int, void* attr, void*) {
  auto* holder = static_cast<std::shared_ptr<CommState>*>(attr);
  CommState& st = **holder;
  if (st.pending != MPI_REQUEST_NULL) MPI_Wait(&st.pending, MPI_STATUS_IGNORE);
  if (st.dup != MPI_COMM_NULL) MPI_Comm_free(&st.dup);
  delete holder;
  return MPI_SUCCESS;
}

}  // namespace

std::shared_ptr<CommState> collective_comm(MPI_Comm user) {
  std::lock_guard<std::mutex> lk(keyval_mu);
  if (keyval == MPI_KEYVAL_INVALID)
    check_mpi(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, free_duplicate, &keyval, nullptr),
              "MPI_Comm_create_keyval");
  void* attr = nullptr;
  int flag = 0;
  check_mpi(MPI_Comm_get_attr(user, keyval, &attr, &flag), "MPI_Comm_get_attr");
  if (flag) return *static_cast<std::shared_ptr<CommState>*>(attr);
  auto state = std::make_shared<CommState>();
  check_mpi(MPI_Comm_idup(user, &state->dup, &state->pending), "MPI_Comm_idup");
  auto* holder = new std::shared_ptr<CommState>(state);
  int rc = MPI_Comm_set_attr(user, keyval, holder);
  if (rc != MPI_SUCCESS) {
    delete holder;
    check_mpi(rc, "MPI_Comm_set_attr");
  }
  return state;
}

CollectiveOp::CollectiveOp(MPI_Comm user, std::shared_ptr<CommState> state, Agreement agreement, bool check, char* buf, size_t elem_size,
                           std::vector<Step> steps, size_t segment_bytes, std::function<void()> prologue,
                           std::function<void()> epilogue)
    : user_(user),
      state_(std::move(state)),
      agreement_(std::move(agreement)),
      check_(check),
      buf_(buf),
      elem_size_(elem_size),
      steps_(std::move(steps)),
      segment_elems_(std::max<size_t>(1, std::min<size_t>(segment_bytes, size_t(1) << 30) / elem_size)),
      prologue_(std::move(prologue)),
      epilogue_(std::move(epilogue)) {
  size_t scratch = 0;
  for (const Step& st : steps_) {
    if (!st.reduce) continue;
    size_t total = 0;
    for (const Xfer& x : st.recvs) total += x.region.len;
    scratch = std::max(scratch, total);
  }
  scratch_.resize(scratch * elem_size_);
}

CollectiveOp::CollectiveOp(MPI_Comm user, std::shared_ptr<CommState> state, Agreement agreement, bool check,
                           std::function<int(MPI_Comm, MPI_Request*)> native, std::function<void()> prologue,
                           std::function<void()> epilogue)
    : user_(user),
      state_(std::move(state)),
      agreement_(std::move(agreement)),
      check_(check),
      native_(std::move(native)),
      prologue_(std::move(prologue)),
      epilogue_(std::move(epilogue)) {}

void CollectiveOp::start() {
  // Collectives on one communicator run in order, so only the first one ever
  // finds the duplicate still being made.
  if (state_->pending != MPI_REQUEST_NULL) {
    awaiting_dup_ = true;
    return;
  }
  begin();
}

void CollectiveOp::begin() {
  comm_ = state_->dup;
  if (!check_) {
    start_data();
    return;
  }
  const int64_t v[3] = {agreement_.count, agreement_.algorithm, agreement_.shape_fingerprint};
  for (int i = 0; i < 3; ++i) {
    check_send_[2 * i] = -v[i];  // max of -x is -(min of x)
    check_send_[2 * i + 1] = v[i];
  }
  check_mpi(MPI_Iallreduce(check_send_, check_recv_, 6, MPI_INT64_T, MPI_MAX, comm_, &check_req_),
            "MPI_Iallreduce (agreement check)");
  checking_ = true;
}

bool CollectiveOp::finish_if_disagreed() {
  static const char* names[3] = {"element count", "algorithm", "torus shape"};
  for (int i = 0; i < 3; ++i) {
    int64_t lo = -check_recv_[2 * i], hi = check_recv_[2 * i + 1];
    if (lo == hi) continue;
    std::string msg = agreement_.what + ": ranks disagree on the " + names[i];
    if (i == 0)
      msg += " (smallest " + std::to_string(lo) + ", largest " + std::to_string(hi) +
             " elements); every rank must pass a tensor of the same size";
    else
      msg += "; every rank must pass the same algorithm and torus_shape";
    finish(Status::ConfigError, msg);
    return true;
  }
  return false;
}

void CollectiveOp::start_data() {
  if (prologue_) prologue_();
  if (native_) {
    check_mpi(native_(comm_, &native_req_), ("MPI collective for " + agreement_.what).c_str());
    return;
  }
  step_ = 0;
  post_step();
}

void CollectiveOp::post_step() {
  reqs_.clear();
  recv_of_req_.clear();
  outstanding_ = 0;
  if (step_ >= steps_.size()) return;
  const Step& st = steps_[step_];
  size_t scratch_off = 0;
  // Receives first, so early arrivals land in place rather than in MPI's buffers.
  for (const Xfer& x : st.recvs) {
    for (size_t off = 0; off < x.region.len; off += segment_elems_) {
      size_t len = std::min(segment_elems_, x.region.len - off);
      char* dst = st.reduce ? scratch_.data() + (scratch_off + off) * elem_size_
                            : buf_ + (x.region.off + off) * elem_size_;
      MPI_Request r;
      check_mpi(MPI_Irecv(dst, static_cast<int>(len * elem_size_), MPI_BYTE, x.peer, st.tag, comm_, &r),
                "MPI_Irecv");
      reqs_.push_back(r);
      recv_of_req_.push_back({x.region.off + off, scratch_off + off, len});
    }
    scratch_off += x.region.len;
  }
  for (const Xfer& x : st.sends) {
    for (size_t off = 0; off < x.region.len; off += segment_elems_) {
      size_t len = std::min(segment_elems_, x.region.len - off);
      MPI_Request r;
      check_mpi(MPI_Isend(buf_ + (x.region.off + off) * elem_size_, static_cast<int>(len * elem_size_),
                          MPI_BYTE, x.peer, st.tag, comm_, &r),
                "MPI_Isend");
      reqs_.push_back(r);
      recv_of_req_.push_back({0, 0, 0});
    }
  }
  outstanding_ = static_cast<int>(reqs_.size());
}

// Test this step's messages; reduce what arrived; move to the next step when
// all are done. Returns true if anything completed.
bool CollectiveOp::advance_step() {
  bool moved = false;
  std::vector<int> idx(reqs_.size());
  while (step_ < steps_.size()) {
    if (outstanding_ > 0) {
      int count = 0;
      int rc = MPI_Testsome(static_cast<int>(reqs_.size()), reqs_.data(), &count, idx.data(),
                            MPI_STATUSES_IGNORE);
      if (rc != MPI_SUCCESS)
        throw std::runtime_error(agreement_.what + " (" + std::to_string(step_) + "th step) failed: " +
                                 mpi_error_string(rc));
      if (count == MPI_UNDEFINED || count == 0) return moved;
      moved = true;
      outstanding_ -= count;
      if (steps_[step_].reduce) {
        for (int k = 0; k < count; ++k) {
          const PendingRecv& pr = recv_of_req_[idx[k]];
          if (pr.len == 0) continue;
          kernels::sum_into(reinterpret_cast<float*>(buf_) + pr.dst_off,
                   reinterpret_cast<const float*>(scratch_.data()) + pr.scratch_off, pr.len);
        }
      }
      if (outstanding_ > 0) return moved;
    }
    ++step_;
    moved = true;
    post_step();
    idx.resize(reqs_.size());
  }
  return moved;
}

bool CollectiveOp::progress() {
  if (awaiting_dup_) {
    int done = 0;
    check_mpi(MPI_Test(&state_->pending, &done, MPI_STATUS_IGNORE), "MPI_Comm_idup");
    if (!done) return false;
    awaiting_dup_ = false;
    // Errors come back as codes and become Python exceptions, not aborts.
    MPI_Comm_set_errhandler(state_->dup, MPI_ERRORS_RETURN);
    begin();
    return true;
  }
  if (checking_) {
    int done = 0;
    check_mpi(MPI_Test(&check_req_, &done, MPI_STATUS_IGNORE), "MPI_Test (agreement check)");
    if (!done) return false;
    checking_ = false;
    if (finish_if_disagreed()) return true;
    start_data();
  }
  bool moved = false;
  if (native_) {
    int done = 0;
    check_mpi(MPI_Test(&native_req_, &done, MPI_STATUS_IGNORE), ("MPI collective for " + agreement_.what).c_str());
    if (!done) return false;
    moved = true;
  } else {
    moved = advance_step();
    if (step_ < steps_.size()) return moved;
  }
  if (epilogue_) epilogue_();
  finish(Status::Ok);
  return true;
}

void CollectiveOp::abandon() {
  // A collective cannot be cancelled; only point-to-point pieces can.
  for (auto& r : reqs_) {
    if (r == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&r);
    MPI_Request_free(&r);
  }
}

}  // namespace rannc::comm
