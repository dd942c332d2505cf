#!/usr/bin/env bash
# The GPU-only tests (they skip on CPU), as the device sessions run them: every GPU test file with the
# default kernels (the backward's per-kernel Mosaic/Triton choice, LONGGEN_JAX_MGPU_BACKWARD unset =
# auto), then the Pallas ones again with the Triton backward and segment paths alone
# (LONGGEN_JAX_MGPU_BACKWARD=0 LONGGEN_JAX_MGPU_SEGMENTS=0, the Ampere path), with both
# Mosaic backward kernels (=1), and the segment-id tests with the Mosaic segment paths on for every
# pattern (LONGGEN_JAX_MGPU_SEGMENTS=1; by default the kinds in pallas_mgpu.SEGMENT_KINDS take them), and
# with the persistent Mosaic forward routed for every pattern (LONGGEN_JAX_MGPU_PERSISTENT=1, opt-in).
#
#   scripts/gpu_tests.sh [OUT_DIR]     # logs in OUT_DIR (default gpu_tests/), a summary line per pass
#   PASSES=mgpu_backward scripts/gpu_tests.sh OUT   # chosen passes only (default: all five)
#
# Tests run on several pytest workers (pytest-xdist) with a per-test limit (pytest-timeout, where
# installed): a hang fails one test, not the run. A Mosaic GPU kernel compiles in 1-4 s on an H100; one
# test that takes tens of seconds is compiling something op by op: jit it. Each pass took 1.5-4.5 min
# on one H200 (8 workers, 2026-11-27: 144 tests in 261 s, the Mosaic backward's 132 in 197 s): ~5 min a pass;
# on a machine of several GPUs give each pass its own (CUDA_VISIBLE_DEVICES=i PASSES=name ...).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_tests}
mkdir -p "$out"
# No autotuning: these tests check numbers, not speed, and each float32 reference compile would autotune.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0"
py=${PYTHON:-python3}
# -v: a line per finished test names it, so a pass cut off by an outer time limit still says which
# tests failed (the failures' tracebacks come only at the end).
args=(-v -p no:cacheprovider -rfE --durations=15)
$py -c "import xdist" 2>/dev/null && args+=(-n "${WORKERS:-4}")
$py -c "import pytest_timeout" 2>/dev/null && args+=(--timeout "${TEST_TIMEOUT:-180}")
status=0
run() {  # name, env, test files...
  local name=$1 env=$2; shift 2
  env $env $py -m pytest "${args[@]}" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "[gpu_tests] $name: $(tail -n 1 "$out/$name.log") (exit $rc, log $out/$name.log)"
  grep -E "(FAILED|ERROR) tests/" "$out/$name.log" | sed 's/^/[gpu_tests]   /' | sort -u
  [[ $rc -ne 0 ]] && status=$rc
}
# A pass per backward setting, one for the Mosaic segment paths on every pattern and one for the persistent
# programs, so one's failure holds back no other.
passes=" ${PASSES:-default triton mgpu_backward mgpu_segments persistent} "
[[ $passes == *" default "* ]] && run default "LONGGEN_JAX_MGPU_BACKWARD=auto" tests/test_pallas_gpu.py tests/test_pallas_mgpu.py tests/test_generate.py
[[ $passes == *" triton "* ]] && run triton "LONGGEN_JAX_MGPU_BACKWARD=0 LONGGEN_JAX_MGPU_SEGMENTS=0" tests/test_pallas_gpu.py
[[ $passes == *" mgpu_backward "* ]] && run mgpu_backward "LONGGEN_JAX_MGPU_BACKWARD=1" tests/test_pallas_gpu.py tests/test_pallas_mgpu.py
[[ $passes == *" persistent "* ]] && run persistent "LONGGEN_JAX_MGPU_PERSISTENT=1" tests/test_pallas_gpu.py tests/test_pallas_mgpu.py
[[ $passes == *" mgpu_segments "* ]] && run mgpu_segments "LONGGEN_JAX_MGPU_BACKWARD=1 LONGGEN_JAX_MGPU_SEGMENTS=1" tests/test_pallas_gpu.py tests/test_pallas_mgpu.py -k "seg"
exit $status
