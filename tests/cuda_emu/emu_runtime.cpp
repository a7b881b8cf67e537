// The CUDA emulator's scheduler and PTX instructions (model in cuda_runtime.h). Fibers are ucontext
// contexts with their own mmap'd stacks (a guard page below each, so an overflow faults loudly).
#include "cuda_runtime.h"
#include "topk_fused_sm90.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cfenv>
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
          if (!t.done && !t.blocked) {
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

void run_grid(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* ctx) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || shared_bytes > 48 * 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_body = body;
  g_ctx = ctx;
  g_fault.clear();
  g_exception = nullptr;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        run_block(grid, block, uint3{x, y, z});
        if (g_exception) std::rethrow_exception(g_exception);
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
  }
  return "unknown error";
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// One emulated device of compute capability 8.0: the mma.sync kernels run, sm_90a ones do not exist.
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *prop = cudaDeviceProp{};
  prop->major = 8;
  prop->minor = 0;
  prop->multiProcessorCount = 4;
  prop->l2CacheSize = 1 << 20;
  std::snprintf(prop->name, sizeof(prop->name), "cuda_emu (CPU)");
  return cudaSuccess;
}

// The sm_90a wgmma kernel (csrc/cuda/topk_fused_sm90.cu) is not compiled for the emulated sm_80
// device: the launcher's wgmma branch sees it unavailable, and forcing it fails as it would on an
// sm_80 GPU.
namespace hnsample {
bool topk_fused_wgmma_available(int) { return false; }
void topk_fused_scores_sm90(const FusedBlock&, void*) {
  throw Error("fused: the wgmma kernel needs an sm_90a build on a compute capability 9.0 device");
}
}  // namespace hnsample
