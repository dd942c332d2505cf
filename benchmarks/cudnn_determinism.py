"""Is cuDNN's fused attention backward bit-for-bit repeatable, and what does making it so cost?

Why: exact resume compares losses bit for bit, so `impl="auto"` may route full layers to cuDNN
(issue 12, item 3) only if its gradients repeat exactly. XLA asks cuDNN for its deterministic
flash-attention backward only under `--xla_gpu_deterministic_ops=true` (or
`--xla_gpu_exclude_nondeterministic_ops=true`), flags read when JAX starts, so each setting runs in
its own process. Per setting and length: fwd+bwd time (median), and whether `repeats` calls on the
same inputs gave identical dq/dk/dv; our kernel (`impl="pallas"`) is timed beside it in the same
process for the ratio. B=1, 32 query heads, head_dim 128, bf16, causal.

  PYTHONPATH=. python benchmarks/cudnn_determinism.py [--seqs 32768,131072] [--kv-heads 8] [--json r.json]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys

SETTINGS = {"default": "", "deterministic_ops": "--xla_gpu_deterministic_ops=true",
            "exclude_nondeterministic": "--xla_gpu_exclude_nondeterministic_ops=true"}


def measure(seqs: list[int], kv_heads: int, repeats: int):
  """This process's rows, each yielded once measured: per length, cuDNN and ours, time and
  repeatability of the gradients."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from attention import HQ, D, time_fn   # benchmarks/attention.py

  from longgen_jax.attention import AttentionSpec, attention

  for T in seqs:
    ks = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(ks[0], (1, T, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, T, kv_heads, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, T, kv_heads, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], (1, T, HQ, D), jnp.bfloat16)
    for impl in ("cudnn", "pallas"):
      f = lambda q, k, v, impl=impl: jnp.sum(
          attention(q, k, v, AttentionSpec.full(), impl=impl).astype(jnp.float32) * do)
      grad = jax.jit(jax.grad(f, (0, 1, 2)))
      row = {"impl": impl, "seq": T, "kv_heads": kv_heads}
      try:
        first = [np.asarray(g) for g in grad(q, k, v)]
        same = all(all(np.array_equal(a, np.asarray(b)) for a, b in zip(first, grad(q, k, v)))
                   for _ in range(repeats - 1))
        row.update(fwd_bwd_s=time_fn(grad, q, k, v), repeatable=same, repeats=repeats)
      except Exception as e:  # e.g. cuDNN refusing a shape: that is the answer for this row
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
      yield row


def add_row(results: dict, row: dict, json_path: str) -> None:
  """Record, print and save one row at once (the run may be cut off by a time limit)."""
  results["rows"].append(row)
  print(json.dumps(row), flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", default="32768,131072")
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5, help="gradient calls compared bit for bit")
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--json", default="")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)   # one setting, in this process
  args = p.parse_args()
  seqs = [int(s) for s in args.seqs.split(",")]
  if args.child:   # one ROW line per measurement as it completes, so a time limit keeps what finished
    for row in measure(seqs, args.kv_heads, args.repeats):
      print("ROW " + json.dumps(row), flush=True)
    return
  import jax  # noqa: F401  (only to report the version; the children own the GPU)
  results = {"jax": jax.__version__, "date": datetime.date.today().isoformat(), "rows": []}
  for name in args.settings.split(","):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + SETTINGS[name]).strip())
    cmd = [sys.executable, __file__, "--child", name, "--seqs", args.seqs, "--kv-heads", str(args.kv_heads),
           "--repeats", str(args.repeats)]
    got, others = 0, collections.deque(maxlen=200)   # one merged pipe: a full stderr pipe cannot stall it
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
      for line in proc.stdout:
        if line.startswith("ROW "):
          got += 1
          add_row(results, dict(json.loads(line[4:]), setting=name), args.json)
        elif line.strip():
          others.append(line.strip())
    if proc.returncode or not got:
      errors = [x for x in others if "Error" in x] or list(others) or ["no output"]
      add_row(results, {"setting": name, "error": f"exit {proc.returncode}: {errors[-1][:300]}"}, args.json)
  print("\n| setting | T | impl | fwd+bwd ms | gradients repeat bit for bit |\n|---|---|---|---|---|")
  for r in results["rows"]:
    if "error" in r:
      print(f"| {r['setting']} | {r.get('seq', '')} | {r.get('impl', '')} | error: {r['error']} | |")
    else:
      print(f"| {r['setting']} | {r['seq']} | {r['impl']} | {r['fwd_bwd_s'] * 1e3:.2f} | {r['repeatable']} |")


if __name__ == "__main__":
  main()
