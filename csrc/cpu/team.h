// One OpenMP parallel region per op call whose threads go through the call's phases together (run_team), with their
// own barrier between phases: a thread that runs out of work spins for a few tens of microseconds, then sleeps on a
// futex until the last thread arrives.
//
// Why: on a machine whose cores other processes also want, every OpenMP region end costs the threads that arrive
// first a spin of up to GOMP_SPINCOUNT (300 000 pauses, milliseconds) in libgomp's barrier, and the pool's idle
// threads spin the same way between regions.  A spinning thread uses up its fair share of the core while it waits,
// so when its next task comes it is the other processes' turn.  A divergence with gradients ran ~32 regions per call
// (4 per 256-row chunk); with 4 busy processes on a 2-core Zen 4, 9 % of its CPU samples were libgomp's spin loops
// (1.5 % idle), and its CPU time per call grew 13 % where MKL's own GEMMs' did not (docs/kernels.md, "CPU threads on
// a shared machine").  A sleeping thread gives its share to the others and is woken when the phase is done.
#pragma once

#include <ATen/ATen.h>
#include <omp.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <atomic>
#include <climits>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>

namespace copsd_cpu {

class Team {
 public:
  // Pause instructions a thread spins for at a barrier before it sleeps: ~40 us on a Zen 4 (a pause is ~65 cycles),
  // ~90 on recent Intel cores; the phases' own tails are longer than that on a busy machine, shorter on an idle one.
  static constexpr int kSpin = 2000;

  int size() const { return size_; }

  // Every thread of the team calls it, with the same n: hands out fn(tid, i), i in [0, n), one at a time, then waits
  // for the whole team.  After a task threw, the others are skipped (the team still meets at every barrier); run_team
  // rethrows the first exception.
  template <typename Fn>
  void tasks(int tid, int64_t n, Fn&& fn) {
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n;) {
      if (failed_.load(std::memory_order_relaxed)) continue;
      try {
        fn(tid, i);
      } catch (...) {
        fail();
      }
    }
    barrier();
  }

  // fn() on thread 0 only, then the whole team meets.
  template <typename Fn>
  void single(int tid, Fn&& fn) {
    if (tid == 0 && !failed_.load(std::memory_order_relaxed)) {
      try {
        fn();
      } catch (...) {
        fail();
      }
    }
    barrier();
  }

  // The whole team meets; the last thread to arrive resets the task counter for the next phase (every thread is
  // done with it) and wakes the sleepers.
  void barrier() {
    if (size_ == 1) {
      next_.store(0, std::memory_order_relaxed);
      return;
    }
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      next_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake();
      return;
    }
    for (int i = 0; i < kSpin; ++i) {
      if (gen_.load(std::memory_order_acquire) != gen) return;
      pause();
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (gen_.load(std::memory_order_seq_cst) == gen) sleep_while(gen);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  template <typename Body>
  friend void run_team(int nt, Body&& body);

  explicit Team(int size) : size_(size) {}
  void fail() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = std::current_exception();
    failed_.store(true, std::memory_order_relaxed);
  }
  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  }
  // Sleeps while gen_ still holds `gen` (a spurious return is fine: the caller checks again).
  void sleep_while(uint32_t gen) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, gen, nullptr, nullptr, 0);
#else
    (void)gen;
    std::this_thread::yield();
#endif
  }
  void wake() {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#endif
  }

  int size_;
  alignas(64) std::atomic<uint32_t> gen_{0};
  alignas(64) std::atomic<int> arrived_{0};
  std::atomic<int> sleepers_{0};
  alignas(64) std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::mutex mu_;
  std::exception_ptr error_;
};

// body(team, tid) on every thread of one OpenMP region of (up to) nt threads: the team's size is the
// region's real thread count (1 where OpenMP gives no more, e.g. inside another region).  Each thread sets its own
// NoGradGuard (grad mode is per thread).  Rethrows the first exception of a task (or of the body itself).
template <typename Body>
void run_team(int nt, Body&& body) {
  nt = nt < 1 ? 1 : nt;
  Team team(nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp single
    team.size_ = omp_get_num_threads();  // the implicit barrier after `single` publishes it
    at::NoGradGuard no_grad;
    const int tid = omp_get_thread_num();
    try {
      body(team, tid);
    } catch (...) {
      team.fail();  // only before the body's first barrier can this leave the others waiting: bodies do not throw
    }
  }
  if (team.error_) std::rethrow_exception(team.error_);
}

}  // namespace copsd_cpu
