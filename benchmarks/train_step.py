"""Train-step speed: LongGen pattern vs all-full attention at Llama-2-7B width, one GPU.

Llama-2-7B dims (4096 hidden, 32 heads, 11008 MLP, vocab 32000) with fewer layers so that fp32
params + AdamW state fit one card: by default 8 layers, 3 full in the middle + 5 sink_window(64,1984)
(the paper's 12-of-32 ratio) against 8 full layers. B=1, bf16 compute, remat="full", chunked loss;
the real train step from longgen_jax.training (optimizer update included). Prints a markdown table and,
with --json, writes the numbers. Needs no grain.

  python benchmarks/train_step.py   (or python -m benchmarks.train_step) --seq-lens 32768,131072 [--attn-impl auto] [--cudnn-baseline]

--documents N packs N equal documents per row (segment ids, positions restarting per document), as
training does by default; cuDNN's public attention takes no segment ids, so with N > 1 the cuDNN
baseline is skipped (the registry would run our kernel under that name) and the all-full row with our
kernel is the packed baseline. --variants picks rows (e.g. only the baselines of a length).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from longgen_jax.attention import AttentionSpec, registry
from longgen_jax.model.config import preset
from longgen_jax.training.flops import peak_tflops, train_flops_per_token
from longgen_jax.training.loss import make_loss_fn
from longgen_jax.training.optimizer import make_optimizer
from longgen_jax.training.state import abstract_model, new_model, new_train_state
from longgen_jax.training.step import make_train_step


def packed_rows(seq_len: int, documents: int) -> tuple[np.ndarray, np.ndarray]:
  """(segment ids 1..documents, positions restarting at 0 per document) of one row of `documents`
  equal documents (the last takes the remainder)."""
  doc_len = -(-seq_len // documents)
  index = np.arange(seq_len)
  return (index // doc_len + 1).astype(np.int32), (index % doc_len).astype(np.int32)


def bench_one(mc, impl: str, seq_len: int, steps: int, remat: str, loss_chunk: int, scan: bool = True,
              documents: int = 1) -> dict:
  mcfg = types.SimpleNamespace(compute_dtype="bfloat16", param_dtype="float32", attn_impl=impl, remat=remat,
                               scan_layers=scan)
  optim = types.SimpleNamespace(lr=1e-5, min_lr_ratio=1.0, warmup_steps=10, schedule="constant", decay_steps=0,
                                weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  optimizer, schedule = make_optimizer(optim, 1000)
  graphdef, _ = abstract_model(mc, mcfg)
  init = jax.jit(lambda: new_train_state(nnx.to_pure_dict(nnx.state(new_model(mc, mcfg, seed=0))),
                                          optimizer))
  state = init()
  loss_fn = make_loss_fn(graphdef, loss_chunk=loss_chunk, segment_attention=documents > 1)
  step = jax.jit(make_train_step(loss_fn, optimizer, schedule), donate_argnums=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, mc.vocab_size, (1, 1, seq_len + 1), dtype=np.int32)
  segment_ids, positions = packed_rows(seq_len, documents)
  batch = {"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(tokens[..., 1:]),
           "positions": jnp.asarray(positions)[None, None], "segment_ids": jnp.asarray(segment_ids)[None, None],
           "loss_mask": jnp.ones((1, 1, seq_len), jnp.float32)}
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch)  # warm-up
  float(m["loss"])
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    loss = float(m["loss"])
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  flops = train_flops_per_token(mc, seq_len) * seq_len
  peak = peak_tflops()
  mem = jax.devices()[0].memory_stats() or {}
  del state
  return {"seq_len": seq_len, "impl": impl, "documents": documents, "step_s": dt, "tokens_per_s": seq_len / dt,
          "model_tflops_per_s": flops / dt / 1e12, "mfu": flops / dt / (peak * 1e12) if peak else None,
          "loss": loss, "compile_s": compile_s,
          "process_peak_mem_gb": mem.get("peak_bytes_in_use", 0) / 2**30}  # high-water mark so far


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seq-lens", default="32768,131072")
  ap.add_argument("--preset", default="llama2_7b", help="model dims (tiny for a CPU smoke run)")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--num-full", type=int, default=3)
  ap.add_argument("--sparse", default="sink_window(64,1984)")
  ap.add_argument("--attn-impl", default="auto", choices=registry.USER_NAMES)
  ap.add_argument("--cudnn-baseline", action="store_true", help="also time all-full with cuDNN attention")
  ap.add_argument("--remat", default="full")
  ap.add_argument("--loss-chunk", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--documents", type=int, default=1, help="equal documents packed per row (segment ids)")
  ap.add_argument("--variants", default="longgen,all-full,all-full-cudnn",
                  help="rows to time: longgen, all-full, all-full-cudnn, longgen-cudnn (the -cudnn rows also "
                       "need --cudnn-baseline; longgen-cudnn: full layers on cuDNN, sparse on ours)")
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  impl = args.attn_impl
  print(f"# attention: full layers -> {registry.choose(impl, AttentionSpec.full())}, "
        f"{args.sparse} -> {registry.choose(impl, AttentionSpec.parse(args.sparse))}")
  base = preset(args.preset, num_layers=args.layers)
  variants = [("longgen", base.with_pattern(args.num_full, args.sparse, "middle"), impl),
              ("all-full", base.all_full(), impl)]
  if args.cudnn_baseline and jax.default_backend() == "gpu":
    if args.documents > 1:
      print("# --documents > 1: no cuDNN baseline (its public API takes no segment ids)")
    else:
      variants.append(("all-full-cudnn", base.all_full(), "cudnn"))
      # LongGen with its full layers on cuDNN (the sparse ones stay ours: the registry's "cudnn")
      variants.append(("longgen-cudnn", base.with_pattern(args.num_full, args.sparse, "middle"), "cudnn"))
  chosen = set(args.variants.split(","))
  if unknown := chosen - {"longgen", "all-full", "all-full-cudnn", "longgen-cudnn"}:
    ap.error(f"unknown --variants {sorted(unknown)}")
  # all-full-cudnn is the "all-full" row with impl cudnn (the ratio column's reference); longgen-cudnn keeps
  # its name so that it never reads as the plain longgen row (e.g. under --attn-impl cudnn)
  variants = [("all-full" if name == "all-full-cudnn" else name, mc, vimpl) for name, mc, vimpl in variants
              if name in chosen]
  dev = jax.devices()[0]
  print(f"# {dev.device_kind}, JAX {jax.__version__}, {datetime.date.today()}, {args.layers} layers "
        f"({args.num_full} full + {args.layers - args.num_full} {args.sparse}) vs all full, B=1, bf16 compute, "
        f"fp32 params + AdamW, remat={args.remat}, loss chunk {args.loss_chunk}, "
        f"{args.documents} document(s) per row")
  rows = []
  for T in map(int, args.seq_lens.split(",")):
    for name, mc, vimpl in variants:
      mc = mc.replace(max_seq_len=T)
      try:
        r = bench_one(mc, vimpl, T, args.steps, args.remat, args.loss_chunk, documents=args.documents)
      except Exception as e:  # e.g. out of memory: record and go on
        r = {"seq_len": T, "impl": vimpl, "error": f"{type(e).__name__}: {str(e)[:200]}"}
      r["variant"] = name
      rows.append(r)
      print(json.dumps(r), flush=True)
  print("\n| seq_len | pattern | attention impl | step (s) | tokens/s | model TFLOP/s | MFU | vs all-full (same impl) | vs all-full cuDNN |")
  print("|---|---|---|---|---|---|---|---|---|")
  def ref(T, ref_impl):
    return next((x for x in rows if x["seq_len"] == T and x["variant"] == "all-full" and x["impl"] == ref_impl
                 and "error" not in x), None)
  for r in rows:
    if "error" in r:
      print(f"| {r['seq_len']} | {r['variant']} | {r['impl']} | {r['error']} | | | | | |")
      continue
    speeds = [f"{b['step_s'] / r['step_s']:.2f}x" if b else "-" for b in (ref(r["seq_len"], r["impl"]),
                                                                          ref(r["seq_len"], "cudnn"))]
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    print(f"| {r['seq_len']} | {r['variant']} | {r['impl']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
          f"{r['model_tflops_per_s']:.0f} | {mfu} | {speeds[0]} | {speeds[1]} |")
  if args.json:
    meta = {"device": dev.device_kind, "jax": jax.__version__, "date": str(datetime.date.today()),
            "args": vars(args)}
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
