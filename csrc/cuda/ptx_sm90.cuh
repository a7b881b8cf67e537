// The inline-PTX wrappers of the sm_90a wgmma kernel (topk_fused_sm90.cu): mbarrier, the bulk tensor
// copy, wgmma and the global timer. Device code for them exists only where HN_SM90A_CODE is 1: nvcc's
// sm_90a pass (the arch-specific feature macro) and the CPU emulator of the tests (HNSAMPLE_CUDA_EMU
// with that feature macro defined, see tests/cuda_emu/), where each wrapper calls the emulator's
// implementation of the instruction, written from the PTX ISA, so the CPU tests check the kernel's own
// reading of barrier phases, the copy's swizzle, the matrix descriptors and the accumulator fragment.
// Shared-memory operands are 32-bit shared-window addresses (__cvta_generic_to_shared).
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && (defined(__CUDA_ARCH__) || defined(HNSAMPLE_CUDA_EMU))
#define HN_SM90A_CODE 1
#else
#define HN_SM90A_CODE 0
#endif

#if HN_SM90A_CODE
namespace hnsample {
namespace ptx90 {

// Nanoseconds of the global timer (the emulator's advances while threads poll barriers).
__device__ __forceinline__ uint64_t global_ns() {
#if defined(HNSAMPLE_CUDA_EMU)
  return ::cuda_emu::globaltimer();
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
#endif
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::mbar_init(bar, count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

// Makes the initialized barriers visible to the tensor copy engine (the async proxy).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::fence_mbarrier_init();
#else
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// True when the barrier's phase of the given parity has completed (a bounded wait in hardware).
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
#if defined(HNSAMPLE_CUDA_EMU)
  return ::cuda_emu::mbar_try_wait_parity(bar, parity);
#else
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
#endif
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::mbar_arrive(bar, 0);
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Raises the barrier's expected transaction bytes by `bytes`, then arrives.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::mbar_arrive(bar, bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

// Box (c0 .. c0 + box0 - 1, c1 .. c1 + box1 - 1) of a 2-D tensor map into shared memory at `dst`
// (written as the map's swizzle lays it out); completes the box's bytes (zero-filled parts included)
// on the barrier's transaction count when it lands.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1,
                                            uint32_t bar) {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::tma_load_2d(dst, map, c0, c1, bar);
#else
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#endif
}

// The AND of `pred` over the kThreads threads (a multiple of 32) that arrive at named barrier kId
// (1-15; 0 is __syncthreads'), each waiting for all of them. The id is an immediate: with a register
// id ptxas reserves all 16 barriers.
template <int kId, int kThreads>
__device__ __forceinline__ bool barrier_all(bool pred) {
  static_assert(kId >= 1 && kId <= 15 && kThreads % 32 == 0, "a named barrier and a whole number of warps");
#if defined(HNSAMPLE_CUDA_EMU)
  return ::cuda_emu::barrier_red_and(kId, kThreads, pred);
#else
  uint32_t all;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbarrier.red.and.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(all)
      : "r"(static_cast<uint32_t>(pred)), "n"(kId), "n"(kThreads)
      : "memory");
  return all != 0;
#endif
}

// Warpgroup-collective (all 128 threads): orders earlier register and shared-memory accesses before
// the wgmma.mma_async that follow.
__device__ __forceinline__ void wgmma_fence() {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Warpgroup-collective: the wgmma.mma_async issued since the last commit form one group.
__device__ __forceinline__ void wgmma_commit() {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::wgmma_commit_group();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Warpgroup-collective: waits until at most kPending committed groups are in flight; only then are
// the finished groups' accumulators written and their shared-memory reads done.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::wgmma_wait_group(kPending);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// The accumulators are written asynchronously by wgmma: this keeps the compiler from moving any access
// to them across the fence / wait it follows (the emulator writes them inside its wait_group call,
// which g++ cannot move accesses across).
template <int kAcc>
__device__ __forceinline__ void acc_fence(float (&d)[kAcc]) {
#if !defined(HNSAMPLE_CUDA_EMU)
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

#if !defined(HNSAMPLE_CUDA_EMU)
// wgmma.mma_async m64nNk16 with fp32 accumulators d[0 .. N/2) (operands %0 .. %(N/2 - 1)), then the
// A and B descriptors and the scale-d input; scale-d is 1 (the accumulators start at zero), no
// negation, no transposes (both operands K-major).
#define HN_WGMMA_REGS_128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define HN_WGMMA_REGS_256 \
  HN_WGMMA_REGS_128 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define HN_WGMMA_OUTS_128 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define HN_WGMMA_OUTS_256 \
  HN_WGMMA_OUTS_128, \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define HN_WGMMA(N, TYPE, A, B, C)                                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #C ", 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TYPE "." #TYPE " {" HN_WGMMA_REGS_##N \
               "}, %" #A ", %" #B ", p, 1, 1, 0, 0;\n}\n"                                               \
               : HN_WGMMA_OUTS_##N                                                                      \
               : "l"(desc_a), "l"(desc_b), "n"(1))
#endif

// Warpgroup-collective: d[N / 2] += A[64 x 16] B[16 x N], both K-major in shared memory (descriptors),
// fp32 accumulation; issued asynchronously (see wgmma_wait).
template <bool kBf16, int kN>
__device__ __forceinline__ void wgmma_m64nNk16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(kN == 128 || kN == 256, "the wgmma shapes the kernel issues");
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::wgmma_mma_async(kBf16, kN, d, desc_a, desc_b, true);
#else
  if constexpr (kN == 128 && kBf16) {
    HN_WGMMA(128, bf16, 64, 65, 66);
  } else if constexpr (kN == 128) {
    HN_WGMMA(128, f16, 64, 65, 66);
  } else if constexpr (kBf16) {
    HN_WGMMA(256, bf16, 128, 129, 130);
  } else {
    HN_WGMMA(256, f16, 128, 129, 130);
  }
#endif
}

}  // namespace ptx90
}  // namespace hnsample
#endif  // HN_SM90A_CODE
