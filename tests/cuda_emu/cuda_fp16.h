// The half type of the CUDA emulator (see cuda_runtime.h): storage plus the conversions the kernels use.
#pragma once

#include <cstdint>

#include "cuda_runtime.h"

struct __half {
  uint16_t x;
};

inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline float __half2float(__half h) { return ::cuda_emu::half_bits_to_float(h.x); }
