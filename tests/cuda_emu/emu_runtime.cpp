// The CUDA emulator's scheduler and PTX instructions (model in cuda_runtime.h). Fibers are ucontext
// contexts with their own mmap'd stacks (a guard page below each, so an overflow faults loudly).
#include "cuda_runtime.h"
#include "cuda.h"


#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cfenv>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <vector>

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

struct CopyOp {
  void* dst;
  const void* src;
  int cp_size, src_size;
};

struct Thread {
  ucontext_t ctx;
  ThreadCoords coords;
  int lane = 0, warp = 0;
  bool done = false, blocked = false;
  bool polling = false;  // yielded from a failed mbarrier poll: the warp-greedy orders pass it over
  uint64_t polls = 0;    // consecutive failed polls
  bool red_result = false;  // of the last named-barrier reduction it took part in
  std::vector<CopyOp> open_group;               // cp.async issued since the last commit
  std::vector<std::vector<CopyOp>> committed;   // oldest first
};

struct WarpState {
  const char* kind = nullptr;  // pending collective, or null
  unsigned mask = 0, arrived = 0;
  Combine combine = nullptr;
  Slot in[32], out[32];
};

struct Block {
  std::vector<Thread> threads;
  std::vector<WarpState> warps;
  int live = 0, at_barrier = 0;
  unsigned warp_exited[64] = {};  // bit l: lane l of the warp has exited
};

struct Fiber {
  void* stack = nullptr;
};

// Emulator state: one grid at a time (launches are serialized by a mutex).
std::mutex g_launch_mutex;
ucontext_t g_scheduler;
Block g_block;
std::vector<Fiber> g_stacks;
Thread* g_current = nullptr;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
std::string g_fault;
std::exception_ptr g_exception;
cudaError_t g_last_error = cudaSuccess;
Schedule g_schedule = Schedule::kRoundRobin;
// Shared-memory destinations of cp.async seen so far (address -> bytes): each block starts with them
// filled with 0xff bytes (NaN in every float format), since a block's shared memory starts undefined
// and statics would otherwise hand it the previous block's data.
std::map<uintptr_t, int> g_shared_seen;
bool g_cp_async_immediate = false;
bool g_mma_truncate = false;

// ---- the sm_90 state of the running block (see the "sm_90" section below) ----
// The shared window: shared address a is byte a of g_window. A kernel's dynamic shared memory starts
// 16 bytes past the first KiB (the reserved KiB of an sm_90 CTA, then an offset that makes a kernel's
// own round-up to 1024 bytes do something); only [kDynamicBase, kDynamicBase + g_dynamic_bytes) may
// be reached by the emulated instructions.
constexpr uint32_t kWindowBytes = 256 * 1024;
constexpr uint32_t kDynamicBase = 1024 + 16;
unsigned char* g_window = nullptr;
size_t g_dynamic_bytes = 0;
struct Mbar {
  int64_t pending = 0, expected = 0, tx = 0;  // arrivals left, arrivals per phase, transaction bytes
  uint32_t phase = 0;                         // parity of the current (incomplete) phase
  int init_thread = -1;                       // who initialized it (its fence makes it visible)
  bool fenced = false;                        // init visible to the async proxy
};
std::map<uint32_t, Mbar> g_mbars;
struct TensorMap {
  int dtype = 0, rank = 0, interleave = 0, swizzle = 0, oob = 0;
  uintptr_t address = 0;
  uint64_t dim[2] = {1, 1}, stride1 = 0;
  uint32_t box[2] = {1, 1}, elem_stride[2] = {1, 1};
};
struct BulkCopy {
  uint32_t dst, bar;
  int32_t c0, c1;
  TensorMap map;
  uint64_t ready_ns;  // the global timer from which it may land
};
std::vector<BulkCopy> g_bulk;  // issued, not landed (the deferred mode)
struct WgOp {
  bool bf16 = false, scale_d = true;
  int n = 0;
  uint64_t desc_a = 0, desc_b = 0;
  float* d[128] = {};
};
struct WgIn {
  bool bf16 = false, scale_d = true;
  int n = 0, pending = 0;
  float* d = nullptr;
  uint64_t desc_a = 0, desc_b = 0;
};
struct WarpGroup {
  const char* kind = nullptr;  // pending warpgroup collective, or null
  int arrived = 0;
  WgIn in[128];
  bool fenced = false;  // a wgmma.fence since the last wait_group
  std::vector<WgOp> open;
  std::deque<std::vector<WgOp>> committed;
};
std::vector<WarpGroup> g_groups;
// Named barriers 1-15 with a thread count (barrier.red): who waits, the count, the reduction so far.
struct NamedBarrier {
  uint32_t count = 0;
  bool all = true;
  std::vector<int> waiting;
};
std::map<uint32_t, NamedBarrier> g_named;
// Accumulators with wgmma in flight: their value as the finished operations leave it (the registers
// themselves hold a poison pattern until the last operation on them retires).
struct Shadow {
  std::vector<float> value;
  int pending = 0;
};
std::map<float*, Shadow> g_shadows;
uint64_t g_clock_ns = 0;                 // the global timer: advances while threads poll barriers
constexpr uint64_t kPollNs = 20000;      // per failed poll (try_wait's own suspend time hint)
constexpr uint64_t kPollFaultNs = 10000000000ull;  // a thread polling this long waits without a bound
int g_device = 0;
int g_sm90_sms = 2;
std::atomic<long long> g_property_queries{0};  // cudaGetDeviceProperties calls (property_queries())
// The instruction counters (reset_counters()): launches are serialized, and the host reads them between.
std::map<uintptr_t, long long> g_atomic_adds;  // atomicAdd calls per address
long long g_timer_reads[32] = {};              // %globaltimer reads per lane
bool g_lose_bulk = false;
uint64_t g_bulk_delay_ns = 0;
struct FuncAttrs {
  int max_dynamic = 48 * 1024;
  int carveout = -1;
};
std::map<std::pair<int, const void*>, FuncAttrs> g_func_attrs;

void end_block_checks();  // the sm_90 section: what a block may not leave behind

void* stack_for(size_t i) {
  while (g_stacks.size() <= i) {
    const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
    mprotect(p, kGuardBytes, PROT_NONE);
    g_stacks.push_back(Fiber{p});
  }
  return static_cast<char*>(g_stacks[i].stack) + kGuardBytes;
}

// Back to the scheduler; returns when this thread is resumed.
void yield() { swapcontext(&g_current->ctx, &g_scheduler); }

void perform(const std::vector<CopyOp>& ops) {
  for (const CopyOp& op : ops) {
    std::memcpy(op.dst, op.src, static_cast<size_t>(op.src_size));
    std::memset(static_cast<char*>(op.dst) + op.src_size, 0, static_cast<size_t>(op.cp_size - op.src_size));
  }
}

std::string where(const Thread& t) {
  const ThreadCoords& c = t.coords;
  return "block (" + std::to_string(c.block.x) + "," + std::to_string(c.block.y) + "," + std::to_string(c.block.z) +
         ") thread " + std::to_string(c.thread.x) + " (warp " + std::to_string(t.warp) + ", lane " +
         std::to_string(t.lane) + ")";
}

