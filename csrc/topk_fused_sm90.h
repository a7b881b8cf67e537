// Host-checkable facts of the sm_90a wgmma fused score kernel (csrc/cuda/topk_fused_sm90.cu): its tile
// shape, the shared-memory layout the bulk tensor copies write and wgmma reads (K-major, 128-byte
// swizzle), the wgmma shared-memory matrix descriptor, the accumulator fragment of m64nNk16 with fp32
// accumulators, and which inputs the kernel takes. Kept torch- and CUDA-free so the CPU tests check the
// same functions the kernel calls. PTX ISA sections: "Matrix Descriptor Format" and "Shared Memory
// Matrix Layout" of the asynchronous warpgroup-level matrix instructions; "Register Fragments" of
// wgmma .m64nNk16; the tensor-map swizzle modes of cuTensorMapEncodeTiled.
#pragma once

#include <cstdint>

#include "topk_select.h"

namespace hnsample {
namespace sm90 {

// Every tile: K in steps of 64 elements (one 128-byte swizzle row of 16-bit values per matrix row); each
// consumer warpgroup owns 64 query rows against all kBN candidates of the CTA (one wgmma m64nNk16 per 16
// of K, N = kBN).
constexpr int kBK = 64;
constexpr int kElemBytes = 2;
constexpr int kRowBytes = kBK * kElemBytes;  // 128: one swizzle span per matrix row
constexpr int kMinBN = 128;                  // the narrowest tile: sets the candidate limit of the grid
static_assert(kFusedMaxCols == int64_t{65535} * kMinBN, "one candidate limit for every fused kernel");
// A 128-byte-swizzled operand tile must start on a 1024-byte boundary (8 rows of 128 bytes, the span of
// the XOR pattern), so the descriptor's base offset field stays 0.
constexpr int kSwizzleAtomBytes = 1024;
// Hopper: 228 KiB of shared memory per SM, at most 227 KiB per CTA, 1 KiB of it reserved per CTA.
constexpr int kSmemPerSm = 228 * 1024, kSmemPerCta = 227 * 1024, kSmemReserved = 1024;
static_assert(kRowBytes == 128, "the 128-byte swizzle needs 128-byte rows");

// A CTA shape: kGroups consumer warpgroups (64 query rows each) plus one producer warp, kBNT
// candidates, kStagesT shared-memory stages.
template <int kGroups, int kBNT, int kStagesT>
struct Tile {
  static constexpr int kConsumerGroups = kGroups;
  static constexpr int kStages = kStagesT;
  static constexpr int kBM = 64 * kGroups, kBN = kBNT;
  static constexpr int kThreads = (kGroups * 4 + 1) * 32;
  static constexpr int kAcc = 64 * kBN / 128;  // fp32 accumulators of m64nN per thread of a warpgroup
  static constexpr int kTileABytes = kBM * kRowBytes;
  static constexpr int kTileBBytes = kBN * kRowBytes;
  static constexpr int kStageBytes = kTileABytes + kTileBBytes;  // what each stage's full barrier expects
  static constexpr int kControlBytes = 2 * kStages * 8 + 8;      // full + empty mbarriers, a CTA-wide flag
  // The epilogue's column scales: per consumer warpgroup, two buffers of kBN floats (tiles alternate
  // between them, so a warpgroup stages the next tile's while none of its threads still reads them).
  static constexpr int kColScaleBytes = kGroups * 2 * kBN * 4;
  // Dynamic shared memory: the stages, the control words, the column scales, and slack to round the
  // base up to 1024 bytes.
  static constexpr int kSmemBytes = kStages * kStageBytes + kControlBytes + kColScaleBytes + kSwizzleAtomBytes;
  static constexpr int kCtasPerSm = kSmemPerSm / (kSmemBytes + kSmemReserved);
  static_assert(kTileABytes % kSwizzleAtomBytes == 0 && kTileBBytes % kSwizzleAtomBytes == 0,
                "every tile must keep the next one on a 1024-byte boundary");
  static_assert(kSmemBytes <= kSmemPerCta && kCtasPerSm >= 1, "the stages must fit one CTA");
  static_assert(kBM <= 256 && kBN <= 256, "a tensor-copy box spans at most 256 rows");
  static_assert((kBN == 128 || kBN == 256) && kBN >= kMinBN, "the wgmma shapes this kernel issues");
};

// Three shapes, by FusedBlock.kernel (FusedKernel); which is fastest is a question for the device, the
// first is what Wgmma and Auto (where wgmma runs) launch. Per 16 of K a warpgroup's m64nNk16 reads 2 KiB of A and N/8 KiB of B from shared memory and
// the copy engine writes (BM + BN) x 32 bytes per CTA; against the SM's 128 bytes per clock of shared
// memory and about 2048 bf16 FMA per clock of tensor cores that is, per clock of tensor work, 160 bytes
// for 128 x 128, 144 for 256 x 128 and 128 for 128 x 256.
//   Wgmma: 128 x 128, 3 stages, 99 KiB: two CTAs per SM, one's epilogue overlaps the other's main loop;
//          64 flop per byte of operands from L2.
//   Wgmma256x128: 256 x 128, 4 stages, one CTA per SM; 85 flop per byte from L2; no epilogue overlap.
//   Wgmma128x256: 128 x 256, 4 stages, one CTA per SM, 128 accumulators per thread; 85 flop per byte
//                 from L2, the least shared-memory traffic; no epilogue overlap.
using TileWide = Tile<2, 128, 3>;
using TileTall = Tile<4, 128, 4>;
using TileLong = Tile<2, 256, 4>;
static_assert(TileWide::kCtasPerSm == 2 && TileTall::kCtasPerSm == 1 && TileLong::kCtasPerSm == 1,
              "the occupancy each shape is built for");

// wgmma shared-memory matrix descriptor (64 bits):
//   bits  0-13  start address >> 4        bits 16-29  leading-dimension byte offset >> 4
//   bits 32-45  stride-dimension byte offset >> 4
//   bits 49-51  base offset (0: the swizzle pattern starts on a 1024-byte boundary)
//   bits 62-63  swizzle: 0 none, 1 128-byte, 2 64-byte, 3 32-byte.
// Addresses are shared-window byte addresses (< 2^18 fits the 14-bit field after >> 4).
constexpr int kSwizzle128 = 1;
HN_HD constexpr uint64_t smem_descriptor(uint32_t start, uint32_t leading_bytes, uint32_t stride_bytes,
                                   uint32_t base_offset, uint32_t swizzle) {
  return (static_cast<uint64_t>((start >> 4) & 0x3FFFu)) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFFu) << 32) |
         (static_cast<uint64_t>(base_offset & 0x7u) << 49) | (static_cast<uint64_t>(swizzle & 0x3u) << 62);
}

