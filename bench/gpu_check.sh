#!/usr/bin/env bash
# What only a GPU can check, in one run (< 10 minutes): build the extension for this GPU,
# run the CUDA tests and every method on the cuda and triton backends on it, the fused
# optimizer's kernels on the device, the device checks of bench/gpu_check.py (NaN swap on
# the device, graph capture and replay after 40 other list signatures, the device guard
# with 2+ GPUs, list kernel GB/s against a device-to-device copy, swap and lerp rounding
# against the CPU reference), and `belay-kernels bench --quick`. Logs and results go to bench/results/gpu/. Without a GPU
# it says so and exits 0.
#
#   bash bench/gpu_check.sh             # on a GPU machine, from anywhere
#   bash bench/gpu_check.sh --dry-run   # print the steps, check the script (CI does this)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=bench/results/gpu
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s): $*"
  [ "$DRY" = 1 ] && return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || FAILED=1
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
}

if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing to check (run it on a GPU machine)."
    exit 0
  fi
  mkdir -p "$OUT"
  : > "$OUT/summary.txt"
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
else
  ARCH="<this GPU's compute capability>"
fi

step build 200 env TORCH_CUDA_ARCH_LIST="$ARCH" BELAY_KERNELS_CPP=1 BELAY_KERNELS_CUDA=1 \
  MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
step tests 90 env BELAY_KERNELS_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_extension_cuda.py tests/test_extension_ops.py tests/test_averagers.py
# every method on the device through the cuda and triton backends, against the reference
step device_backends 120 env BELAY_KERNELS_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_backends.py tests/test_multi_ema.py -k "cuda or triton"
# the fused optimizer's kernels (cuda, triton) against torch's optimizer then the averager
step fused 120 env BELAY_KERNELS_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_fused.py -k "device"
step checks 60 "$PY" bench/gpu_check.py --out "$OUT"
step bench 90 "$PY" -m belay_kernels.cli bench --quick --device cuda --no-plot --out "$OUT/bench"

if [ "$DRY" = 1 ]; then
  "$PY" bench/gpu_check.py --dry-run
  exit $?
fi
echo "gpu_check: results in $OUT (summary.txt, checks.json, bench/)"
exit $FAILED
