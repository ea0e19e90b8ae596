#include "comm/p2p.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "comm/mpi_util.h"

namespace rannc::comm {

namespace {
// Keep each MPI message's count within an int.
constexpr size_t kMaxPiece = size_t(1) << 30;
}  // namespace

P2POp::P2POp(bool is_send, void* ptr, size_t nbytes, int peer, int tag, MPI_Comm comm)
    : is_send_(is_send), peer_(peer), tag_(tag) {
  char* p = static_cast<char*>(ptr);
  size_t off = 0;
  do {  // a zero-byte message is still one message
    int len = static_cast<int>(std::min(kMaxPiece, nbytes - off));
    MPI_Request r;
    int rc = is_send ? MPI_Isend(p + off, len, MPI_BYTE, peer, tag, comm, &r)
                     : MPI_Irecv(p + off, len, MPI_BYTE, peer, tag, comm, &r);
    if (rc != MPI_SUCCESS) {
      abandon();
      check_mpi(rc, is_send ? "MPI_Isend" : "MPI_Irecv");
    }
    reqs_.push_back(r);
    piece_bytes_.push_back(len);
    off += static_cast<size_t>(len);
  } while (off < nbytes);
}

bool P2POp::progress() {
  int done = 0;
  std::vector<MPI_Status> st(reqs_.size());
  int rc = MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &done, st.data());
  if (rc == MPI_ERR_IN_STATUS) {
    for (auto& s : st)
      if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) rc = s.MPI_ERROR;
  }
  if (rc != MPI_SUCCESS) {
    throw std::runtime_error(std::string(is_send_ ? "isend to" : "irecv from") + " rank " +
                             std::to_string(peer_) + " with tag " + std::to_string(tag_) +
                             " failed: " + mpi_error_string(rc) +
                             (is_send_ ? "" : " (is the sender's tensor larger than the receiver's?)"));
  }
  if (!done) return false;
  if (!is_send_) {
    for (size_t i = 0; i < st.size(); ++i) {
      int got = 0;
      MPI_Get_count(&st[i], MPI_BYTE, &got);
      if (got != piece_bytes_[i]) {
        finish(Status::CommError, "irecv from rank " + std::to_string(peer_) + " with tag " +
                                      std::to_string(tag_) + ": expected " +
                                      std::to_string(piece_bytes_[i]) + " bytes, received " +
                                      std::to_string(got) +
                                      "; the sender's tensor must have the same number of bytes");
        return true;
      }
    }
  }
  finish(Status::Ok);
  return true;
}

void P2POp::abandon() {
  for (auto& r : reqs_) {
    if (r == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&r);
    MPI_Request_free(&r);
  }
}

int tag_upper_bound(MPI_Comm comm) {
  void* v = nullptr;
  int flag = 0;
  check_mpi(MPI_Comm_get_attr(comm, MPI_TAG_UB, &v, &flag), "MPI_Comm_get_attr(MPI_TAG_UB)");
  return flag ? *static_cast<int*>(v) : 32767;  // 32767 is the standard's guaranteed minimum
}

}  // namespace rannc::comm
