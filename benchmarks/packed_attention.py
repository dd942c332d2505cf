"""Full attention over packed documents (segment ids): what each kernel pays, one card, one run.

  PYTHONPATH=. python benchmarks/packed_attention.py [--seq 131072] [--documents 1,4,16,64] [--kv-heads 8]

A row of T tokens holds N equal documents (segment ids 1..N). Timed, forward+backward, bf16, B 1,
32 query heads, head_dim 128:
  ours_packed       our kernel with segment ids (the default path): tiles that share no document are
                    skipped (attention.segment_skip.ENABLED; Triton: at the list ends, Mosaic: anywhere,
                    and one-document full tiles unmasked), so the work is ~T^2 / 2N
  ours_triton_segments / ours_mosaic_segments
                    the same, forcing the Triton or the Mosaic GPU segment paths (LONGGEN_JAX_MGPU_SEGMENTS
                    0 / 1 while tracing): the two side by side in one run, per --pattern
  ours_no_skip      the same with the skipping off: the whole causal triangle (on the Mosaic path the
                    one-document tiles still run unmasked)
  cudnn_causal      cuDNN over the row as ONE sequence (no segment ids: the cost of ignoring packing)
  cudnn_batched     cuDNN over the N documents as a batch of N sequences of T / N: the ideal for equal
                    documents (what a packing-aware cuDNN call could reach)
Effective TFLOP/s count the per-document causal pairs (N x L(L+1)/2 x heads) for every row, so the
rows compare as speeds on the same useful work (full pattern only; --pattern sink_window(...) or
block_sparse(...) runs our cases with that pattern over the packed row and reports ms alone).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import HQ, D, random_qkv_do, save_rows, time_fn  # noqa: E402  (benchmarks/attention.py)

from longgen_jax.attention import AttentionSpec, pallas_gpu, pallas_mgpu, segment_skip  # noqa: E402


@contextlib.contextmanager
def skipping(on: bool):
  old, segment_skip.ENABLED = segment_skip.ENABLED, on
  try:
    yield
  finally:
    segment_skip.ENABLED = old


@contextlib.contextmanager
def segment_paths(name: str):
  """LONGGEN_JAX_MGPU_SEGMENTS forced for the ours_triton/mosaic_segments cases (read while tracing).
  Only that key is restored afterwards: `mock.patch.dict(os.environ)` would also delete what JAX's Mosaic
  GPU module sets on its first import inside the block (MOSAIC_GPU_RUNTIME_LIB_PATH), and the kernel,
  compiled after the block, then fails with "Symbols not found: mosaic_gpu_launch_kernel"."""
  value = {"ours_triton_segments": "0", "ours_mosaic_segments": "1"}.get(name)
  if value is None:
    yield
    return
  key = pallas_mgpu.SEGMENTS_ENV
  old = os.environ.get(key)
  os.environ[key] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = old


def fwd_bwd_fn(name: str, T: int, n_docs: int, spec: AttentionSpec = AttentionSpec.full()):
  """jitted (q, k, v, do) -> (out, grads) of one case."""
  L = T // n_docs
  seg = jnp.repeat(jnp.arange(1, n_docs + 1, dtype=jnp.int32), L)[None]
  if name.startswith("ours"):
    attn = lambda q, k, v: pallas_gpu.pallas_attention(q, k, v, spec, q_segment_ids=seg, kv_segment_ids=seg)
  elif name == "cudnn_causal":
    attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  else:  # cudnn_batched: documents as the batch
    fold = lambda x: x.reshape(n_docs, L, *x.shape[2:])
    attn = lambda q, k, v: jax.nn.dot_product_attention(fold(q), fold(k), fold(v), is_causal=True,
                                                        implementation="cudnn").reshape(q.shape)

  def run(q, k, v, do):
    with skipping(name != "ours_no_skip"), segment_paths(name):   # read while tracing
      out, vjp = jax.vjp(attn, q, k, v)
      return out, vjp(do)
  return jax.jit(run)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq", type=int, default=131072)
  p.add_argument("--documents", default="1,4,16,64")
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--cases", default="ours_packed,ours_no_skip,cudnn_causal,cudnn_batched")
  p.add_argument("--pattern", default="full", help="our cases' pattern (cuDNN cases: full only)")
  p.add_argument("--json", default="")
  args = p.parse_args()
  T, hkv, spec = args.seq, args.kv_heads, AttentionSpec.parse(args.pattern)
  known = {"ours_packed", "ours_no_skip", "ours_triton_segments", "ours_mosaic_segments", "cudnn_causal",
           "cudnn_batched"}
  if unknown := set(args.cases.split(",")) - known:
    raise SystemExit(f"unknown --cases {sorted(unknown)}; known: {sorted(known)}")
  if spec.kind != "full" and any(c.startswith("cudnn") for c in args.cases.split(",")):
    raise SystemExit(f"--pattern {spec}: the cudnn cases time full attention only; pick ours_* cases")
  q, k, v, do = random_qkv_do(T, hkv)
  print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}, {datetime.date.today()}, B 1, T {T}, "
        f"Hq {HQ}, Hkv {hkv}, D {D}, bf16, fwd+bwd, {spec}")
  rows = []
  for n in map(int, args.documents.split(",")):
    if T % n:
      raise SystemExit(f"--seq {T} is not a multiple of {n} documents")
    L = T // n
    pairs = n * L * (L + 1) // 2 * HQ
    for name in args.cases.split(","):
      if name == "cudnn_causal" and n > 1 and any(r["case"] == name for r in rows):
        continue   # the same call for every N: timed once
      row = {"documents": n, "case": name, "seq": T, "kv_heads": hkv, "pattern": str(spec)}
      try:
        row["fwd_bwd_ms"] = 1e3 * time_fn(fwd_bwd_fn(name, T, n, spec), q, k, v, do)
        if spec.kind == "full":
          row["useful_tflops"] = 14 * D * pairs / row["fwd_bwd_ms"] / 1e9
      except Exception as e:  # e.g. a kernel refusing a shape: the row says so
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.json:
    save_rows(args.json, rows)


if __name__ == "__main__":
  main()
