"""Evaluation CLI (also `longgen-evaluate`): a pass-key (needle) grid and loss by position.

  python -m longgen_jax.evaluate passkey --ckpt DIR [--tokenizer T] --lengths 1K,4K,16K \\
      --depths 0,0.25,0.5,0.75,1 --samples 5 --seed 0 --out passkey.json
  python -m longgen_jax.evaluate ppl --ckpt DIR [--tokenizer T] --seq-len 128K --bucket 4K \\
      [--source jsonl --paths 'long/*.jsonl'] --docs 8 --out ppl.json

  python -m longgen_jax.evaluate ruler --ckpt DIR --data 'ruler/niah_single_1/*.jsonl' [--metric part]
  python -m longgen_jax.evaluate babilong --ckpt DIR --data 'babilong/qa1/*.jsonl'

passkey (evaluation.passkey): prints a depth x length accuracy table; --out writes JSON with
`accuracy[len(lengths)][len(depths)]` in [0, 1], each cell's hits, samples and 95% Wilson interval
(`ci95`), and every key and output; plus a heatmap PNG (--plot, default: --out with .png).

ppl (evaluation.ppl): seq_len defaults to the model's max_seq_len; the default source is the
synthetic corpus with documents long enough; --source text/jsonl/parquet/array_record reads files.
--out also writes a loss/perplexity-by-position plot (--plot, default: --out with .png).

ruler / babilong (evaluation.tasks): task files as those projects' data scripts write them (JSONL,
stored locally; docs/evaluation.md), scored by the projects' own metrics.

Lengths beyond the training length: pass --max-seq-len; RoPE keeps the checkpoint's base
(rope_theta), and the results record it with the checkpoint's own max_seq_len.

Lengths accept a K suffix (1K = 1024). Arguments are checked against the checkpoint's
config.json before its weights load; a bad one exits with status 2 and one "error:" line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from longgen_jax.attention.registry import USER_NAMES
from longgen_jax.data.sources import open_source
from longgen_jax.data.tokenizer import resolve_tokenizer
from longgen_jax.evaluation.common import EvalError, check_vocab
from longgen_jax.evaluation.passkey import check_passkey_args, format_grid, passkey_grid
from longgen_jax.evaluation.ppl import (default_bucket, document_rows, format_buckets, loss_by_position,
                                        synthetic_source)
from longgen_jax.evaluation.tasks import SCORERS, format_task, read_babilong, read_ruler, run_task
from longgen_jax.model.config import DTYPES
from longgen_jax.weights import ConversionError, load_config, load_pretrained


def parse_length(text: str) -> int:
  """'4096', '4K' or '128k' (K = 1024) -> tokens."""
  m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
  if not m or int(m.group(1)) < 1:
    raise EvalError(f"bad length {text!r}: use a positive integer, optionally with K (= 1024)")
  return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_list(text: str, fn) -> list:
  try:
    return [fn(s) for s in text.split(",") if s.strip()]
  except ValueError as e:
    raise EvalError(f"bad list {text!r}: {e}") from None


def load_model(ckpt: str, *, dtype: str = "bfloat16", attn_impl: str = "auto",
               max_seq_len: int | None = None):
  """The checkpoint's model for evaluation (no remat)."""
  over = {"max_seq_len": max_seq_len} if max_seq_len else {}
  return load_pretrained(ckpt, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], attn_impl=attn_impl,
                         remat="none", **over)


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--ckpt", required=True, help="longgen_jax checkpoint dir or a Hugging Face Llama dir")
  common.add_argument("--tokenizer", default=None,
                      help="'byte', a SentencePiece .model, or a dir with tokenizer.json "
                           "(default: the checkpoint's own, else byte)")
  common.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
  common.add_argument("--attn-impl", default="auto", choices=USER_NAMES)
  common.add_argument("--max-seq-len", type=parse_length, default=None,
                      help="override the checkpoint's max_seq_len (e.g. after RoPE extension)")
  common.add_argument("--batch-size", type=int, default=1, help="prompts / rows per forward pass")
  common.add_argument("--seed", type=int, default=0)
  common.add_argument("--out", default=None, help="write the results as JSON here")
  common.add_argument("--force", action="store_true", help="replace an existing --out file")
  common.add_argument("--no-progress", action="store_true")
  p = argparse.ArgumentParser(prog="python -m longgen_jax.evaluate", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  k = sub.add_parser("passkey", parents=[common], help="pass-key retrieval grid: lengths x depths")
  k.add_argument("--lengths", default="1K,2K,4K", help="comma-separated context lengths in tokens")
  k.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
  k.add_argument("--samples", type=int, default=5, help="prompts (random keys) per cell")
  k.add_argument("--chunk-len", type=parse_length, default=2048, help="prefill chunk length")
  k.add_argument("--kv-int8", action="store_true", help="full layers' KV cache in int8 (half the memory)")
  q = sub.add_parser("ppl", parents=[common], help="mean token loss bucketed by position")
  q.add_argument("--seq-len", type=parse_length, default=None,
                 help="tokens per document row (default: the model's max_seq_len)")
  q.add_argument("--bucket", type=parse_length, default=None,
                 help="positions per bucket, dividing --seq-len (default 1K, or seq_len / 8 below 4K)")
  q.add_argument("--docs", type=int, default=8, help="documents (rows) to evaluate")
  q.add_argument("--source", default="synthetic", choices=["synthetic", "text", "jsonl", "parquet", "array_record"])
  q.add_argument("--paths", default="", help="comma-separated globs for a file --source")
  q.add_argument("--text-field", default="text", help="jsonl / parquet field holding the document")
  q.add_argument("--loss-chunk", type=parse_length, default=2048, help="positions whose logits exist at once")
  for cmd in (k, q):
    cmd.add_argument("--plot", default=None, help="write the PNG here (default: --out with .png; none without --out)")
    cmd.add_argument("--title", default=None, help="the plot's title (default: the checkpoint directory's name)")
  for name, what in (("ruler", "RULER task files (JSONL: index, input, outputs, length)"),
                     ("babilong", "BABILong task files (JSONL: input, question, target)")):
    t = sub.add_parser(name, parents=[common], help=what)
    t.add_argument("--data", required=True, help="comma-separated globs of JSONL task files")
    t.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens per example")
    t.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples (0 = all)")
    t.add_argument("--chunk-len", type=parse_length, default=2048, help="prefill chunk length")
    t.add_argument("--kv-int8", action="store_true", help="full layers' KV cache in int8 (half the memory)")
    if name == "ruler":
      t.add_argument("--metric", default="all", choices=["all", "part"],
                     help="RULER's string_match_all (niah, vt, cwe, fwe) or string_match_part (qa)")
  return p


def plot_path(args) -> str | None:
  """--plot, else --out with .png, else None (no picture without a place for the results; none for tasks)."""
  if args.command not in ("passkey", "ppl"):
    return None
  return args.plot or (os.path.splitext(args.out)[0] + ".png" if args.out else None)


def check_writable(path: str, force: bool = False) -> None:
  """Fails before any work when the results could not be written, or would replace a file without --force."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise EvalError(f"--out {path}: cannot write a file there (is the directory missing or read-only?)")
  if os.path.exists(path) and not force:
    raise EvalError(f"--out {path} already exists; pass --force to replace it")


def run(args) -> dict:
  """Runs one parsed command; returns the JSON-able result (also printed / written).

  Arguments and data are checked against the checkpoint's config before the weights load.
  """
  progress = False if args.no_progress else None
  plot = plot_path(args)
  for path in filter(None, (args.out, plot)):
    check_writable(path, args.force)
  tok = resolve_tokenizer(args.tokenizer, args.ckpt)
  cfg = load_config(args.ckpt)
  checkpoint = {"checkpoint_max_seq_len": cfg.max_seq_len, "rope_theta": cfg.rope_theta}
  if args.max_seq_len:
    cfg = cfg.replace(max_seq_len=args.max_seq_len)
  load = lambda: load_model(args.ckpt, dtype=args.dtype, attn_impl=args.attn_impl, max_seq_len=args.max_seq_len)
  if args.command == "passkey":
    lengths = parse_list(args.lengths, parse_length)
    depths = parse_list(args.depths, float)
    check_passkey_args(cfg, tok, lengths, depths, args.samples, args.batch_size)
    res = passkey_grid(load(), tok, lengths, depths, samples=args.samples, seed=args.seed,
                       batch_size=args.batch_size, chunk_len=args.chunk_len, kv_int8=args.kv_int8,
                       attn_impl=args.attn_impl, progress=progress)
    text = format_grid(res)
  elif args.command in ("ruler", "babilong"):
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.limit < 0:
      raise EvalError("--max-new-tokens and --batch-size must be >= 1 and --limit >= 0")
    examples = (read_ruler if args.command == "ruler" else read_babilong)(args.data)
    examples = examples[:args.limit] if args.limit else examples
    scorer = f"ruler_{args.metric}" if args.command == "ruler" else "babilong"
    assert scorer in SCORERS
    res = run_task(load(), tok, examples, scorer, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   chunk_len=args.chunk_len, kv_int8=args.kv_int8, attn_impl=args.attn_impl, progress=progress)
    res["data"] = args.data
    text = format_task(res)
  else:
    seq_len = args.seq_len or cfg.max_seq_len
    bucket = args.bucket or default_bucket(seq_len)
    if seq_len > cfg.max_seq_len:
      raise EvalError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                      "lower it or raise it with --max-seq-len")
    if seq_len % bucket:
      raise EvalError(f"--bucket {bucket} must divide --seq-len {seq_len}")
    if args.docs < 1:
      raise EvalError(f"--docs must be >= 1, got {args.docs}")
    if args.source != "synthetic" and not args.paths:
      raise EvalError(f"--source {args.source} needs --paths")
    source = (synthetic_source(tok, seq_len, args.docs, args.seed) if args.source == "synthetic"
              else open_source(args.source, args.paths, args.text_field))
    rows, skipped = document_rows(tok, source, seq_len, args.docs)
    check_vocab(cfg, int(rows.max()))
    res = loss_by_position(load(), rows, bucket=bucket, loss_chunk=args.loss_chunk,
                           batch_size=args.batch_size, progress=progress)
    res["skipped_short_docs"] = skipped
    text = format_buckets(res)
  res["ckpt"] = args.ckpt
  res.update(checkpoint, max_seq_len=cfg.max_seq_len)
  if args.command != "ppl":
    res["kv_int8"] = args.kv_int8
  print(text)
  if plot:
    from longgen_jax.evaluation import plots
    draw = plots.passkey_heatmap if args.command == "passkey" else plots.loss_by_position_plot
    res["plot"] = draw(res, plot, title=args.title or os.path.basename(os.path.normpath(args.ckpt)))
    print(f"wrote {plot}", file=sys.stderr)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
  return res


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    run(args)
  except (EvalError, ConversionError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
