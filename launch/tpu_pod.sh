#!/bin/bash
# LongGen training on every worker of a Cloud TPU pod slice (one process per host).
# NOT RUN HERE (no TPU was available); launch detection is tested on a simulated TPU environment
# (tests/test_multihost.py).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--config.key=value ...]
#   CONFIG=configs/llama2_70b_longgen_128k.py WORKDIR=/mnt/bucket/runs/70b launch/tpu_pod.sh my-v5p-128 us-east5-a
#
# The repository must be at ~/longgen_jax on every worker (e.g. `--worker=all --command="git clone ..."`) with
# its dependencies installed; WORKDIR must be a path every worker sees (a gcsfuse-mounted bucket, a
# Filestore share). JAX finds the other workers from the TPU metadata.
set -euo pipefail
if [[ $# -lt 2 ]]; then echo "usage: $0 TPU_NAME ZONE [train flags...]" >&2; exit 2; fi
TPU=$1; ZONE=$2; shift 2
CONFIG=${CONFIG:-configs/llama2_7b_longgen_128k.py}
WORKDIR=${WORKDIR:?set WORKDIR to a path every worker sees}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="cd ~/longgen_jax && \
  python -m longgen_jax.train --config=$CONFIG --workdir=$WORKDIR --distributed $(printf '%q ' "$@")"
