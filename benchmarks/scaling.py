"""Per-device memory of the real LongGen train step on meshes we do not have: an ahead-of-time compile
against a TPU topology, or, for GPU clusters, on one real GPU whose client JAX mocks as many GPUs (XLA's
mock NCCL: the collectives compile, nothing runs). Either way XLA's compiled memory analysis of the step
at the target's per-device shapes, with the attention kernels lowered as on the target.

  pip install --no-deps --target /tmp/tpu_site "libtpu==0.0.48.*"   # the libtpu of jax 0.11.2
  PYTHONPATH=/tmp/tpu_site:. TPU_WORKER_HOSTNAMES=localhost python benchmarks/scaling.py [--cases a,b] [--out r.json]
  python benchmarks/scaling.py --cases gpu   # on a machine with one GPU: every "gpu:N" case, one child each

Each case: a model (the configs' LongGen pattern: 3/8 of the layers full in the middle, the rest
sink_window(64,1984)), a sequence length and global batch, a TPU topology or GPU count, and a mesh. The step is the
one `python -m longgen_jax.train` compiles (bf16 compute, fp32 weights + AdamW, remat full, scanned
layers, chunked loss, context parallelism where the mesh has a context axis). Reported per chip:
arguments (weights, AdamW state, batch), temporaries, new outputs; model FLOPs per step and the
step time those FLOPs take at an assumed MFU (analytic, labelled so); lower and compile seconds of this
host (--scan both: with the layer scan and unrolled, the compile-time-vs-depth comparison at 70B).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from longgen_jax.attention.registry import compiling_for
from longgen_jax.attention.sharding import MESH_AXES
from longgen_jax.model.config import preset
from longgen_jax.parallel.context import FULL_STRATEGIES, ContextStrategy
from longgen_jax.parallel.layout import padded_length
from longgen_jax.parallel.runtime import plan_for_devices
from longgen_jax.training.flops import train_flops_per_token
from longgen_jax.training.optimizer import make_optimizer
from longgen_jax.training.step import compiled_memory, sharded_step

V5P_TFLOPS = 459.0
H100_TFLOPS = 989.0  # dense bf16, H100 and H200 SXM alike
MOCK_ENV = "SCALING_MOCK_GPUS"  # set in a gpu case's child: the N GPUs it plans for (runtime.plan_for_devices)


@dataclasses.dataclass(frozen=True)
class Case:
  model: str          # preset
  seq_len: int
  batch: int          # global sequences per step
  topology: str       # "v5p:2x2x2" (TPU chips) or "gpu:N" (N GPUs, mocked on one)
  mesh: tuple         # (data, fsdp, context, tensor)


CASES = {
    "7b_128k_v5p16": Case("llama2_7b", 131072, 8, "v5p:2x2x2", (1, 8, 1, 1)),
    "7b_128k_v5p16_context2": Case("llama2_7b", 131072, 4, "v5p:2x2x2", (1, 4, 2, 1)),
    "7b_1m_v5p64": Case("llama2_7b", 1048576, 4, "v5p:4x4x2", (1, 4, 8, 1)),
    "70b_128k_v5p128": Case("llama2_70b", 131072, 16, "v5p:4x4x4", (1, 16, 4, 1)),
    "70b_128k_v5p128_context8": Case("llama2_70b", 131072, 8, "v5p:4x4x4", (1, 8, 8, 1)),
    "7b_1m_v5p128_context16": Case("llama2_7b", 1048576, 4, "v5p:4x4x4", (1, 4, 16, 1)),
    # docs/scaling.md's recommended GPU meshes, at their per-GPU shapes
    "7b_128k_gpu8": Case("llama2_7b", 131072, 4, "gpu:8", (1, 4, 2, 1)),
    "7b_128k_gpu8_fsdp8": Case("llama2_7b", 131072, 8, "gpu:8", (1, 8, 1, 1)),
    "7b_128k_gpu64": Case("llama2_7b", 131072, 32, "gpu:64", (8, 4, 2, 1)),
    "7b_128k_gpu256": Case("llama2_7b", 131072, 32, "gpu:256", (32, 1, 8, 1)),
    "7b_1m_gpu16": Case("llama2_7b", 1048576, 1, "gpu:16", (1, 1, 16, 1)),
    "70b_128k_gpu64": Case("llama2_70b", 131072, 8, "gpu:64", (1, 8, 8, 1)),
}


def mocked_gpus(case: Case) -> int:
  """N for a "gpu:N" case, 0 for a TPU one."""
  kind, _, size = case.topology.partition(":")
  return int(size) if kind == "gpu" else 0


def target_devices(case: Case) -> tuple[np.ndarray, str]:
  """The devices to compile for and the backend the attention kernels are chosen for."""
  n = mocked_gpus(case)
  if not n:
    return np.array(topologies.get_topology_desc(case.topology, platform="tpu").devices), "tpu"
  devices = jax.devices()
  if jax.default_backend() != "gpu" or len(devices) != n * jax.local_device_count():
    raise RuntimeError(f"{case.topology} needs a GPU client mocking {n} processes (`--cases` runs each gpu "
                       f"case in such a child, {MOCK_ENV}={n}): this one has {len(devices)} "
                       f"{jax.default_backend()} devices")
  return np.array(devices[:: jax.local_device_count()]), "gpu"  # one per mocked process


def compile_case(case: Case, loss_chunk: int = 4096, scan: bool = True, remat: str = "full",
                 full_strategy: str = "ring") -> dict:
  devices, backend = target_devices(case)
  if devices.size != int(np.prod(case.mesh)):
    raise ValueError(f"{case}: mesh {case.mesh} needs {int(np.prod(case.mesh))} chips, topology has {devices.size}")
  mesh = Mesh(devices.reshape(case.mesh), MESH_AXES)
  mc = preset(case.model, max_seq_len=case.seq_len)  # the LongGen pattern: 3/8 full, middle
  mcfg = types.SimpleNamespace(compute_dtype="bfloat16", param_dtype="float32", attn_impl="auto", remat=remat,
                               scan_layers=scan)
  optim = types.SimpleNamespace(lr=2e-5, min_lr_ratio=1.0, warmup_steps=50, schedule="constant", decay_steps=0,
                                weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  optimizer, schedule = make_optimizer(optim, 5000)
  context = case.mesh[2]
  T = padded_length(case.seq_len, context)
  with compiling_for(backend):
    steps = sharded_step(mc, mcfg, optimizer, schedule, mesh, batch_shape=(1, case.batch, T),
                         loss_chunk=loss_chunk, segment_attention=True, context=ContextStrategy(full=full_strategy))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      lowered = steps.train.lower(steps.state, steps.batch)
      lower_s = time.perf_counter() - t0
      compiled = lowered.compile()
    seconds = time.perf_counter() - t0
  memory = compiled_memory(compiled)
  flops = train_flops_per_token(mc, case.seq_len) * case.batch * case.seq_len
  chips = devices.size
  peak_tflops = V5P_TFLOPS if backend == "tpu" else H100_TFLOPS
  kernels = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
  return {"case": dataclasses.asdict(case), "pattern": [str(s) for s in mc.layer_specs[:1]] + ["..."],
          "num_full": mc.num_full_layers, "chips": chips, "scan_layers": scan, "remat": remat,
          "full_strategy": full_strategy,
          "lower_s": round(lower_s, 1), "compile_s": round(seconds - lower_s, 1),
          "per_chip_gib": {k: round(n / 2**30, 2) for k, n in memory.items()},
          "model_tflop_per_step": round(flops / 1e12, 1),
          "analytic_step_s_at_40pct_mfu": round(flops / (chips * peak_tflops * 1e12 * 0.40), 2),
          "custom_calls": dict(kernels)}


def case_names(arg: str) -> list[str]:
  """Case names from a comma list of names and the groups "tpu" / "gpu"."""
  names = []
  for name in arg.split(","):
    if name in ("tpu", "gpu"):
      names += [k for k, c in CASES.items() if bool(mocked_gpus(c)) == (name == "gpu")]
    elif name in CASES:
      names.append(name)
    else:
      raise SystemExit(f"unknown case {name!r}; known: tpu, gpu, {', '.join(CASES)}")
  return names


def in_mocked_child(name: str, args) -> list[dict]:
  """Runs one gpu case in a child whose client mocks its GPUs on the first visible one (the mock is fixed
  when a client starts); the child's rows, or one error row when it left none."""
  env = dict(os.environ, **{MOCK_ENV: str(mocked_gpus(CASES[name]))})
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "rows.json"
    cmd = [sys.executable, __file__, "--cases", name, "--scan", args.scan, "--remat", args.remat,
           "--full-strategy", args.full_strategy, "--out", str(out)]
    try:
      rc = subprocess.run(cmd, env=env, timeout=args.case_timeout or None).returncode
      why = f"exited {rc}"
    except subprocess.TimeoutExpired:
      rc, why = None, f"was still compiling after --case-timeout {args.case_timeout:g} s"
    rows = json.loads(out.read_text())["results"] if out.exists() else []
  if rc != 0:  # also after some rows (--scan both): the failure is a row too
    rows.append({"name": name, "case": dataclasses.asdict(CASES[name]), "remat": args.remat,
                 "full_strategy": args.full_strategy,
                 "error": f"the child {why}" + (" after the rows above" if rows else ", without a result")})
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", default="tpu", help="comma list of case names, or the groups tpu / gpu")
  p.add_argument("--scan", default="on", choices=["on", "off", "both"], help="layer runs as scans, unrolled, or both")
  p.add_argument("--remat", default="full", choices=["full", "offload"],
                 help="offload: the saved layer inputs and ring outputs in host memory (model.remat)")
  p.add_argument("--full-strategy", default="ring", choices=FULL_STRATEGIES,
                 help="full layers under a context axis (parallel.full_strategy): ring_loop keeps the program flat")
  p.add_argument("--case-timeout", type=float, default=0, help="seconds per gpu case's child (0: no limit)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  planned = int(os.environ.get(MOCK_ENV) or 0)   # set: this is a gpu case's child
  if planned:  # before the GPU client starts: the mock is fixed then
    plan_for_devices(planned)
  results = {"jax": jax.__version__, "date": datetime.date.today().isoformat(), "results": []}

  def record(rows):
    results["results"].extend(rows)
    if args.out:
      Path(args.out).write_text(json.dumps(results, indent=2))

  for name in case_names(args.cases):
    if mocked_gpus(CASES[name]) and not planned:
      record(in_mocked_child(name, args))  # the child prints its rows
      continue
    for scan in {"on": [True], "off": [False], "both": [True, False]}[args.scan]:
      t0 = time.perf_counter()
      try:
        r = {"name": name, **compile_case(CASES[name], scan=scan, remat=args.remat, full_strategy=args.full_strategy)}
      except RuntimeError as e:  # e.g. XLA refuses a plan over the chip's HBM (that is the answer), no mocked GPUs
        r = {"name": name, "case": dataclasses.asdict(CASES[name]), "scan_layers": scan, "remat": args.remat,
             "full_strategy": args.full_strategy,
             "error": str(e).splitlines()[0][:300], "seconds_until_error": round(time.perf_counter() - t0, 1)}
      print(json.dumps(r), flush=True)
      record([r])


if __name__ == "__main__":
  main()
