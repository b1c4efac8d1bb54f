#include "mrcnn/common/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace mrcnn {
namespace {

class Pool {
 public:
  explicit Pool(int nthreads) {
    for (int i = 1; i < nthreads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs task(0..nchunks-1) on the workers and the calling thread; rethrows the first exception.
  void run(int nchunks, const std::function<void(int)>& task) {
    {
      std::lock_guard<std::mutex> g(m_);
      task_ = &task;
      nchunks_ = nchunks;
      next_.store(0);
      remaining_ = nchunks;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [this] { return remaining_ == 0; });
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static thread_local bool in_worker_;
  friend bool inside_worker();

  void work() {
    for (;;) {
      const int i = next_.fetch_add(1);
      if (i >= nchunks_) return;
      try {
        (*task_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(m_);
        if (!error_) error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> g(m_);
      if (--remaining_ == 0) done_cv_.notify_all();
    }
  }
  void loop() {
    in_worker_ = true;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || (generation_ != seen && task_ != nullptr); });
        if (stop_) return;
        seen = generation_;
      }
      work();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* task_ = nullptr;
  int nchunks_ = 0;
  std::atomic<int> next_{0};
  int remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};
thread_local bool Pool::in_worker_ = false;
// True on pool threads and on a caller thread while it runs chunks of a job: nested calls run inline.
thread_local bool t_in_job = false;
bool inside_worker() { return Pool::in_worker_ || t_in_job; }

// Heap-allocated so a forked child (DataLoader workers) can drop the parent's state: the parent's
// threads do not exist there and its mutexes may be held.
std::mutex* g_config_mu = new std::mutex();
std::mutex* g_run_mu = new std::mutex();
Pool* g_pool = nullptr;
int g_threads = 0;

int default_threads() {
  if (const char* env = std::getenv("MRCNN_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

void after_fork_child() {
  g_config_mu = new std::mutex();
  g_run_mu = new std::mutex();
  g_pool = nullptr;  // leaked on purpose: its threads are gone in the child
}

Pool* get_pool() {
  static bool registered = [] { return pthread_atfork(nullptr, nullptr, after_fork_child) == 0; }();
  (void)registered;
  std::lock_guard<std::mutex> g(*g_config_mu);
  if (g_threads <= 0) g_threads = default_threads();
  if (!g_pool || g_pool->size() != g_threads) {
    delete g_pool;
    g_pool = new Pool(g_threads);
  }
  return g_pool;
}

}  // namespace

int get_num_threads() {
  std::lock_guard<std::mutex> g(*g_config_mu);
  return g_threads > 0 ? g_threads : default_threads();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> run(*g_run_mu);  // never resize while a job is running
  std::lock_guard<std::mutex> g(*g_config_mu);
  g_threads = n > 0 ? n : default_threads();
}

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (end <= begin) return;
  const int64_t n = end - begin;
  grain = std::max<int64_t>(grain, 1);
  if (n <= grain || inside_worker()) {
    fn(begin, end);
    return;
  }
  std::unique_lock<std::mutex> run(*g_run_mu, std::try_to_lock);
  if (!run.owns_lock()) {  // another thread is using the pool: do the work here rather than wait
    fn(begin, end);
    return;
  }
  Pool* pool = get_pool();
  const int64_t max_chunks = (n + grain - 1) / grain;
  // A few chunks per thread balance uneven work (RoIs of different sizes) without much overhead.
  const int nchunks = static_cast<int>(std::min<int64_t>(max_chunks, int64_t(pool->size()) * 4));
  if (nchunks <= 1 || pool->size() == 1) {
    fn(begin, end);
    return;
  }
  const int64_t step = (n + nchunks - 1) / nchunks;
  struct JobScope {
    JobScope() { t_in_job = true; }
    ~JobScope() { t_in_job = false; }
  } scope;
  pool->run(nchunks, [&](int c) {
    const int64_t b = begin + c * step;
    const int64_t e = std::min(end, b + step);
    if (b < e) fn(b, e);
  });
}

}  // namespace mrcnn