std::string hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", m);
  return buf;
}

// A thread leaves: its uncommitted and committed copies land (the GPU finishes them too), and no
// pending collective may count on it.
void thread_exit(Thread& t) {
  for (const auto& g : t.committed) perform(g);
  perform(t.open_group);
  t.committed.clear();
  t.open_group.clear();
  t.done = true;
  --g_block.live;
  g_block.warp_exited[t.warp] |= 1u << t.lane;
  const WarpState& w = g_block.warps[t.warp];
  if (w.kind != nullptr && (w.mask >> t.lane & 1u))
    fault(std::string("exited while its warp waits in ") + w.kind + " with mask " + hex(w.mask));
  if (static_cast<size_t>(t.warp / 4) < g_groups.size() && g_groups[t.warp / 4].kind != nullptr)
    fault(std::string("exited while its warpgroup waits in ") + g_groups[t.warp / 4].kind);
  if (g_block.at_barrier > 0 && g_block.at_barrier == g_block.live) {
    for (Thread& o : g_block.threads) o.blocked = false;
    g_block.at_barrier = 0;
  }
}

void fiber_main() {
  Thread& t = *g_current;
  try {
    g_body(g_ctx);
    thread_exit(t);
  } catch (const KernelFault& e) {
    if (g_fault.empty()) g_fault = e.what();
    t.done = true;
  } catch (...) {
    if (!g_exception) g_exception = std::current_exception();
    t.done = true;
  }
  swapcontext(&t.ctx, &g_scheduler);  // never resumed
}

std::string deadlock_report() {
  std::string msg = "deadlock: every live thread waits and no collective can complete;";
  for (size_t w = 0; w < g_block.warps.size(); ++w) {
    const WarpState& ws = g_block.warps[w];
    if (ws.kind != nullptr)
      msg += " warp " + std::to_string(w) + " in " + ws.kind + " mask " + hex(ws.mask) + " arrived " + hex(ws.arrived) +
             ";";
  }
  for (size_t g = 0; g < g_groups.size(); ++g)
    if (g_groups[g].kind != nullptr)
      msg += " warpgroup " + std::to_string(g) + " in " + g_groups[g].kind + " (" +
             std::to_string(g_groups[g].arrived) + " of 128 arrived);";
  for (const auto& [id, b] : g_named)
    if (!b.waiting.empty())
      msg += " " + std::to_string(b.waiting.size()) + " of " + std::to_string(b.count) + " threads at named barrier " +
             std::to_string(id) + ";";
  if (g_block.at_barrier > 0)
    msg += " " + std::to_string(g_block.at_barrier) + " of " + std::to_string(g_block.live) +
           " threads at __syncthreads;";
  return msg;
}

void run_block(dim3 grid, dim3 block, uint3 block_idx) {
  for (const auto& [addr, bytes] : g_shared_seen) std::memset(reinterpret_cast<void*>(addr), 0xff, bytes);
  const unsigned n = block.x * block.y * block.z;
  const unsigned nwarps = (n + 31) / 32;
  g_block.threads.assign(n, Thread{});
  g_block.warps.assign(nwarps, WarpState{});
  g_block.live = static_cast<int>(n);
  g_block.at_barrier = 0;
  // A block's shared memory starts undefined: 0xff bytes (NaN in every float format).
  if (g_dynamic_bytes > 0) std::memset(g_window + kDynamicBase, 0xff, g_dynamic_bytes);
  g_mbars.clear();
  g_bulk.clear();
  g_shadows.clear();
  g_groups.assign((nwarps + 3) / 4, WarpGroup{});
  g_named.clear();
  for (unsigned w = 0; w < nwarps; ++w) {
    // lanes past the block's size never run: they count as exited
    const unsigned have = n - 32 * w >= 32 ? 32 : n - 32 * w;
    g_block.warp_exited[w] = have == 32 ? 0u : ~((1u << have) - 1u);
  }
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = g_block.threads[i];
    t.coords.thread = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    t.coords.block = block_idx;
    t.coords.block_dim = block;
    t.coords.grid_dim = grid;
    t.lane = static_cast<int>(i % 32);
    t.warp = static_cast<int>(i / 32);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stack_for(i);
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_main, 0);
  }
  const int nw = static_cast<int>(nwarps);
  for (;;) {
    bool ran = false, alive = false;
    // Round robin: one turn for every runnable thread. Warp-greedy orders: only the first warp (in
    // that order) with a runnable thread gets turns, so it runs as far ahead of the others as the
    // block's barriers allow (what a missing __syncthreads needs to show).
    int only_warp = -1;
    if (g_schedule != Schedule::kRoundRobin) {
      for (int i = 0; i < nw && only_warp < 0; ++i) {
        const int w = g_schedule == Schedule::kWarpsAscending ? i : nw - 1 - i;
        for (int l = 0; l < 32 && 32 * w + l < static_cast<int>(n); ++l) {
          const Thread& t = g_block.threads[32 * w + l];
          if (!t.done && !t.blocked && !t.polling) {  // a poller waits for another warp
            only_warp = w;
            break;
          }
        }
      }
    }
    for (Thread& t : g_block.threads) {
      if (t.done) continue;
      alive = true;
      if (t.blocked || (only_warp >= 0 && t.warp != only_warp)) continue;
      g_current = &t;
      swapcontext(&g_scheduler, &t.ctx);
      g_current = nullptr;
      ran = true;
      if (!g_fault.empty() || g_exception) return;
    }
    if (!alive) return;
    if (!ran) {
      g_fault = deadlock_report();
      return;
    }
  }
}

}  // namespace

long long property_queries() { return g_property_queries.load(); }

void count_atomic_add(const void* address) { ++g_atomic_adds[reinterpret_cast<uintptr_t>(address)]; }

long long atomic_adds(const void* address) {
  const auto it = g_atomic_adds.find(reinterpret_cast<uintptr_t>(address));
  return it == g_atomic_adds.end() ? 0 : it->second;
}

long long timer_reads(int lane) { return lane >= 0 && lane < 32 ? g_timer_reads[lane] : 0; }

void reset_counters() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_atomic_adds.clear();
  std::fill(std::begin(g_timer_reads), std::end(g_timer_reads), 0);
}

void configure_sm90(bool sm90, int sms, bool lose_bulk_copies, uint64_t bulk_delay_ns) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_device = sm90 ? 1 : 0;
  g_sm90_sms = sms;
  g_lose_bulk = lose_bulk_copies;
  g_bulk_delay_ns = bulk_delay_ns;
}

void configure(Schedule schedule, bool cp_async_immediate, bool mma_truncate) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_schedule = schedule;
  g_cp_async_immediate = cp_async_immediate;
  g_mma_truncate = mma_truncate;
}

const ThreadCoords& coords() {
  if (g_current == nullptr) fault("a device builtin was used outside a kernel");
  return g_current->coords;
}

