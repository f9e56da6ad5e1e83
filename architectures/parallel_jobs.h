// Shared by the C++ CPU kernels (architectures/cpp_kernels.py builds them with -I architectures/).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

// Runs job(0 .. jobs-1) on `threads` threads (the caller's included), each taking the next job.
// Built with OpenMP (cpp_kernels.py adds -fopenmp where the compiler takes it), the jobs run on PyTorch's own
// OpenMP threads: the library needs libgomp.so.1, and the loader hands it the one PyTorch has already loaded,
// so no thread is started per call and none waits beside PyTorch's (on 2 cores, threads started per call
// queued behind PyTorch's spin-waiting one). Without OpenMP, threads are started per call (tens of microseconds).
template <class Job>
void parallel_jobs(int64_t jobs, int64_t threads, const Job& job) {
  threads = std::max<int64_t>(1, std::min(threads, jobs));
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t j = 0; j < jobs; j++) job(j);
    return;
  }
  for (int64_t j = 0; j < jobs; j++) job(j);
#else
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t j = next++; j < jobs; j = next++) job(j);
  };
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; i++) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
#endif
}
