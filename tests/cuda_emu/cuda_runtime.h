// A CPU emulator of the CUDA subset hnsample's kernels use, so that their own source runs in the test
// suite on machines without a GPU (built with -DHNSAMPLE_CUDA_EMU, this directory first on the include
// path, so it stands in for the toolkit's cuda_runtime.h). Model:
//   * Every CUDA thread is a fiber on the calling OS thread; the blocks of a grid run one after another
//     (so __shared__ variables become function statics), the threads of a block interleave only at
//     barriers and warp collectives, which are the scheduling points. A thread runs until it reaches
//     one, so code that leans on lockstep execution without a __syncwarp shows up as wrong results.
//   * A warp collective (__syncwarp, __ballot_sync, __any_sync, __all_sync, __shfl*_sync, ldmatrix,
//     mma.sync) completes when every lane of its mask has arrived at the same kind of collective with
//     the same mask. A lane of the mask that has exited, a lane arriving at another kind or mask, or a
//     block where every live thread waits without any collective able to complete is a kernel fault:
//     the launch throws cuda_emu::KernelFault (a test failure, never a hang).
//   * The order of the threads' turns is configurable (round robin, or one warp running ahead of the
//     others), as is when a cp.async copy lands: at the cp.async.wait_group that covers it (the latest a
//     GPU may land it) or when issued (the earliest), so tests can run a kernel under the extremes of
//     what the hardware allows and catch a missing barrier or wait.
//   * PTX instructions are written from the PTX ISA (emu_runtime.cpp): ldmatrix and mma.sync gather
//     the warp's fragments, form the matrices of the ISA's fragment tables and scatter the results.
//   * An sm_90 device (configure_sm90; docs/cuda.md, the sm_90 emulator section): mbarrier, bulk tensor copies through
//     emulated tensor maps, wgmma from shared-memory descriptors, warpgroup collectives (all 128
//     threads of a warpgroup), dynamic shared memory in an emulated shared window, and a global timer
//     that advances while threads poll barriers, so a deadlock shows as a kernel's bounded-wait path.
// Not modelled: data races between warps outside the scheduling points, memory spaces (any pointer is
// as good as any other, but the sm_90 instructions take shared-window addresses), registers, timing.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// One block runs at a time, so a block's shared memory can be a static of the function declaring it.
#define __shared__ static

// ---- vector types ----------------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(8) float2 {
  float x, y;
};
struct __align__(16) float4 {
  float x, y, z, w;
};
struct __align__(16) double2 {
  double x, y;
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};

// ---- runtime API -----------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
typedef struct CUstream_st* cudaStream_t;

struct cudaDeviceProp {
  int major = 0, minor = 0;
  int multiProcessorCount = 0;
  int l2CacheSize = 0;
  size_t sharedMemPerBlock = 0, sharedMemPerBlockOptin = 0, sharedMemPerMultiprocessor = 0;
  size_t reservedSharedMemPerBlock = 0;
  int maxThreadsPerMultiProcessor = 0;
  char name[256] = {};
};

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaSharedCarveout { cudaSharedmemCarveoutDefault = -1, cudaSharedmemCarveoutMaxL1 = 0,
                          cudaSharedmemCarveoutMaxShared = 100 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxThreadsPerBlock = 0;
  int maxDynamicSharedSizeBytes = 0;
  int preferredShmemCarveout = -1;
};
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDefault = 4 };
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2,
};
enum { cudaEnableDefault = 0 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
// Two emulated devices: 0 is a compute capability 8.0 GPU (4 SMs), 1 a 9.0 one with sm_90a code in the
// binary (cuda_emu::configure's sm90 makes it the current device; its SM count is configurable).
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
// The driver entry points the kernels fetch (only cuTensorMapEncodeTiled, ABI of CUDA 12.0).
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int version,
                                             unsigned long long flags, cudaDriverEntryPointQueryResult* status);

