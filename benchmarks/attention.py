"""Attention kernel benchmark: our Pallas kernel per LongGen pattern beside cuDNN, one card, one run.

  PYTHONPATH=. python benchmarks/attention.py [--seqs 8192,32768,131072] [--kv-heads 32,8]

"ours" is the default path (Mosaic GPU forward on Hopper; the backward LONGGEN_JAX_MGPU_BACKWARD
picks: by default each kernel where it measured faster, Mosaic GPU or Triton); "ours_triton_fwd"
forces the Triton forward (same backward).
`--mgpu-bwd` adds, per pattern, "ours_mgpu_bwd", "ours_triton_bwd", "ours_mgpu_dq" and "ours_mgpu_bwd128": the
default forward with the Mosaic GPU backward (pallas_mgpu_backward) with 64-key dK/dV programs, the Triton
backward, the Mosaic dQ beside the Triton dK/dV (what the default, auto, picks for sparse patterns), or
the Mosaic backward with 128-key dK/dV programs (MgpuBwdTiles.dkv_keys; what auto picks for full), forced
while tracing, so the backwards and cuDNN are timed in one run on one card whatever the switch says:

  PYTHONPATH=. python benchmarks/attention.py --mgpu-bwd --only ours_,cudnn

`--persistent` adds "ours_persistent" per pattern: the default path with the persistent Mosaic forward
and dQ (`MgpuTiles.persistent`, `MgpuBwdTiles.persistent_dq`: one program per SM walking query tiles in
turn; opt-in until GPU-tested). With LONGGEN_JAX_MGPU_PERSISTENT set, "ours" is persistent too.

Effective TFLOP/s count only allowed (query, key) pairs, from closed-form per-row counts (never
a dense mask): forward 4*D flops per pair, forward+backward 3.5x that (the usual 2.5x backward).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp

from longgen_jax.attention.spec import AttentionSpec, attended_keys_per_query

HQ, D = 32, 128


def allowed_pairs(spec: AttentionSpec | str, T: int, num_kv_heads: int) -> int:
  """Allowed (query, key) pairs summed over the 32 query heads."""
  if spec == "cudnn_causal":
    spec = AttentionSpec.full()
  elif spec == "cudnn_window":
    spec = AttentionSpec.sink_window(0, 2048)
  return round(attended_keys_per_query(spec, T, num_kv_heads) * T) * HQ


def random_qkv_do(T: int, kv_heads: int, seed: int = 0):
  """bf16 q, k, v and an output cotangent do of one [1, T, heads, D] attention call (HQ query heads)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (1, T, HQ, D), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, T, kv_heads, D), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, T, kv_heads, D), jnp.bfloat16)
  return q, k, v, jax.random.normal(ks[3], (1, T, HQ, D), jnp.bfloat16)


def save_rows(path: str, rows: list[dict]) -> None:
  """A benchmark's rows as JSON, with the card, JAX version and date they were measured on."""
  with open(path, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "date": datetime.date.today().isoformat(), "rows": rows}, f, indent=1)


def time_fn(fn, *args, min_time=0.3, reps=5) -> float:
  """Median seconds per call: warm up (compile), then `reps` timed batches of synchronized calls."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  n = max(1, int(min_time / max(one, 1e-6) / reps))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times)


def make_fns(name: str, spec, tiles=None):
  """(forward, forward+backward) jitted callables of (q, k, v, do); tiles: the kernels' `Tiles`, or
  for ours_mgpu_bwd the Mosaic backward's `MgpuBwdTiles` (default: 64-key dK/dV programs)."""
  if name in ("ours", "ours_triton_fwd", "ours_mgpu_bwd", "ours_triton_bwd", "ours_mgpu_dq", "ours_mgpu_bwd128",
              "ours_persistent"):
    from longgen_jax.attention import pallas_mgpu_backward
    from longgen_jax.attention.pallas_gpu import Tiles, pallas_attention
    bwd_tiles = None
    if isinstance(tiles, pallas_mgpu_backward.MgpuBwdTiles):
      bwd_tiles, tiles = tiles, None
    if name == "ours_triton_fwd":   # the Triton forward instead of Mosaic GPU (same backward)
      tiles = dataclasses.replace(tiles or Tiles(), forward="triton")
    # The backward switch is read while jit traces the custom_vjp backward (in fwd_bwd below):
    # None follows LONGGEN_JAX_MGPU_BACKWARD (the default path), True/False force one backward.
    forced = {"ours_mgpu_bwd": True, "ours_triton_bwd": False, "ours_mgpu_dq": "dq",
              "ours_mgpu_bwd128": True}.get(name)
    bwd_tiles = bwd_tiles or {"ours_mgpu_bwd": pallas_mgpu_backward.MgpuBwdTiles(dkv_keys=64),
                              "ours_mgpu_bwd128": pallas_mgpu_backward.MgpuBwdTiles(dkv_keys=128)}.get(name)

    if name == "ours_persistent":   # the persistent Mosaic forward and dQ (dK/dV as "ours")
      tiles = dataclasses.replace(tiles or Tiles(), forward="persistent")

    @contextlib.contextmanager
    def switch():
      with pallas_mgpu_backward.forced(forced), pallas_mgpu_backward.using_tiles(bwd_tiles):
        yield
    attn = lambda q, k, v: pallas_attention(q, k, v, spec, tiles=tiles)
  elif name == "cudnn_causal":
    switch = contextlib.nullcontext
    attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation="cudnn")
  else:
    switch = contextlib.nullcontext
    attn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(2047, 0), implementation="cudnn")
  fwd = jax.jit(lambda q, k, v, do: attn(q, k, v))

  def fwd_bwd(q, k, v, do):
    with switch():
      out, vjp = jax.vjp(attn, q, k, v)
      return out, vjp(do)
  return fwd, jax.jit(fwd_bwd)


