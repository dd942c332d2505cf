"""Long-context evaluation: a pass-key (needle) grid and loss by position; CLI.

  python -m longgen_jax.evaluate passkey --ckpt DIR [--tokenizer T] --lengths 1K,4K,16K \\
      --depths 0,0.25,0.5,0.75,1 --samples 5 --seed 0 --out passkey.json
  python -m longgen_jax.evaluate ppl --ckpt DIR [--tokenizer T] --seq-len 128K --bucket 4K \\
      [--source jsonl --paths 'long/*.jsonl'] --docs 8 --out ppl.json

passkey: for every (context length, depth) cell, `--samples` prompts of exactly `length` tokens
hide a random 5-digit pass key in filler text, with the needle starting at fraction `depth`
of the filler (0 = right after BOS, 1 = right before the question). The phrasing is the
synthetic training corpus' (data_sources.SyntheticLongContextSource), so a model trained on it
can answer. The answer is generated greedily (generate.generate) and scored by exact match of
the first run of digits. Prints a depth x length accuracy table; --out writes JSON with
`accuracy[len(lengths)][len(depths)]` in [0, 1] and every key and output.

ppl: mean next-token loss bucketed by position. Each document's first seq_len + 1 tokens
(BOS first; seq_len defaults to the model's max_seq_len) form one row; shorter documents are
skipped. The default source is the synthetic
corpus with documents long enough; --source text/jsonl/parquet/array_record reads files.
Bucket [a, b) holds the losses of input positions a..b-1 (predicting tokens a+1..b). The
logits are computed `--loss-chunk` positions at a time (train.chunked_xent), so a 128K row
never holds [T, V] logits at once.

Lengths accept a K suffix (1K = 1024). Arguments are checked against the checkpoint's
config.json before its weights load; a bad one exits with status 2 and one "error:" line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax.convert import ConversionError, load_config, load_pretrained
from longgen_jax.data_sources import FILLER, PASSKEY_FACT, PASSKEY_QUESTION, open_source
from longgen_jax.generate import generate, resolve_tokenizer
from longgen_jax.inference import PREFILL_IMPLS
from longgen_jax.train import chunked_xent

FILLER_SENTENCES = tuple(re.findall(r"[^.]*\. ", FILLER))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class EvalError(ValueError):
  """A bad evaluation argument, reported as one line by the CLI."""


# ----------------------------------------------------------------------------- pass key


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
  tokens: np.ndarray   # int32 [length]: BOS, filler, needle, filler, question
  key: str
  needle_start: int    # index of the needle's first token
  needle_len: int


def _filler(tok, n: int) -> tuple[np.ndarray, list[int]]:
  """(n filler tokens ending at a sentence end, sentence boundaries within them incl. 0 and n)."""
  sentences = [tok.encode(s) for s in FILLER_SENTENCES]
  per_round = sum(len(s) for s in sentences)
  stream = [s for _ in range(n // per_round + 2) for s in sentences]
  ends = np.cumsum([len(s) for s in stream])
  cut = int(ends[-1]) - n  # keep the last n tokens, so the filler ends at a sentence end
  bounds = sorted({0, n, *(int(e) - cut for e in ends if 0 < e - cut < n)})
  return np.concatenate(stream)[cut:], bounds


def passkey_prompt(tok, length: int, depth: float, key: str) -> PasskeyPrompt:
  """A prompt of exactly `length` tokens with the needle at the sentence boundary nearest depth.

  Pieces are tokenized separately, so lengths and positions are exact for any tokenizer (for
  the byte tokenizer the text equals the training corpus' phrasing byte for byte).
  """
  if not 0 <= depth <= 1:
    raise EvalError(f"depth {depth} is not in [0, 1]")
  needle = tok.encode(PASSKEY_FACT.format(key=key))
  question = tok.encode(PASSKEY_QUESTION)
  n_fill = length - 1 - len(needle) - len(question)
  if n_fill < 0:
    raise EvalError(f"length {length} is too short for a pass-key prompt: the needle and question "
                    f"alone take {length - n_fill} tokens")
  filler, bounds = _filler(tok, n_fill)
  at = min(bounds, key=lambda b: abs(b - depth * n_fill))
  tokens = np.concatenate([[tok.bos_id], filler[:at], needle, filler[at:], question]).astype(np.int32)
  return PasskeyPrompt(tokens, key, 1 + at, len(needle))


def passkey_key(seed: int, length: int, depth: float, sample: int) -> str:
  """A 5-digit key (the corpus' range) that depends only on the cell and sample, not the grid."""
  rng = np.random.default_rng([seed, length, round(depth * 1e6), sample])
  return str(rng.integers(10000, 100000))


def _answer_tokens(tok) -> int:
  """Tokens generated per prompt: a 5-digit answer plus room to see a wrong extra digit."""
  return len(tok.encode(" 99999")) + 2


def score_answer(text: str, key: str) -> bool:
  """Exact match of the first run of digits in the generated text (leading spaces allowed)."""
  m = re.match(r"\s*(\d+)", text)
  return bool(m) and m.group(1) == key


def passkey_grid(model, tok, lengths: Sequence[int], depths: Sequence[float], *, samples: int = 5,
                 seed: int = 0, batch_size: int = 1, chunk_len: int = 2048,
                 attn_impl: str | None = None, progress: bool | None = None) -> dict:
  """Accuracy of greedy pass-key retrieval per (length, depth) cell; see the module docstring."""
  from tqdm import tqdm
  check_passkey_args(model.config, tok, lengths, depths, samples, batch_size)
  max_new = _answer_tokens(tok)
  acc = np.zeros((len(lengths), len(depths)))
  cells = []
  bar = tqdm(total=len(lengths) * len(depths), desc="passkey", unit="cell",
             disable=None if progress is None else not progress)
  for i, length in enumerate(lengths):
    for j, depth in enumerate(depths):
      prompts = [passkey_prompt(tok, length, depth, passkey_key(seed, length, depth, s))
                 for s in range(samples)]
      outputs = []
      for b in range(0, samples, batch_size):
        batch = prompts[b:b + batch_size]
        outputs += generate(model, [p.tokens for p in batch], max_new_tokens=max_new,
                            stop_tokens=[tok.eos_id], chunk_len=chunk_len, attn_impl=attn_impl,
                            pad_id=tok.pad_id)
      texts = [tok.decode(o) for o in outputs]
      hits = [score_answer(t, p.key) for t, p in zip(texts, prompts)]
      acc[i, j] = float(np.mean(hits))
      cells.append({"length": length, "depth": depth, "accuracy": acc[i, j],
                    "needle_starts": [p.needle_start for p in prompts],
                    "answers": [{"key": p.key, "output": t, "correct": h}
                                for p, t, h in zip(prompts, texts, hits)]})
      bar.set_postfix(length=length, depth=depth, acc=f"{acc[i, j]:.2f}")
      bar.update()
  bar.close()
  return {"mode": "passkey", "lengths": list(lengths), "depths": list(depths), "samples": samples,
          "seed": seed, "accuracy": acc.tolist(), "mean_accuracy": float(acc.mean()), "cells": cells}


def check_passkey_args(cfg, tok, lengths, depths, samples, batch_size):
  """Fails on bad arguments before the model is loaded or anything compiles."""
  if not lengths or not depths:
    raise EvalError("give at least one length and one depth")
  if samples < 1 or batch_size < 1:
    raise EvalError(f"--samples and --batch-size must be >= 1, got {samples} and {batch_size}")
  bad = [d for d in depths if not 0 <= d <= 1]
  if bad:
    raise EvalError(f"depths must be in [0, 1], got {bad}")
  _check_vocab(cfg, tok.vocab_size - 1)
  max_len = cfg.max_seq_len
  too_long = [n for n in lengths if n + _answer_tokens(tok) > max_len]
  if too_long:
    raise EvalError(f"length {too_long[0]} plus the answer exceeds the model's max_seq_len {max_len}; "
                    "evaluate shorter lengths or raise it with --max-seq-len")
  for n in lengths:  # too short: fail before any compile
    passkey_prompt(tok, n, 0.0, "10000")


def format_grid(res: dict) -> str:
  """Depth rows x length columns of accuracies, and a mean row."""
  lens = [_fmt_len(n) for n in res["lengths"]]
  acc = np.asarray(res["accuracy"])  # [lengths, depths]
  w = max(6, *(len(s) for s in lens))
  lines = ["depth  " + " ".join(s.rjust(w) for s in lens)]
  for j, d in enumerate(res["depths"]):
    lines.append(f"{d:<5.2f}  " + " ".join(f"{a:.2f}".rjust(w) for a in acc[:, j]))
  lines.append("mean   " + " ".join(f"{a:.2f}".rjust(w) for a in acc.mean(axis=1)))
  lines.append(f"overall {res['mean_accuracy']:.3f} ({res['samples']} samples per cell)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- loss by position


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket", "chunk"))
def bucket_losses(graphdef, params, tokens_BT1, mask_BT, *, bucket: int, chunk: int):
  """(loss sums [nb], counted tokens [nb]) per position bucket of rows tokens [B, T + 1]."""
  model = nnx.merge(graphdef, params)
  inputs, targets = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  hidden_BTE = model.hidden_states(inputs)
  B, T, E = hidden_BTE.shape
  per_bucket = lambda x: x.reshape(B, T // bucket, bucket, *x.shape[2:]).swapaxes(0, 1)
  return jax.lax.map(lambda xs: chunked_xent(model, *xs, chunk),
                     (per_bucket(hidden_BTE), per_bucket(targets), per_bucket(mask_BT)))


def document_rows(tok, source, seq_len: int, num_docs: int) -> tuple[np.ndarray, int]:
  """(rows int32 [n <= num_docs, seq_len + 1] = BOS + a document's first tokens, docs skipped)."""
  rows, skipped = [], 0
  for i in range(len(source)):
    ids = np.concatenate([[tok.bos_id], tok.encode(source[i])]).astype(np.int32)
    if len(ids) < seq_len + 1:
      skipped += 1
      continue
    rows.append(ids[:seq_len + 1])
    if len(rows) == num_docs:
      break
  if not rows:
    raise EvalError(f"no document has the {seq_len + 1} tokens --seq-len {seq_len} needs "
                    f"({skipped} shorter ones skipped); lower --seq-len or use longer documents")
  return np.stack(rows), skipped


def synthetic_source(tok, seq_len: int, num_docs: int, seed: int):
  """The synthetic corpus with documents just long enough for seq_len tokens of this tokenizer."""
  chars_per_token = len(FILLER) / len(tok.encode(FILLER))
  chars = int(math.ceil((seq_len + 1) * chars_per_token * 1.1)) + 200
  return open_source("synthetic", num_docs=num_docs, seed=seed, min_chars=chars, max_chars=chars)


def loss_by_position(model, rows_NT1: np.ndarray, *, bucket: int, loss_chunk: int = 2048,
                     batch_size: int = 1, progress: bool | None = None) -> dict:
  """Mean token loss per position bucket over rows [N, seq_len + 1]; see the module docstring."""
  from tqdm import tqdm
  N, T = rows_NT1.shape[0], rows_NT1.shape[1] - 1
  if bucket < 1 or T % bucket:
    raise EvalError(f"--bucket {bucket} must divide --seq-len {T}")
  if batch_size < 1:
    raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
  _check_vocab(model.config, int(rows_NT1.max()))
  chunk = bucket if bucket <= loss_chunk else math.gcd(bucket, loss_chunk)
  graphdef, params = nnx.split(model)
  sums, counts = np.zeros(T // bucket), np.zeros(T // bucket)
  for b in tqdm(range(0, N, batch_size), desc="ppl", unit="batch",
                disable=None if progress is None else not progress):
    rows = jnp.asarray(rows_NT1[b:b + batch_size])
    s, c = bucket_losses(graphdef, params, rows, jnp.ones(rows[:, 1:].shape, jnp.float32),
                         bucket=bucket, chunk=chunk)
    sums, counts = sums + np.asarray(s, np.float64), counts + np.asarray(c, np.float64)
  buckets = [{"start": k * bucket, "end": (k + 1) * bucket, "tokens": int(counts[k]),
              "loss": sums[k] / counts[k], "ppl": math.exp(min(sums[k] / counts[k], 700))}
             for k in range(T // bucket)]
  mean = float(sums.sum() / counts.sum())
  return {"mode": "ppl", "seq_len": T, "bucket": bucket, "docs": N, "buckets": buckets,
          "mean_loss": mean, "mean_ppl": math.exp(min(mean, 700))}


def format_buckets(res: dict) -> str:
  lines = [f"{'positions':>17}  {'loss':>8}  {'ppl':>10}"]
  for b in res["buckets"]:
    lines.append(f"{b['start']:>8}-{b['end']:<8}  {b['loss']:8.4f}  {b['ppl']:10.3f}")
  lines.append(f"mean loss {res['mean_loss']:.4f} (ppl {res['mean_ppl']:.3f}) over {res['docs']} "
               f"documents x {res['seq_len']} tokens")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- shared


def _check_vocab(cfg, top: int):
  """The tokenizer's ids must be rows of the model's embedding."""
  vocab = cfg.vocab_size
  if top >= vocab:
    raise EvalError(f"tokenizer ids reach {top} but the model's vocab_size is {vocab}: "
                    "wrong --tokenizer for this checkpoint?")


def _fmt_len(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


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
  """The checkpoint's model; the prefill-only 'cudnn' impl leaves the model on 'auto'."""
  over = {"max_seq_len": max_seq_len} if max_seq_len else {}
  return load_pretrained(ckpt, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype],
                         attn_impl="auto" if attn_impl == "cudnn" else attn_impl, remat="none", **over)


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--ckpt", required=True, help="longgen_jax checkpoint dir or a Hugging Face Llama dir")
  common.add_argument("--tokenizer", default=None,
                      help="'byte', a SentencePiece .model, or a dir with tokenizer.json "
                           "(default: the checkpoint's own, else byte)")
  common.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
  common.add_argument("--attn-impl", default="auto", choices=PREFILL_IMPLS)
  common.add_argument("--max-seq-len", type=parse_length, default=None,
                      help="override the checkpoint's max_seq_len (e.g. after RoPE extension)")
  common.add_argument("--batch-size", type=int, default=1, help="prompts / rows per forward pass")
  common.add_argument("--seed", type=int, default=0)
  common.add_argument("--out", default=None, help="write the results as JSON here")
  common.add_argument("--no-progress", action="store_true")
  p = argparse.ArgumentParser(prog="python -m longgen_jax.evaluate", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  k = sub.add_parser("passkey", parents=[common], help="pass-key retrieval grid: lengths x depths")
  k.add_argument("--lengths", default="1K,2K,4K", help="comma-separated context lengths in tokens")
  k.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
  k.add_argument("--samples", type=int, default=5, help="prompts (random keys) per cell")
  k.add_argument("--chunk-len", type=parse_length, default=2048, help="prefill chunk length")
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
  return p


def default_bucket(seq_len: int) -> int:
  """1K-token buckets, or 8 buckets when that gives fewer than 4."""
  return 1024 if seq_len % 1024 == 0 and seq_len >= 4096 else max(1, seq_len // 8)


def run(args) -> dict:
  """Runs one parsed command; returns the JSON-able result (also printed / written).

  Arguments and data are checked against the checkpoint's config before the weights load.
  """
  progress = False if args.no_progress else None
  tok = resolve_tokenizer(args.tokenizer, args.ckpt)
  cfg = load_config(args.ckpt)
  if args.max_seq_len:
    cfg = cfg.replace(max_seq_len=args.max_seq_len)
  load = lambda: load_model(args.ckpt, dtype=args.dtype, attn_impl=args.attn_impl, max_seq_len=args.max_seq_len)
  if args.command == "passkey":
    lengths = parse_list(args.lengths, parse_length)
    depths = parse_list(args.depths, float)
    check_passkey_args(cfg, tok, lengths, depths, args.samples, args.batch_size)
    res = passkey_grid(load(), tok, lengths, depths, samples=args.samples, seed=args.seed,
                       batch_size=args.batch_size, chunk_len=args.chunk_len,
                       attn_impl=args.attn_impl, progress=progress)
    text = format_grid(res)
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
    _check_vocab(cfg, int(rows.max()))
    res = loss_by_position(load(), rows, bucket=bucket, loss_chunk=args.loss_chunk,
                           batch_size=args.batch_size, progress=progress)
    res["skipped_short_docs"] = skipped
    text = format_buckets(res)
  res["ckpt"] = args.ckpt
  print(text)
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
