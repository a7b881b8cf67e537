// pybind11 module _cuda_emu: the CUDA launchers of csrc/cuda/*.cu, compiled for the CPU emulator, with
// the signatures of the cuda=True branches of hnsample._C (csrc/bindings.cpp). The params types
// (TopkParams, FusedBlock, InfoNceParams) are the ones hnsample._C registers: this module only uses
// them, so objects built with hnsample._C pass straight in. `cuda` must be True and `threads` is
// ignored: these are the device kernels, nothing else.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda_runtime.h"
#include "info_nce.h"
#include "launch_args.h"
#include "topk_fused_sm90.h"
#include "topk_screen.h"
#include "topk_select.h"

namespace py = pybind11;
using namespace hnsample;

namespace hnsample {
bool cuda_device_usable();
}
namespace cuda_emu_selftest {  // emu_selftest.cu
void shuffles(int* out);
void faults(int mode, int* out);
void mma_bf16(const uint16_t* a, const uint16_t* bt, float* d);
void sm90_faults(int mode);
}  // namespace cuda_emu_selftest

namespace {

void need_cuda(bool cuda) {
  if (!cuda) throw py::value_error("cuda: the emulated module runs the CUDA launchers only (cuda=True)");
}

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "hnsample's CUDA kernels run on the CPU by the test emulator (tests/cuda_emu)";
  py::register_exception<cuda_emu::KernelFault>(m, "KernelFault", PyExc_RuntimeError);
  py::module_::import("hnsample._C");  // registers the params types used below

