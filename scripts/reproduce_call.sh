#!/usr/bin/env bash
# One lent-machine call of the reproduction set: results already recorded in the repo are copied in first
# (so their jobs are skipped; so are the pretrained models' pass-key grids where the redone pretraining ends
# on the recorded eval loss; a seed whose redone pretraining ends elsewhere runs none of its variants, since
# they would not pair with the recorded ones: exit 1), scripts/reproduce.py runs under a time limit (a
# stopped training resumes from its checkpoint in the next call on the same warm machine: results/ is ignored
# by git and kept there), and the small result files (JSON, PNG, Markdown, logs; no models or checkpoints)
# are packed into one archive.
#
#   scripts/reproduce_call.sh SEEDS GPUS TIME_LIMIT_S ARCHIVE [RECORDED_DIR ...]
#   scripts/reproduce_call.sh 0,1,2 0,1,2,3 540 $OUT/repro.tgz docs/reproduction/gpu_8k_set
#
# One job per GPU: two of the 8K set's trainings did not fit one H200 (out of memory, 2026-11-28; the runner's
# own JAX client then held part of each GPU too, mended since, not re-tried).
# GPUS "" runs on the CPU. REPRODUCE_OUT (default results/repro) is the results directory; REPRODUCE_ARGS
# (e.g. "--cpu-tiny --steps 2") is appended to reproduce.py's arguments. Relative paths (ARCHIVE,
# RECORDED_DIR, REPRODUCE_OUT) are taken from the repository root. Wheels in ./.whl (the packages a lent
# machine lacks: ../shared/tools/gpu-wheels.sh; carry .whl) are installed first into /tmp/site
# (scripts/use_wheels.sh, as scripts/gpu_jobs.sh does). Exits with reproduce.py's status (3: time limit
# reached, jobs left: call again), or 2 on bad arguments before anything runs.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 4 ]] || { echo "usage: $0 SEEDS GPUS TIME_LIMIT_S ARCHIVE [RECORDED_DIR ...]" >&2; exit 2; }
seeds=$1 gpus=$2 limit=$3 out=${REPRODUCE_OUT:-results/repro}
mkdir -p "$(dirname "$4")" "$out" && archive="$(cd "$(dirname "$4")" && pwd)/$(basename "$4")" \
  || { echo "$0: cannot create the directories of $4 and $out" >&2; exit 2; }
shift 4
for recorded in "$@"; do
  [[ -d "$recorded" ]] || { echo "$0: no recorded results directory $recorded" >&2; exit 2; }
done
source scripts/use_wheels.sh || { echo "$0: installing .whl/ failed" >&2; exit 2; }
for recorded in "$@"; do
  for run in "$recorded"/*/seed*/; do          # VARIANT/seedS/ holding a finished job's result.json
    [[ -f "$run/result.json" ]] || continue
    dest=$out/$(basename "$(dirname "$run")")/$(basename "$run")
    [[ -e "$dest" ]] || { mkdir -p "$(dirname "$dest")"; cp -r "$run" "$dest"; }
  done
  # a pretrained model's grid, with the eval loss its pretraining ended on: not run again if the redone
  # pretraining ends on the same (reproduce.grid_matches_pretraining)
  for grid in "$recorded"/pretrain/seed*/passkey.json; do
    src=$(dirname "$grid") dest=$out/pretrain/$(basename "$(dirname "$grid")")
    [[ -f "$src/passkey_of.json" && ! -e "$dest/passkey.json" ]] || continue
    mkdir -p "$dest" && cp "$grid" "$src/passkey_of.json" "$dest"/
    [[ -f "$src/passkey.png" ]] && cp "$src/passkey.png" "$dest"/
  done
done
# shellcheck disable=SC2086  # REPRODUCE_ARGS is a list of arguments
PYTHONUNBUFFERED=1 python3 scripts/reproduce.py --variants all --seeds "$seeds" --gpus "$gpus" --out "$out" \
  --time-limit "$limit" ${REPRODUCE_ARGS:-}
rc=$?
echo "[reproduce_call] reproduce.py exit $rc"
(cd "$(dirname "$out")" && find "$(basename "$out")" -type f \
   \( -name '*.json' -o -name '*.png' -o -name '*.md' -o -name '*.txt' \) -not -path '*/train/*' \
   -not -path '*/init/*' -not -path '*/model/*' -not -path '*/checkpoints/*' -size -4M | tar czf "$archive" -T -)
exit $rc
