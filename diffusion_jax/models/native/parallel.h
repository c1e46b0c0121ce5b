// What the native kernels' sources share: ParallelFor over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace diffusion_jax {

// fn(0) .. fn(tasks - 1) shared out over XLA's intra-op pool. The calling thread works too and takes every task no
// helper has started, so the call finishes even when the pool's threads are all busy (each host device's program
// runs on one of them); it then waits only for tasks a started helper holds. The state is shared with helpers
// that start after the call returned (they find no task left).
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int tasks, Fn fn) {
  struct State {
    Fn fn; int tasks;
    std::atomic<int> next{0};
    int done = 0;
    std::mutex mu;
    std::condition_variable cv;
    State(Fn f, int n) : fn(std::move(f)), tasks(n) {}
    void Run() {
      for (int t; (t = next.fetch_add(1)) < tasks;) {
        fn(t);
        std::lock_guard<std::mutex> lock(mu);
        if (++done == tasks) cv.notify_all();
      }
    }
  };
  auto state = std::make_shared<State>(std::move(fn), tasks);
  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), tasks)) - 1;
  for (int i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->tasks; });
}

}  // namespace diffusion_jax
