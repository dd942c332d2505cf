"""Which kernels take the time of one attention forward+backward: per-kernel GPU time from a profile.

  PYTHONPATH=. python benchmarks/kernel_profile.py --specs "sink_window(64,1984);block_sparse(64,16,64)" \
      --seq 131072 [--kv-heads 8] [--backward triton,mosaic,mixed] [--json r.json]

Per spec and backward (benchmarks/attention.py's "ours" with the Triton or the Mosaic GPU backward forced,
"mixed": the Mosaic dQ beside the Triton dK/dV, or "mosaic128": the Mosaic backward with 128-key dK/dV programs),
traces `--calls` jitted fwd+bwd calls after a warm-up with jax.profiler and sums, per kernel name, the GPU
time per call (the GPU plane's stream events, benchmarks/profile_overlap.gpu_kernels), largest first, with
the wall time per call beside it. The kernels' sum against the wall time says whether the time is in the
kernels or between them; the per-kernel split says which kernel to work on.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import HQ, D, make_fns, random_qkv_do, save_rows  # noqa: E402  (benchmarks/attention.py)
from profile_overlap import gpu_kernels  # noqa: E402

from longgen_jax.attention.spec import parse_spec  # noqa: E402

BACKWARDS = {"triton": "ours_triton_bwd", "mosaic": "ours_mgpu_bwd", "mixed": "ours_mgpu_dq",
             "mosaic128": "ours_mgpu_bwd128"}


def kernel_times(fn, args, calls: int) -> tuple[dict[str, float], float]:
  """({kernel name: ms per call}, wall ms per call) of `calls` traced calls after a warm-up."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
      wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    per_kernel: dict[str, float] = collections.defaultdict(float)
    for kernels in gpu_kernels(trace_dir).values():
      for name, start, end in kernels:
        per_kernel[name] += (end - start) / 1e6 / calls
  return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])), wall_ms


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--specs", default="sink_window(64,1984);block_sparse(64,16,64)", help="';'-separated specs")
  p.add_argument("--seq", type=int, default=131072)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--backward", default="triton,mosaic,mixed", help=f"comma list of {sorted(BACKWARDS)}")
  p.add_argument("--calls", type=int, default=3)
  p.add_argument("--top", type=int, default=8, help="kernels listed per case")
  p.add_argument("--json", default="")
  args = p.parse_args()
  T, hkv = args.seq, args.kv_heads
  q, k, v, do = random_qkv_do(T, hkv)
  rows = []
  print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}, B 1, T {T}, Hq {HQ}, Hkv {hkv}, D {D}, bf16")
  for text in args.specs.split(";"):
    spec = parse_spec(text)
    for backward in args.backward.split(","):
      _, fwd_bwd = make_fns(BACKWARDS[backward], spec)
      per_kernel, wall_ms = kernel_times(fwd_bwd, (q, k, v, do), args.calls)
      print(f"\n## {text}, {backward} backward: wall {wall_ms:.2f} ms/call, kernels {sum(per_kernel.values()):.2f} ms")
      for name, ms in list(per_kernel.items())[:args.top]:
        print(f"  {ms:9.3f} ms  {name[:110]}")
      rows.append({"spec": text, "backward": backward, "seq": T, "kv_heads": hkv, "wall_ms": wall_ms,
                   "kernels_ms": per_kernel})
  if args.json:
    save_rows(args.json, rows)


if __name__ == "__main__":
  main()
