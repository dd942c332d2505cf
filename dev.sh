#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (Python >= 3.12, pinned JAX) on first use.
#   ./dev.sh train [--config.key=value ...]   tiny LongGen training run on CPU (embedded data)
#   ./dev.sh test  [pytest args ...]          the test suite (CPU; Pallas kernels in interpret mode)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ]; then
  echo "[dev.sh] first run: creating .venv and installing the pinned packages (JAX, Flax, Optax, Orbax, grain;" >&2
  echo "[dev.sh] PyTorch and transformers for the conversion tests): about 3 minutes; pip lists each package" >&2
  python3 -c 'import sys; assert sys.version_info >= (3, 12), f"need Python >= 3.12, got {sys.version}"'
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install --progress-bar off -c constraints.txt -e ".[test]" | grep -E "^(Collecting|Installing|Successfully)" >&2
  touch .venv/.installed
fi
cmd=${1:-}; shift || true
case "$cmd" in
  train) exec .venv/bin/python -m longgen_jax.train --config=configs/tiny.py --workdir="${WORKDIR:-workdir/tiny}" "$@" ;;
  test)  exec .venv/bin/python -m pytest -q -n 2 "$@" ;;
  *) echo "usage: ./dev.sh train|test [args]" >&2; exit 2 ;;
esac