void fault(const std::string& what) {
  throw KernelFault(g_current != nullptr ? where(*g_current) + ": " + what : what);
}

void run_grid(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* ctx, const void* key) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  // Past 48 KiB of dynamic shared memory a kernel must have opted in (cudaFuncSetAttribute), up to
  // the device's limit.
  const auto attrs = g_func_attrs.find({g_device, key});
  const size_t allowed = attrs == g_func_attrs.end() ? 48 * 1024 : static_cast<size_t>(attrs->second.max_dynamic);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || shared_bytes > allowed || kDynamicBase + shared_bytes > kWindowBytes) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (g_window == nullptr) g_window = static_cast<unsigned char*>(std::aligned_alloc(4096, kWindowBytes));
  g_dynamic_bytes = shared_bytes;
  g_body = body;
  g_ctx = ctx;
  g_fault.clear();
  g_exception = nullptr;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        run_block(grid, block, uint3{x, y, z});
        if (g_exception) std::rethrow_exception(g_exception);
        if (g_fault.empty()) {
          try {
            end_block_checks();
          } catch (const KernelFault& e) {
            g_fault = "block (" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) +
                      ") at its end: " + e.what();
          }
        }
        if (!g_fault.empty()) throw KernelFault("cuda_emu kernel fault: " + g_fault);
      }
}

void collective(const char* kind, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                Combine combine) {
  Thread& t = *g_current;
  WarpState& w = g_block.warps[t.warp];
  if (!(mask >> t.lane & 1u)) fault(std::string(kind) + " with mask " + hex(mask) + " that omits the calling lane");
  if (mask & g_block.warp_exited[t.warp])
    fault(std::string(kind) + " with mask " + hex(mask) + " names exited lanes " +
          hex(mask & g_block.warp_exited[t.warp]));
  if (w.kind == nullptr) {
    w.kind = kind;
    w.mask = mask;
    w.arrived = 0;
    w.combine = combine;
  } else if (std::strcmp(w.kind, kind) != 0 || w.mask != mask) {
    fault(std::string(kind) + " (mask " + hex(mask) + ") while lanes " + hex(w.arrived) + " of the warp wait in " +
          w.kind + " (mask " + hex(w.mask) + ")");
  }
  if (in_bytes) std::memcpy(w.in[t.lane], in, in_bytes);
  w.arrived |= 1u << t.lane;
  if (w.arrived == mask) {
    if (combine) combine(w.in, w.out, mask);
    w.kind = nullptr;
    for (Thread& o : g_block.threads)
      if (o.warp == t.warp && (mask >> o.lane & 1u)) o.blocked = false;
  } else {
    t.blocked = true;
    yield();
  }
  if (out_bytes) std::memcpy(out, w.out[t.lane], out_bytes);
}

void sync_block() {
  Thread& t = *g_current;
  ++g_block.at_barrier;
  if (g_block.at_barrier == g_block.live) {
    for (Thread& o : g_block.threads) o.blocked = false;
    g_block.at_barrier = 0;
    return;
  }
  t.blocked = true;
  yield();
}

unsigned vote(const char* kind, unsigned mask, int pred) {
  const int in = pred != 0;
  unsigned out;
  collective(kind, mask, &in, sizeof(in), &out, sizeof(out), &vote_combine_ballot);
  return out;
}

void vote_combine_ballot(const Slot* ins, Slot* outs, unsigned mask) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    int pred;
    std::memcpy(&pred, ins[l], sizeof(pred));
    if (pred) ballot |= 1u << l;
  }
  for (int l = 0; l < 32; ++l) std::memcpy(outs[l], &ballot, sizeof(ballot));
}

// ---- PTX ---------------------------------------------------------------------------------------------

// cp.async.cg.shared.global [dst], [src], cp-size, src-size: copies src-size bytes and zero-fills the
// rest of cp-size; both addresses aligned to cp-size. The copy lands at the wait_group covering it
// (the latest a GPU may complete it), or at once in the immediate mode (the earliest).
void cp_async(void* smem, const void* gmem, int cp_size, int src_size) {
  if (reinterpret_cast<uintptr_t>(smem) % cp_size != 0 || reinterpret_cast<uintptr_t>(gmem) % cp_size != 0)
    fault("cp.async: addresses must be aligned to the copy size " + std::to_string(cp_size));
  if (src_size < 0 || src_size > cp_size) fault("cp.async: src-size out of range");
  const CopyOp op{smem, gmem, cp_size, src_size};
  g_shared_seen[reinterpret_cast<uintptr_t>(smem)] = cp_size;
  if (g_cp_async_immediate) {
    perform({op});
    return;
  }
  g_current->open_group.push_back(op);
}

