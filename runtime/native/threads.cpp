#include "threads.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define OVSEG_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define OVSEG_CPU_RELAX() asm volatile("yield")
#else
#define OVSEG_CPU_RELAX() std::this_thread::yield()
#endif

namespace ovseg {
namespace {

// Workers poll for this long before sleeping: kernels are called back to back
// per frame, and a condition-variable wake-up costs about as much as a whole
// pooling call.
constexpr auto kSpin = std::chrono::microseconds(100);

// Polls `ready` until it returns true or kSpin has passed; returns its value.
template <class Ready>
bool spin_until(Ready&& ready) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1;; ++i) {
    if (ready()) return true;
    OVSEG_CPU_RELAX();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) return false;
  }
}

class Pool {
 public:
  explicit Pool(int n) { start(n); }
  // Never destroyed (see instance()), so no shutdown-order problems at exit.
  ~Pool() = delete;

  void resize(int n) {
    std::lock_guard<std::mutex> run(run_mutex_);
    stop();
    start(n);
  }

  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> run(run_mutex_, std::try_to_lock);
    if (!run.owns_lock() || workers_.empty()) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    uint64_t id;
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      n_ = n;
      next_ = 0;
      done_.store(0);
      error_ = nullptr;
      id = job_id_.load() + 1;
      job_id_.store(id, std::memory_order_release);
    }
    wake_.notify_all();
    work(id);
    spin_until([&] { return done_.load(std::memory_order_acquire) == n; });
    std::unique_lock<std::mutex> lk(m_);
    finished_.wait(lk, [&] { return done_.load() == n; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void start(int n) {
    stop_ = false;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  void loop() {
    uint64_t seen = job_id_.load();
    for (;;) {
      spin_until([&] { return job_id_.load(std::memory_order_acquire) != seen || stop_.load(); });
      {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, [&] { return stop_ || job_id_.load() != seen; });
        if (stop_) return;
        seen = job_id_.load();
      }
      work(seen);
    }
  }

  // Claims and runs tasks of job `id` until none is left.
  void work(uint64_t id) {
    for (;;) {
      int task;
      const std::function<void(int)>* fn;
      {
        std::lock_guard<std::mutex> lk(m_);
        if (job_id_.load() != id || next_ >= n_) return;
        task = next_++;
        fn = fn_;
      }
      try {
        (*fn)(task);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (!error_) error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lk(m_);
      if (done_.fetch_add(1) + 1 == n_) finished_.notify_all();
    }
  }

  std::mutex run_mutex_;  // one job at a time; concurrent callers run serially
  std::mutex m_;
  std::condition_variable wake_, finished_;
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> job_id_{0};
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0, next_ = 0;
  std::atomic<int> done_{0};
  std::exception_ptr error_;
};

std::mutex g_mutex;
Pool* g_pool = nullptr;
int g_threads = 0;

int default_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

#if defined(__unix__) || defined(__APPLE__)
// A forked child has none of the parent's workers: drop (leak) the pool and
// let the child start its own.
void after_fork_in_child() {
  new (&g_mutex) std::mutex();
  g_pool = nullptr;
}
#endif

Pool& instance() {
  std::lock_guard<std::mutex> lk(g_mutex);
  if (!g_pool) {
#if defined(__unix__) || defined(__APPLE__)
    static const int registered = pthread_atfork(nullptr, nullptr, after_fork_in_child);
    (void)registered;
#endif
    if (g_threads == 0) g_threads = default_threads();
    g_pool = new Pool(g_threads);
  }
  return *g_pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lk(g_mutex);
  return g_threads == 0 ? default_threads() : g_threads;
}

void set_num_threads(int n) {
  Pool* pool;
  {
    std::lock_guard<std::mutex> lk(g_mutex);
    g_threads = std::max(1, n);
    pool = g_pool;
  }
  if (pool) pool->resize(n);
}

void parallel_tasks(int n, const std::function<void(int)>& fn) {
  if (n <= 0) return;
  if (n == 1) {
    fn(0);
    return;
  }
  instance().run(n, fn);
}

}  // namespace ovseg
