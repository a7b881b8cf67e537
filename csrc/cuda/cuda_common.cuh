// CUDA-only plumbing: the error check that throws with file and line, ceil_div, and the launch macro.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../common.h"

namespace hnsample {

#define HN_CUDA_CHECK(expr)                                                                         \
  do {                                                                                              \
    const cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) {                                                                      \
      throw ::hnsample::Error(std::string("CUDA error: ") + cudaGetErrorString(err_) + " at " +    \
                              __FILE__ ":" + std::to_string(__LINE__));                             \
    }                                                                                               \
  } while (0)

// Every kernel launch: HN_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...). The kernel comes
// last so that template arguments with commas pass through the macro. The CPU emulator of the tests
// (tests/cuda_emu/cuda_runtime.h, HNSAMPLE_CUDA_EMU) defines its own, since g++ cannot parse <<<>>>.
#if !defined(HNSAMPLE_CUDA_EMU)
#define HN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
// A kernel's dynamic shared memory as the array `name` of `type`, 16-byte aligned (the emulator's
// stands for its emulated shared window).
#define HN_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace hnsample