void cp_async_commit() {
  Thread& t = *g_current;
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

// cp.async.wait_group N: every committed group but the N most recent is complete.
void cp_async_wait(int pending) {
  Thread& t = *g_current;
  while (static_cast<int>(t.committed.size()) > pending) {
    perform(t.committed.front());
    t.committed.erase(t.committed.begin());
  }
}

namespace {

struct LdmIn {
  const void* row;
};

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8 j + r gives the address of row r of matrix j (16
// bytes, 16-byte aligned); register j of lane l receives row l / 4, columns 2 (l % 4), 2 (l % 4) + 1 of
// matrix j, the lower column in the lower half.
void ldmatrix_combine(const Slot* ins, Slot* outs, unsigned) {
  uint16_t rows[4][8][8];
  for (int j = 0; j < 4; ++j)
    for (int r = 0; r < 8; ++r) {
      LdmIn in;
      std::memcpy(&in, ins[8 * j + r], sizeof(in));
      if (reinterpret_cast<uintptr_t>(in.row) % 16 != 0) fault("ldmatrix: row address not 16-byte aligned");
      std::memcpy(rows[j][r], in.row, 16);
    }
  for (int l = 0; l < 32; ++l) {
    uint32_t reg[4];
    for (int j = 0; j < 4; ++j) {
      const uint16_t lo = rows[j][l / 4][2 * (l % 4)], hi = rows[j][l / 4][2 * (l % 4) + 1];
      reg[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    std::memcpy(outs[l], reg, sizeof(reg));
  }
}

float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// acc + p rounded to float toward zero (the double sum of a float and a product of two values with
// 11-bit significands is exact unless their magnitudes are ~2^30 apart, far below float resolution).
float add_toward_zero(float acc, double p) {
  const double exact = static_cast<double>(acc) + p;
  float f = static_cast<float>(exact);
  if (std::fabs(static_cast<double>(f)) > std::fabs(exact)) f = std::nextafter(f, 0.0f);
  return f;
}

struct MmaIn {
  int kind;
  uint32_t a[4], b[2];
  float c[4];
};

template <MmaKind kKind>
float element(uint32_t reg, int half) {
  if constexpr (kKind == MmaKind::kTf32) {
    // The tensor core reads the 19 high bits (sign, exponent, 10 mantissa bits) and ignores the rest.
    return bits_float(reg & 0xffffe000u);
  } else {
    const uint16_t h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    return kKind == MmaKind::kBf16 ? bf16_to_float(h) : half_bits_to_float(h);
  }
}

// D = A B + C, fragments per the PTX ISA (g = lane / 4, t = lane % 4):
//   m16n8k16 f16/bf16: A (16 x 16) a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..),
//     a3 = (g + 8, 2t + 8..); B (16 x 8) b0 = (k 2t..2t+1, n g), b1 = (k 2t + 8.., n g).
//   m16n8k8 tf32: A (16 x 8) a0 = (g, t), a1 = (g + 8, t), a2 = (g, t + 4), a3 = (g + 8, t + 4);
//     B (8 x 8) b0 = (k t, n g), b1 = (k t + 4, n g).
//   C/D (16 x 8 f32): c0 = (g, 2t), c1 = (g, 2t + 1), c2 = (g + 8, 2t), c3 = (g + 8, 2t + 1).
// The products are exact in double. Each output is the double sum over k plus c, rounded once to
// float; or, in the truncating mode, c plus the products one at a time in float, every addition
// rounded toward zero: the worst adder tf32_dot_error_factor allows for.
template <MmaKind kKind>
void mma_combine(const Slot* ins, Slot* outs, unsigned) {
  constexpr int K = kKind == MmaKind::kTf32 ? 8 : 16;
  float A[16][K], B[K][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    MmaIn in;
    std::memcpy(&in, ins[l], sizeof(in));
    if (in.kind != static_cast<int>(kKind)) fault("mma.sync: lanes disagree on the instruction");
    const int g = l / 4, t = l % 4;
    if constexpr (kKind == MmaKind::kTf32) {
      A[g][t] = element<kKind>(in.a[0], 0);
      A[g + 8][t] = element<kKind>(in.a[1], 0);
      A[g][t + 4] = element<kKind>(in.a[2], 0);
      A[g + 8][t + 4] = element<kKind>(in.a[3], 0);
      B[t][g] = element<kKind>(in.b[0], 0);
      B[t + 4][g] = element<kKind>(in.b[1], 0);
    } else {
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = element<kKind>(in.a[0], h);
        A[g + 8][2 * t + h] = element<kKind>(in.a[1], h);
        A[g][2 * t + 8 + h] = element<kKind>(in.a[2], h);
        A[g + 8][2 * t + 8 + h] = element<kKind>(in.a[3], h);
        B[2 * t + h][g] = element<kKind>(in.b[0], h);
        B[2 * t + 8 + h][g] = element<kKind>(in.b[1], h);
      }
    }
    C[g][2 * t] = in.c[0];
    C[g][2 * t + 1] = in.c[1];
    C[g + 8][2 * t] = in.c[2];
    C[g + 8][2 * t + 1] = in.c[3];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float d[4];
    for (int e = 0; e < 4; ++e) {
      const int m = g + 8 * (e / 2), n = 2 * t + e % 2;
      if (g_mma_truncate) {
        float acc = C[m][n];
        for (int k = 0; k < K; ++k)
          acc = add_toward_zero(acc, static_cast<double>(A[m][k]) * static_cast<double>(B[k][n]));
        d[e] = acc;
      } else {
        double acc = C[m][n];
        for (int k = 0; k < K; ++k) acc += static_cast<double>(A[m][k]) * static_cast<double>(B[k][n]);
        d[e] = static_cast<float>(acc);
      }
    }
    std::memcpy(outs[l], d, sizeof(d));
  }
}

}  // namespace

void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const LdmIn in{smem};
  collective("ldmatrix.x4", 0xffffffffu, &in, sizeof(in), r, sizeof(r), &ldmatrix_combine);
}

void mma_sync(MmaKind kind, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaIn in;
  in.kind = static_cast<int>(kind);
  std::memcpy(in.a, a, sizeof(in.a));
  in.b[0] = b0;
  in.b[1] = b1;
  std::memcpy(in.c, c, sizeof(in.c));
  static_assert(sizeof(MmaIn) <= kSlotBytes, "mma fragments fit a slot");
  Combine fn = kind == MmaKind::kTf32   ? &mma_combine<MmaKind::kTf32>
               : kind == MmaKind::kBf16 ? &mma_combine<MmaKind::kBf16>
                                        : &mma_combine<MmaKind::kFp16>;
  collective("mma.sync", 0xffffffffu, &in, sizeof(in), c, sizeof(c), fn);
}

// cvt.rna.tf32.f32: nearest value with 10 mantissa bits, ties away from zero (adding half an ulp of
// the tf32 grid to the magnitude bits carries into the exponent exactly when rounding up should);
// NaN stays NaN.
uint32_t cvt_rna_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if (std::isnan(x)) return 0x7fffffffu;
  return (u + 0x1000u) & 0xffffe000u;
}

// Conversion under the hardware rounding mode (cvtsd2ss honours MXCSR); volatile keeps the compiler
// from folding it under the default mode.
float double_to_float_rounded(double v, int direction) {
  const int old = std::fegetround();
  std::fesetround(direction > 0 ? FE_UPWARD : FE_DOWNWARD);
  volatile double in = v;
  volatile float out = static_cast<float>(in);
  std::fesetround(old);
  return out;
}

float half_bits_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, sizeof(x));
  return static_cast<float>(x);
}

// ---- sm_90 ------------------------------------------------------------------------------------------
// Written from the PTX ISA (mbarrier, cp.async.bulk.tensor, wgmma) and the driver's description of
// cuTensorMapEncodeTiled, independently of the kernel and of csrc/topk_fused_sm90.h.

namespace {

Thread& current() {
  if (g_current == nullptr) fault("a device instruction was used outside a kernel");
  return *g_current;
}

int thread_index(const Thread& t) { return 32 * t.warp + t.lane; }

// Host bytes of [addr, addr + bytes) of the shared window; the range must lie in the launch's dynamic
// shared memory.
unsigned char* shared_bytes(uint32_t addr, size_t bytes, const char* what) {
  if (addr < kDynamicBase || addr + bytes > kDynamicBase + g_dynamic_bytes)
    fault(std::string(what) + ": shared address " + std::to_string(addr) + " (+" + std::to_string(bytes) +
          " bytes) outside the block's dynamic shared memory [" + std::to_string(kDynamicBase) + ", " +
          std::to_string(kDynamicBase + g_dynamic_bytes) + ")");
  return g_window + addr;
}

// An mbarrier object: 8 bytes, 8-byte aligned, in shared memory. The emulator keeps its state aside
// and a tag in its 8 bytes, so a store over an initialized barrier is caught at its next use.
uint64_t mbar_tag(uint32_t addr) { return 0x6d62617272696572ull ^ (static_cast<uint64_t>(addr) * 0x9e3779b97f4a7c15ull); }

Mbar& mbar_at(uint32_t addr, const char* what) {
  if (addr % 8 != 0) fault(std::string(what) + ": mbarrier address " + std::to_string(addr) + " not 8-byte aligned");
  const unsigned char* p = shared_bytes(addr, 8, what);
  const auto it = g_mbars.find(addr);
  uint64_t tag;
  std::memcpy(&tag, p, 8);
  if (it == g_mbars.end()) fault(std::string(what) + ": mbarrier at " + std::to_string(addr) + " was never initialized");
  if (tag != mbar_tag(addr))
    fault(std::string(what) + ": the mbarrier at " + std::to_string(addr) + " was overwritten after its init");
  return it->second;
}

// A phase completes when its pending arrivals and its transaction count both reach zero; then the
// next phase starts with the expected arrivals again.
void mbar_progress(Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    m.phase ^= 1u;
    m.pending = m.expected;
  }
}

