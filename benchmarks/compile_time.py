"""Compile time vs depth: the real train step (Llama-2-7B width), scanned vs unrolled layers.

For each (layers, seq_len, variant, scan) the step is lowered and compiled from abstract shapes
(no weights are allocated, so depths that do not fit one card still compile), then optionally
run. Each configuration runs in its own process under a time limit, so a compile that does not
finish is recorded as "> limit" and the sweep goes on. Variants:
  longgen   the LongGen pattern (3/8 full in the middle, sink_window(64,1984)) with --attn-impl
  full      every layer full with --attn-impl
  cudnn     every layer full with cuDNN (the strongest dense baseline; needs a GPU)
Reported per configuration: lower_s (trace + StableHLO, incl. Pallas kernel lowering), compile_s
(XLA: partitioning, fusion, autotuning, Triton/Mosaic compilation), kernel call sites in the
lowered module, XLA's per-device memory estimate, and step_s when run.

  python benchmarks/compile_time.py --layers 8,32 --seq-lens 32768 --variants longgen,cudnn \
      --scan both --run-layers 8 --limit 300 --json out.json
  python benchmarks/compile_time.py --preset tiny --layers 8,32 --seq-lens 256 --variants longgen   (CPU)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def one(args) -> dict:
  """Lower, compile and (optionally) run one configuration in this process."""
  import jax
  import numpy as np

  from longgen_jax.model.config import preset
  from longgen_jax.parallel.mesh import make_mesh
  from longgen_jax.training.optimizer import make_optimizer
  from longgen_jax.training.state import random_state
  from longgen_jax.training.step import compiled_memory, sharded_step

  base = preset(args.preset, num_layers=args.layers, max_seq_len=args.seq_len)
  mc = base.all_full() if args.variant in ("full", "cudnn") else base
  impl = "cudnn" if args.variant == "cudnn" else args.attn_impl
  mcfg = types.SimpleNamespace(compute_dtype="bfloat16", param_dtype="float32", attn_impl=impl,
                               remat=args.remat, scan_layers=args.scan)
  optim = types.SimpleNamespace(lr=1e-5, min_lr_ratio=1.0, warmup_steps=10, schedule="constant", decay_steps=0,
                                weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  optimizer, schedule = make_optimizer(optim, 1000)
  T, B = args.seq_len, args.batch
  # One mesh over the devices this process sees: FSDP over all of them (data x fsdp = the batch split).
  mesh = make_mesh(data=1, fsdp=-1)
  steps = sharded_step(mc, mcfg, optimizer, schedule, mesh, batch_shape=(1, B, T),
                       loss_chunk=min(args.loss_chunk, T), segment_attention=False)
  context = jax.set_mesh(mesh)
  context.__enter__()  # attention runs per shard of this mesh; left open for the timed steps
  t0 = time.perf_counter()
  lowered = steps.train.lower(steps.state, steps.batch)
  lower_s = time.perf_counter() - t0
  sites = collections.Counter(re.findall(r"stablehlo\.custom_call @([\w$.\-]+)\(", lowered.as_text()))
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled_memory(compiled)
  r = {"lower_s": lower_s, "compile_s": compile_s, "kernel_sites": dict(sites),
       "xla_temp_gb": mem["temporaries"] / 2**30, "xla_args_gb": mem["arguments"] / 2**30}
  if args.run:
    state = random_state(mc, mcfg, optimizer, steps.state_shardings, seed=0)
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, (1, B, T + 1), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)),
             "segment_ids": np.ones((1, B, T), np.int32), "loss_mask": np.ones((1, B, T), np.float32)}
    batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
    state, m = compiled(state, batch)  # warm-up
    float(m["loss"])
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      r["loss"] = float(m["loss"])
      times.append(time.perf_counter() - t0)
    r["step_s"] = float(np.median(times))
    r["step_s_all"] = times
    r["tokens_per_s_per_device"] = B * T / r["step_s"] / jax.device_count()
    r["peak_gb"] = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / 2**30
  r["devices"] = jax.device_count()
  return r


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="llama2_7b")
  ap.add_argument("--layers", default="8,32")
  ap.add_argument("--seq-lens", default="32768")
  ap.add_argument("--variants", default="longgen,cudnn")
  ap.add_argument("--scan", default="both", choices=["on", "off", "both"])
  ap.add_argument("--attn-impl", default="auto")
  ap.add_argument("--remat", default="full")
  ap.add_argument("--loss-chunk", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=1, help="sequences per step, split over all visible devices (FSDP)")
  ap.add_argument("--run-layers", default="8", help="layer counts whose step is also run (others: compile only)")
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--limit", type=int, default=300, help="seconds per configuration")
  ap.add_argument("--json", default="")
  ap.add_argument("--repeat", type=int, default=1, help="compile each configuration this many times (2: the "
                  "second run shows the persistent compilation cache, when JAX_COMPILATION_CACHE_DIR is set)")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one configuration as JSON
  args = ap.parse_args()
  if args.one:
    cfg = types.SimpleNamespace(**json.loads(args.one))
    print("RESULT " + json.dumps(one(cfg)), flush=True)
    return

  import jax
  dev = jax.devices()[0]
  meta = {"device": dev.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
          "date": str(datetime.date.today()), "preset": args.preset, "remat": args.remat,
          "attn_impl": args.attn_impl, "batch": args.batch}
  print("# " + json.dumps(meta), flush=True)
  run_layers = {int(x) for x in args.run_layers.split(",") if x}
  rows = []
  scans = {"on": [True], "off": [False], "both": [True, False]}[args.scan]
  for T in map(int, args.seq_lens.split(",")):
    for L in map(int, args.layers.split(",")):
      for variant in args.variants.split(","):
        if variant == "cudnn" and dev.platform != "gpu":
          continue
        for scan in scans:
          cfg = dict(preset=args.preset, layers=L, seq_len=T, variant=variant, scan=scan,
                     attn_impl=args.attn_impl, remat=args.remat, loss_chunk=args.loss_chunk,
                     run=L in run_layers, steps=args.steps, batch=args.batch)
          for attempt in range(args.repeat):
            rows.append(run_one(cfg, attempt, args.limit))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:  # partial results survive a cut-off sweep
              with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print("\n| layers | seq | variant | scan | lower s | compile s | custom calls | step s | peak GB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['layers']} | {r['seq_len']} | {r['variant']} | {r['scan']} | {r['error'][:60]} | | | | |")
      continue
    step = f"{r['step_s']:.3f}" if "step_s" in r else "-"
    peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-"
    print(f"| {r['layers']} | {r['seq_len']} | {r['variant']} | {r['scan']} | {r['lower_s']:.1f} | "
          f"{r['compile_s']:.1f} | {sum(r['kernel_sites'].values())} | {step} | {peak} |")


def run_one(cfg: dict, attempt: int, limit: int) -> dict:
  """One configuration in a fresh process, under the time limit."""
  row = {k: cfg[k] for k in ("layers", "seq_len", "variant", "scan")}
  row["attempt"] = attempt
  t0 = time.perf_counter()
  try:
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                       timeout=limit)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    row.update(json.loads(line[7:]) if line else {"error": (p.stderr or p.stdout)[-400:]})
  except subprocess.TimeoutExpired:
    row["error"] = f"did not finish in {limit} s"
  row["wall_s"] = time.perf_counter() - t0
  return row


if __name__ == "__main__":
  main()