PATTERNS = [AttentionSpec.full(), AttentionSpec.sink_window(64, 1984), AttentionSpec.block_sparse(64, 16, 64)]
CASES = [("ours", AttentionSpec.full()), ("ours", AttentionSpec.sink_window(64, 1984)),
         ("ours", AttentionSpec.block_sparse(64, 16, 64)),
         ("ours_triton_fwd", AttentionSpec.full()),
         ("ours_triton_fwd", AttentionSpec.sink_window(64, 1984)),
         ("ours_triton_fwd", AttentionSpec.block_sparse(64, 16, 64)),
         ("cudnn_causal", "cudnn_causal"), ("cudnn_window", "cudnn_window")]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seqs", default="8192,32768,131072")
  ap.add_argument("--kv-heads", default="32,8")
  ap.add_argument("--only", default="", help="comma list of case labels to keep")
  ap.add_argument("--json", default="")
  ap.add_argument("--sweep", default="", help="JSON list of Tiles kwargs: time ours with each")
  ap.add_argument("--bwd-sweep", default="",
                  help='JSON list of MgpuBwdTiles kwargs (e.g. [{"dkv_keys": 128, "stages_dkv": 3}]): time the '
                       "Mosaic backward (both kernels forced) with each, per pattern")
  ap.add_argument("--mgpu-bwd", action="store_true",
                  help="also time ours_mgpu_bwd, ours_triton_bwd, ours_mgpu_dq and ours_mgpu_bwd128 (each backward "
                       "forced) per pattern")
  ap.add_argument("--persistent", action="store_true",
                  help="also time ours_persistent per pattern: the default path with the persistent Mosaic forward "
                       "and dQ (Tiles(forward='persistent'))")
  args = ap.parse_args()
  case_list = CASES + ([(n, s) for n in ("ours_mgpu_bwd", "ours_triton_bwd", "ours_mgpu_dq", "ours_mgpu_bwd128")
                        for s in PATTERNS]
                       if args.mgpu_bwd else []) + ([("ours_persistent", s) for s in PATTERNS] if args.persistent else [])
  dev = jax.devices()[0]
  print(f"# {dev.device_kind}, JAX {jax.__version__}, {datetime.date.today()}, B=1 Hq={HQ} D={D} bf16")
  rows = []
  key = jax.random.PRNGKey(0)
  for T in [int(x) for x in args.seqs.split(",")]:
    for hkv in [int(x) for x in args.kv_heads.split(",")]:
      kq, kk, kv, kd = jax.random.split(jax.random.fold_in(key, T * 100 + hkv), 4)
      q = jax.random.normal(kq, (1, T, HQ, D), jnp.bfloat16)
      k = jax.random.normal(kk, (1, T, hkv, D), jnp.bfloat16)
      v = jax.random.normal(kv, (1, T, hkv, D), jnp.bfloat16)
      do = jax.random.normal(kd, (1, T, HQ, D), jnp.bfloat16)
      cases = [(n, s, None) for n, s in case_list]
      if args.sweep:
        from longgen_jax.attention.pallas_gpu import Tiles
        cases = [("ours", s, Tiles(**kw)) for n, s in CASES if n == "ours"
                 for kw in json.loads(args.sweep)]
      if args.bwd_sweep:
        from longgen_jax.attention.pallas_mgpu_backward import MgpuBwdTiles
        cases = [("ours_mgpu_bwd", s, MgpuBwdTiles(**kw)) for s in PATTERNS for kw in json.loads(args.bwd_sweep)]
        cases += [(n, s, None) for n, s in CASES if n.startswith("cudnn")]   # the baselines, same run
      for name, spec, tiles in cases:
        label = f"{name}:{spec}" if name.startswith("ours") else name
        if tiles is not None:
          label += " " + ",".join(str(x) for x in dataclasses.astuple(tiles))
        if args.only and not any(o in label for o in args.only.split(",")):
          continue
        pairs = allowed_pairs(spec, T, hkv)
        fwd, fwd_bwd = make_fns(name, spec, tiles)
        row = dict(T=T, kv_heads=hkv, impl=label, pairs=pairs)
        try:
          row["fwd_ms"] = 1e3 * time_fn(fwd, q, k, v, do)
          row["fwd_bwd_ms"] = 1e3 * time_fn(fwd_bwd, q, k, v, do)
          row["fwd_tflops"] = 4 * D * pairs / row["fwd_ms"] / 1e9
          row["fwd_bwd_tflops"] = 14 * D * pairs / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # keep the table going; the error shows in the row
          row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
  print()
  print("| T | kv heads | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['T']} | {r['kv_heads']} | {r['impl']} | error: {r['error'][:80]} | | | |")
      continue
    print(f"| {r['T']} | {r['kv_heads']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | "
          f"{r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