// The operand tiles of this kernel: K-major rows of 128 bytes, 128-byte swizzle. The stride-dimension
// offset is the distance between consecutive groups of 8 rows (8 x 128 bytes); the leading-dimension
// offset is unused by swizzled K-major layouts (the K extent of one instruction, 16 elements = 32
// bytes, lies inside one swizzle row) and set to 16 bytes, the field's unit.
constexpr uint32_t kLeadingBytes = 16;
constexpr uint32_t kStrideBytes = 8 * kRowBytes;
HN_HD constexpr uint64_t operand_descriptor(uint32_t tile_start, int k16) {
  // Step k16 (elements 16 k16 .. 16 k16 + 15) starts 32 k16 bytes into the unswizzled row: the
  // hardware applies the XOR pattern to the full address, so advancing the start is enough.
  return smem_descriptor(tile_start + static_cast<uint32_t>(k16) * 16 * kElemBytes, kLeadingBytes,
                         kStrideBytes, 0, kSwizzle128);
}

// The 128-byte swizzle as an address map: the 16-byte chunk index (address bits 4-6) is XORed with the
// row index within the 1024-byte pattern (address bits 7-9). The tensor copy writes through it and
// wgmma reads through it, both on absolute shared addresses.
HN_HD constexpr uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 0x7u) << 4); }

// Where the tensor copy puts element (row r, k) of a box of kBK x rows 16-bit values whose tile starts
// at `tile` (1024-byte aligned): row r at r x 128 bytes, then the swizzle.
HN_HD constexpr uint32_t tma_element_address(uint32_t tile, int r, int k) {
  return swizzle128(tile + static_cast<uint32_t>(r) * kRowBytes + static_cast<uint32_t>(k) * kElemBytes);
}

