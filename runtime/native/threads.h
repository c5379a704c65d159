// A small persistent thread pool. The calling thread always takes part, so
// num_threads() == 1 means "no worker threads".
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

namespace ovseg {

int num_threads();
void set_num_threads(int n);  // n >= 1

// Runs fn(i) for every i in [0, n). Runs serially when n == 1, when the pool
// has no workers, or when another call is already using the pool. The first
// exception thrown by a task is rethrown here.
void parallel_tasks(int n, const std::function<void(int)>& fn);

// Splits [0, total) into at most num_threads() contiguous chunks of at least
// `grain` items and calls fn(begin, end) for each. The split depends only on
// (total, grain, num_threads()).
template <class F>
void parallel_for(int64_t total, int64_t grain, F&& fn) {
  if (total <= 0) return;
  const int64_t max_chunks = (total + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1);
  const int chunks = static_cast<int>(std::min<int64_t>(num_threads(), max_chunks));
  if (chunks <= 1) {
    fn(int64_t{0}, total);
    return;
  }
  parallel_tasks(chunks, [&](int i) { fn(total * i / chunks, total * (i + 1) / chunks); });
}

}  // namespace ovseg
