"""Per-device memory of the real LongGen train step on TPU slices we do not have: an ahead-of-time compile
against a TPU topology (XLA's compiled memory analysis; the Pallas TPU kernels lower as on the chip).

  pip install --no-deps --target /tmp/tpu_site "libtpu==0.0.48.*"   # the libtpu of jax 0.11.2
  PYTHONPATH=/tmp/tpu_site:. TPU_WORKER_HOSTNAMES=localhost python benchmarks/scaling.py [--cases a,b] [--out r.json]

Each case: a model (the configs' LongGen pattern: 3/8 of the layers full in the middle, the rest
sink_window(64,1984)), a sequence length and global batch, a TPU topology and a mesh. The step is the
one `python -m longgen_jax.train` compiles (bf16 compute, fp32 weights + AdamW, remat full, scanned
layers, chunked loss, context parallelism where the mesh has a context axis). Reported per chip:
arguments (weights, AdamW state, batch), temporaries, new outputs; model FLOPs per step and the
step time those FLOPs take at an assumed MFU (analytic, labelled so); lower and compile seconds of this
host (--scan both: with the layer scan and unrolled, the compile-time-vs-depth comparison at 70B).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
import types

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from longgen_jax.attention.registry import compiling_for
from longgen_jax.attention.sharding import MESH_AXES
from longgen_jax.model.config import preset
from longgen_jax.parallel.layout import padded_length
from longgen_jax.training.flops import train_flops_per_token
from longgen_jax.training.optimizer import make_optimizer
from longgen_jax.training.step import compiled_memory, sharded_step

V5P_HBM_GIB, V5P_TFLOPS = 95.0, 459.0


@dataclasses.dataclass(frozen=True)
class Case:
  model: str          # preset
  seq_len: int
  batch: int          # global sequences per step
  topology: str       # e.g. "v5p:2x2x2" (chips)
  mesh: tuple         # (data, fsdp, context, tensor)


CASES = {
    "7b_128k_v5p16": Case("llama2_7b", 131072, 8, "v5p:2x2x2", (1, 8, 1, 1)),
    "7b_128k_v5p16_context2": Case("llama2_7b", 131072, 4, "v5p:2x2x2", (1, 4, 2, 1)),
    "7b_1m_v5p64": Case("llama2_7b", 1048576, 4, "v5p:4x4x2", (1, 4, 8, 1)),
    "70b_128k_v5p128": Case("llama2_70b", 131072, 16, "v5p:4x4x4", (1, 16, 4, 1)),
    "70b_128k_v5p128_context8": Case("llama2_70b", 131072, 8, "v5p:4x4x4", (1, 8, 8, 1)),
    "7b_1m_v5p128_context16": Case("llama2_7b", 1048576, 4, "v5p:4x4x4", (1, 4, 16, 1)),
}


def compile_case(case: Case, loss_chunk: int = 4096, scan: bool = True, remat: str = "full") -> dict:
  topo = topologies.get_topology_desc(case.topology, platform="tpu")
  devices = np.array(topo.devices)
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
  with compiling_for("tpu"):
    steps = sharded_step(mc, mcfg, optimizer, schedule, mesh, batch_shape=(1, case.batch, T),
                         loss_chunk=loss_chunk, segment_attention=True)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      lowered = steps.train.lower(steps.state, steps.batch)
      lower_s = time.perf_counter() - t0
      compiled = lowered.compile()
    seconds = time.perf_counter() - t0
  memory = compiled_memory(compiled)
  flops = train_flops_per_token(mc, case.seq_len) * case.batch * case.seq_len
  chips = devices.size
  return {"case": dataclasses.asdict(case), "pattern": [str(s) for s in mc.layer_specs[:1]] + ["..."],
          "num_full": mc.num_full_layers, "chips": chips, "scan_layers": scan, "remat": remat, "lower_s": round(lower_s, 1),
          "compile_s": round(seconds - lower_s, 1),
          "per_chip_gib": {k: round(n / 2**30, 2) for k, n in memory.items()},
          "model_tflop_per_step": round(flops / 1e12, 1),
          "analytic_step_s_at_40pct_mfu": round(flops / (chips * V5P_TFLOPS * 1e12 * 0.40), 2),
          "tpu_custom_calls": compiled.as_text().count("tpu_custom_call")}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--scan", default="on", choices=["on", "off", "both"], help="layer runs as scans, unrolled, or both")
  p.add_argument("--remat", default="full", choices=["full", "offload"],
                 help="offload: the saved layer inputs and ring outputs in host memory (model.remat)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  results = {"jax": jax.__version__, "date": datetime.date.today().isoformat(), "hbm_per_chip_gib": V5P_HBM_GIB,
             "results": []}
  for name in args.cases.split(","):
    for scan in {"on": [True], "off": [False], "both": [True, False]}[args.scan]:
      t0 = time.perf_counter()
      try:
        r = {"name": name, **compile_case(CASES[name], scan=scan, remat=args.remat)}
      except jax.errors.JaxRuntimeError as e:  # e.g. XLA refuses a plan over the chip's HBM: that is the answer
        r = {"name": name, "case": dataclasses.asdict(CASES[name]), "scan_layers": scan, "remat": args.remat,
             "error": str(e).splitlines()[0][:300], "seconds_until_error": round(time.perf_counter() - t0, 1)}
      results["results"].append(r)
      print(json.dumps(r), flush=True)
      if args.out:
        with open(args.out, "w") as f:
          json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