namespace cuda_emu {

// A kernel broke the execution model (divergent or unmatched collective, deadlock, misaligned access).
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ThreadCoords {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
const ThreadCoords& coords();  // of the running CUDA thread
[[noreturn]] void fault(const std::string& what);

// How the threads of a block take turns: round robin over the runnable threads (default), or the
// lowest (highest) warp with a runnable thread first, so one warp runs ahead of the others.
enum class Schedule { kRoundRobin, kWarpsAscending, kWarpsDescending };
// cp.async copies land at the covering wait_group (default) or as soon as they are issued; mma.sync
// rounds each output once (default) or truncates after every addition (mma_truncate).
void configure(Schedule schedule, bool cp_async_immediate, bool mma_truncate);
// The sm_90 device: sm90 makes device 1 (compute capability 9.0, `sms` SMs) the current device;
// lose_bulk_copies makes every bulk tensor copy vanish (never lands, never completes its bytes), the
// hang the wgmma kernel's bounded waits exist for; bulk_delay_ns > 0 makes each copy land no earlier
// than that much global-timer time after its issue (a slow copy engine).
void configure_sm90(bool sm90, int sms, bool lose_bulk_copies, uint64_t bulk_delay_ns);
// How many times cudaGetDeviceProperties was called (what the launchers cache, tests count).
long long property_queries();
// Instruction counters the tests read: atomicAdd calls per address (count_atomic_add, called by every
// atomicAdd) and %globaltimer reads per lane of the reading warp, both since reset_counters().
void count_atomic_add(const void* address);
long long atomic_adds(const void* address);
long long timer_reads(int lane);
void reset_counters();

// Runs kernel() once per thread of every block of the grid (see the model above). `key` (the kernel's
// address) selects the attributes that allow more than 48 KiB of dynamic shared memory.
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* ctx, const void* key);

// A warp collective: every lane of `mask` hands in `in` (in_bytes <= kSlotBytes); when all have
// arrived, combine(ins, outs, mask) runs once and each lane gets outs[lane] back in `out`.
constexpr size_t kSlotBytes = 48;
using Slot = unsigned char[kSlotBytes];
using Combine = void (*)(const Slot* ins, Slot* outs, unsigned mask);
void collective(const char* kind, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                Combine combine);
void sync_block();

// Per-kernel attributes and occupancy on the current device (emu_runtime.cpp); `key` is the kernel's
// address.
cudaError_t func_set_attribute(const void* key, cudaFuncAttribute attr, int value);
cudaError_t func_get_attributes(const void* key, cudaFuncAttributes* attr);
cudaError_t occupancy(const void* key, int block_threads, size_t dynamic_shared, int* blocks);

// The block's dynamic shared memory, inside the emulated shared window (see emu_runtime.cpp), and the
// shared-window address of a generic pointer into it.
void* dynamic_shared();
uint32_t cvta_generic_to_shared(const void* p);

// sm_90 instructions (emu_runtime.cpp, written from the PTX ISA): the global timer, mbarrier objects in
// shared memory, the bulk tensor copy, and the warpgroup MMA.
uint64_t globaltimer();
void mbar_init(uint32_t bar, uint32_t count);
void fence_mbarrier_init();
// mbarrier.arrive (tx_bytes 0) or mbarrier.arrive.expect_tx (tx_bytes > 0).
void mbar_arrive(uint32_t bar, uint32_t tx_bytes);
bool mbar_try_wait_parity(uint32_t bar, uint32_t parity);
void tma_load_2d(uint32_t dst, const struct CUtensorMap_st* map, int32_t c0, int32_t c1, uint32_t bar);
bool barrier_red_and(uint32_t id, uint32_t threads, bool pred);
void wgmma_fence();
void wgmma_commit_group();
void wgmma_wait_group(int pending);
void wgmma_mma_async(bool bf16, int n, float* d, uint64_t desc_a, uint64_t desc_b, bool scale_d);

// PTX instructions (emu_runtime.cpp).
enum class MmaKind { kFp16, kBf16, kTf32 };
void cp_async(void* smem, const void* gmem, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem);
void mma_sync(MmaKind kind, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
uint32_t cvt_rna_tf32(float x);
float double_to_float_rounded(double v, int direction);  // +1 toward +inf, -1 toward -inf
float half_bits_to_float(uint16_t h);

template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    // Each thread's call copies the arguments into its own parameters, as kernel parameters are.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{kernel, &params};
    run_grid(grid, block, shared_bytes,
             [](void* c) {
               auto* x = static_cast<Ctx*>(c);
               std::apply(x->kernel, *x->params);
             },
             &ctx, reinterpret_cast<const void*>(kernel));
  }
};

template <typename... P>
Launch<P...> make_launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, shared_bytes, kernel};
}

template <typename T>
T load_aligned(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    fault("misaligned " + std::to_string(sizeof(T)) + "-byte load at " +
          std::to_string(reinterpret_cast<uintptr_t>(p)));
  return *p;
}

template <typename T>
struct ShflIn {
  T value;
  int arg;    // source lane (shfl), lane mask (xor) or delta (down)
  int width;
  int mode;   // 0 idx, 1 xor, 2 down, 3 up
};

