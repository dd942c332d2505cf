#!/usr/bin/env bash
# Several commands side by side, one GPU each, under one time limit: a device session's whole
# check-and-time batch in one call (each GPU of a lent machine busy, every job's output kept even
# when another one hangs).
#
#   scripts/gpu_jobs.sh LIMIT_S OUT_DIR "command on GPU 0" "command on GPU 1" ...
#   scripts/gpu_jobs.sh 540 $OUT "PASSES=default scripts/gpu_tests.sh \$JOB_OUT/tests" \
#       "python3 benchmarks/attention.py --seqs 131072 --kv-heads 32 --persistent"
#
# Job i runs with CUDA_VISIBLE_DEVICES=i (a command may chain several programs with ';' or '&&'), its
# stdout and stderr in OUT_DIR/job<i>.txt, JOB_OUT=OUT_DIR/job<i>/ for its own files; each is stopped
# at LIMIT_S seconds. Then everything is packed into OUT_DIR.tgz (files over 4 MB left out, listed in
# OUT_DIR/left_out.txt) and OUT_DIR removed: one file comes back from a device call, whatever the jobs
# wrote. If ./.whl holds wheels (../shared/tools/gpu-wheels.sh), they are installed first into
# /tmp/site, on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 3 ]] || { echo "usage: $0 LIMIT_S OUT_DIR COMMAND [COMMAND ...]" >&2; exit 2; }
limit=$1 out=$2
shift 2
mkdir -p "$out"
source scripts/use_wheels.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; git log --oneline -1; } > "$out/machine.txt" 2>&1
i=0
for cmd in "$@"; do
  mkdir -p "$out/job$i"
  (export CUDA_VISIBLE_DEVICES=$i JOB_OUT="$out/job$i"; echo "\$ $cmd" > "$out/job$i.txt"
   start=$(date +%s)
   timeout -k 10 "$limit" bash -c "$cmd" >> "$out/job$i.txt" 2>&1
   echo "[gpu_jobs] exit $? after $(( $(date +%s) - start )) s" >> "$out/job$i.txt") &
  i=$((i + 1))
done
wait
find "$out" -type f -size +4M -print -delete > "$out/left_out.txt"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
echo "[gpu_jobs] $i job(s); results in $out.tgz"
