// The worker pool behind parallel_rows (csrc/common.h). A call splits its rows into fixed chunks,
// queues them as one job and works on them itself; idle workers (blocked on a condition variable, so
// an idle pool costs no CPU) take the job's other chunks. Workers are started lazily, the first time a
// call needs that many, and then live as long as the process: every later call only pays a wake-up.
// Several threads may run jobs at once (their chunks interleave on the shared workers; a caller never
// waits for a chunk nobody has claimed, so there is no deadlock). A forked child starts a fresh pool.
// When the system refuses a worker, the call raises hnsample::Error (KernelError in Python) before
// running anything, instead of silently running on fewer threads: the cause (too many torch threads
// for the process's limits) stays visible and the fix, torch.set_num_threads, is the caller's. The
// workers already started are kept, so a later call that needs no more of them runs normally.
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "../common.h"

namespace hnsample {
namespace {

// Blocks the asynchronous signals in the calling thread for its lifetime; threads started meanwhile
// inherit the mask. Workers so leave signals to the threads that expect them (Python's main thread),
// while faults (SIGSEGV, SIGBUS, ...) in a worker still reach the handlers that report them.
class AsyncSignalsBlocked {
 public:
  AsyncSignalsBlocked() {
    sigset_t async;
    sigfillset(&async);
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT}) sigdelset(&async, sig);
    pthread_sigmask(SIG_BLOCK, &async, &saved_);
  }
  ~AsyncSignalsBlocked() { pthread_sigmask(SIG_SETMASK, &saved_, nullptr); }
  AsyncSignalsBlocked(const AsyncSignalsBlocked&) = delete;
  AsyncSignalsBlocked& operator=(const AsyncSignalsBlocked&) = delete;

 private:
  sigset_t saved_;
};

struct Job {
  detail::ChunkBody body;
  void* ctx;
  int64_t n, chunk;
  int chunks;
  // The fields below are guarded by the pool's mutex.
  int next = 0;        // lowest chunk nobody has claimed
  int unfinished = 0;  // chunks claimed or not that have not finished
  int error_chunk = INT_MAX;
  std::exception_ptr error;  // of the lowest failing chunk
  Job* queued_next = nullptr;  // the pool's queue of jobs with unclaimed chunks
  std::condition_variable finished;
};

class Pool {
 public:
  // Runs every chunk of `job`; rethrows the exception of its lowest failing chunk.
  void run(Job& job) {
    ensure_workers(job.chunks - 1);
    std::unique_lock<std::mutex> lock(mutex_);
    job.unfinished = job.chunks;
    enqueue(job);
    // One wake-up per chunk the caller does not start itself; idle workers beyond that sleep on.
    for (int i = 1; i < job.chunks; ++i) work_.notify_one();
    // The caller works on its own job until every chunk is claimed, then waits for the workers'.
    while (job.next < job.chunks) execute(lock, job, claim(job));
    job.finished.wait(lock, [&] { return job.unfinished == 0; });
    lock.unlock();
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  // Starts workers until there are at least `wanted`. Throws Error (and keeps the workers it did
  // start, each fully running) when the system refuses a thread.
  void ensure_workers(int wanted) {
    if (workers_.load(std::memory_order_acquire) >= wanted) return;
    std::lock_guard<std::mutex> grow(grow_mutex_);
    int have = workers_.load(std::memory_order_relaxed);
    if (have >= wanted) return;
    const AsyncSignalsBlocked inherited_by_workers;
    std::string failure;
    for (; have < wanted; ++have) {
      try {
        std::thread(&Pool::worker_loop, this).detach();
      } catch (const std::exception& e) {  // std::system_error (EAGAIN) or std::bad_alloc
        failure = e.what();
        if (failure.empty()) failure = "unknown error";
        break;
      }
      workers_.store(have + 1, std::memory_order_release);
    }
    if (!failure.empty()) {
      throw Error("hnsample: could not start CPU worker thread " + std::to_string(have + 1) + " of the " +
                  std::to_string(wanted) + " this call needs (" + failure +
                  "); the kernels use torch.get_num_threads() threads: lower it with torch.set_num_threads(), "
                  "or raise the process's thread, memory or address-space limits");
    }
  }

  void worker_loop() {
#if defined(__GLIBC__)
    pthread_setname_np(pthread_self(), "hnsample-cpu");
#endif
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_.wait(lock, [&] { return head_ != nullptr; });
      Job& job = *head_;
      execute(lock, job, claim(job));
    }
  }

  void enqueue(Job& job) {
    job.queued_next = nullptr;
    if (tail_ != nullptr) {
      tail_->queued_next = &job;
    } else {
      head_ = &job;
    }
    tail_ = &job;
  }

  // Claims the job's next chunk (lock held); a job leaves the queue with its last unclaimed chunk.
  int claim(Job& job) {
    const int c = job.next++;
    if (job.next == job.chunks) {
      Job* prev = nullptr;
      for (Job* j = head_; j != &job; j = j->queued_next) prev = j;
      (prev != nullptr ? prev->queued_next : head_) = job.queued_next;
      if (tail_ == &job) tail_ = prev;
    }
    return c;
  }

  // Runs chunk c of job without the lock, then records its outcome. The last chunk to finish wakes
  // the job's caller; after that nothing here touches the job (the caller owns it and may return).
  void execute(std::unique_lock<std::mutex>& lock, Job& job, int c) {
    lock.unlock();
    const int64_t begin = static_cast<int64_t>(c) * job.chunk;
    const int64_t end = std::min(job.n, begin + job.chunk);
    std::exception_ptr error;
    try {
      job.body(job.ctx, begin, end);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error && c < job.error_chunk) {
      job.error_chunk = c;
      job.error = std::move(error);
    }
    if (--job.unfinished == 0) job.finished.notify_one();
  }

  std::mutex mutex_;            // guards the queue and every queued job's claim/finish fields
  std::condition_variable work_;  // signalled when a job with unclaimed chunks is queued
  Job* head_ = nullptr;
  Job* tail_ = nullptr;
  std::mutex grow_mutex_;  // one thread starts workers at a time
  std::atomic<int> workers_{0};
};

// The process's pool. Never destroyed: its detached workers use it until the process exits (also while
// the interpreter shuts down with daemon threads still inside a kernel).
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  Pool* fresh = new Pool;
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread installed one first
  return *p;
}

// A forked child has only the forking thread: the parent's workers do not exist there, and the pool's
// mutexes may have been held by them. The child abandons that pool (its memory stays allocated, never
// touched again) and starts a fresh one on its first parallel call.
void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

const int g_atfork_registered = pthread_atfork(nullptr, nullptr, &forget_pool_in_child);

}  // namespace

namespace detail {

void run_chunks(int64_t n, int threads, ChunkBody body, void* ctx) {
  if (n <= 0) return;
  HN_CHECK(g_atfork_registered == 0, "pthread_atfork failed: the CPU worker pool would not be fork-safe");
  const int64_t parts = std::min<int64_t>(std::max(threads, 1), n);
  const int64_t chunk = (n + parts - 1) / parts;
  Job job;
  job.body = body;
  job.ctx = ctx;
  job.n = n;
  job.chunk = chunk;
  job.chunks = static_cast<int>((n + chunk - 1) / chunk);
  if (job.chunks == 1) return body(ctx, 0, n);
  pool().run(job);
}

}  // namespace detail
}  // namespace hnsample
