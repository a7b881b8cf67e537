// Tests of the CPU kernels' worker pool (csrc/cpu/thread_pool.cpp) through parallel_rows, built and
// run by tests/test_thread_pool.py (also under ThreadSanitizer and AddressSanitizer). Prints one line
// per check and exits non-zero on the first failure; a hang is caught by alarm().
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common.h"

using hnsample::parallel_rows;

namespace {

int g_failures = 0;

#define EXPECT(cond)                                                        \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                         \
    }                                                                       \
  } while (0)

// Prints the check's outcome: ok when it added no failure.
void report(const char* name) {
  static int failures_before = 0;
  std::printf("%s: %s\n", name, g_failures == failures_before ? "ok" : "FAILED");
  std::fflush(stdout);
  failures_before = g_failures;
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// Sum of i over [0, n) computed chunk by chunk.
int64_t chunked_sum(int64_t n, int threads) {
  std::vector<int64_t> per_row(static_cast<size_t>(n), 0);
  parallel_rows(n, threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) per_row[static_cast<size_t>(i)] = i;
  });
  int64_t s = 0;
  for (int64_t v : per_row) s += v;
  return s;
}

// The chunks are exactly [t * chunk, min(n, (t + 1) * chunk)) with chunk = ceil(n / min(threads, n)),
// each run once, whatever thread runs it.
void test_chunk_boundaries() {
  for (int64_t n = 1; n <= 40; ++n) {
    for (int threads = 1; threads <= 9; ++threads) {
      std::mutex m;
      std::multiset<std::pair<int64_t, int64_t>> seen;
      parallel_rows(n, threads, [&](int64_t b, int64_t e) {
        std::lock_guard<std::mutex> lock(m);
        seen.insert({b, e});
      });
      const int64_t parts = std::min<int64_t>(threads, n);
      const int64_t chunk = (n + parts - 1) / parts;
      std::multiset<std::pair<int64_t, int64_t>> want;
      for (int64_t b = 0; b < n; b += chunk) want.insert({b, std::min(n, b + chunk)});
      EXPECT(seen == want);
    }
  }
  parallel_rows(0, 4, [&](int64_t, int64_t) { EXPECT(false); });
  report("chunk boundaries");
}

// The exception of the lowest failing chunk reaches the caller, after every chunk has finished; the
// pool keeps working afterwards.
void test_exceptions() {
  for (int round = 0; round < 20; ++round) {
    std::atomic<int> finished{0};
    std::string message;
    try {
      parallel_rows(8, 8, [&](int64_t b, int64_t) {
        if (b == 5) throw std::runtime_error("chunk 5");
        if (b == 2) throw std::runtime_error("chunk 2");
        std::this_thread::sleep_for(std::chrono::microseconds(200 * b));
        finished.fetch_add(1);
      });
    } catch (const std::runtime_error& e) {
      message = e.what();
    }
    EXPECT(message == "chunk 2");
    EXPECT(finished.load() == 6);
  }
  try {  // the caller's own chunk (chunk 0) throwing
    parallel_rows(4, 4, [&](int64_t b, int64_t) {
      if (b == 0) throw std::logic_error("first");
    });
    EXPECT(false);
  } catch (const std::logic_error& e) {
    EXPECT(std::string(e.what()) == "first");
  }
  EXPECT(chunked_sum(1000, 4) == 499500);
  report("exceptions");
}

// Many threads run jobs with different chunk counts at once (and grow the pool while others use it).
void test_concurrent_callers() {
  std::atomic<int> wrong{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 8; ++c) {
    callers.emplace_back([&, c] {
      for (int it = 0; it < 300; ++it) {
        const int64_t n = 1 + (it * 37 + c * 11) % 500;
        const int threads = 1 + (it + c) % 7;
        if (chunked_sum(n, threads) != n * (n - 1) / 2) wrong.fetch_add(1);
      }
    });
  }
  for (auto& t : callers) t.join();
  EXPECT(wrong.load() == 0);
  report("concurrent callers");
}

// A chunk may itself call parallel_rows (the inner call's caller helps with its own job).
void test_nested() {
  std::atomic<int64_t> total{0};
  parallel_rows(6, 3, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) total.fetch_add(chunked_sum(100, 3));
  });
  EXPECT(total.load() == 6 * 4950);
  report("nested calls");
}

// A child forked after the pool started (and while other threads keep it busy) gets a working pool.
void test_fork() {
#if defined(__SANITIZE_THREAD__)
  std::puts("fork: skipped under ThreadSanitizer (it does not support threads after a multi-threaded fork)");
  return;
#endif
  EXPECT(chunked_sum(2000, 4) == 1999000);  // the pool has workers now
  std::atomic<bool> stop{false};
  std::thread busy([&] {
    while (!stop.load()) chunked_sum(3000, 3);
  });
  for (int round = 0; round < 10; ++round) {
    const pid_t pid = fork();
    if (pid == 0) {
      alarm(30);  // a deadlocked child dies of SIGALRM
      const bool ok = chunked_sum(5000, 4) == 12497500 && chunked_sum(777, 7) == 301476;
      _exit(ok ? 0 : 3);
    }
    EXPECT(pid > 0);
    int status = 0;
    EXPECT(waitpid(pid, &status, 0) == pid);
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
      std::fprintf(stderr, "child status %d (signal %d)\n", status, WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    }
  }
  stop.store(true);
  busy.join();
  report("fork");
}

// When the system refuses a thread, the call throws hnsample::Error before running anything, keeps
// the workers it has, and the next call that fits works. (Not under a sanitizer: their runtimes need
// address space of their own.)
void test_thread_start_failure() {
  if (kSanitized) {
    std::puts("thread start failure: skipped under a sanitizer");
    return;
  }
  EXPECT(chunked_sum(100, 2) == 4950);
  long pages = 0;
  {
    std::ifstream statm("/proc/self/statm");
    statm >> pages;
  }
  rlimit saved{};
  getrlimit(RLIMIT_AS, &saved);
  rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(pages) * static_cast<rlim_t>(sysconf(_SC_PAGESIZE)) + (32u << 20);
  EXPECT(setrlimit(RLIMIT_AS, &tight) == 0);
  std::string message;
  bool ran = false;
  try {
    parallel_rows(100000, 5000, [&](int64_t, int64_t) { ran = true; });
  } catch (const hnsample::Error& e) {
    message = e.what();
  }
  EXPECT(setrlimit(RLIMIT_AS, &saved) == 0);
  EXPECT(!ran);
  EXPECT(message.find("could not start CPU worker thread") != std::string::npos);
  EXPECT(chunked_sum(100000, 3) == int64_t{100000} * 99999 / 2);
  report("thread start failure");
}

}  // namespace

int main() {
  alarm(300);
  test_chunk_boundaries();
  test_exceptions();
  test_concurrent_callers();
  test_nested();
  test_fork();
  test_thread_start_failure();
  if (g_failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::puts("all passed");
  return 0;
}
