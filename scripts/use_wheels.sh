# Sourced by the lent-machine scripts (scripts/gpu_jobs.sh, scripts/reproduce_call.sh) from the repository
# root: the wheels in ./.whl (the packages a lent GPU machine lacks: ../shared/tools/gpu-wheels.sh; carry
# .whl) are installed into /tmp/site, which goes first on PYTHONPATH. Nothing to do without .whl/*.whl.
# Returns pip's status.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
