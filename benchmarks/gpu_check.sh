#!/usr/bin/env bash
# One-call device check for the CUDA top-k paths (stage limits sum to 425 s, 470 s when the sanitizer
# needs its retry; no network):
#   build + install (sm_90a only, to halve compile time; the wgmma kernel needs the arch-specific target)
#   -> per-kernel resource usage and a count of the wgmma instructions in the SASS -> GPU tests (the
#   wgmma kernel's file first, in its own process, so a fault there cannot take the other tests' CUDA
#   context with it) -> the fused score kernels alone (benchmarks/bench_wgmma.py) -> compute-sanitizer
#   memcheck on a small case -> correctness + timing table (benchmarks/gpu_check.py).
# Logs and JSON go to $OUT (default /tmp/gpu_check_out); the table is printed last. Each stage has its own
# time limit and the script goes on after a failed stage, so one run reports everything it can.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
declare -A RC
stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  echo "== $name: rc=${RC[$name]} ($((SECONDS - t0)) s)"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader || true
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a-real -DHNSAMPLE_PTXAS_VERBOSE=ON" HNSAMPLE_CUDA=ON \
  stage build 100 "$PY" -m pip install --no-build-isolation --no-deps -v .
if [ "${RC[build]}" != 0 ]; then  # an image whose CMake or nvcc refuses 90a: the rest still runs on sm_90
  tail -n 25 "$OUT/build.log"
  mv "$OUT/build.log" "$OUT/build_90a.log"
  CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90-real -DHNSAMPLE_PTXAS_VERBOSE=ON" HNSAMPLE_CUDA=ON \
    stage build 100 "$PY" -m pip install --no-build-isolation --no-deps -v .
fi
grep -E "ptxas info|spill|registers" "$OUT/build.log" | sed 's/^ *//' | sort -u > "$OUT/resource_usage.txt" || true
# HGMMA = wgmma in SASS; 0 means the sm_90a kernel is not in the binary (a build without 90a).
SO=$(cd /tmp && "$PY" -c "import hnsample._C as C; print(C.__file__)" 2>/dev/null)  # not the source tree
{ cuobjdump --dump-sass "$SO" | grep -c HGMMA; } > "$OUT/sass_hgmma_count.txt" 2>&1 || true
echo "HGMMA instructions in SASS: $(head -c 40 "$OUT/sass_hgmma_count.txt")"
WGMMA_TESTS=tests/test_topk_fused_sm90.py
gpu_tests() {
  timeout 50 "$PY" -m pytest -m gpu -q -p no:cacheprovider "$WGMMA_TESTS"
  local a=$?
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --ignore="$WGMMA_TESTS" tests
  local b=$?
  return $((a != 0 || b != 0))
}
export -f gpu_tests
export PY WGMMA_TESTS
stage pytest 150 bash -c gpu_tests
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -n 4
tail -n 15 "$OUT/pytest.log"
# The fused score kernels alone (mma.sync; wgmma 128x128, 256x128, 128x256) against torch.mm, main shape.
stage wgmma_bench 30 "$PY" benchmarks/bench_wgmma.py --out "$OUT"
sed -n '/^B=/,$p' "$OUT/wgmma_bench.log"
[ "${RC[wgmma_bench]}" = 0 ] || tail -n 20 "$OUT/wgmma_bench.log"
# Only hnsample's kernels are instrumented (cuBLAS under memcheck is slow); without the filter option
# (an older sanitizer) the whole case is checked.
SAN=(compute-sanitizer --tool memcheck --error-exitcode 3)
stage memcheck 45 "${SAN[@]}" --kernel-name kns=hnsample "$PY" benchmarks/gpu_check.py --memcheck
if grep -qiE "unrecognized|unknown option|invalid option" "$OUT/memcheck.log"; then
  stage memcheck 45 "${SAN[@]}" "$PY" benchmarks/gpu_check.py --memcheck
fi
grep -E "ERROR SUMMARY|Invalid|memcheck case done" "$OUT/memcheck.log" | head -n 5
stage bench 100 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s 75
sed -n '/TFLOP\/s, copy/,$p' "$OUT/bench.log"
[ "${RC[bench]}" = 0 ] || tail -n 30 "$OUT/bench.log"
echo "build=${RC[build]} pytest=${RC[pytest]} wgmma_bench=${RC[wgmma_bench]} memcheck=${RC[memcheck]} bench=${RC[bench]}"
