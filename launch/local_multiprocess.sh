#!/usr/bin/env bash
# N processes on this machine as one JAX run: how a multi-host job behaves, on one host.
#
#   launch/local_multiprocess.sh NUM_PROCESSES [DEVICES_PER_PROCESS] -- COMMAND...
#   launch/local_multiprocess.sh 2 2 -- python -m longgen_jax.train --config=configs/tiny.py --workdir=w \
#       --config.mesh.data=2 --config.mesh.fsdp=2
#
# Each process gets LONGGEN_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID (parallel/runtime.py:initialize
# joins them). With JAX_PLATFORMS=cpu each process gets DEVICES_PER_PROCESS forced CPU devices (CI runs
# this); otherwise process i gets GPUs i*D .. i*D+D-1 (LONGGEN_JAX_LOCAL_DEVICES). Output lines are
# prefixed with the process id; if one process fails the others are stopped and the exit status is its.
set -uo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES [DEVICES_PER_PROCESS] -- COMMAND..." >&2; exit 2
fi
n=$1; shift
d=1
if [[ $1 != "--" ]]; then d=$1; shift; fi
if [[ $1 != "--" ]]; then echo "$0: expected -- before the command" >&2; exit 2; fi
shift
port=${LONGGEN_JAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  if [[ ${JAX_PLATFORMS:-} == cpu ]]; then
    devices=(XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$d")
  else
    devices=(LONGGEN_JAX_LOCAL_DEVICES="$(seq -s, $((i * d)) $((i * d + d - 1)))")
  fi
  env LONGGEN_JAX_COORDINATOR="localhost:$port" LONGGEN_JAX_NUM_PROCESSES="$n" LONGGEN_JAX_PROCESS_ID="$i" \
    "${devices[@]}" "$@" > >(sed -u "s/^/[process $i] /") 2> >(sed -u "s/^/[process $i] /" >&2) &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}"
  rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; cleanup; fi
done
exit $status
