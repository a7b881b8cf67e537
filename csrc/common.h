// Shared plumbing for every op: host/device qualifiers, the dtype enum that Python passes as an int,
// the error macro that throws (never aborts), the dtype dispatch macro and a row-parallel loop that
// uses plain std::thread so it can never fight torch's OpenMP pool.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__CUDACC__)
#define HN_HD __host__ __device__ __forceinline__
#else
#define HN_HD inline
#endif

namespace hnsample {

// Must match hnsample/_ext.py::DTYPE_CODES.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int64 = 4 };

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parameters a launcher cannot run with (csrc/params_check.h); Python sees a ValueError.
struct ParamError : Error {
  using Error::Error;
};

#define HN_CHECK(cond, msg)                                                                   \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      throw ::hnsample::Error(std::string("hnsample internal check failed: ") + (msg) +      \
                              " (" __FILE__ ":" + std::to_string(__LINE__) + ")");            \
    }                                                                                         \
  } while (0)

// Raw storage types for the half formats; conversion to float is bit arithmetic so that the same
// code runs on every host compiler and in device code.
struct half_bits {
  uint16_t x;
};
struct bf16_bits {
  uint16_t x;
};

HN_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

HN_HD float to_float(float v) { return v; }
HN_HD double to_float(double v) { return v; }
HN_HD float to_float(bf16_bits v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
HN_HD float to_float(half_bits v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return bits_to_float(sign | ((112u - e) << 23) | (mant << 13));
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Dispatch over the floating dtypes a score block may have.
#define HN_DISPATCH_FLOAT(code, T, ...)                                                        \
  [&] {                                                                                       \
    switch (static_cast<::hnsample::DType>(code)) {                                           \
      case ::hnsample::DType::Float32: {                                                      \
        using T = float;                                                                      \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::hnsample::DType::Float64: {                                                      \
        using T = double;                                                                     \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::hnsample::DType::Float16: {                                                      \
        using T = ::hnsample::half_bits;                                                      \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::hnsample::DType::BFloat16: {                                                     \
        using T = ::hnsample::bf16_bits;                                                      \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      default:                                                                                \
        throw ::hnsample::Error("hnsample: unsupported dtype code " + std::to_string(code));  \
    }                                                                                         \
  }()

// Compile-time flag from a runtime bool (flash-attention's BOOL_SWITCH idea).
#define HN_BOOL_SWITCH(cond, NAME, ...) \
  [&] {                                 \
    if (cond) {                         \
      constexpr bool NAME = true;       \
      return __VA_ARGS__();             \
    } else {                            \
      constexpr bool NAME = false;      \
      return __VA_ARGS__();             \
    }                                   \
  }()

#if !defined(__CUDACC__)
// Runs fn(begin, end) over [0, n) split into contiguous chunks on `threads` std::threads (the caller's
// thread takes the first chunk). Exceptions from workers are rethrown on the caller.
template <typename Fn>
void parallel_rows(int64_t n, int threads, Fn&& fn) {
  if (n <= 0) return;
  if (threads < 1) threads = 1;
  if (threads > n) threads = static_cast<int>(n);
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  pool.reserve(threads - 1);
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    const int64_t b = t * chunk, e = (b + chunk < n) ? b + chunk : n;
    if (b >= e) break;
    pool.emplace_back([&, t, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    fn(int64_t{0}, chunk < n ? chunk : n);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}
#endif

}  // namespace hnsample
