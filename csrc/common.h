// Shared plumbing for every op: host/device qualifiers, the dtype enum that Python passes as an int,
// the error macro that throws (never aborts), the dtype dispatch macro, alignment-safe element access
// for the CPU kernels and their row-parallel loop (a persistent pool of plain std::threads, so it can
// never fight torch's OpenMP pool; csrc/cpu/thread_pool.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// Element i of an array of T that may start at any byte address: numpy views of a byte buffer and
// torch.frombuffer(..., offset=1) hand the CPU kernels pointers that are not aligned for T, and reading
// them through a T* is undefined behaviour. memcpy is defined for any address and compiles to the
// same single (unaligned-tolerant) load, also inside vectorized loops. Device arrays come from the
// CUDA allocator, always aligned, so device code loads them directly.
template <typename T>
HN_HD T load_at(const void* base, int64_t i) {
#if defined(__CUDA_ARCH__)
  return static_cast<const T*>(base)[i];
#else
  static_assert(std::is_trivially_copyable_v<T>, "load_at needs a trivially copyable type");
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(base) + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
  return v;
#endif
}

#if !defined(__CUDACC__)
template <typename T>
inline void store_at(void* base, int64_t i, T v) {
  static_assert(std::is_trivially_copyable_v<T>, "store_at needs a trivially copyable type");
  std::memcpy(static_cast<unsigned char*>(base) + i * static_cast<int64_t>(sizeof(T)), &v, sizeof(T));
}

// A read-only view of T elements at any byte address: v[i] is load_at<T>(bytes, i).
template <typename T>
struct UnalignedSpan {
  const void* bytes;
  T operator[](int64_t i) const { return load_at<T>(bytes, i); }
};

namespace detail {
using ChunkBody = void (*)(void* ctx, int64_t begin, int64_t end);
// Runs body(ctx, begin, end) over [0, n) split into ceil(n / chunk) contiguous chunks of
// chunk = ceil(n / min(threads, n)) rows, on the calling thread and the shared worker pool
// (csrc/cpu/thread_pool.cpp). Returns when every chunk has finished; rethrows the exception of the
// lowest failing chunk. Throws hnsample::Error, before any chunk runs, when the pool cannot start the
// threads it needs.
void run_chunks(int64_t n, int threads, ChunkBody body, void* ctx);
}  // namespace detail

// Runs fn(begin, end) over [0, n) split into contiguous chunks of ceil(n / threads) rows, at most
// `threads` of them running at once (the caller's thread takes part). The chunk boundaries depend
// only on n and threads, never on which thread runs a chunk, so per-chunk partial results may be
// indexed by begin / chunk. Exceptions from chunks are rethrown on the caller.
template <typename Fn>
void parallel_rows(int64_t n, int threads, Fn&& fn) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1) {
    fn(int64_t{0}, n);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  detail::run_chunks(
      n, threads, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); },
      const_cast<void*>(static_cast<const void*>(&fn)));
}
#endif

}  // namespace hnsample