template <typename T>
void shfl_combine(const Slot* ins, Slot* outs, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    ShflIn<T> in;
    std::memcpy(&in, ins[l], sizeof(in));
    const int w = in.width, seg = l & ~(w - 1);
    int src = l;
    switch (in.mode) {
      case 0: src = seg + (in.arg & (w - 1)); break;
      case 1: src = l ^ in.arg; if (src >= seg + w || src < seg) src = l; break;
      case 2: src = l + in.arg; if (src >= seg + w) src = l; break;
      default: src = l - in.arg; if (src < seg) src = l; break;
    }
    if (!(mask >> src & 1u))
      fault("shuffle: lane " + std::to_string(l) + " reads lane " + std::to_string(src) + " outside the mask");
    ShflIn<T> from;
    std::memcpy(&from, ins[src], sizeof(from));
    std::memcpy(outs[l], &from.value, sizeof(T));
  }
}

template <typename T>
T shfl(const char* kind, unsigned mask, T v, int arg, int width, int mode) {
  static_assert(sizeof(ShflIn<T>) <= kSlotBytes && std::is_trivially_copyable_v<T>, "shuffled type");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fault("shuffle: width must be a power of 2 <= 32");
  const ShflIn<T> in{v, arg, width, mode};
  T out;
  collective(kind, mask, &in, sizeof(in), &out, sizeof(out), &shfl_combine<T>);
  return out;
}

void vote_combine_ballot(const Slot* ins, Slot* outs, unsigned mask);
// The ballot of pred over the lanes of mask, as the collective `kind`.
unsigned vote(const char* kind, unsigned mask, int pred);

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::coords().thread)
#define blockIdx (::cuda_emu::coords().block)
#define blockDim (::cuda_emu::coords().block_dim)
#define gridDim (::cuda_emu::coords().grid_dim)

// HN_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...): see csrc/cuda/cuda_common.cuh.
#define HN_LAUNCH(grid, block, smem, stream, ...) ::cuda_emu::make_launch(grid, block, smem, stream, &__VA_ARGS__)
#define HN_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::cuda_emu::dynamic_shared())

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cuda_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(P...)) {
  return ::cuda_emu::func_get_attributes(reinterpret_cast<const void*>(kernel), attr);
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...), int block_threads,
                                                          size_t dynamic_shared) {
  return ::cuda_emu::occupancy(reinterpret_cast<const void*>(kernel), block_threads, dynamic_shared, blocks);
}
// __device__ variables are host globals here (one emulated memory for every device).
template <typename T>
cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                 cudaMemcpyKind = cudaMemcpyDeviceToHost) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(dst, reinterpret_cast<const char*>(&symbol) + offset, count);
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t count, size_t offset = 0,
                               cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, count);
  return cudaSuccess;
}
inline size_t __cvta_generic_to_shared(const void* p) { return ::cuda_emu::cvta_generic_to_shared(p); }

// ---- device intrinsics -----------------------------------------------------------------------------
inline void __syncthreads() { ::cuda_emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuda_emu::collective("__syncwarp", mask, nullptr, 0, nullptr, 0, nullptr);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::cuda_emu::vote("__ballot_sync", mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return ::cuda_emu::vote("__any_sync", mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return ::cuda_emu::vote("__all_sync", mask, pred) == mask; }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::cuda_emu::shfl("__shfl_sync", mask, v, src, width, 0);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::cuda_emu::shfl("__shfl_xor_sync", mask, v, lane_mask, width, 1);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_emu::shfl("__shfl_down_sync", mask, v, static_cast<int>(delta), width, 2);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_emu::shfl("__shfl_up_sync", mask, v, static_cast<int>(delta), width, 3);
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// Fibers switch only at scheduling points, so a read-modify-write is atomic as written.
template <typename T>
T atomicAdd(T* p, T v) {
  ::cuda_emu::count_atomic_add(p);
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

// Streaming loads: plain loads that check the alignment the GPU requires.
template <typename T>
T __ldcs(const T* p) {
  return ::cuda_emu::load_aligned(p);
}
template <typename T>
T __ldg(const T* p) {
  return ::cuda_emu::load_aligned(p);
}

inline float __double2float_ru(double v) { return ::cuda_emu::double_to_float_rounded(v, 1); }
inline float __double2float_rd(double v) { return ::cuda_emu::double_to_float_rounded(v, -1); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, sizeof(x));
  return x;
}
