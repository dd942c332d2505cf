#!/usr/bin/env bash
# The GPU-only tests (they skip on CPU), as the device sessions run them: every GPU test file with the
# default kernels, then the Pallas ones again with the opt-in Mosaic GPU paths switched on: the backward
# (LONGGEN_JAX_MGPU_BACKWARD=1) and the forward with segment ids (LONGGEN_JAX_MGPU_SEGMENTS=1); their
# defaults stay off until this second pass is green.
#
#   scripts/gpu_tests.sh [OUT_DIR]     # logs in OUT_DIR (default gpu_tests/), a summary line per pass
#
# Tests run on several pytest workers (pytest-xdist) with a per-test limit (pytest-timeout, where
# installed): a hang fails one test, not the run. A test takes seconds (each Mosaic GPU kernel compiles
# in 1-4 s on an H100); one that takes tens of seconds is compiling something op by op: jit it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_tests}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
args=(-q -p no:cacheprovider -rfE)
$py -c "import xdist" 2>/dev/null && args+=(-n "${WORKERS:-4}")
$py -c "import pytest_timeout" 2>/dev/null && args+=(--timeout "${TEST_TIMEOUT:-180}")
status=0
run() {  # name, env, test files...
  local name=$1 env=$2; shift 2
  env $env $py -m pytest "${args[@]}" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "[gpu_tests] $name: $(tail -n 1 "$out/$name.log") (exit $rc, log $out/$name.log)"
  [[ $rc -ne 0 ]] && status=$rc
}
run default "LONGGEN_JAX_MGPU_BACKWARD=0" tests/test_pallas_gpu.py tests/test_pallas_mgpu.py tests/test_generate.py
run mgpu_opt_in "LONGGEN_JAX_MGPU_BACKWARD=1 LONGGEN_JAX_MGPU_SEGMENTS=1" tests/test_pallas_gpu.py tests/test_pallas_mgpu.py
exit $status
