// The inline-PTX wrappers of the tensor-core kernels, in one place: asynchronous global->shared
// copies (cp.async), ldmatrix, mma.sync (bf16/fp16 m16n8k16 and tf32 m16n8k8, fp32 accumulation) and
// the fp32 -> tf32 rounding. With HNSAMPLE_CUDA_EMU (the test-only CPU build of the kernels, see
// tests/cuda_emu/) each wrapper calls the emulator's implementation of the instruction instead, written
// from the PTX ISA, so the kernels' own reading of the fragment layouts is what the CPU tests check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hnsample {
namespace ptx {

// kBytes (16, or 4 for single floats) global -> shared; valid = false zero-fills the destination (rows
// past the problem's edge). 16-byte copies bypass L1 (.cg); .ca is the only mode for the other sizes.
template <int kBytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid) {
  static_assert(kBytes == 16 || kBytes == 4, "the copy sizes the kernels use");
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::cp_async(smem, gmem, kBytes, valid ? kBytes : 0);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? kBytes : 0;
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Four 8 x 8 b16 matrices: lanes 8 j .. 8 j + 7 give the row addresses of matrix j; r[j] of lane l
// holds row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::ldmatrix_x4(r, smem);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

// c += a b for a 16 x 16 row-major A, a 16 x 8 column-major B (bf16 or fp16), fp32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::mma_sync(kBf16 ? ::cuda_emu::MmaKind::kBf16 : ::cuda_emu::MmaKind::kFp16, c, a, b0, b1);
#else
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// c += a b for a 16 x 8 row-major A and an 8 x 8 column-major B of tf32 values, fp32 accumulators.
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(HNSAMPLE_CUDA_EMU)
  ::cuda_emu::mma_sync(::cuda_emu::MmaKind::kTf32, c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Round to nearest tf32, ties away from zero: the rounding tf32_dot_error_factor assumes.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(HNSAMPLE_CUDA_EMU)
  return ::cuda_emu::cvt_rna_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#endif
}

}  // namespace ptx
}  // namespace hnsample
