#!/usr/bin/env bash
# One-shot GPU check (no network needed): build the CUDA extension, run every GPU test, run every
# benchmarks/*_gpu.py, write logs + tables to $OUT and print a short summary last.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from anywhere; ~7 minutes on an H200
#   GPU_TESTS="tests/test_x.py" GPU_BENCHES="benchmarks/bench_x_gpu.py" GPU_CHECK_BUDGET_S=300 ...  # a subset
#   BENCH_ARGS_<name>="..." (arguments for benchmarks/<name>.py), GPU_DIAG_CMD="..." (a command run after the
#   build, its output in diag.log), COPSD_SKIP_CPU=1 (build the CUDA extension only: saves about a minute)
#
# The GPU tests run under pytest-xdist (PYTEST_WORKERS, default 8) where it is installed: most of their time is
# Triton compiling kernels on the CPU, one process at a time otherwise.  The benchmarks run one after another,
# alone on the GPU, in the order of GPU_BENCHES (most wanted first: a stage that would start past the budget is
# skipped and says so in the summary).
#
# Each stage has its own timeout and runs even if an earlier one failed.  Files in $OUT:
#   build.log (environment + pip build + extension import), pytest_gpu.log, bench_<name>.log per
#   benchmark, bench_loss_gpu.{json,md}, summary.txt; at the end all of them are packed into
#   gpu_check_logs.tar.gz and only summary.txt, pytest_gpu.log and the benchmark tables stay beside it
#   (GPU_CHECK_PACK=0 keeps every file).
# Wheels carried in .whl/ (Liger-Kernel for bench_loss_gpu; TRL, datasets, dill and multiprocess for
# bench_e2e_gpu) are installed without network into /tmp/site.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
export OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
PY=${PYTHON:-python3}
T0=$(date +%s)
TOTAL=${GPU_CHECK_BUDGET_S:-480}
SUMMARY=()

remaining() { echo $((TOTAL - ($(date +%s) - T0))); }

# stage NAME CAP_SECONDS LOGFILE CMD...   (appends to LOGFILE; prints its tail)
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local rem lim start rc el
  rem=$(remaining)
  lim=$((cap < rem ? cap : rem))
  if [ "$lim" -lt 15 ]; then
    SUMMARY+=("$(printf '%-28s %-14s %6s  %s' "$name" "SKIPPED(time)" "-" "$log")")
    return
  fi
  start=$(date +%s)
  echo "===== $name (timeout ${lim}s): $*" | tee -a "$OUT/$log"
  timeout -k 10 "$lim" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  el=$(($(date +%s) - start))
  local status="ok"
  [ "$rc" -ne 0 ] && status="FAIL rc=$rc"
  [ "$rc" -eq 124 ] && status="TIMEOUT"
  echo "===== $name: $status after ${el}s" | tee -a "$OUT/$log"
  tail -n "${TAIL_LINES:-25}" "$OUT/$log" | cut -c1-300
  SUMMARY+=("$(printf '%-28s %-14s %5ss  %s' "$name" "$status" "$el" "$log")")
}

# ---------------------------------------------------------------- environment + Liger wheel
{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1
  nvcc --version 2>&1 | tail -n 2
} >"$OUT/build.log" 2>&1
cat "$OUT/build.log"

