"""Conversion CLI (also `longgen-convert`): Hugging Face Llama <-> longgen_jax checkpoints.

  python -m longgen_jax.convert hf-to-jax --hf-dir DIR --out DIR [--pattern longgen] [--rope-theta X]
  python -m longgen_jax.convert jax-to-hf --ckpt DIR --out DIR [--shard-size 5GB]

The work happens in `longgen_jax.weights` (names, streaming, our format).
"""

from __future__ import annotations

import argparse
import sys

from longgen_jax.model.config import DEFAULT_SPARSE, DTYPES, PLACEMENTS, PRESETS, ModelConfig
from longgen_jax.weights import ConversionError, hf_to_jax, jax_to_hf


def _describe(cfg: ModelConfig) -> str:
  sparse = sorted({str(s) for s in cfg.layer_specs if not s.is_full})
  pattern = f"{cfg.num_full_layers} full" + (f" + {cfg.num_layers - cfg.num_full_layers} {'/'.join(sparse)}"
                                             if sparse else "")
  return (f"{cfg.num_layers} layers ({pattern}), hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, rope_theta {cfg.rope_theta:g}")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m longgen_jax.convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  h = sub.add_parser("hf-to-jax", help="Hugging Face Llama (safetensors) -> longgen_jax checkpoint")
  h.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors")
  h.add_argument("--out", required=True, help="output checkpoint directory")
  h.add_argument("--pattern", default=None,
                 help="full | longgen | a preset name (" + ", ".join(PRESETS) + ") | spec(s), e.g. "
                      "'sink_window(64,1984)' or 'full;block_sparse(64,16,64);full'. Default: keep the "
                      "source's pattern (all full for a plain Llama)")
  h.add_argument("--sparse", default=None, help=f"sparse spec for --pattern longgen/preset (default {DEFAULT_SPARSE})")
  h.add_argument("--num-full", type=int, default=None, help="full layers for --pattern longgen (default 3/8 of them)")
  h.add_argument("--placement", default="middle", choices=PLACEMENTS)
  h.add_argument("--rope-theta", type=float, default=None, help="replace rope_theta (LongGen extends it for 128K)")
  h.add_argument("--max-seq-len", type=int, default=None)
  h.add_argument("--param-dtype", default="float32", choices=list(DTYPES))
  h.add_argument("--force", action="store_true", help="replace an existing params/ in --out")
  j = sub.add_parser("jax-to-hf", help="longgen_jax checkpoint -> Hugging Face LlamaForCausalLM safetensors")
  j.add_argument("--ckpt", required=True, help="our checkpoint directory")
  j.add_argument("--out", required=True, help="output Hugging Face directory")
  j.add_argument("--shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
  j.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the stored parameter dtype")
  j.add_argument("--force", action="store_true", help="replace existing weight files in --out")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "hf-to-jax":
      cfg = hf_to_jax(args.hf_dir, args.out, pattern=args.pattern, sparse=args.sparse,
                      num_full=args.num_full, placement=args.placement, rope_theta=args.rope_theta,
                      max_seq_len=args.max_seq_len, param_dtype=DTYPES[args.param_dtype],
                      overwrite=args.force)
      print(f"wrote {args.out}: {_describe(cfg)}")
    else:
      files = jax_to_hf(args.ckpt, args.out, shard_size=args.shard_size, dtype=args.dtype,
                        overwrite=args.force)
      print(f"wrote {args.out}: config.json + {len(files)} safetensors file(s)")
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # an unwritable or invalid --out
    print(f"error: cannot write {args.out}: {e.strerror or e} ({e.filename or args.out})", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
