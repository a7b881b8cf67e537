// The only file that knows pybind11. Python hands over raw pointers (as ints), sizes, strides, dtype
// codes and CUDA streams; nothing here touches torch. Every kernel call releases the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "topk_select.h"
#include "info_nce.h"
#include "topk_fused_sm90.h"
#include "topk_screen.h"
#include "launch_args.h"
#include "params_check.h"

namespace py = pybind11;
using namespace hnsample;

namespace hnsample {
const char* cpu_isa_name();
#if defined(HNSAMPLE_WITH_CUDA)
bool cuda_device_usable();
#endif
}  // namespace hnsample

namespace {

// Exposes a raw pointer field of a params struct as an int property.
template <typename S, typename P>
void pointer_field(py::class_<S>& cls, const char* name, P* S::*field) {
  cls.def_property(
      name, [field](const S& s) { return reinterpret_cast<uintptr_t>(s.*field); },
      [field](S& s, uintptr_t v) { s.*field = reinterpret_cast<P*>(v); });
}

[[noreturn]] void no_cuda() { throw Error("hnsample was built without CUDA kernels"); }

// A candidate-list block from the launch's plain integers (topk_from_candidates).
CandidateBlock make_candidate_block(uintptr_t scores, int dtype, int64_t rows, int64_t cols, int64_t score_row_stride,
                                    int64_t score_col_stride, uintptr_t ids, int64_t id_row_stride,
                                    int64_t id_col_stride, int64_t row_offset, int64_t num_ids) {
  CandidateBlock b;
  b.scores = as_ptr<const void>(scores);
  b.dtype = dtype;
  b.rows = rows;
  b.cols = cols;
  b.score_row_stride = score_row_stride;
  b.score_col_stride = score_col_stride;
  b.ids = as_ptr<const void>(ids);
  b.id_row_stride = id_row_stride;
  b.id_col_stride = id_col_stride;
  b.row_offset = row_offset;
  b.num_ids = num_ids;
  return b;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hnsample compiled kernels (torch-free; see hnsample/_ext.py)";
  py::register_exception<Error>(m, "KernelError", PyExc_RuntimeError);
  // Registered after KernelError so that it is matched first (pybind11 tries the newest translator first).
  py::register_exception<ParamError>(m, "ParamError", PyExc_ValueError);

  // The codes the kernels take, named as the Python API names them.
  py::enum_<DType>(m, "DType")
      .value("float32", DType::Float32)
      .value("float64", DType::Float64)
      .value("float16", DType::Float16)
      .value("bfloat16", DType::BFloat16)
      .value("int64", DType::Int64);
  py::enum_<Sampling>(m, "Sampling")
      .value("top", Sampling::Top)
      .value("uniform", Sampling::Uniform)
      .value("softmax", Sampling::Softmax);
  py::enum_<SelectMode>(m, "SelectMode").value("window", SelectMode::Window).value("stream", SelectMode::Stream);
  py::enum_<FusedKernel>(m, "FusedKernel")
      .value("auto", FusedKernel::Auto)
      .value("mma", FusedKernel::Mma)
      .value("wgmma", FusedKernel::Wgmma)
      .value("wgmma_256x128", FusedKernel::Wgmma256x128)
      .value("wgmma_128x256", FusedKernel::Wgmma128x256);
  m.def(
      "state_layout",
      [](int64_t k, int64_t skip, int64_t pool, Sampling sampling) {
        const StateLayout l = state_layout(k, skip, pool, sampling);
        return py::make_tuple(l.mode, l.capacity);
      },
      py::arg("k"), py::arg("skip"), py::arg("pool"), py::arg("sampling"),
      "(mode, capacity): the per-row selection state a selection needs (csrc/topk_select.h).");

  py::class_<TopkParams> params(m, "TopkParams");
  params.def(py::init<>())
      .def(
          "configure",
          [](TopkParams& p, int64_t num_rows, int64_t k, int64_t skip, int64_t pool, Sampling sampling) {
            p.num_rows = num_rows;
            p.k = k;
            p.skip = skip;
            p.pool = pool;
            p.sampling = sampling;
            const StateLayout l = state_layout(k, skip, pool, sampling);
            p.mode = l.mode;
            p.capacity = l.capacity;
          },
          py::arg("num_rows"), py::arg("k"), py::arg("skip"), py::arg("pool"), py::arg("sampling"),
          "Sets the selection's shape and derives mode and capacity (the state is [num_rows, capacity]).")
      .def("copy", [](const TopkParams& p) { return p; }, "A copy (the same fields, the same buffers).")
      .def("check", [](const TopkParams& p) { check_params(p); }, "Raises ValueError where a launcher would.")
      .def_readwrite("num_rows", &TopkParams::num_rows)
      .def_readwrite("k", &TopkParams::k)
      .def_readwrite("skip", &TopkParams::skip)
      .def_readwrite("pool", &TopkParams::pool)
      .def_readwrite("capacity", &TopkParams::capacity)
      .def_readwrite("mode", &TopkParams::mode)
      .def_readwrite("sampling", &TopkParams::sampling)
      .def_readwrite("inv_temperature", &TopkParams::inv_temperature)
      .def_readwrite("seed", &TopkParams::seed)
      .def_readwrite("noise_row_offset", &TopkParams::noise_row_offset)
      .def_readwrite("min_score", &TopkParams::min_score)
      .def_readwrite("max_score", &TopkParams::max_score)
      .def_readwrite("banned_stride", &TopkParams::banned_stride)
      .def_readwrite("banned_cols", &TopkParams::banned_cols);
  pointer_field(params, "upper", &TopkParams::upper);
  pointer_field(params, "banned", &TopkParams::banned);
  pointer_field(params, "query_labels", &TopkParams::query_labels);
  pointer_field(params, "candidate_labels", &TopkParams::candidate_labels);
  pointer_field(params, "st_score", &TopkParams::st_score);
  pointer_field(params, "st_index", &TopkParams::st_index);
  pointer_field(params, "st_key", &TopkParams::st_key);
  pointer_field(params, "st_count", &TopkParams::st_count);

  m.def(
      "topk_select_block",
      [](const TopkParams& p, uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t row_offset, int64_t col_offset, bool cuda, uintptr_t stream, int threads) {
        const ScoreBlock b = make_block(data, dtype, rows, cols, row_stride, col_stride, row_offset, col_offset);
        if (!cuda) return topk_select_block_cpu(p, b, threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_select_block_cuda(p, b, as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("data"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("cuda"), py::arg("stream"),
      py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Merges a block of scores into the selection state.");

  m.def(
      "topk_finalize",
      [](const TopkParams& p, uintptr_t out_scores, uintptr_t out_indices, bool cuda, uintptr_t stream, int threads) {
        if (!cuda) return topk_finalize_cpu(p, as_ptr<double>(out_scores), as_ptr<int64_t>(out_indices), threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_finalize_cuda(p, as_ptr<double>(out_scores), as_ptr<int64_t>(out_indices), as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("out_scores"), py::arg("out_indices"), py::arg("cuda"), py::arg("stream"),
      py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Writes each row's k results (sorted by score) and consumes the state.");

  m.def(
      "topk_merge",
      [](const TopkParams& p, const TopkParams& other, bool cuda, uintptr_t stream, int threads) {
        if (!cuda) return topk_merge_cpu(p, other, threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_merge_cuda(p, other, as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("other"), py::arg("cuda"), py::arg("stream"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(), "Folds another state over disjoint candidates into this one.");

  m.def(
      "topk_filter_counts",
      [](const TopkParams& p, uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t row_offset, int64_t col_offset, uintptr_t counts, bool cuda, uintptr_t stream,
         int threads) {
        const ScoreBlock b = make_block(data, dtype, rows, cols, row_stride, col_stride, row_offset, col_offset);
        if (!cuda) return topk_filter_counts_cpu(p, b, as_ptr<int64_t>(counts), threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_filter_counts_cuda(p, b, as_ptr<int64_t>(counts), as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("data"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("counts"), py::arg("cuda"),
      py::arg("stream"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Adds to int64 counts [B, 5] the candidates of a score block each score filter removes "
      "(labels, NaN, min_score, max_score, margin; a candidate counted under the first it fails).");
  // ---- certified screening and canonical scores (csrc/topk_screen.h, csrc/canonical.h) ----
  py::class_<ScreenBlock> screen(m, "ScreenBlock");
  screen.def(py::init<>())
      .def(
          "set_approx",
          [](ScreenBlock& s, uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
             int64_t col_stride, int64_t row_offset, int64_t col_offset) {
            s.approx = make_block(data, dtype, rows, cols, row_stride, col_stride, row_offset, col_offset);
          },
          py::arg("data"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
          py::arg("col_stride"), py::arg("row_offset"), py::arg("col_offset"),
          "The block of approximate scores (float32 or bfloat16).")
      .def_readwrite("rel", &ScreenBlock::rel)
      .def_readwrite("q_stride", &ScreenBlock::q_stride)
      .def_readwrite("c_stride", &ScreenBlock::c_stride)
      .def_readwrite("dtype", &ScreenBlock::dtype)
      .def_readwrite("dim", &ScreenBlock::dim);
  pointer_field(screen, "row_a", &ScreenBlock::row_a);
  pointer_field(screen, "row_e", &ScreenBlock::row_e);
  pointer_field(screen, "row_g", &ScreenBlock::row_g);
  pointer_field(screen, "col_b", &ScreenBlock::col_b);
  pointer_field(screen, "col_f", &ScreenBlock::col_f);
  pointer_field(screen, "col_h", &ScreenBlock::col_h);
  pointer_field(screen, "queries", &ScreenBlock::queries);
  pointer_field(screen, "candidates", &ScreenBlock::candidates);
  pointer_field(screen, "q_norms", &ScreenBlock::q_norms);
  pointer_field(screen, "c_norms", &ScreenBlock::c_norms);
  pointer_field(screen, "rescored", &ScreenBlock::rescored);
  pointer_field(screen, "col_max", &ScreenBlock::col_max);
  screen.def_readwrite("defer_slots", &ScreenBlock::defer_slots);
  pointer_field(screen, "defer_ids", &ScreenBlock::defer_ids);
  pointer_field(screen, "defer_upper", &ScreenBlock::defer_upper);
  pointer_field(screen, "defer_count", &ScreenBlock::defer_count);
  pointer_field(screen, "defer_lower", &ScreenBlock::defer_lower);
  pointer_field(screen, "defer_lower_count", &ScreenBlock::defer_lower_count);
  m.def(
      "topk_screen_flush",
      [](const TopkParams& p, const ScreenBlock& s, uintptr_t table, int64_t blocks, int threads) {
        topk_screen_flush_cpu(p, s, as_ptr<int64_t>(table), blocks, threads);
      },
      py::arg("params"), py::arg("screen"), py::arg("table"), py::arg("blocks"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(),
      "CPU: rescores and offers the deferred survivors of the screen's rows (queries at screen.queries) and "
      "empties their lists; table: int64 [blocks, 5] (first id, rows, rows address, row stride, norms address "
      "or 0) of the candidate blocks they came from, ascending and not overlapping.");
  m.def(
      "topk_screen_block",
      [](const TopkParams& p, const ScreenBlock& s, bool cuda, uintptr_t stream, int threads) {
        if (!cuda) return topk_screen_block_cpu(p, s, threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_screen_block_cuda(p, s, as_ptr<void>(stream));
#else
        (void)stream;
        throw Error("hnsample was built without CUDA");
#endif
      },
      py::arg("params"), py::arg("screen"), py::arg("cuda"), py::arg("stream"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Merges a block of approximate scores into the state: candidates the error bound cannot rule out are "
      "rescored canonically and offered exactly.");
  m.def(
      "topk_screen_block_segments",
      [](const TopkParams& p, const ScreenBlock& s, int64_t segments, uintptr_t stream) {
#if defined(HNSAMPLE_WITH_CUDA)
        topk_screen_block_segments_cuda(p, s, segments, as_ptr<void>(stream));
#else
        (void)p, (void)s, (void)segments, (void)stream;
        throw Error("hnsample was built without CUDA");
#endif
      },
      py::arg("params"), py::arg("screen"), py::arg("segments"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "CUDA: topk_screen_block with the block's columns split into `segments` ranges, range s feeding the "
      "state copy s * B rows past the params' state.");
  m.def(
      "topk_screen_filter_counts",
      [](const TopkParams& p, const ScreenBlock& s, uintptr_t counts, int threads, bool cuda, uintptr_t stream) {
        if (!cuda) return topk_screen_filter_counts_cpu(p, s, as_ptr<int64_t>(counts), threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_screen_filter_counts_cuda(p, s, as_ptr<int64_t>(counts), as_ptr<void>(stream));
#else
        (void)stream;
        throw Error("hnsample was built without CUDA");
#endif
      },
      py::arg("params"), py::arg("screen"), py::arg("counts"), py::arg("threads"), py::arg("cuda") = false,
      py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Adds the per-filter counts of a screened block by the canonical scores (see topk_filter_counts).");
  m.def(
      "canonical_norms",
      [](uintptr_t x, int dtype, int64_t rows, int64_t dim, int64_t stride, uintptr_t out, int threads, bool cuda,
         uintptr_t stream) {
        if (!cuda)
          return canonical_norms_cpu(as_ptr<const void>(x), dtype, rows, dim, stride, as_ptr<double>(out), threads);
#if defined(HNSAMPLE_WITH_CUDA)
        canonical_norms_cuda(as_ptr<const void>(x), dtype, rows, dim, stride, as_ptr<double>(out), as_ptr<void>(stream));
#else
        (void)stream;
        throw Error("hnsample was built without CUDA");
#endif
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("dim"), py::arg("stride"), py::arg("out"),
      py::arg("threads"), py::arg("cuda") = false, py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "Canonical norms sqrt(D(x, x)) of rows with unit column stride (float64 out).");
  m.def(
      "canonical_pairs",
      [](uintptr_t q, int64_t q_stride, uintptr_t c, int64_t c_stride, int dtype, int64_t dim, uintptr_t ids,
         int64_t rows, int64_t cols, uintptr_t q_norms, uintptr_t c_norms, uintptr_t out, int threads, bool cuda,
         uintptr_t stream) {
        if (!cuda)
          return canonical_pairs_cpu(as_ptr<const void>(q), q_stride, as_ptr<const void>(c), c_stride, dtype, dim,
                                     as_ptr<const int64_t>(ids), rows, cols, as_ptr<const double>(q_norms),
                                     as_ptr<const double>(c_norms), as_ptr<float>(out), threads);
#if defined(HNSAMPLE_WITH_CUDA)
        canonical_pairs_cuda(as_ptr<const void>(q), q_stride, as_ptr<const void>(c), c_stride, dtype, dim,
                             as_ptr<const int64_t>(ids), rows, cols, as_ptr<const double>(q_norms),
                             as_ptr<const double>(c_norms), as_ptr<float>(out), as_ptr<void>(stream));
#else
        (void)stream;
        throw Error("hnsample was built without CUDA");
#endif
      },
      py::arg("q"), py::arg("q_stride"), py::arg("c"), py::arg("c_stride"), py::arg("dtype"), py::arg("dim"),
      py::arg("ids"), py::arg("rows"), py::arg("cols"), py::arg("q_norms"), py::arg("c_norms"), py::arg("out"),
      py::arg("threads"), py::arg("cuda") = false, py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "Canonical scores of query i with candidate ids[i, p] (float32 [rows, cols]; -1 gives NaN).");
  m.def(
      "canonical_distances",
      [](uintptr_t a, int64_t a_stride, int64_t a_rows, uintptr_t b, int64_t b_stride, int64_t b_rows, int dtype,
         int64_t dim, uintptr_t a_ids, uintptr_t b_ids, int64_t n, uintptr_t out, int threads) {
        canonical_distances_cpu(as_ptr<const void>(a), a_stride, a_rows, as_ptr<const void>(b), b_stride, b_rows,
                                dtype, dim, as_ptr<const int64_t>(a_ids), as_ptr<const int64_t>(b_ids), n,
                                as_ptr<float>(out), threads);
      },
      py::arg("a"), py::arg("a_stride"), py::arg("a_rows"), py::arg("b"), py::arg("b_stride"), py::arg("b_rows"),
      py::arg("dtype"), py::arg("dim"), py::arg("a_ids"), py::arg("b_ids"), py::arg("n"), py::arg("out"),
      py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Canonical euclidean scores -float32(sqrt(D2)) of rows a[a_ids[t]], b[b_ids[t]] (float32 [n]; CPU).");
  m.def(
      "pair_kth_key",
      [](uintptr_t t, int64_t rows, int64_t cols, int64_t stride, uintptr_t pair_rows, uintptr_t floor,
         int64_t pairs, int64_t k, uintptr_t out, int threads) {
        pair_kth_key_cpu(as_ptr<const float>(t), rows, cols, stride, as_ptr<const int64_t>(pair_rows),
                         as_ptr<const float>(floor), pairs, k, as_ptr<float>(out), threads);
      },
      py::arg("t"), py::arg("rows"), py::arg("cols"), py::arg("stride"), py::arg("pair_rows"), py::arg("floor"),
      py::arg("pairs"), py::arg("k"), py::arg("out"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Per pair, the k-th smallest float32 key >= floor[p] of its row (+inf when fewer than k).");
  m.def(
      "pair_key_columns",
      [](uintptr_t t, int64_t rows, int64_t cols, int64_t stride, uintptr_t pair_rows, uintptr_t lo, uintptr_t hi,
         int64_t pairs, int64_t capacity, uintptr_t out_pairs, uintptr_t out_cols, int threads) {
        return pair_key_columns_cpu(as_ptr<const float>(t), rows, cols, stride, as_ptr<const int64_t>(pair_rows),
                                    as_ptr<const float>(lo), as_ptr<const float>(hi), pairs, capacity,
                                    as_ptr<int64_t>(out_pairs), as_ptr<int64_t>(out_cols), threads);
      },
      py::arg("t"), py::arg("rows"), py::arg("cols"), py::arg("stride"), py::arg("pair_rows"), py::arg("lo"),
      py::arg("hi"), py::arg("pairs"), py::arg("capacity"), py::arg("out_pairs"), py::arg("out_cols"),
      py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "The (pair, column) of every key with lo[p] < t < hi[p] (written when at most capacity); returns the count.");
  m.def("canonical_rounding_factor", &canonical_rounding_factor, py::arg("dim"),
        "Bound on the canonical score's distance to the exact real score, relative to |q| |c|.");
  m.def("uniform_noise", &uniform_noise, py::arg("seed"), py::arg("row"), py::arg("col"),
        "The sampling noise u(seed, row, candidate) in (0, 1), as every backend computes it.");
  m.def("cpu_isa", &cpu_isa_name, "The SIMD path the CPU kernels picked at run time.");
#if defined(HNSAMPLE_WITH_CUDA)
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_usable", &cuda_device_usable);
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_usable", [] { return false; });
#endif

  // ---- CUDA top-k selection: the segmented select launcher used by hnsample/engine/cuda.py ----
  m.def(
      "topk_select_block_segments",
      [](const TopkParams& p, uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t row_offset, int64_t col_offset, int64_t segments, uintptr_t stream,
         uintptr_t row_scale, uintptr_t col_scale, int scale_dtype) {
        const ScoreBlock b = make_scaled_block(data, dtype, rows, cols, row_stride, col_stride, row_offset,
                                               col_offset, row_scale, col_scale, scale_dtype);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_select_block_segments_cuda(p, b, segments, as_ptr<void>(stream));
#else
        (void)b;
        (void)segments;
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("data"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("segments"), py::arg("stream"),
      py::arg("row_scale") = 0, py::arg("col_scale") = 0, py::arg("scale_dtype") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Merges a CUDA block of scores into `segments` state copies, column range s into copy s. row_scale, "
      "col_scale: float32 [rows] and [cols] cosine scales (both or neither; scale_dtype their dtype code): "
      "the score of (r, c) is then (block[r, c] * row_scale[r]) * col_scale[c].");

  // ---- CUDA top-k selection, fused path: row bounds, tensor-core score filter, candidate lists ----
  m.def(
      "topk_row_bounds",
      [](const TopkParams& p, uintptr_t lo, uintptr_t hi, bool cuda, uintptr_t stream, int threads) {
        if (!cuda) return topk_row_bounds_cpu(p, as_ptr<float>(lo), as_ptr<float>(hi), threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_row_bounds_cuda(p, as_ptr<float>(lo), as_ptr<float>(hi), as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("lo"), py::arg("hi"), py::arg("cuda"), py::arg("stream"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Writes each row's float bulk interval [lo, hi] that every candidate the state can take lies in.");
  m.def(
      "topk_offer_candidates",
      [](const TopkParams& p, uintptr_t scores, uintptr_t cols, uintptr_t counts, int64_t cap, int64_t col_offset,
         bool cuda, uintptr_t stream, int threads) {
        if (!cuda)
          return topk_offer_candidates_cpu(p, as_ptr<const float>(scores), as_ptr<const int32_t>(cols),
                                           as_ptr<const int32_t>(counts), cap, col_offset, threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_offer_candidates_cuda(p, as_ptr<const float>(scores), as_ptr<const int32_t>(cols),
                                   as_ptr<const int32_t>(counts), cap, col_offset, as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("scores"), py::arg("cols"), py::arg("counts"), py::arg("cap"), py::arg("col_offset"),
      py::arg("cuda"), py::arg("stream"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Offers per-row candidate lists ([B, cap] float scores and int32 columns, [B] counts) to the state.");
  py::class_<FusedBlock> fused(m, "FusedBlock");
  fused.def(py::init<>())
      .def_readwrite("q_stride", &FusedBlock::q_stride)
      .def_readwrite("c_stride", &FusedBlock::c_stride)
      .def_readwrite("dtype", &FusedBlock::dtype)
      .def_readwrite("rows", &FusedBlock::rows)
      .def_readwrite("cols", &FusedBlock::cols)
      .def_readwrite("dim", &FusedBlock::dim)
      .def_readwrite("cand_cap", &FusedBlock::cand_cap)
      .def_readwrite("kernel", &FusedBlock::kernel)
      .def_readwrite("stages", &FusedBlock::stages);
  pointer_field(fused, "queries", &FusedBlock::queries);
  pointer_field(fused, "candidates", &FusedBlock::candidates);
  pointer_field(fused, "row_lo", &FusedBlock::row_lo);
  pointer_field(fused, "row_hi", &FusedBlock::row_hi);
  pointer_field(fused, "row_scale", &FusedBlock::row_scale);
  pointer_field(fused, "col_scale", &FusedBlock::col_scale);
  pointer_field(fused, "row_slack", &FusedBlock::row_slack);
  pointer_field(fused, "col_slack", &FusedBlock::col_slack);
  pointer_field(fused, "cand_score", &FusedBlock::cand_score);
  pointer_field(fused, "cand_col", &FusedBlock::cand_col);
  pointer_field(fused, "cand_count", &FusedBlock::cand_count);
  m.def(
      "topk_fused_scores",
      [](const FusedBlock& f, uintptr_t stream) {
#if defined(HNSAMPLE_WITH_CUDA)
        topk_fused_scores_cuda(f, as_ptr<void>(stream));
#else
        (void)f;
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("block"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Tensor-core scores q c^T filtered against per-row bounds into per-row candidate lists (CUDA).");
  m.def(
      "topk_rescore_candidates",
      [](const FusedBlock& f, bool cuda, uintptr_t stream, int threads) {
        if (!cuda) return topk_rescore_candidates_cpu(f, threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_rescore_candidates_cuda(f, as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("block"), py::arg("cuda"), py::arg("stream"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Rescores a fused launch's fp32 candidate lists exactly (double sums, scaled, rounded to float).");
  m.attr("fused_max_cols") = py::int_(kFusedMaxCols);
  m.def("tf32_dot_error_factor", &tf32_dot_error_factor, py::arg("dim"),
        "e(d) of the tf32 score bound |s_tc - s| <= e(d) |q| |c| (csrc/topk_select.h).");
#if defined(HNSAMPLE_WITH_CUDA)
  m.def("topk_fused_supported", &topk_fused_supported, py::arg("device"),
        "Whether the device can run the fused kernel (compute capability >= 8.0).");
#else
  m.def("topk_fused_supported", [](int) { return false; }, py::arg("device"));
#endif

  // ---- CUDA top-k selection, fused path: the sm_90a wgmma kernel (csrc/cuda/topk_fused_sm90.cu) ----
#if defined(HNSAMPLE_WITH_CUDA)
  m.def("topk_fused_wgmma_available", &topk_fused_wgmma_available, py::arg("device"),
        "Whether the device runs the wgmma fused kernel (compute capability 9.0 and sm_90a code in this build).");
  m.def("topk_fused_wgmma_stalled", &topk_fused_wgmma_stalled, py::arg("device"),
        "Whether a wait in the wgmma kernel timed out on the device (diagnostic; synchronizes the device).");
  m.def("topk_fused_wgmma_clear_stall", &topk_fused_wgmma_clear_stall, py::arg("device"),
        "Resets the device's wgmma stall flag (after a stall was reported, before timing again).");
  m.def("topk_fused_wgmma_ctas_per_sm", &topk_fused_wgmma_ctas_per_sm, py::arg("device"), py::arg("kernel"),
        "CTAs of a wgmma FusedKernel that run at once on one SM (0 where unavailable).");
#else
  m.def("topk_fused_wgmma_available", [](int) { return false; }, py::arg("device"));
  m.def("topk_fused_wgmma_stalled", [](int) { return false; }, py::arg("device"));
  m.def("topk_fused_wgmma_clear_stall", [](int) {}, py::arg("device"));
  m.def("topk_fused_wgmma_ctas_per_sm", [](int, FusedKernel) { return 0; }, py::arg("device"), py::arg("kernel"));
#endif
  m.def("topk_fused_wgmma_suits", &sm90::wgmma_inputs_suit, py::arg("block"),
        "Whether the wgmma kernel takes a FusedBlock's inputs (dtype, alignment, strides, extents).");
  // The kernel's layout facts, for the CPU tests.
  py::module_ sm90m = m.def_submodule("sm90", "Tile shape and shared-memory layout of the wgmma kernel");
  sm90m.attr("BK") = sm90::kBK;
  const auto tile = [](auto t) {
    using T = decltype(t);
    py::dict d;
    d["BM"] = T::kBM;
    d["BN"] = T::kBN;
    d["ACC"] = T::kAcc;
    d["STAGES"] = T::kStages;
    d["THREADS"] = T::kThreads;
    d["TILE_A_BYTES"] = T::kTileABytes;
    d["STAGE_BYTES"] = T::kStageBytes;
    d["SMEM_BYTES"] = T::kSmemBytes;
    d["CTAS_PER_SM"] = T::kCtasPerSm;
    return d;
  };
  py::dict tiles;  // by FusedKernel
  tiles[py::cast(FusedKernel::Wgmma)] = tile(sm90::TileWide{});
  tiles[py::cast(FusedKernel::Wgmma256x128)] = tile(sm90::TileTall{});
  tiles[py::cast(FusedKernel::Wgmma128x256)] = tile(sm90::TileLong{});
  sm90m.attr("TILES") = tiles;
  sm90m.def("smem_descriptor", &sm90::smem_descriptor, py::arg("start"), py::arg("leading_bytes"),
            py::arg("stride_bytes"), py::arg("base_offset"), py::arg("swizzle"));
  sm90m.def("operand_descriptor", &sm90::operand_descriptor, py::arg("tile_start"), py::arg("k16"));
  sm90m.def("swizzle128", &sm90::swizzle128, py::arg("addr"));
  sm90m.def("tma_element_address", &sm90::tma_element_address, py::arg("tile"), py::arg("row"), py::arg("k"));
  sm90m.def("wgmma_element_address", &sm90::wgmma_element_address, py::arg("desc"), py::arg("row"), py::arg("k"));
  sm90m.def(
      "acc_coord",
      [](int warp, int lane, int reg) {
        return py::make_tuple(sm90::acc_row(warp, lane, reg), sm90::acc_col(lane, reg));
      },
      py::arg("warp"), py::arg("lane"), py::arg("reg"));

  // ---- info_nce: memory-flat contrastive loss block passes -------------------------------------
  py::class_<InfoNceParams> nce(m, "InfoNceParams");
  nce.def(py::init<>())
      .def_readwrite("num_rows", &InfoNceParams::num_rows)
      .def_readwrite("num_cols", &InfoNceParams::num_cols)
      .def_readwrite("positive_stride", &InfoNceParams::positive_stride)
      .def_readwrite("positive_cols", &InfoNceParams::positive_cols)
      .def_readwrite("inv_temperature", &InfoNceParams::inv_temperature)
      .def_readwrite("hardness_alpha", &InfoNceParams::hardness_alpha)
      .def_readwrite("hcl_beta", &InfoNceParams::hcl_beta)
      .def_readwrite("positive_margin", &InfoNceParams::positive_margin)
      .def_readwrite("symmetric", &InfoNceParams::symmetric)
      .def_readwrite("float_exp", &InfoNceParams::float_exp);
  pointer_field(nce, "positive_ids", &InfoNceParams::positive_ids);
  pointer_field(nce, "positive_doc_ids", &InfoNceParams::positive_doc_ids);
  pointer_field(nce, "doc_ids", &InfoNceParams::doc_ids);
  pointer_field(nce, "query_labels", &InfoNceParams::query_labels);
  pointer_field(nce, "doc_labels", &InfoNceParams::doc_labels);
  pointer_field(nce, "upper", &InfoNceParams::upper);
  pointer_field(nce, "guide_upper", &InfoNceParams::guide_upper);
  pointer_field(nce, "row_stats", &InfoNceParams::row_stats);
  pointer_field(nce, "col_stats", &InfoNceParams::col_stats);
  pointer_field(nce, "row_coef", &InfoNceParams::row_coef);
  pointer_field(nce, "col_coef", &InfoNceParams::col_coef);
  pointer_field(nce, "tau_acc", &InfoNceParams::tau_acc);

  m.def(
      "info_nce_block",
      [](const InfoNceParams& p, bool backward, uintptr_t data, uintptr_t guide, int dtype, int64_t rows,
         int64_t cols, int64_t row_stride, int64_t col_stride, int64_t guide_row_stride, int64_t guide_col_stride,
         int64_t row_offset, int64_t col_offset, bool cuda, uintptr_t stream, int threads) {
        const PairBlock b = make_pair_block(data, guide, dtype, rows, cols, row_stride, col_stride, guide_row_stride,
                                            guide_col_stride, row_offset, col_offset);
        if (!cuda) {
          return backward ? info_nce_backward_block_cpu(p, b, threads) : info_nce_forward_block_cpu(p, b, threads);
        }
#if defined(HNSAMPLE_WITH_CUDA)
        if (backward) return info_nce_backward_block_cuda(p, b, as_ptr<void>(stream));
        info_nce_forward_block_cuda(p, b, as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("backward"), py::arg("data"), py::arg("guide"), py::arg("dtype"), py::arg("rows"),
      py::arg("cols"), py::arg("row_stride"), py::arg("col_stride"), py::arg("guide_row_stride"),
      py::arg("guide_col_stride"), py::arg("row_offset"), py::arg("col_offset"), py::arg("cuda"), py::arg("stream"),
      py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Forward: folds a score block into the InfoNCE statistics. Backward: turns the recomputed block "
      "into dL/ds in place and accumulates the temperature gradient terms.");

  // ---- topk_from_candidates: per-row candidate lists (csrc/cpu/topk_candidates.cpp) ----
  m.attr("CANDIDATE_FILTERS") = kCandidateFilters;
  m.def(
      "topk_candidates_select",
      [](const TopkParams& p, uintptr_t scores, int dtype, int64_t rows, int64_t cols, int64_t score_row_stride,
         int64_t score_col_stride, uintptr_t ids, int64_t id_row_stride, int64_t id_col_stride, int64_t row_offset,
         int64_t num_ids, bool cuda, uintptr_t stream, int threads) {
        const CandidateBlock b = make_candidate_block(scores, dtype, rows, cols, score_row_stride, score_col_stride,
                                                      ids, id_row_stride, id_col_stride, row_offset, num_ids);
        if (!cuda) return topk_candidates_select_cpu(p, b, threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_candidates_select_cuda(p, b, as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("scores"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("score_row_stride"), py::arg("score_col_stride"), py::arg("ids"), py::arg("id_row_stride"),
      py::arg("id_col_stride"), py::arg("row_offset"), py::arg("num_ids"), py::arg("cuda"), py::arg("stream"),
      py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Offers per-row candidate lists ([rows, cols] scores of any float dtype and int64 ids, -1 = padding) "
      "to the state rows [row_offset, row_offset + rows).");
  m.def(
      "topk_candidates_filter_counts",
      [](const TopkParams& p, uintptr_t scores, int dtype, int64_t rows, int64_t cols, int64_t score_row_stride,
         int64_t score_col_stride, uintptr_t ids, int64_t id_row_stride, int64_t id_col_stride, int64_t row_offset,
         int64_t num_ids, uintptr_t counts, bool cuda, uintptr_t stream, int threads) {
        const CandidateBlock b = make_candidate_block(scores, dtype, rows, cols, score_row_stride, score_col_stride,
                                                      ids, id_row_stride, id_col_stride, row_offset, num_ids);
        if (!cuda) return topk_candidates_filter_counts_cpu(p, b, as_ptr<int64_t>(counts), threads);
#if defined(HNSAMPLE_WITH_CUDA)
        topk_candidates_filter_counts_cuda(p, b, as_ptr<int64_t>(counts), as_ptr<void>(stream));
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("params"), py::arg("scores"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("score_row_stride"), py::arg("score_col_stride"), py::arg("ids"), py::arg("id_row_stride"),
      py::arg("id_col_stride"), py::arg("row_offset"), py::arg("num_ids"), py::arg("counts"), py::arg("cuda"),
      py::arg("stream"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Adds to int64 counts [B, 6] the listed candidates each filter removes (banned ids, labels, NaN, "
      "min_score, max_score, margin; each under the first it fails).");
}
