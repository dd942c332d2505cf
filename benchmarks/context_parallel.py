"""Context-parallel attention on the GPUs of one host beside one GPU, in one run.

  PYTHONPATH=. python benchmarks/context_parallel.py [--seqs 131072,524288] [--check-seq 32768] [--out r.json]
  PYTHONPATH=. python benchmarks/context_parallel.py --seqs 131072 --profile traces/   (then profile_overlap.py)

Per pattern and total length T (B=1, 32 query and kv heads, head_dim 128, bf16, forward+backward
with a random output cotangent):
  one GPU       ours (impl auto: the Pallas kernel) and, for full layers, cuDNN causal, whole T on GPU 0
  n GPUs        context parallel over every visible GPU (context = n, the load-balanced layout):
                full layers ring, ring_loop (its middle steps as one loop) and all_gather, sparse
                layers halo and all_gather
  *_no_comm     ring / halo with every ppermute replaced by the identity: the same kernel calls
                and branches without communication, so ring - ring_no_comm is the communication
                the ring did not hide behind compute
  local_kernels sparse layers: the two near-key kernel calls one device makes under halo (each
                chunk over its [sinks, halo, chunk] keys), forward+backward, alone on one GPU:
                halo - local_kernels is everything around the kernels
Efficiency = best one-GPU time / (n x context-parallel time); 1.0 is perfect scaling.

--check-seq: bf16 outputs and dq/dk/dv of one GPU and of each context-parallel strategy against a
float32 computation (xla_blockwise, same layout), relative-norm errors; the context-parallel error
should be that of one GPU (both are bf16 kernels; only the summation order differs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import time_fn  # noqa: E402  (benchmarks/attention.py)

from longgen_jax.attention import attention, parse_spec  # noqa: E402
from longgen_jax.parallel.context import ContextStrategy, context_attention  # noqa: E402
from longgen_jax.parallel.layout import sequence_order  # noqa: E402
from longgen_jax.parallel.mesh import make_mesh  # noqa: E402

H, D = 32, 128
PATTERNS = ("full", "sink_window(64,1984)", "block_sparse(64,16,64)")


@contextlib.contextmanager
def no_communication():
  """ppermute -> identity while tracing (the ring's compute alone)."""
  real = jax.lax.ppermute
  jax.lax.ppermute = lambda x, axis_name, perm: x
  try:
    yield
  finally:
    jax.lax.ppermute = real


def random_inputs(T: int, sharding, dtype=jnp.bfloat16, seed: int = 0):
  """q, k, v, dout [1, T, H, D] made on the devices of `sharding` (no host copy of 4 x T x H x D)."""
  def make():
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, (1, T, H, D), jnp.float32).astype(dtype) for key in keys)
  return jax.jit(make, out_shardings=(sharding,) * 4)()


def fwd_bwd(attend):
  def run(q, k, v, dout):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)
  return jax.jit(run)


def time_one_gpu(spec, impl: str, T: int, reps: int) -> float:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  args = random_inputs(T, sharding)
  fn = fwd_bwd(lambda q, k, v: attention(q, k, v, spec, impl=impl))
  return time_fn(fn, *args, min_time=0.0, reps=reps)


def compiled_context(spec, strategy: ContextStrategy, T: int, mesh, comm: bool = True):
  """(compiled context-parallel fwd+bwd, its inputs on the load-balanced layout)."""
  x = NamedSharding(mesh, P(None, "context", None, None))
  args = random_inputs(T, x)
  fn = fwd_bwd(lambda q, k, v: context_attention(q, k, v, spec, strategy=strategy))
  with jax.set_mesh(mesh), (contextlib.nullcontext() if comm else no_communication()):
    return fn.lower(*args).compile(), args


def time_context(spec, strategy: ContextStrategy, T: int, reps: int, mesh, comm: bool = True) -> float:
  fn, args = compiled_context(spec, strategy, T, mesh, comm)
  with jax.set_mesh(mesh):
    return time_fn(fn, *args, min_time=0.0, reps=reps)


def profile_context(spec, strategy: ContextStrategy, T: int, mesh, directory: str, reps: int = 2) -> None:
  """A jax.profiler trace of `reps` compiled fwd+bwd calls (after a warm-up) in `directory`; read it with
  benchmarks/profile_overlap.py (does the communication run under compute?) or TensorBoard/Perfetto."""
  fn, args = compiled_context(spec, strategy, T, mesh)
  with jax.set_mesh(mesh):
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(directory):
      for _ in range(reps):
        jax.block_until_ready(fn(*args))