  m.def(
      "configure",
      [](const std::string& schedule, bool cp_async_immediate, bool mma_truncate, bool sm90, int sm90_sms,
         bool lose_bulk_copies, double bulk_delay_us) {
        if (!(bulk_delay_us >= 0 && bulk_delay_us < 1e9)) throw py::value_error("bulk_delay_us must be in [0, 1e9)");
        if (sm90_sms < 1 || sm90_sms > 132) throw py::value_error("sm90_sms must be in [1, 132]");
        cuda_emu::Schedule sc;
        if (schedule == "round_robin") {
          sc = cuda_emu::Schedule::kRoundRobin;
        } else if (schedule == "warps_ascending") {
          sc = cuda_emu::Schedule::kWarpsAscending;
        } else if (schedule == "warps_descending") {
          sc = cuda_emu::Schedule::kWarpsDescending;
        } else {
          throw py::value_error("schedule must be round_robin, warps_ascending or warps_descending, got " + schedule);
        }
        cuda_emu::configure(sc, cp_async_immediate, mma_truncate);
        cuda_emu::configure_sm90(sm90, sm90_sms, lose_bulk_copies, static_cast<uint64_t>(bulk_delay_us * 1000));
      },
      py::arg("schedule") = "round_robin", py::arg("cp_async_immediate") = false, py::arg("mma_truncate") = false,
      py::arg("sm90") = false, py::arg("sm90_sms") = 2, py::arg("lose_bulk_copies") = false,
      py::arg("bulk_delay_us") = 0.0,
      "How the emulated threads of a block take turns, whether cp.async and bulk tensor copies land when "
      "issued (else at the wait_group covering them / the first failed poll of their mbarrier), whether "
      "mma.sync truncates after every addition (else rounds each output once); sm90: the current device "
      "is the emulated compute capability 9.0 one (device 1, sm90_sms SMs) instead of the 8.0 one "
      "(device 0); lose_bulk_copies: bulk tensor copies never land (a hung copy engine); bulk_delay_us: "
      "each bulk copy lands no earlier than that long (global timer) after its issue.");
  // The emulator's own test kernels (emu_selftest.cu); pointers as ints, as everywhere.
  m.def("selftest_shuffles", [](uintptr_t out) { cuda_emu_selftest::shuffles(as_ptr<int>(out)); });
  m.def("selftest_faults", [](int mode, uintptr_t out) { cuda_emu_selftest::faults(mode, as_ptr<int>(out)); });
  m.def("selftest_sm90_faults", [](int mode) { cuda_emu_selftest::sm90_faults(mode); });
  m.def("selftest_mma_bf16", [](uintptr_t a, uintptr_t bt, uintptr_t d) {
    cuda_emu_selftest::mma_bf16(as_ptr<const uint16_t>(a), as_ptr<const uint16_t>(bt), as_ptr<float>(d));
  });
  m.def(
      "topk_select_block",
      [](const TopkParams& p, uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t row_offset, int64_t col_offset, bool cuda, uintptr_t stream, int threads) {
        need_cuda(cuda);
        py::gil_scoped_release release;
        topk_select_block_cuda(p, make_block(data, dtype, rows, cols, row_stride, col_stride, row_offset, col_offset),
                               as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("data"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("cuda"), py::arg("stream"),
      py::arg("threads"));
  m.def(
      "topk_select_block_segments",
      [](const TopkParams& p, uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t row_offset, int64_t col_offset, int64_t segments, uintptr_t stream,
         uintptr_t row_scale, uintptr_t col_scale, int scale_dtype) {
        py::gil_scoped_release release;
        topk_select_block_segments_cuda(p,
                                        make_scaled_block(data, dtype, rows, cols, row_stride, col_stride, row_offset,
                                                          col_offset, row_scale, col_scale, scale_dtype),
                                        segments, as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("data"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("segments"), py::arg("stream"),
      py::arg("row_scale") = 0, py::arg("col_scale") = 0, py::arg("scale_dtype") = 0);
  m.def(
      "topk_filter_counts",
      [](const TopkParams& p, uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t row_offset, int64_t col_offset, uintptr_t counts, bool cuda, uintptr_t stream,
         int threads) {
        need_cuda(cuda);
        py::gil_scoped_release release;
        topk_filter_counts_cuda(p, make_block(data, dtype, rows, cols, row_stride, col_stride, row_offset, col_offset),
                                as_ptr<int64_t>(counts), as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("data"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("counts"), py::arg("cuda"),
      py::arg("stream"), py::arg("threads"));
  m.def(
      "topk_finalize",
      [](const TopkParams& p, uintptr_t out_scores, uintptr_t out_indices, bool cuda, uintptr_t stream, int threads) {
        need_cuda(cuda);
        py::gil_scoped_release release;
        topk_finalize_cuda(p, as_ptr<double>(out_scores), as_ptr<int64_t>(out_indices), as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("out_scores"), py::arg("out_indices"), py::arg("cuda"), py::arg("stream"),
      py::arg("threads"));
  m.def(
      "topk_merge",
      [](const TopkParams& p, const TopkParams& other, bool cuda, uintptr_t stream, int threads) {
        need_cuda(cuda);
        py::gil_scoped_release release;
        topk_merge_cuda(p, other, as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("other"), py::arg("cuda"), py::arg("stream"), py::arg("threads"));
  m.def(
      "topk_row_bounds",
      [](const TopkParams& p, uintptr_t lo, uintptr_t hi, bool cuda, uintptr_t stream, int threads) {
        need_cuda(cuda);
        py::gil_scoped_release release;
        topk_row_bounds_cuda(p, as_ptr<float>(lo), as_ptr<float>(hi), as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("lo"), py::arg("hi"), py::arg("cuda"), py::arg("stream"), py::arg("threads"));
  m.def(
      "topk_offer_candidates",
      [](const TopkParams& p, uintptr_t scores, uintptr_t cols, uintptr_t counts, int64_t cap, int64_t col_offset,
         bool cuda, uintptr_t stream, int threads) {
        need_cuda(cuda);
        py::gil_scoped_release release;
        topk_offer_candidates_cuda(p, as_ptr<const float>(scores), as_ptr<const int32_t>(cols),
                                   as_ptr<const int32_t>(counts), cap, col_offset, as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("scores"), py::arg("cols"), py::arg("counts"), py::arg("cap"), py::arg("col_offset"),
      py::arg("cuda"), py::arg("stream"), py::arg("threads"));
  m.def(
      "topk_fused_scores",
      [](const FusedBlock& f, uintptr_t stream) {
        py::gil_scoped_release release;
        topk_fused_scores_cuda(f, as_ptr<void>(stream));
      },
      py::arg("block"), py::arg("stream"));
  m.def(
      "topk_rescore_candidates",
      [](const FusedBlock& f, bool cuda, uintptr_t stream, int threads) {
        need_cuda(cuda);
        py::gil_scoped_release release;
        topk_rescore_candidates_cuda(f, as_ptr<void>(stream));
      },
      py::arg("block"), py::arg("cuda"), py::arg("stream"), py::arg("threads"));
  m.def(
      "topk_screen_block",
      [](const TopkParams& p, const ScreenBlock& s, bool cuda, uintptr_t stream, int) {
        need_cuda(cuda);
        topk_screen_block_cuda(p, s, as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("screen"), py::arg("cuda"), py::arg("stream"), py::arg("threads"));
  m.def(
      "topk_screen_block_segments",
      [](const TopkParams& p, const ScreenBlock& s, int64_t segments, uintptr_t stream) {
        topk_screen_block_segments_cuda(p, s, segments, as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("screen"), py::arg("segments"), py::arg("stream"));
  m.def(
      "topk_screen_filter_counts",
      [](const TopkParams& p, const ScreenBlock& s, uintptr_t counts, int, bool cuda, uintptr_t stream) {
        need_cuda(cuda);
        topk_screen_filter_counts_cuda(p, s, as_ptr<int64_t>(counts), as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("screen"), py::arg("counts"), py::arg("threads"), py::arg("cuda") = false,
      py::arg("stream") = 0);
  m.def(
      "canonical_norms",
      [](uintptr_t x, int dtype, int64_t rows, int64_t dim, int64_t stride, uintptr_t out, int, bool cuda,
         uintptr_t stream) {
        need_cuda(cuda);
        canonical_norms_cuda(as_ptr<const void>(x), dtype, rows, dim, stride, as_ptr<double>(out), as_ptr<void>(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("dim"), py::arg("stride"), py::arg("out"),
      py::arg("threads"), py::arg("cuda") = false, py::arg("stream") = 0);
  m.def(
      "canonical_pairs",
      [](uintptr_t q, int64_t q_stride, uintptr_t c, int64_t c_stride, int dtype, int64_t dim, uintptr_t ids,
         int64_t rows, int64_t cols, uintptr_t q_norms, uintptr_t c_norms, uintptr_t out, int, bool cuda,
         uintptr_t stream) {
        need_cuda(cuda);
        canonical_pairs_cuda(as_ptr<const void>(q), q_stride, as_ptr<const void>(c), c_stride, dtype, dim,
                             as_ptr<const int64_t>(ids), rows, cols, as_ptr<const double>(q_norms),
                             as_ptr<const double>(c_norms), as_ptr<float>(out), as_ptr<void>(stream));
      },
      py::arg("q"), py::arg("q_stride"), py::arg("c"), py::arg("c_stride"), py::arg("dtype"), py::arg("dim"),
      py::arg("ids"), py::arg("rows"), py::arg("cols"), py::arg("q_norms"), py::arg("c_norms"), py::arg("out"),
      py::arg("threads"), py::arg("cuda") = false, py::arg("stream") = 0);
  m.def("topk_fused_supported", &topk_fused_supported, py::arg("device"));
  m.def("topk_fused_wgmma_available", &topk_fused_wgmma_available, py::arg("device"));
  m.def("topk_fused_wgmma_ctas_per_sm", &topk_fused_wgmma_ctas_per_sm, py::arg("device"), py::arg("kernel"));
  m.def("topk_fused_wgmma_stalled", &topk_fused_wgmma_stalled, py::arg("device"));
  m.def("topk_fused_wgmma_clear_stall", &topk_fused_wgmma_clear_stall, py::arg("device"));
  m.def("current_device", [] {
    int d = -1;
    cudaGetDevice(&d);
    return d;
  });
  m.def("cuda_device_usable", &cuda_device_usable);
  m.def("property_queries", &cuda_emu::property_queries);
  m.def("reset_counters", &cuda_emu::reset_counters,
        "Zeroes the instruction counters read by atomic_adds and timer_reads.");
  m.def(
      "atomic_adds", [](uintptr_t address) { return cuda_emu::atomic_adds(as_ptr<const void>(address)); },
      py::arg("address"), "atomicAdd calls on this address since reset_counters().");
  m.def(
      "timer_reads", [] {
        py::list out;
        for (int lane = 0; lane < 32; ++lane) out.append(cuda_emu::timer_reads(lane));
        return out;
      },
      "%globaltimer reads per lane (32 counts, any warp) since reset_counters().");
  m.def(
      "info_nce_block",
      [](const InfoNceParams& p, bool backward, uintptr_t data, uintptr_t guide, int dtype, int64_t rows,
         int64_t cols, int64_t row_stride, int64_t col_stride, int64_t guide_row_stride, int64_t guide_col_stride,
         int64_t row_offset, int64_t col_offset, bool cuda, uintptr_t stream, int threads) {
        need_cuda(cuda);
        const PairBlock b = make_pair_block(data, guide, dtype, rows, cols, row_stride, col_stride, guide_row_stride,
                                            guide_col_stride, row_offset, col_offset);
        py::gil_scoped_release release;
        if (backward) return info_nce_backward_block_cuda(p, b, as_ptr<void>(stream));
        info_nce_forward_block_cuda(p, b, as_ptr<void>(stream));
      },
      py::arg("params"), py::arg("backward"), py::arg("data"), py::arg("guide"), py::arg("dtype"), py::arg("rows"),
      py::arg("cols"), py::arg("row_stride"), py::arg("col_stride"), py::arg("guide_row_stride"),
      py::arg("guide_col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("cuda"), py::arg("stream"),
      py::arg("threads"));
}