if ls .whl/*.whl >/dev/null 2>&1; then
  stage "install carried wheels" 60 build.log $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
fi

# ---------------------------------------------------------------- build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then  # a dry run of this script on a machine where copsd is built
  echo "build skipped (GPU_CHECK_SKIP_BUILD=1)" | tee -a "$OUT/build.log"
else
  stage "build (pip install -e .)" 200 build.log $PY -m pip install --no-build-isolation --no-deps -v -e .
fi
stage "import extensions" 60 build.log $PY -c "
import torch, copsd
print('copsd from', copsd.__file__)
try:
    import copsd._cuda
    print('copsd._cuda OK; topk_merge:', torch.ops.copsd_cuda.topk_merge)
except Exception as e:
    import traceback; traceback.print_exc(); raise
import copsd_kernels; print('copsd_kernels from', copsd_kernels.__file__)
from copsd.backends import available_backends; print('backends:', available_backends())
"
# If the editable install failed, the tests still import the source tree (no CUDA extension then).
if ! $PY -c "import copsd" >/dev/null 2>&1; then
  echo "copsd not importable after install: using the source tree via PYTHONPATH" | tee -a "$OUT/build.log"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------- optional diagnosis (GPU_DIAG_CMD)
if [ -n "${GPU_DIAG_CMD:-}" ]; then
  TAIL_LINES=40 stage "diagnosis" "${GPU_DIAG_CAP_S:-60}" diag.log bash -c "$GPU_DIAG_CMD"
fi

# ---------------------------------------------------------------- GPU tests (all engineers)
XDIST=()
if [ "${PYTEST_WORKERS:-8}" -gt 1 ] && $PY -c "import xdist" >/dev/null 2>&1; then
  XDIST=(-n "${PYTEST_WORKERS:-8}")
fi
TAIL_LINES=40 stage "pytest -m gpu tests/" "${PYTEST_CAP_S:-220}" pytest_gpu.log \
  $PY -m pytest -v -m gpu ${GPU_TESTS:-tests/} "${XDIST[@]}" -p no:cacheprovider --tb=long -rfEs --durations=15

# ---------------------------------------------------------------- benchmarks
DEFAULT_BENCHES="benchmarks/bench_loss_gpu.py benchmarks/bench_e2e_gpu.py benchmarks/bench_prefix_gpu.py"
for b in benchmarks/*_gpu.py; do  # any other GPU benchmark after those
  case " $DEFAULT_BENCHES " in *" $b "*) ;; *) DEFAULT_BENCHES="$DEFAULT_BENCHES $b" ;; esac
done
for b in ${GPU_BENCHES:-$DEFAULT_BENCHES}; do
  [ -e "$b" ] || continue
  name=$(basename "$b" .py)
  cap=60
  [ "$name" = "bench_loss_gpu" ] && cap=200
  [ "$name" = "bench_e2e_gpu" ] && cap=170
  [ "$name" = "bench_prefix_gpu" ] && cap=100
  args_var="BENCH_ARGS_$name"  # e.g. BENCH_ARGS_bench_e2e_gpu="--steps 1"
  # shellcheck disable=SC2086  # the arguments are meant to split
  TAIL_LINES=12 stage "$name" "$cap" "$name.log" $PY "$b" ${!args_var:-}
done

# ---------------------------------------------------------------- summary (printed last)
{
  echo
  echo "================ gpu_check summary ($(($(date +%s) - T0))s total, budget ${TOTAL}s) ================"
  grep -m1 "^python" "$OUT/build.log"
  printf '%s\n' "${SUMMARY[@]}"
  echo "---- pytest result lines:"
  grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/pytest_gpu.log" | tail -n 25 | cut -c1-250
  for md in bench_loss_gpu.md bench_e2e_gpu.md; do
    [ -f "$OUT/$md" ] && { echo "---- $md:"; cat "$OUT/$md"; }
  done
  for log in bench_prefix_gpu.log bench_attention_gpu.log; do
    [ -f "$OUT/$log" ] && { echo "---- $log (end):"; tail -n 8 "$OUT/$log" | cut -c1-250; }
  done
} | tee "$OUT/summary.txt"

# ---------------------------------------------------------------- pack (the device tool returns at most 8 files)
# Everything goes into one archive; the summary, the test log and the benchmark tables also stay as plain files.
if [ "${GPU_CHECK_PACK:-1}" = 1 ]; then
  (
    cd "$OUT" || exit 1
    tar czf gpu_check_logs.tar.gz --exclude=gpu_check_logs.tar.gz -- * &&
      find . -maxdepth 1 -type f ! -name gpu_check_logs.tar.gz ! -name summary.txt ! -name pytest_gpu.log \
        ! -name bench_loss_gpu.md ! -name bench_e2e_gpu.md -delete
  )
fi
