// The progress thread: polls every operation in flight, backing off when
// nothing moves so that waiting ranks do not steal cores from computation.
//
// MPI offers no completion notification, so someone has to poll. The back-off
// grows with the time nothing has moved (a sleep of 1/16 of it, at most 1 ms):
// an operation that completes after waiting w is noticed at most w/16 late,
// while a rank waiting for a long computation elsewhere wakes only about
// every millisecond instead of tens of thousands of times a second (which
// matters when ranks share cores). A thread that starts waiting on an
// operation pokes the engine, which polls tightly again; on a rank with a core
// to itself (set_dedicated) it keeps polling, yielding to any other runnable
// thread, for as long as a thread waits, since the waiter leaves the core to
// it (naps, even of tens of microseconds, measured slower: a timed wake-up
// costs about a hundred microseconds here).
#include "comm/engine.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <thread>
#include <stdexcept>

namespace rannc::comm {

void Op::wait() {
  if (completed()) return;
  Engine& engine = Engine::get();
  engine.begin_wait();
  struct Done {
    Engine& e;
    ~Done() { e.end_wait(); }
  } done{engine};
  // Poll briefly first: most small operations finish within microseconds,
  // and sleeping on the condition variable costs a scheduler wake-up.
  auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
  while (!completed() && std::chrono::steady_clock::now() < until) std::this_thread::yield();
  if (completed()) return;
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [this] { return completed(); });
}

std::string Op::message() const {
  std::lock_guard<std::mutex> lk(mu_);
  return message_;
}

void Op::finish(Status s, std::string msg) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (completed()) return;
    message_ = std::move(msg);
    status_.store(static_cast<int>(s), std::memory_order_release);
  }
  cv_.notify_all();
}

Engine& Engine::get() {
  // Never destroyed: a static destructor would run after MPI_Finalize.
  static Engine* engine = new Engine();
  return *engine;
}

void Engine::submit(std::shared_ptr<Op> op) {
  int provided = MPI_THREAD_SINGLE;
  MPI_Query_thread(&provided);
  if (provided != MPI_THREAD_MULTIPLE) {
    throw std::runtime_error(
        "rannc_py's communication engine needs MPI initialised with MPI_THREAD_MULTIPLE "
        "(got level " + std::to_string(provided) +
        "); import rannc_py.comm before mpi4py.MPI, or leave mpi4py.rc.thread_level at 'multiple'");
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (!thread_.joinable()) {
    stop_ = false;
    thread_ = std::thread([this] { run(); });
  }
  incoming_.push_back(std::move(op));
  cv_.notify_one();
}

void Engine::begin_wait() {
  waiters_.fetch_add(1, std::memory_order_relaxed);
  poke();
}

void Engine::poke() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    poked_ = true;
  }
  cv_.notify_one();
}

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!thread_.joinable()) return;
    stop_ = true;
  }
  cv_.notify_one();
  thread_.join();
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& op : active_) op->finish(Status::CommError, "communication engine shut down before completion");
  for (auto& op : incoming_) op->finish(Status::CommError, "communication engine shut down before start");
  for (auto& [comm, q] : waiting_)
    for (auto& op : q) op->finish(Status::CommError, "communication engine shut down before start");
  active_.clear();
  incoming_.clear();
  waiting_.clear();
  busy_.clear();
}

void Engine::admit(const std::shared_ptr<Op>& op) {
  MPI_Comm c = op->serial_comm();
  if (c == MPI_COMM_NULL) {
    active_.push_back(op);
  } else if (busy_.count(c)) {
    waiting_[c].push_back(op);
  } else {
    busy_.insert(c);
    active_.push_back(op);
  }
}

void Engine::retire(const std::shared_ptr<Op>& op) {
  MPI_Comm c = op->serial_comm();
  if (c == MPI_COMM_NULL) return;
  auto it = waiting_.find(c);
  if (it == waiting_.end() || it->second.empty()) {
    busy_.erase(c);
    if (it != waiting_.end()) waiting_.erase(it);
    return;
  }
  active_.push_back(it->second.front());
  it->second.pop_front();
}

void Engine::run() {
  using clock = std::chrono::steady_clock;
  // Tight polling for a short while after anything moved (message latency),
  // then yields, then sleeps proportional to the idle time (see the top).
  constexpr auto kSpin = std::chrono::microseconds(20);
  constexpr auto kYield = std::chrono::microseconds(200);
  constexpr auto kMaxSleep = std::chrono::microseconds(1000);
  auto idle_since = clock::now();
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (active_.empty()) cv_.wait(lk, [this] { return stop_ || !incoming_.empty(); });
      if (stop_) return;
      if (!incoming_.empty() || poked_) idle_since = clock::now();
      poked_ = false;
      for (auto& op : incoming_) admit(op);
      incoming_.clear();
    }
    bool moved = false;
    for (size_t i = 0; i < active_.size();) {
      std::shared_ptr<Op> op = active_[i];
      try {
        if (!op->started) {
          op->started = true;
          op->start();
          moved = true;
        }
        if (!op->completed()) moved |= op->progress();
      } catch (const std::exception& e) {
        op->abandon();
        op->finish(Status::CommError, e.what());
      }
      if (op->completed()) {
        active_[i] = active_.back();
        active_.pop_back();
        retire(op);
        moved = true;
      } else {
        ++i;
      }
    }
    auto now = clock::now();
    if (moved) {
      idle_since = now;
      continue;
    }
    auto idle = now - idle_since;
    if (idle < kSpin) continue;
    if (idle < kYield) {
      std::this_thread::yield();
      continue;
    }
    if (dedicated() && waiters_.load(std::memory_order_relaxed) > 0) {
      std::this_thread::yield();  // the waiter sleeps: this rank's core is the poller's
      continue;
    }
    auto nap = std::min<clock::duration>(idle / 16, kMaxSleep);
    // Interruptible: a new operation or a waiter (poke) ends the nap at once.
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait_for(lk, nap, [this] { return stop_ || poked_ || !incoming_.empty(); });
  }
}

}  // namespace rannc::comm
