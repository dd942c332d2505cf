"""Generation CLI: python -m longgen_jax.sample --ckpt DIR --prompt "Once upon a time" [--max-new-tokens 64]

(also `longgen-generate`). Streams the continuation to stdout and prints the KV-cache size and
timing to stderr. The library function is `longgen_jax.generate`.
"""

from __future__ import annotations

import argparse
import sys
import time

from longgen_jax.attention.registry import USER_NAMES
from longgen_jax.model.config import DTYPES


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m longgen_jax.sample", description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--ckpt", help="longgen_jax checkpoint dir (config.json + params/) or a HF Llama dir")
  src.add_argument("--preset", help="random weights from a preset (e.g. tiny), for smoke tests")
  txt = p.add_mutually_exclusive_group(required=True)
  txt.add_argument("--prompt", help="prompt text")
  txt.add_argument("--prompt-file", help="file holding the prompt text")
  p.add_argument("--tokenizer", default=None,
                 help="'byte', a SentencePiece .model, or a dir with tokenizer.json "
                      "(default: the checkpoint's own, else byte)")
  p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--stop-token", type=int, action="append", default=None,
                 help="stop token id (repeatable; default: the tokenizer's EOS)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chunk-len", type=int, default=2048, help="prefill chunk length")
  p.add_argument("--kv-int8", action="store_true", help="int8 KV cache for the full layers")
  p.add_argument("--attn-impl", default="auto", choices=USER_NAMES)
  p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
  p.add_argument("--stream-every", type=int, default=8, help="decode steps between printed updates")
  p.add_argument("--compile-cache", default="auto",
                 help="JAX persistent compilation cache dir (auto: ~/.cache/longgen_jax/jax_compile; '' = off)")
  return p


def load_model(args):
  from longgen_jax.model.config import dtype
  from longgen_jax.weights import load_pretrained, random_model
  dt = dtype(args.dtype)
  if args.ckpt:
    return load_pretrained(args.ckpt, dtype=dt, param_dtype=dt, attn_impl=args.attn_impl)
  return random_model(args.preset, seed=args.seed, dtype=dt, param_dtype=dt, attn_impl=args.attn_impl)


def main(argv=None):
  """Parses the arguments and generates; a user error (bad setting, missing file) is one line, exit 2."""
  import os
  args = _parser().parse_args(argv)
  from longgen_jax.weights import ConversionError
  try:
    return _generate(args)
  except (ValueError, FileNotFoundError, ConversionError) as e:
    if os.environ.get("LONGGEN_JAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2


def _generate(args):
  import os
  from longgen_jax.data.tokenizer import resolve_tokenizer
  from longgen_jax.parallel.runtime import enable_compile_cache
  enable_compile_cache(args.compile_cache)
  from longgen_jax.model.generation import cut_at_stop, generate_stream
  from longgen_jax.model.kv_cache import describe_cache
  tok = resolve_tokenizer(args.tokenizer, args.ckpt)
  if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
    raise FileNotFoundError(f"--prompt-file {args.prompt_file}: no such file")
  text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
  ids = ([] if args.no_bos else [int(tok.bos_id)]) + [int(i) for i in tok.encode(text)]
  model = load_model(args)
  stops = args.stop_token if args.stop_token is not None else [int(tok.eos_id)]
  t0 = time.perf_counter()
  new: list[int] = []
  shown = ""
  blocks = generate_stream(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, stop_tokens=stops, seed=args.seed,
                           chunk_len=args.chunk_len, kv_int8=args.kv_int8, attn_impl=args.attn_impl,
                           stream_every=args.stream_every)  # checks every setting before any output
  print(describe_cache(model.config, len(ids) + args.max_new_tokens, 1, dtype=model.dtype,
                       kv_int8=args.kv_int8), file=sys.stderr)
  sys.stdout.write(text)
  for block in blocks:
    new += cut_at_stop(block[0], stops)
    decoded = tok.decode(new)
    if decoded.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
      continue
    sys.stdout.write(decoded[len(shown):])
    sys.stdout.flush()
    shown = decoded
    if any(int(t) in stops for t in block[0]):
      break
  sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
  dt = time.perf_counter() - t0
  print(f"[{len(ids)} prompt tokens, {len(new)} new tokens, {dt:.2f} s incl. compile]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