void mbar_complete_tx(uint32_t bar, uint32_t bytes) {
  Mbar& m = mbar_at(bar, "complete_tx");
  if (!m.fenced)
    fault("a bulk copy completes on the mbarrier at " + std::to_string(bar) +
          " whose initialization was never made visible to the async proxy (fence.mbarrier_init)");
  m.tx -= bytes;
  mbar_progress(m);
}

size_t element_bytes(int dtype) {
  switch (dtype) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16: case CU_TENSOR_MAP_DATA_TYPE_FLOAT16: case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16:
      return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64: case CU_TENSOR_MAP_DATA_TYPE_INT64: case CU_TENSOR_MAP_DATA_TYPE_FLOAT64:
      return 8;
    default: return 4;
  }
}

uint32_t swizzle_span(int mode) { return mode == 0 ? 0 : 16u << mode; }  // 32, 64, 128 bytes

// The swizzled layouts XOR the 16-byte chunk index within a span (address bits 4 and up) with the
// index of the span-wide row within the pattern's 8 rows (address bits 7 and up), as many bits of each
// as the span has chunks; on absolute shared addresses, so a pattern repeats every 8 spans... of 128
// bytes (1024 bytes for the 128-byte swizzle).
uint32_t swizzled(uint32_t addr, uint32_t span) {
  if (span == 0) return addr;
  const uint32_t mask = span / 16 - 1;
  return addr ^ (((addr >> 7) & mask) << 4);
}

constexpr uint64_t kMapMagic = 0x746d6170656d7531ull;

TensorMap decode_map(const CUtensorMap* map) {
  if (map == nullptr || map->opaque[0] != kMapMagic) fault("cp.async.bulk.tensor: not a tensor map from the encoder");
  TensorMap m;
  const uint64_t f = map->opaque[1];
  m.dtype = static_cast<int>(f & 0xff);
  m.rank = static_cast<int>(f >> 8 & 0xff);
  m.interleave = static_cast<int>(f >> 16 & 0xff);
  m.swizzle = static_cast<int>(f >> 24 & 0xff);
  m.oob = static_cast<int>(f >> 40 & 0xff);
  m.address = static_cast<uintptr_t>(map->opaque[2]);
  m.dim[0] = map->opaque[3];
  m.dim[1] = map->opaque[4];
  m.stride1 = map->opaque[5];
  m.box[0] = static_cast<uint32_t>(map->opaque[6]);
  m.box[1] = static_cast<uint32_t>(map->opaque[6] >> 32);
  m.elem_stride[0] = static_cast<uint32_t>(map->opaque[7]);
  m.elem_stride[1] = static_cast<uint32_t>(map->opaque[7] >> 32);
  return m;
}

uint32_t box_bytes(const TensorMap& m) {
  return static_cast<uint32_t>(m.box[0] * m.box[1] * element_bytes(m.dtype));
}

// The copy itself: box element (i, j) is tensor element (c0 + i, c1 + j), or the fill value outside
// the tensor; box row j starts j * (box0 * element bytes) bytes past dst, then the swizzle.
void land(const BulkCopy& c) {
  const TensorMap& m = c.map;
  const size_t e = element_bytes(m.dtype);
  const uint32_t row_bytes = static_cast<uint32_t>(m.box[0] * e), span = swizzle_span(m.swizzle);
  const uint32_t total = box_bytes(m);
  unsigned char* base = shared_bytes(c.dst, total, "cp.async.bulk.tensor");
  (void)base;
  for (const auto& [addr, mb] : g_mbars)
    if (addr + 8 > c.dst && addr < c.dst + total)
      fault("cp.async.bulk.tensor: the box at " + std::to_string(c.dst) + " (+" + std::to_string(total) +
            " bytes) overwrites the mbarrier at " + std::to_string(addr));
  for (uint32_t j = 0; j < m.box[1]; ++j)
    for (uint32_t i = 0; i < m.box[0]; ++i) {
      const int64_t x = static_cast<int64_t>(c.c0) + i, y = static_cast<int64_t>(c.c1) + j;
      unsigned char* dst = g_window + swizzled(c.dst + j * row_bytes + static_cast<uint32_t>(i * e), span);
      const bool inside = x >= 0 && y >= 0 && static_cast<uint64_t>(x) < m.dim[0] && static_cast<uint64_t>(y) < m.dim[1];
      if (inside) {
        std::memcpy(dst, reinterpret_cast<const unsigned char*>(m.address) + y * m.stride1 + x * e, e);
      } else {
        std::memset(dst, m.oob == CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE ? 0 : 0xff, e);
      }
    }
  mbar_complete_tx(c.bar, total);
}

// Lands the deferred copies that complete on `bar` and are due (in issue order).
void land_for(uint32_t bar) {
  std::vector<BulkCopy> keep;
  std::vector<BulkCopy> now;
  for (const BulkCopy& c : g_bulk) (c.bar == bar && c.ready_ns <= g_clock_ns ? now : keep).push_back(c);
  g_bulk.swap(keep);
  for (const BulkCopy& c : now) land(c);
}

// A warpgroup collective: all 128 threads of the calling thread's warpgroup (warps 4 g .. 4 g + 3) must
// arrive at the same kind; the last one runs `combine`. A missing, exited or diverging thread faults.
void group_collective(const char* kind, const WgIn& in, void (*combine)(WarpGroup&, int)) {
  Thread& t = current();
  const int g = t.warp / 4;
  for (int i = 0; i < 128; ++i) {
    const size_t idx = 128 * static_cast<size_t>(g) + i;
    if (idx >= g_block.threads.size() || g_block.threads[idx].done)
      fault(std::string(kind) + " is warpgroup-collective, but thread " + std::to_string(idx) + " of warpgroup " +
            std::to_string(g) + (idx >= g_block.threads.size() ? " does not exist" : " has exited"));
  }
  WarpGroup& w = g_groups[g];
  if (w.kind == nullptr) {
    w.kind = kind;
    w.arrived = 0;
  } else if (std::strcmp(w.kind, kind) != 0) {
    fault(std::string(kind) + " while " + std::to_string(w.arrived) + " threads of the warpgroup wait in " + w.kind);
  }
  w.in[thread_index(t) % 128] = in;
  if (++w.arrived == 128) {
    combine(w, g);
    w.kind = nullptr;
    for (int i = 0; i < 128; ++i) g_block.threads[128 * static_cast<size_t>(g) + i].blocked = false;
  } else {
    t.blocked = true;
    yield();
  }
}

