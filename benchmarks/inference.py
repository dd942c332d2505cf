"""LongGen vs all-full inference: KV-cache bytes, chunked prefill time, per-token decode latency.

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.98 python benchmarks/inference.py --out results.json
  ... --prefill-contexts 131072 --decode "" --profile-prefill 20   # + where each prefill's GPU time goes
  # the reproduction set's pass-key evaluation (configs/repro): 16K prompts, 25 at a time, chunks of 2048
  ... --repro-variant all_sparse_sink --prefill-contexts 16384 --prefill-batch 25 --chunk-len 2048 \
      --attn-impl auto --decode 25x16392 --profile-prefill 12

Random bf16 weights of a Llama-2-7B-shaped model (or, with --repro-variant, of the reproduction set's small
model with that variant's pattern); the all-full model shares the same weights.
Prefill: random prompt of each context length, chunked (--chunk-len); time of the second run
(the first compiles). Decode: caches of `context` positions (their contents do not change the
cost), the compiled decode loop timed over --decode-steps tokens at positions just below the
context length. Every configuration runs in a try block: one that runs out of memory is
recorded as such and the rest go on. --profile-prefill N traces one more prefill per context and model
(jax.profiler) and records the N kernels with the most GPU time, the kernels' sum and the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax.model import inference
from longgen_jax.attention import AttentionSpec, registry
from longgen_jax.model.config import ModelConfig, preset
from longgen_jax.model.generation import LoopState, Sampling, decode_loop
from longgen_jax.model.kv_cache import cache_layouts, init_cache, kv_cache_bytes
from longgen_jax.model.llama import Llama

GiB = 1 << 30


def repro_model_config(variant: str) -> ModelConfig:
  """configs/repro's model (base.MODEL) with the variant's layer pattern."""
  from longgen_jax.training.config import load_config_file, load_config_module
  repro = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "repro")
  m = load_config_file(os.path.join(repro, f"{variant}.py")).model
  cfg = ModelConfig(**load_config_module(os.path.join(repro, "base.py")).MODEL)
  return cfg.with_pattern(m.num_full_layers, m.sparse_spec, m.placement)


def build_models(name: str, num_layers: int | None, impl: str, repro_variant: str | None = None):
  over = {"num_layers": num_layers} if num_layers else {}
  cfg = repro_model_config(repro_variant) if repro_variant else preset(name, **over)
  model = Llama(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attn_impl=impl)
  full_cfg = cfg.all_full()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(full_cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                        param_dtype=jnp.bfloat16, attn_impl=impl)))
  full = nnx.merge(graphdef, nnx.state(model))  # same weight arrays, all layers full
  return {"longgen": model, "all_full": full}


def time_prefill(model, context: int, chunk_len: int, impl: str, repeats: int = 1, batch: int = 1):
  layouts = cache_layouts(model.config, context)
  caches = init_cache(layouts, batch, jnp.bfloat16)
  tokens = np.random.RandomState(0).randint(0, model.config.vocab_size, (batch, context)).astype(np.int32)
  lengths = np.full((batch,), context, np.int32)
  times = []
  for _ in range(1 + repeats):
    t0 = time.perf_counter()
    caches, logits = inference.prefill(model, layouts, caches, tokens, lengths, chunk_len=chunk_len,
                                       attn_impl=impl)
    logits.block_until_ready()
    times.append(time.perf_counter() - t0)
  del caches
  return {"first_s": times[0], "s": min(times[1:]), "impl": impl}


def profile_prefill(model, context: int, chunk_len: int, impl: str, top: int, batch: int = 1) -> dict:
  """One chunked prefill traced after a warm-up (benchmarks/kernel_profile.kernel_times): the `top` kernels
  by GPU time (ms, summed over the kernel's launches), the sum of every kernel and the wall time. A sum well
  below the wall time means the time is between kernels (dispatch, host work), not in them."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from kernel_profile import kernel_times   # benchmarks/kernel_profile.py
  layouts = cache_layouts(model.config, context)
  state = {"caches": init_cache(layouts, batch, jnp.bfloat16)}
  tokens = np.random.RandomState(0).randint(0, model.config.vocab_size, (batch, context)).astype(np.int32)
  lengths = np.full((batch,), context, np.int32)

  def once():
    state["caches"], logits = inference.prefill(model, layouts, state["caches"], tokens, lengths,
                                                chunk_len=chunk_len, attn_impl=impl)
    return logits

  per_kernel, wall_ms = kernel_times(once, (), calls=1)   # largest first
  del state
  return {"wall_ms": wall_ms, "kernels_ms": sum(per_kernel.values()), "kernel_count": len(per_kernel),
          "top_ms": dict(list(per_kernel.items())[:top])}


def time_decode(model, context: int, batch: int, steps: int):
  layouts = cache_layouts(model.config, context)
  graphdef, params = nnx.split(model)
  sampling = Sampling()

  def fresh(caches):
    out = jnp.zeros((batch, steps + 1), jnp.int32)
    start = jnp.full((batch,), context - steps - 1, jnp.int32)
    return LoopState(caches, out, start, jnp.zeros((batch,), bool), jnp.int32(0), jax.random.key(0))

  st = fresh(init_cache(layouts, batch, jnp.bfloat16))
  t0 = time.perf_counter()
  st = decode_loop(graphdef, params, layouts, sampling, st, jnp.int32(steps))
  st.out_BN.block_until_ready()
  compile_s = time.perf_counter() - t0
  best = float("inf")
  for _ in range(2):
    st = fresh(st.caches)
    t0 = time.perf_counter()
    st = decode_loop(graphdef, params, layouts, sampling, st, jnp.int32(steps))
    st.out_BN.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  assert int(st.step) == steps
  del st
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  cache_bytes = kv_cache_bytes(model.config, context, batch)["total"]
  ms = 1e3 * best / steps
  return {"ms_per_token": ms, "first_call_s": compile_s,
          "bytes_per_token_GiB": (weight_bytes + cache_bytes) / GiB,
          "achieved_TBps": (weight_bytes + cache_bytes) / (ms * 1e-3) / 1e12}


OUT_PATH = None


def run(fn, label, results):
  print(f"--- {label}", flush=True)
  try:
    r = fn()
  except Exception as e:  # noqa: BLE001  (an OOM is a result here)
    msg = str(e).split("\n")[0][:300]
    r = {"error": msg}
    traceback.print_exc(limit=2)
  finally:
    gc.collect()
  print(f"    {label}: {r}", flush=True)
  results[label] = r
  if OUT_PATH:  # keep partial results if a later configuration hangs or the run is cut off
    with open(OUT_PATH, "w") as f:
      json.dump(results, f, indent=1)
  return r


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="llama2_7b")
  p.add_argument("--num-layers", type=int, default=None, help="fewer layers (smoke tests)")
  p.add_argument("--repro-variant", default=None, metavar="NAME",
                 help="instead of --preset: configs/repro's model with this variant's pattern (e.g. all_sparse_sink)")
  p.add_argument("--prefill-batch", type=int, default=1, help="prompts per prefill (the repro pass-key runs 25)")
  p.add_argument("--prefill-contexts", default="32768,131072")
  p.add_argument("--decode", default="1x131072,8x8192,8x32768",
                 help="batch x context pairs for decode; all-full is skipped where its cache won't fit")
  p.add_argument("--chunk-len", type=int, default=4096)
  p.add_argument("--attn-impl", default="cudnn", choices=registry.USER_NAMES,
                 help="prefill impl (attention.registry): cudnn = full layers via cuDNN, the rest auto")
  p.add_argument("--decode-steps", type=int, default=32)
  p.add_argument("--profile-prefill", type=int, default=0, metavar="N",
                  help="also trace one prefill per context and model: its N largest kernels by GPU time")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.repro_variant and args.num_layers:
    p.error("--num-layers applies to --preset, not to --repro-variant (the set's model has its own depth)")
  global OUT_PATH
  OUT_PATH = args.out

  impl = args.attn_impl
  dev = jax.devices()[0]
  mem = dev.memory_stats() or {}
  info = {"device": dev.device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
          "preset": None if args.repro_variant else args.preset, "num_layers": args.num_layers,
          "repro_variant": args.repro_variant, "prefill_batch": args.prefill_batch, "prefill_impl": impl,
          "chunk_len": args.chunk_len,
          "device_memory_GiB": mem.get("bytes_limit", 0) / GiB}
  models = build_models(args.preset, args.num_layers, "auto", args.repro_variant)
  sparse = [spec for spec in models["longgen"].config.layer_specs if not spec.is_full]
  info["sparse_prefill_impl"] = {str(spec): registry.choose(impl, spec) for spec in dict.fromkeys(sparse)}
  print(json.dumps(info), flush=True)
  results: dict = {"info": info}

  for name, model in models.items():
    for ctx, batch in [(131072, 1), (131072, 8)]:
      r = kv_cache_bytes(model.config, ctx, batch)
      results[f"kv_bytes/{name}/b{batch}/{ctx}"] = {"GiB": r["total"] / GiB,
                                                    "by_kind_GiB": {k: v / GiB for k, v in r["by_kind"].items()}}
  print(json.dumps({k: v for k, v in results.items() if k.startswith("kv")}, indent=1), flush=True)

  limit = mem.get("bytes_limit", 0)
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(models["longgen"])))
  for ctx in [int(c) for c in args.prefill_contexts.split(",") if c]:
    for name, model in models.items():
      need = weights + kv_cache_bytes(model.config, ctx, args.prefill_batch)["total"]
      if limit and need > limit:
        results[f"prefill/{name}/{ctx}"] = {"skipped": f"needs {need / GiB:.1f} GiB > {limit / GiB:.1f} GiB"}
        continue
      run(lambda: time_prefill(model, ctx, args.chunk_len, impl, batch=args.prefill_batch),
          f"prefill/{name}/{ctx}", results)
      if args.profile_prefill:
        run(lambda: profile_prefill(model, ctx, args.chunk_len, impl, args.profile_prefill, args.prefill_batch),
            f"prefill_profile/{name}/{ctx}", results)
  for pair in [s for s in args.decode.split(",") if s]:
    batch, ctx = (int(x) for x in pair.split("x"))
    for name, model in models.items():
      need = weights + kv_cache_bytes(model.config, ctx, batch)["total"]
      if limit and need > 0.99 * limit:
        results[f"decode/{name}/b{batch}/{ctx}"] = {
            "skipped": f"weights + cache need {need / GiB:.1f} GiB > {limit / GiB:.1f} GiB"}
        continue
      run(lambda: time_decode(model, ctx, batch, args.decode_steps), f"decode/{name}/b{batch}/{ctx}", results)
  print(json.dumps(results, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