// Where wgmma reads element (row r of the instruction's 64 (A) or N (B) rows, k of its 16) for a
// K-major operand with 128-byte swizzle, described by `desc`: core matrices of 8 rows x 16 bytes;
// rows within a group of 8 are 128 bytes apart (the swizzle row), groups are `stride` bytes apart, and
// the 16 K elements are two consecutive 16-byte chunks from the start address; then the swizzle.
HN_HD constexpr uint32_t wgmma_element_address(uint64_t desc, int r, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  return swizzle128(start + static_cast<uint32_t>(r / 8) * stride + static_cast<uint32_t>(r % 8) * kRowBytes +
                    static_cast<uint32_t>(k) * kElemBytes);
}

// Accumulator fragment of wgmma .m64nNk16 with fp32 D, for thread `lane` of warp `warp` (0-3) of the
// warpgroup and register index `reg`: warp w owns rows 16 w .. 16 w + 15; registers come in groups of 4
// per 8 columns: group i = reg / 4 covers columns 8 i .. 8 i + 7; within it, reg % 2 picks column
// 2 (lane % 4) + reg % 2 and (reg / 2) % 2 adds 8 to the row lane / 4.
HN_HD constexpr int acc_row(int warp, int lane, int reg) { return 16 * warp + lane / 4 + 8 * ((reg / 2) % 2); }
HN_HD constexpr int acc_col(int lane, int reg) { return 8 * (reg / 4) + 2 * (lane % 4) + reg % 2; }

// Whether the wgmma kernel takes these inputs (the device and the binary are checked separately):
// 16-bit values; the bulk tensor copy needs 16-byte aligned bases and row strides that are whole
// 16-byte multiples and at least a row long (rows may not overlap), and tile coordinates that fit
// int32. Any d > 0 works: elements past d in the last K step are zero-filled by the copy and add
// nothing.
inline bool wgmma_inputs_suit(const FusedBlock& f) {
  const auto dt = static_cast<DType>(f.dtype);
  if (dt != DType::BFloat16 && dt != DType::Float16) return false;
  if (f.rows <= 0 || f.cols <= 0 || f.dim <= 0 || f.cand_cap <= 0) return false;
  if (f.row_slack != nullptr) return false;  // exact products: no tf32 slack
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(f.queries) || !aligned(f.candidates)) return false;
  const int64_t per16 = 16 / kElemBytes;
  if (f.q_stride % per16 != 0 || f.c_stride % per16 != 0) return false;
  if (f.q_stride < f.dim || f.c_stride < f.dim) return false;
  if (f.q_stride * kElemBytes >= (int64_t{1} << 40) || f.c_stride * kElemBytes >= (int64_t{1} << 40)) return false;
  if (f.dim >= (int64_t{1} << 31) || f.rows >= (int64_t{1} << 31)) return false;
  return f.cols <= kFusedMaxCols;  // the mma.sync kernel's limit, so both take the same blocks
}

}  // namespace sm90

#if defined(HNSAMPLE_WITH_CUDA)
// True when `device` can run the wgmma kernel: compute capability 9.0, this binary holds sm_90a code for
// it, the driver exports the tensor-map encoder and the device grants the shared memory. Probed once per
// device, then cached.
bool topk_fused_wgmma_available(int device);
// Launches the wgmma kernel on the current device (FusedBlock contract; inputs must suit, see
// sm90::wgmma_inputs_suit). Throws when the device cannot run it.
void topk_fused_scores_sm90(const FusedBlock& f, void* stream);
// CTAs of a wgmma kernel (one of the three wgmma codes) that run at once on one SM of `device` (0 when the
// kernel is unavailable there); the persistent grid is this times the SM count. Diagnostics.
int topk_fused_wgmma_ctas_per_sm(int device, FusedKernel kernel);
// Whether a wait in the wgmma kernel ran out of time on `device` (then every later launch there reports
// overflow in every row, so the fused driver redoes its chunks on the two-pass path). Synchronizes the
// device: a diagnostic for tests and device checks, never called on the op's path.
bool topk_fused_wgmma_stalled(int device);
// Clears that flag on `device`, so the wgmma kernel scores again there (after a deliberate stall in a
// test, or once the cause of a real one is understood). Synchronizes the device.
void topk_fused_wgmma_clear_stall(int device);
#endif

}  // namespace hnsample