def time_local_kernels(spec, T: int, cp: int, reps: int) -> float:
  """The halo's near-key calls of one device (both chunks), alone on GPU 0 (see the docstring)."""
  c = T // (2 * cp)
  if spec.kind == "sink_window":
    sinks, halo = spec.sink, -(-(spec.sink + spec.window - 1) // 128) * 128 - spec.sink
  else:
    tokens = spec.vert_stride * spec.block_size
    sinks, halo = 0, -(-(spec.local_blocks - 1) * spec.block_size // tokens) * tokens
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  q, _, _, dout = random_inputs(c, sharding)
  _, k, v, _ = random_inputs(sinks + halo + c, sharding)

  def two_chunks(q, k, v):
    one = lambda q: attention(q, k, v, spec, q_offset=sinks + halo)
    return jnp.concatenate([one(q), one(q * 0.5)], axis=1)
  return time_fn(fwd_bwd(two_chunks), q, k, v, jnp.concatenate([dout, dout], axis=1), min_time=0.0, reps=reps)


def strategies(spec) -> dict[str, ContextStrategy]:
  if spec.is_full:
    return {"ring": ContextStrategy(full="ring"), "ring_loop": ContextStrategy(full="ring_loop"),
            "all_gather": ContextStrategy(full="all_gather")}
  return {"halo": ContextStrategy(sparse="halo"), "all_gather": ContextStrategy(sparse="all_gather")}


def check(spec, T: int, mesh) -> dict[str, list[float]]:
  """Relative errors (out, dq, dk, dv) of one GPU and each strategy vs float32, bf16 inputs."""
  cp = mesh.shape["context"]
  order = sequence_order(T, cp)
  q, k, v, dout = (np.asarray(x, np.float32) for x in random_inputs(T, jax.sharding.SingleDeviceSharding(jax.devices()[0]), seed=1))
  q16, k16, v16, do16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, dout))
  exact = fwd_bwd(lambda q, k, v: attention(q, k, v, spec, impl="xla_blockwise"))(
      *(jnp.asarray(np.asarray(x, np.float32)) for x in (q16, k16, v16, do16)))
  flat = lambda r: [r[0]] + list(r[1])
  rel = lambda a, b: float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))
  errors = {"one_gpu": [rel(a, b) for a, b in zip(flat(fwd_bwd(lambda q, k, v: attention(q, k, v, spec))(
      q16, k16, v16, do16)), flat(exact))]}
  x = NamedSharding(mesh, P(None, "context", None, None))
  lay = lambda a: jax.device_put(np.take(np.asarray(a), order, axis=1), x)
  for name, strategy in strategies(spec).items():
    with jax.set_mesh(mesh):
      got = fwd_bwd(lambda q, k, v: context_attention(q, k, v, spec, strategy=strategy))(
          lay(q16), lay(k16), lay(v16), lay(do16))
    errors[name] = [rel(np.asarray(a, np.float32), np.take(np.asarray(b), order, axis=1))
                    for a, b in zip(flat(got), flat(exact))]
  return errors


def main():
  global H
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", default="131072,524288")
  p.add_argument("--patterns", default=";".join(PATTERNS), help="';'-separated attention specs")
  p.add_argument("--heads", type=int, default=32, help="query = kv heads (32: Llama-2-7B)")
  p.add_argument("--check-seq", type=int, default=32768, help="0: no correctness check")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--skip-one-gpu", action="store_true", help="context-parallel rows only (no efficiency)")
  p.add_argument("--profile", default="", help="DIR: only trace each pattern's first strategy at the first "
                 "length into DIR/<pattern> (no timings); summarise with benchmarks/profile_overlap.py")
  p.add_argument("--out", default="")
  args = p.parse_args()
  H = args.heads
  n = jax.device_count()
  mesh = make_mesh(data=1, context=n)
  specs = [parse_spec(s) for s in args.patterns.split(";") if s]
  report = {"devices": f"{n} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "heads": H, "head_dim": D, "dtype": "bfloat16",
            "checks": {}, "timings": []}
  if args.profile:
    T = int(args.seqs.split(",")[0])
    for spec in specs:
      name, strategy = next(iter(strategies(spec).items()))
      profile_context(spec, strategy, T, mesh, os.path.join(args.profile, f"{spec.kind}_{name}_{T}"))
    return
  for spec in specs:
    if args.check_seq:
      report["checks"][str(spec)] = check(spec, args.check_seq, mesh)
      print(f"check T={args.check_seq} {spec}: " + ", ".join(
          f"{k} {max(v):.2e}" for k, v in report["checks"][str(spec)].items()), flush=True)
  for T in (int(s) for s in args.seqs.split(",")):
    for spec in specs:
      row = {"T": T, "spec": str(spec), "one_gpu": {}, "context": {}}
      if not args.skip_one_gpu:
        row["one_gpu"]["ours"] = time_one_gpu(spec, "auto", T, args.reps)
      if spec.is_full and not args.skip_one_gpu:
        row["one_gpu"]["cudnn"] = time_one_gpu(spec, "cudnn", T, args.reps)
      for name, strategy in strategies(spec).items():
        row["context"][name] = time_context(spec, strategy, T, args.reps, mesh)
      first = next(iter(strategies(spec)))
      row["context"][f"{first}_no_comm"] = time_context(spec, strategies(spec)[first], T, args.reps, mesh,
                                                        comm=False)
      if not spec.is_full:
        row["local_kernels"] = time_local_kernels(spec, T, n, args.reps)
      if row["one_gpu"]:
        best = min(row["one_gpu"].values())
        row["efficiency"] = {k: best / (n * t) for k, t in row["context"].items() if not k.endswith("_no_comm")}
      report["timings"].append(row)
      print(json.dumps(row), flush=True)
      if args.out:
        with open(args.out, "w") as f:
          json.dump(report, f, indent=2)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
