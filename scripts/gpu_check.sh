#!/usr/bin/env bash
# GPU check for jattn: ONE script for an NVIDIA GPU machine (H100/H200; no network).
#
# Default (issue 13, the Pallas flex kernels): prints the GPU and JAX's devices, runs
# the Pallas kernels' GPU tests (tests/test_pallas_gpu.py: Triton-compiled band and
# flex kernels against the reference and dense), then scripts/gpu_pallas.py --flex
# (pallas vs chunked: plain causal, ALiBi, learned relative bias, document mask_mod,
# soft-cap, dropout 0.1; forward and forward+backward at T=4096) and its one table.
#
#   bash scripts/gpu_check.sh                   # on the GPU machine (~5 minutes)
#   bash scripts/gpu_check.sh --dry-run         # anywhere (CPU): the same steps, tiny
#                                               # (GPU tests skip; the interpreter, T=128)
#   bash scripts/gpu_check.sh --suite           # the whole test suite, then the GPU
#   bash scripts/gpu_check.sh --suite --dry-run # benchmark (configs/bench_gpu.yaml);
#                                               # dry: tests/test_benchmark.py, bench_smoke
#
# Needs python3 with jax (CUDA), flax, optax, pytest, hypothesis, pyyaml, rich,
# matplotlib and psutil; jattn need not be installed (PYTHONPATH=. is used).
# Environment: PYTHON (python3), OUT (runs; results go to $OUT/bench_gpu),
# TOTAL_S (460: the script's target length in seconds), PYTEST_TIMEOUT (150).
#
# Budget, about 8 minutes at most: the tests are stopped after PYTEST_TIMEOUT s; the
# benchmark starts no case after TOTAL_S - (time so far) - 90 s (its time_budget_s),
# each case is stopped after 60 s (timeout_s in the config), and a hard `timeout`
# backs that up.  Cases the budget cuts are skipped rows in the table.  Seen on an
# H200: ~5 s a case, so with the tests using their whole 150 s the benchmark covers
# about 40 of its 64 cases (T=16384 and 4096 first); run
# `python3 -m experiments.benchmark --config configs/bench_gpu.yaml` for all of them.
set -u
cd "$(dirname "$0")/.."

DRY=0
SUITE=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --suite) SUITE=1 ;;
    *) echo "unknown argument: $arg"; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs}
TOTAL_S=${TOTAL_S:-460}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-150}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  TESTS=(tests/test_benchmark.py -p no:xdist)
  CONFIG=configs/bench_smoke.yaml
  BENCH_OUT=$OUT_DIR/bench_gpu_dryrun
else
  TESTS=()
  CONFIG=configs/bench_gpu.yaml
  BENCH_OUT=$OUT_DIR/bench_gpu
fi

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi: not found or no GPU)"
"$PY" -c "import jax; print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())"

if [ "$SUITE" = 0 ]; then
  echo "== Pallas GPU tests (stopped after ${PYTEST_TIMEOUT} s)"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$PYTEST_TIMEOUT" \
    "$PY" -m pytest -q -p no:cacheprovider -p no:xdist -rs tests/test_pallas_gpu.py
  rc_tests=$?
  [ "$rc_tests" = 124 ] && echo "tests: stopped by the ${PYTEST_TIMEOUT} s limit"
  budget=$(( TOTAL_S - SECONDS - 60 ))
  [ "$budget" -lt 60 ] && budget=60
  echo "== flex benchmark: scripts/gpu_pallas.py --flex (no row starts after ${budget} s)"
  DRY_ARG=()
  [ "$DRY" = 1 ] && DRY_ARG=(--dry-run)
  timeout $(( budget + 120 )) "$PY" scripts/gpu_pallas.py "$budget" --flex "${DRY_ARG[@]}"
  rc_bench=$?
  echo
  echo "tests exit $rc_tests (124: time limit; 5: none collected), benchmark exit $rc_bench; ${SECONDS} s in all"
  { [ "$rc_tests" = 0 ] || [ "$rc_tests" = 5 ]; } && [ "$rc_bench" = 0 ]
  exit $?
fi

echo "== tests (stopped after ${PYTEST_TIMEOUT} s)"
# The tests allocate GPU memory as they go (no 75% preallocation), so that processes
# they start have room; the benchmark keeps JAX's default (one case at a time).
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$PYTEST_TIMEOUT" \
  "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
rc_tests=$?
[ "$rc_tests" = 124 ] && echo "tests: stopped by the ${PYTEST_TIMEOUT} s limit"

budget=$(( TOTAL_S - SECONDS - 90 ))
[ "$budget" -lt 60 ] && budget=60
echo "== benchmark: $CONFIG -> $BENCH_OUT (no case starts after ${budget} s)"
timeout $(( budget + 150 )) "$PY" -m experiments.benchmark --config "$CONFIG" --out "$BENCH_OUT" \
  "time_budget_s=$budget"
rc_bench=$?
if [ ! -f "$BENCH_OUT/results.md" ] && [ -f "$BENCH_OUT/results.json" ]; then
  echo "benchmark stopped early (exit $rc_bench); the table from what it measured:"
  "$PY" -m experiments.benchmark --report "$BENCH_OUT"
fi

echo "== results ($BENCH_OUT/results.md)"
cat "$BENCH_OUT/results.md" 2>/dev/null || echo "(no results.md)"
echo
echo "tests exit $rc_tests (124: time limit), benchmark exit $rc_bench; ${SECONDS} s in all"
[ "$rc_tests" = 0 ] && [ "$rc_bench" = 0 ]
