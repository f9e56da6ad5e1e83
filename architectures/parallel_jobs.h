// Shared by the C++ CPU kernels (architectures/cpp_kernels.py builds them with -I architectures/).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

// Runs job(0 .. jobs-1) on `threads` threads (the caller's included), each taking the next job. Threads are
// started per call (a few tens of microseconds): no pool waits spinning between calls on a shared machine.
template <class Job>
void parallel_jobs(int64_t jobs, int64_t threads, const Job& job) {
  threads = std::max<int64_t>(1, std::min(threads, jobs));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t j = next++; j < jobs; j = next++) job(j);
  };
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; i++) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}
