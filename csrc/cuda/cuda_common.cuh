// CUDA-only plumbing: the error check that throws with file and line, and ceil_div.
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

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace hnsample