constexpr uint32_t kPoisonBits = 0x7fdead00u;  // a quiet NaN: accumulators while their wgmma is in flight

float poison() {
  float f;
  std::memcpy(&f, &kPoisonBits, 4);
  return f;
}

// One operand of wgmma from its shared-memory matrix descriptor (start address >> 4 in bits 0-13,
// leading byte offset >> 4 in 16-29, stride byte offset >> 4 in 32-45, base offset in 49-51, swizzle
// in 62-63: 1 = 128-byte, 2 = 64-byte, 3 = 32-byte). K-major with a swizzle of span W: row r of the
// operand at (r / 8) * stride + (r % 8) * W bytes past the start, its 16 K elements of 2 bytes
// contiguous in there; then the swizzle on the absolute address. The leading byte offset does not
// enter (the 32 bytes of K lie within one span row).
void read_operand(uint64_t desc, int rows, bool bf16, std::vector<float>& out) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t stride = static_cast<uint32_t>(desc >> 32 & 0x3fff) << 4;
  const int base_offset = static_cast<int>(desc >> 49 & 7), mode = static_cast<int>(desc >> 62 & 3);
  if (mode == 0) fault("wgmma: the unswizzled (interleaved core matrix) layout is not emulated");
  if (base_offset != 0) fault("wgmma: a nonzero matrix base offset is not emulated");
  const uint32_t span = 16u << (4 - mode);  // 1 -> 128, 2 -> 64, 3 -> 32
  if (start % span + 32 > span)
    fault("wgmma: the descriptor's start address " + std::to_string(start) + " leaves less than 32 bytes of K in its " +
          std::to_string(span) + "-byte swizzle row");
  out.assign(static_cast<size_t>(rows) * 16, 0.f);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) {
      const uint32_t addr = swizzled(start + static_cast<uint32_t>(r / 8) * stride + static_cast<uint32_t>(r % 8) * span +
                                         static_cast<uint32_t>(2 * k),
                                     span);
      uint16_t h;
      std::memcpy(&h, shared_bytes(addr, 2, "wgmma operand"), 2);
      out[static_cast<size_t>(r) * 16 + k] = bf16 ? bf16_to_float(h) : half_bits_to_float(h);
    }
}

// D (64 x N, fp32) = A (64 x 16) B (16 x N) + (scale_d ? D : 0). Thread i of the warpgroup (warp
// w = i / 32, lane l) holds N / 2 values: value v is row 16 w + l / 4 + 8 ((v / 2) % 2), column
// 8 (v / 4) + 2 (l % 4) + v % 2. Products exact in double, each output rounded once.
void retire(const WgOp& op) {
  std::vector<float> a, b;
  read_operand(op.desc_a, 64, op.bf16, a);
  read_operand(op.desc_b, op.n, op.bf16, b);
  for (int i = 0; i < 128; ++i) {
    Shadow& sh = g_shadows.at(op.d[i]);
    const int w = i / 32, l = i % 32;
    for (int v = 0; v < op.n / 2; ++v) {
      const int row = 16 * w + l / 4 + 8 * ((v / 2) % 2), col = 8 * (v / 4) + 2 * (l % 4) + v % 2;
      double acc = op.scale_d ? static_cast<double>(sh.value[v]) : 0.0;
      for (int k = 0; k < 16; ++k)
        acc += static_cast<double>(a[static_cast<size_t>(row) * 16 + k]) * static_cast<double>(b[static_cast<size_t>(col) * 16 + k]);
      sh.value[v] = static_cast<float>(acc);
    }
    if (--sh.pending == 0) {
      for (int v = 0; v < op.n / 2; ++v) {
        uint32_t bits;
        std::memcpy(&bits, &op.d[i][v], 4);
        if (bits != kPoisonBits)
          fault("wgmma: accumulator " + std::to_string(v) + " of warpgroup thread " + std::to_string(i) +
                " was written while a wgmma.mma_async on it was in flight");
      }
      std::memcpy(op.d[i], sh.value.data(), sizeof(float) * static_cast<size_t>(op.n / 2));
      g_shadows.erase(op.d[i]);
    }
  }
}

void combine_fence(WarpGroup& w, int) { w.fenced = true; }

void combine_commit(WarpGroup& w, int) {
  w.committed.push_back(std::move(w.open));
  w.open.clear();
}

void combine_wait(WarpGroup& w, int) {
  const int pending = w.in[0].pending;
  for (int i = 1; i < 128; ++i)
    if (w.in[i].pending != pending) fault("wgmma.wait_group: the warpgroup's threads disagree on N");
  while (static_cast<int>(w.committed.size()) > pending) {
    for (const WgOp& op : w.committed.front()) retire(op);
    w.committed.pop_front();
  }
  // The accumulators are registers again: another wgmma on them needs a fence first.
  w.fenced = false;
}

void combine_mma(WarpGroup& w, int) {
  const WgIn& first = w.in[0];
  if (!w.fenced)
    fault("wgmma.mma_async without a wgmma.fence since the warpgroup's last wait_group (or its start)");
  WgOp op;
  op.bf16 = first.bf16;
  op.n = first.n;
  op.scale_d = first.scale_d;
  op.desc_a = first.desc_a;
  op.desc_b = first.desc_b;
  for (int i = 0; i < 128; ++i) {
    const WgIn& in = w.in[i];
    if (in.bf16 != op.bf16 || in.n != op.n || in.scale_d != op.scale_d || in.desc_a != op.desc_a ||
        in.desc_b != op.desc_b)
      fault("wgmma.mma_async: the warpgroup's threads disagree on the shape, type or descriptors");
    op.d[i] = in.d;
    auto [it, fresh] = g_shadows.try_emplace(in.d);
    if (fresh) {  // the registers' value now; then poison, so a read before the wait shows
      it->second.value.assign(in.d, in.d + op.n / 2);
      for (int v = 0; v < op.n / 2; ++v) in.d[v] = poison();
    } else if (static_cast<int>(it->second.value.size()) != op.n / 2) {
      fault("wgmma.mma_async: accumulators reused with another shape while in flight");
    }
    ++it->second.pending;
  }
  w.open.push_back(op);
}

void end_block_checks() {
  for (size_t g = 0; g < g_groups.size(); ++g)
    if (!g_groups[g].open.empty() || !g_groups[g].committed.empty())
      fault("warpgroup " + std::to_string(g) + " ended with wgmma.mma_async in flight (no wait_group 0)");
  // A copy still in flight would write into the shared memory of an exited CTA (whatever the SM runs
  // next); lost copies (lose_bulk_copies) never write.
  if (!g_bulk.empty())
    fault("the block ended with " + std::to_string(g_bulk.size()) +
          " bulk tensor copies in flight into its shared memory (the first onto the mbarrier at " +
          std::to_string(g_bulk.front().bar) + ")");
}

}  // namespace

