// The communication engine: operations in flight on MPI, driven to completion
// by one background progress thread so they overlap with computation.
//
// Threading: MPI must be initialised with MPI_THREAD_MULTIPLE (mpi4py does so
// by default; rannc_py.comm checks it). Operations are posted either by the
// calling thread (point-to-point) or by the progress thread (collectives), and
// only the progress thread tests their requests. Collectives on one
// communicator run one after another, in the order they were submitted, which
// keeps MPI's ordering rules for collectives; different communicators progress
// concurrently.
#pragma once

#include <mpi.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace rannc::comm {

// What became of an operation. The numbers are visible from Python.
enum class Status : int { Pending = 0, Ok = 1, ConfigError = 2, CommError = 3 };

// One communication in flight.
class Op {
 public:
  virtual ~Op() = default;
  Op() = default;
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;

  // Post the first MPI calls; called once, on the progress thread.
  virtual void start() = 0;
  // Test outstanding requests and advance; true if anything moved. Calls
  // finish() when done. Called only on the progress thread.
  virtual bool progress() = 0;
  // Communicator on which this operation must not overlap others
  // (MPI_COMM_NULL: it may overlap anything).
  virtual MPI_Comm serial_comm() const { return MPI_COMM_NULL; }
  // Give up outstanding requests after an error (best effort).
  virtual void abandon() {}

  bool completed() const { return status_.load(std::memory_order_acquire) != static_cast<int>(Status::Pending); }
  // Block until completed. Call without holding the GIL.
  void wait();
  Status status() const { return static_cast<Status>(status_.load(std::memory_order_acquire)); }
  // Why it failed; empty on success. Valid once completed().
  std::string message() const;

  // Record the outcome and wake waiters. The first call wins.
  void finish(Status s, std::string msg = {});

  bool started = false;

 private:
  std::atomic<int> status_{static_cast<int>(Status::Pending)};
  std::string message_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
};

// The process-wide progress engine.
class Engine {
 public:
  static Engine& get();
  // Hand an operation to the progress thread (starting it on first use).
  // Throws std::runtime_error if MPI is not initialised with THREAD_MULTIPLE.
  void submit(std::shared_ptr<Op> op);
  // Stop and join the progress thread; operations still in flight are left
  // unfinished. Safe to call more than once; a later submit restarts it.
  void shutdown();
  // A thread is about to block on an operation in flight: poll promptly
  // again (the idle back-off restarts from zero).
  void poke();
  // Whether this rank has a core to itself (ranks x torch threads within the
  // machine's cores). Then, while a thread is blocked on an operation, the
  // progress thread polls without napping: the waiting thread leaves the core
  // free, and a nap would make every message arriving during a long wait
  // (a pipeline stage waiting for its neighbour) late by up to the nap.
  void set_dedicated(bool dedicated) { dedicated_.store(dedicated, std::memory_order_relaxed); }
  bool dedicated() const { return dedicated_.load(std::memory_order_relaxed); }
  // A thread starts or stops blocking in Op::wait.
  void begin_wait();
  void end_wait() { waiters_.fetch_sub(1, std::memory_order_relaxed); }

 private:
  Engine() = default;
  void run();
  void admit(const std::shared_ptr<Op>& op);
  void retire(const std::shared_ptr<Op>& op);

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<Op>> incoming_;
  bool stop_ = false;
  bool poked_ = false;
  std::thread thread_;
  std::atomic<int> waiters_{0};
  std::atomic<bool> dedicated_{false};

  // Touched only by the progress thread.
  std::vector<std::shared_ptr<Op>> active_;
  std::set<MPI_Comm> busy_;
  std::map<MPI_Comm, std::deque<std::shared_ptr<Op>>> waiting_;
};

}  // namespace rannc::comm
