"""Mean next-token loss bucketed by position over long documents.

Each document's first seq_len + 1 tokens (BOS first) form one row; shorter documents are
skipped. Bucket [a, b) holds the losses of input positions a..b-1 (predicting tokens a+1..b).
The logits are computed `loss_chunk` positions at a time (training.loss.chunked_xent), so a
128K row never holds [T, V] logits at once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax.data.sources import FILLER, open_source
from longgen_jax.evaluation.common import EvalError, check_vocab
from longgen_jax.model.llama import sequence_positions
from longgen_jax.training.loss import chunked_xent


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket", "chunk"))
def bucket_losses(graphdef, params, tokens_BT1, mask_BT, *, bucket: int, chunk: int):
  """(loss sums [nb], counted tokens [nb]) per position bucket of rows tokens [B, T + 1]."""
  model = nnx.merge(graphdef, params)
  inputs, targets = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  hidden_BTE = model.hidden_states(inputs, sequence_positions(inputs))
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
  check_vocab(model.config, int(rows_NT1.max()))
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


def default_bucket(seq_len: int) -> int:
  """1K-token buckets, or 8 buckets when that gives fewer than 4."""
  return 1024 if seq_len % 1024 == 0 and seq_len >= 4096 else max(1, seq_len // 8)