void* dynamic_shared() { return g_window + kDynamicBase; }

uint32_t cvta_generic_to_shared(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p), w = reinterpret_cast<uintptr_t>(g_window);
  if (g_window == nullptr || a < w || a >= w + kWindowBytes)
    fault("__cvta_generic_to_shared of a pointer outside the shared window");
  return static_cast<uint32_t>(a - w);
}

// Each read also lets 1 ns pass, so threads running between two polls see time move.
uint64_t globaltimer() {
  ++g_timer_reads[current().lane];
  return ++g_clock_ns;
}

void mbar_init(uint32_t bar, uint32_t count) {
  if (count < 1 || count > (1u << 20) - 1) fault("mbarrier.init: count must be in [1, 2^20 - 1]");
  if (bar % 8 != 0) fault("mbarrier.init: address not 8-byte aligned");
  const uint64_t tag = mbar_tag(bar);
  std::memcpy(shared_bytes(bar, 8, "mbarrier.init"), &tag, 8);
  Mbar m;
  m.pending = m.expected = count;
  m.init_thread = thread_index(current());
  g_mbars[bar] = m;
}

// fence.mbarrier_init.release.cluster: the calling thread's earlier inits become visible to the async
// proxy (the copy engine).
void fence_mbarrier_init() {
  const int me = thread_index(current());
  for (auto& [addr, m] : g_mbars)
    if (m.init_thread == me) m.fenced = true;
}

// mbarrier.arrive{.expect_tx}: the expect-tx part (transaction count += bytes), then one arrival.
void mbar_arrive(uint32_t bar, uint32_t tx_bytes) {
  Mbar& m = mbar_at(bar, tx_bytes ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive");
  m.tx += tx_bytes;
  if (m.pending == 0)
    fault("mbarrier.arrive at " + std::to_string(bar) + ": more arrivals than its count in one phase");
  --m.pending;
  mbar_progress(m);
}

// mbarrier.try_wait.parity: true when the phase of that parity has completed, i.e. the current phase's
// parity differs. Deferred copies onto this barrier that are due land first. A failed poll is a
// scheduling point: the global timer advances by kPollNs, other threads get turns, then due copies
// land and the barrier is tested again.
bool mbar_try_wait_parity(uint32_t bar, uint32_t parity) {
  Thread& t = current();
  if (parity > 1) fault("mbarrier.try_wait.parity: parity must be 0 or 1");
  if (mbar_at(bar, "mbarrier.try_wait").phase != parity) {
    t.polls = 0;
    return true;
  }
  land_for(bar);
  if (mbar_at(bar, "mbarrier.try_wait").phase != parity) {
    t.polls = 0;
    return true;
  }
  g_clock_ns += kPollNs;
  if (++t.polls * kPollNs > kPollFaultNs)
    fault("polled the mbarrier at " + std::to_string(bar) + " for 10 s of emulated time: a wait without a bound");
  t.polling = true;
  yield();
  t.polling = false;
  land_for(bar);  // what became due while this thread was suspended
  const bool done = mbar_at(bar, "mbarrier.try_wait").phase != parity;
  if (done) t.polls = 0;
  return done;
}

// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes: lands when issued
// (cp_async_immediate) or at the first failed poll of its barrier (the latest point a waiter could
// tell); its destination is poisoned at issue, so a read before the barrier completes shows.
void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1, uint32_t bar) {
  current();
  const TensorMap m = decode_map(map);
  if (m.rank != 2) fault("cp.async.bulk.tensor.2d with a tensor map of rank " + std::to_string(m.rank));
  if (m.elem_stride[0] != 1 || m.elem_stride[1] != 1) fault("cp.async.bulk.tensor: element strides are not emulated");
  if (dst % 128 != 0) fault("cp.async.bulk.tensor: shared destination " + std::to_string(dst) + " not 128-byte aligned");
  const uint32_t span = swizzle_span(m.swizzle);
  if (span != 0 && m.box[0] * element_bytes(m.dtype) != span)
    fault("cp.async.bulk.tensor: a swizzled box narrower than the swizzle span is not emulated");
  Mbar& mb = mbar_at(bar, "cp.async.bulk.tensor");
  (void)mb;
  std::memset(shared_bytes(dst, box_bytes(m), "cp.async.bulk.tensor"), 0xff, box_bytes(m));
  const BulkCopy c{dst, bar, c0, c1, m, g_clock_ns + g_bulk_delay_ns};
  if (g_lose_bulk) return;
  if (g_cp_async_immediate && g_bulk_delay_ns == 0) {
    land(c);
  } else {
    g_bulk.push_back(c);
  }
}

// barrier.red.and.pred p, id, threads, pred: waits until `threads` threads (a multiple of the warp size)
// have arrived at named barrier `id` (1-15; 0 is __syncthreads'), then every one of them gets the AND
// of their predicates.
bool barrier_red_and(uint32_t id, uint32_t threads, bool pred) {
  Thread& t = current();
  if (id == 0 || id > 15) fault("barrier.red: named barrier id must be in [1, 15], got " + std::to_string(id));
  if (threads == 0 || threads % 32 != 0 || threads > g_block.threads.size())
    fault("barrier.red: thread count " + std::to_string(threads) + " is no multiple of 32 within the block");
  NamedBarrier& b = g_named[id];
  if (b.waiting.empty()) {
    b.count = threads;
    b.all = true;
  } else if (b.count != threads) {
    fault("barrier.red: threads at named barrier " + std::to_string(id) + " disagree on its count");
  }
  b.all = b.all && pred;
  b.waiting.push_back(thread_index(t));
  if (b.waiting.size() == b.count) {
    for (int i : b.waiting) {
      g_block.threads[static_cast<size_t>(i)].red_result = b.all;
      g_block.threads[static_cast<size_t>(i)].blocked = false;
    }
    b.waiting.clear();
  } else {
    t.blocked = true;
    yield();
  }
  return t.red_result;
}

void wgmma_fence() { group_collective("wgmma.fence", WgIn{}, &combine_fence); }
void wgmma_commit_group() { group_collective("wgmma.commit_group", WgIn{}, &combine_commit); }
void wgmma_wait_group(int pending) {
  WgIn in;
  in.pending = pending;
  group_collective("wgmma.wait_group", in, &combine_wait);
}
void wgmma_mma_async(bool bf16, int n, float* d, uint64_t desc_a, uint64_t desc_b, bool scale_d) {
  if (n % 8 != 0 || n < 8 || n > 256) fault("wgmma.mma_async: N must be a multiple of 8 in [8, 256]");
  WgIn in;
  in.bf16 = bf16;
  in.n = n;
  in.d = d;
  in.desc_a = desc_a;
  in.desc_b = desc_b;
  in.scale_d = scale_d;
  group_collective("wgmma.mma_async", in, &combine_mma);
}

// ---- devices, kernel attributes, occupancy --------------------------------------------------------

