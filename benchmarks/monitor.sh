#!/usr/bin/env bash
# Samples GPU utilisation and memory (nvidia-smi, where there is one) and the host's memory in use every
# INTERVAL seconds into FILE, one line per sample, until killed: run it beside a long job to see where its
# time goes (e.g. the 1M step's first minutes: GPUs idle while the host's pinned memory grows, BENCHMARKS.md).
#
#   benchmarks/monitor.sh $OUT/mon.txt 10 &  MON=$!;  ...the job...;  kill $MON
set -u
file=${1:?usage: $0 FILE [INTERVAL_S]} interval=${2:-10}
while true; do
  gpus=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null | tr '\n' ' ')
  host=$(free -g | awk '/^Mem:/ {print $3}')
  echo "$(date +%T) gpu ${gpus:-none} host_used_gib $host" >> "$file"
  sleep "$interval"
done
