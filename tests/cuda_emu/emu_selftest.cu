// Kernels that test the emulator itself (tests/test_cuda_emulated.py, "emulator" section): warp
// shuffles and votes against their CUDA definitions, the faults it must raise instead of hanging
// (a lane that leaves before a collective naming it, a deadlock, lanes at different collectives), and
// the fragment tables of ldmatrix and mma.sync composed the way the PTX ISA documents them, and the
// sm_90 rules (warpgroup collectives, wgmma.fence, unbounded mbarrier polls, surplus arrivals).
#include <cuda_runtime.h>

#include <cstdint>

#include "../../csrc/cuda/cuda_common.cuh"
#include "../../csrc/cuda/ptx.cuh"

namespace cuda_emu_selftest {
namespace {

// out[t][0..5] for thread t of a 64-thread block: shfl idx (from lane 31 - lane), xor 5, down 3,
// up 2, idx within width 8 (from sub-lane 1), ballot of odd lanes.
__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  const int v = 100 * t;
  int* o = out + 6 * t;
  o[0] = __shfl_sync(0xffffffffu, v, 31 - lane);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[2] = __shfl_down_sync(0xffffffffu, v, 3);
  o[3] = __shfl_up_sync(0xffffffffu, v, 2);
  o[4] = __shfl_sync(0xffffffffu, v, 1, 8);
  o[5] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 2));
}

// mode 0: lanes >= 16 leave, the rest shuffle over the full warp (a lane of the mask has exited).
// mode 1: lanes < 16 wait at __syncwarp(full), the others at __syncthreads (deadlock).
// mode 2: lanes < 16 ballot, the others shuffle (different collectives).
// mode 3: the same as 2 with a half-warp mask each, so both complete (divergence done right).
__global__ void fault_kernel(int mode, int* out) {
  const int lane = threadIdx.x % 32;
  int r = 0;
  if (mode == 0) {
    if (lane >= 16) return;
    r = __shfl_sync(0xffffffffu, lane, 0);
  } else if (mode == 1) {
    if (lane < 16) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  } else if (mode == 2) {
    if (lane < 16) {
      r = static_cast<int>(__ballot_sync(0xffffffffu, 1));
    } else {
      r = __shfl_sync(0xffffffffu, lane, 0);
    }
  } else {
    if (lane < 16) {
      r = static_cast<int>(__ballot_sync(0x0000ffffu, 1));
    } else {
      r = __shfl_sync(0xffff0000u, lane, 16);
    }
  }
  out[threadIdx.x] = r;
}

// One warp: D = A B for A [16, 16] (row-major bf16 bits), B given as B^T [8, 16] (n-major), D [16, 8]
// float. A's fragments come from ldmatrix.x4 over the four 8 x 8 quadrants (lanes 0-15 address rows
// 0-15 at column 0, lanes 16-31 rows 0-15 at column 8), B's from the ISA's B table read directly
// (b0 = (k 2t, 2t + 1; n g), b1 = (k 2t + 8, 2t + 9; n g)); D is stored by the C table.
__global__ void mma_bf16_kernel(const uint16_t* a, const uint16_t* bt, float* d) {
  __shared__ __align__(16) uint16_t sa[16][16];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) sa[i / 16][i % 16] = a[i];
  __syncwarp();
  uint32_t ra[4];
  hnsample::ptx::ldmatrix_x4(ra, &sa[lane % 16][(lane / 16) * 8]);
  auto pack = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  const uint32_t b0 = pack(bt[g * 16 + 2 * t], bt[g * 16 + 2 * t + 1]);
  const uint32_t b1 = pack(bt[g * 16 + 2 * t + 8], bt[g * 16 + 2 * t + 9]);
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  hnsample::ptx::mma_16816<true>(c, ra, b0, b1);
  d[g * 8 + 2 * t] = c[0];
  d[g * 8 + 2 * t + 1] = c[1];
  d[(g + 8) * 8 + 2 * t] = c[2];
  d[(g + 8) * 8 + 2 * t + 1] = c[3];
}


// The emulator's sm_90 rules, on a 128-thread block (one warpgroup; 96 threads in mode 1) with 64
// bytes of dynamic shared memory:
// mode 0: thread 5 leaves, the others wgmma.fence (a warpgroup collective missing a thread).
// mode 1: a 96-thread block wgmma.fences (a warpgroup with a missing warp).
// mode 2: threads < 64 wgmma.fence, the others wgmma.commit_group (different collectives).
// mode 3: wgmma.mma_async with no wgmma.fence before it.
// mode 4: thread 0 polls an mbarrier that never completes, without a bound.
// mode 5: an mbarrier of count 1 gets a second arrival in one phase (its first left bytes pending).
__global__ void sm90_fault_kernel(int mode) {
  HN_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t bar = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int t = threadIdx.x;
  if (mode == 0) {
    if (t == 5) return;
    ::cuda_emu::wgmma_fence();
  } else if (mode == 1) {
    ::cuda_emu::wgmma_fence();
  } else if (mode == 2) {
    if (t < 64) {
      ::cuda_emu::wgmma_fence();
    } else {
      ::cuda_emu::wgmma_commit_group();
    }
  } else if (mode == 3) {
    float d[64] = {};
    ::cuda_emu::wgmma_mma_async(true, 128, d, 0, 0, true);
  } else if (t == 0) {
    ::cuda_emu::mbar_init(bar, 1);
    ::cuda_emu::fence_mbarrier_init();
    if (mode == 4) {
      while (!::cuda_emu::mbar_try_wait_parity(bar, 0)) {
      }
    } else {
      ::cuda_emu::mbar_arrive(bar, 16);
      ::cuda_emu::mbar_arrive(bar, 0);
    }
  }
}

}  // namespace

void shuffles(int* out) { HN_LAUNCH(1, 64, 0, nullptr, shuffle_kernel)(out); }
void faults(int mode, int* out) { HN_LAUNCH(1, 64, 0, nullptr, fault_kernel)(mode, out); }
void mma_bf16(const uint16_t* a, const uint16_t* bt, float* d) {
  HN_LAUNCH(1, 32, 0, nullptr, mma_bf16_kernel)(a, bt, d);
}
void sm90_faults(int mode) { HN_LAUNCH(1, mode == 1 ? 96 : 128, 64, nullptr, sm90_fault_kernel)(mode); }

}  // namespace cuda_emu_selftest