namespace {

struct DeviceModel {
  int major, minor, sms;
  size_t optin, per_sm;  // shared memory: per block after opting in, per SM
};

DeviceModel device_model(int device) {
  if (device == 1) return {9, 0, g_sm90_sms, 227 * 1024, 228 * 1024};
  return {8, 0, 4, 163 * 1024, 164 * 1024};
}

// The tensor-map encoder: validates as the driver documents (rank 1 or 2 emulated) and stores the
// arguments in the map's 128 opaque bytes.
CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* address,
                      const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                      const cuuint32_t* element_strides, CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                      CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob) {
  if (map == nullptr || rank < 1 || rank > 2 || dtype < CU_TENSOR_MAP_DATA_TYPE_UINT8 ||
      dtype > CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ)
    return CUDA_ERROR_INVALID_VALUE;
  const size_t e = element_bytes(dtype);
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (1ull << 32)) return CUDA_ERROR_INVALID_VALUE;
    if (box[i] == 0 || box[i] > 256) return CUDA_ERROR_INVALID_VALUE;
    if (element_strides[i] == 0 || element_strides[i] > 8) return CUDA_ERROR_INVALID_VALUE;
  }
  if (rank == 2 && (strides[0] % 16 != 0 || strides[0] >= (1ull << 40) || strides[0] < dims[0] * e))
    return CUDA_ERROR_INVALID_VALUE;
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return CUDA_ERROR_INVALID_VALUE;  // not emulated
  if (box[0] * e % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  const uint32_t span = swizzle_span(swizzle);
  if (span != 0 && box[0] * e > span) return CUDA_ERROR_INVALID_VALUE;
  if (oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE &&
      (dtype != CU_TENSOR_MAP_DATA_TYPE_FLOAT16 && dtype != CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 &&
       dtype != CU_TENSOR_MAP_DATA_TYPE_FLOAT32 && dtype != CU_TENSOR_MAP_DATA_TYPE_FLOAT64))
    return CUDA_ERROR_INVALID_VALUE;
  *map = CUtensorMap{};
  map->opaque[0] = kMapMagic;
  map->opaque[1] = static_cast<uint64_t>(dtype) | static_cast<uint64_t>(rank) << 8 |
                   static_cast<uint64_t>(interleave) << 16 | static_cast<uint64_t>(swizzle) << 24 |
                   static_cast<uint64_t>(l2) << 32 | static_cast<uint64_t>(oob) << 40;
  map->opaque[2] = reinterpret_cast<uintptr_t>(address);
  map->opaque[3] = dims[0];
  map->opaque[4] = rank == 2 ? dims[1] : 1;
  map->opaque[5] = rank == 2 ? strides[0] : dims[0] * e;
  map->opaque[6] = box[0] | static_cast<uint64_t>(rank == 2 ? box[1] : 1) << 32;
  map->opaque[7] = element_strides[0] | static_cast<uint64_t>(rank == 2 ? element_strides[1] : 1) << 32;
  return CUDA_SUCCESS;
}

}  // namespace

cudaError_t func_set_attribute(const void* key, cudaFuncAttribute attr, int value) {
  FuncAttrs& a = g_func_attrs[{g_device, key}];
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > device_model(g_device).optin) return cudaErrorInvalidValue;
    a.max_dynamic = value;
  } else if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    if (value < -1 || value > 100) return cudaErrorInvalidValue;
    a.carveout = value;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// The emulator cannot measure a kernel's static shared memory (__shared__ arrays are host statics): it
// reports none on the sm_80 device and the 48 KiB static limit on the sm_90a one, whose binary is taken
// to hold sm_90a code (the wgmma kernel's probe looks for a static array only that code declares).
cudaError_t func_get_attributes(const void* key, cudaFuncAttributes* attr) {
  const auto it = g_func_attrs.find({g_device, key});
  const FuncAttrs a = it == g_func_attrs.end() ? FuncAttrs{} : it->second;
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = g_device == 1 ? 48 * 1024 : 0;
  attr->maxThreadsPerBlock = 1024;
  attr->maxDynamicSharedSizeBytes = a.max_dynamic;
  attr->preferredShmemCarveout = a.carveout;
  return cudaSuccess;
}

// Blocks per SM as limited by threads (2048 per SM), blocks (32) and shared memory (the carveout's
// share of the SM's, 1 KiB reserved per block); registers are not modelled.
cudaError_t occupancy(const void* key, int block_threads, size_t dynamic_shared, int* blocks) {
  if (block_threads <= 0 || block_threads > 1024) return cudaErrorInvalidValue;
  const auto it = g_func_attrs.find({g_device, key});
  const FuncAttrs a = it == g_func_attrs.end() ? FuncAttrs{} : it->second;
  const DeviceModel d = device_model(g_device);
  if (dynamic_shared > static_cast<size_t>(a.max_dynamic)) {
    *blocks = 0;
    return cudaSuccess;
  }
  const size_t smem = a.carveout < 0 ? d.per_sm : d.per_sm * static_cast<size_t>(a.carveout) / 100;
  const int warps = (block_threads + 31) / 32;
  const int by_threads = 2048 / (32 * warps);
  const int by_smem = static_cast<int>(smem / (dynamic_shared + 1024));
  *blocks = std::min(std::min(by_threads, by_smem), 32);
  return cudaSuccess;
}

}  // namespace cuda_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cuda_emu::g_last_error; }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
  }
  return "unknown error";
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 2;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = cuda_emu::g_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device > 1) return cudaErrorInvalidDevice;
  cuda_emu::g_device = device;
  return cudaSuccess;
}
// Device 0: compute capability 8.0 (the mma.sync kernels run, sm_90a code does not exist for it);
// device 1: 9.0 with the sm_90a kernels (cuda_emu::configure_sm90).
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  cuda_emu::g_property_queries.fetch_add(1);
  if (device < 0 || device > 1) return cudaErrorInvalidDevice;
  const cuda_emu::DeviceModel d = cuda_emu::device_model(device);
  *prop = cudaDeviceProp{};
  prop->major = d.major;
  prop->minor = d.minor;
  prop->multiProcessorCount = d.sms;
  prop->l2CacheSize = 1 << 20;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = d.optin;
  prop->sharedMemPerMultiprocessor = d.per_sm;
  prop->reservedSharedMemPerBlock = 1024;
  prop->maxThreadsPerMultiProcessor = 2048;
  std::snprintf(prop->name, sizeof(prop->name), "cuda_emu (CPU) sm_%d%d", d.major, d.minor);
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device > 1) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = cuda_emu::device_model(device).sms;
  return cudaSuccess;
}
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int version,
                                             unsigned long long, cudaDriverEntryPointQueryResult* status) {
  *fn = nullptr;
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") != 0) {
    if (status) *status = cudaDriverEntryPointSymbolNotFound;
    return cudaSuccess;
  }
  if (version < 12000) {
    if (status) *status = cudaDriverEntryPointVersionNotSufficent;
    return cudaSuccess;
  }
  *fn = reinterpret_cast<void*>(&cuda_emu::encode_tiled);
  if (status) *status = cudaDriverEntryPointSuccess;
  return cudaSuccess;
}
