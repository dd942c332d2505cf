"""Grain input pipeline: documents -> tokens -> packed [B, seq_len] batches with segment ids.

Order of operations (each one deterministic from the seed, each one checkpointable):
  source (random access) -> hold out eval docs -> this host's shard -> tokenize (+BOS)
  -> upsample long docs -> shuffle (reshuffled every epoch) -> repeat -> pack (concat-then-split)
  -> batch -> model inputs.
A batch holds `inputs`, `targets`, `positions`, `segment_ids` and `loss_mask`, all [B, seq_len]:
packing uses seq_len + 1 tokens per row so inputs and targets are both exactly seq_len long.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from longgen_jax.data.sources import AnswerPairs, RetrievalSource, open_corpus, parse_source
from longgen_jax.data.tokenizer import Tokenizer

_EVAL_SPLIT_SEED = 1234567  # fixed, so the held-out documents don't move when the training seed does


def tokenize(ds: grain.MapDataset, tokenizer: Tokenizer, add_eos: bool = False) -> grain.MapDataset:
  """Text -> {"tokens": int32[n]} with BOS first (the document separator after packing)."""
  def fn(text: str):
    ids = [np.asarray([tokenizer.bos_id], np.int32), tokenizer.encode(text)]
    if add_eos:
      ids.append(np.asarray([tokenizer.eos_id], np.int32))
    return {"tokens": np.concatenate(ids).astype(np.int32)}
  return ds.map(fn)


def tokenize_answers(ds: grain.MapDataset, tokenizer: Tokenizer, answer_weight: float,
                     add_eos: bool = False) -> grain.MapDataset:
  """(prompt, answer) pairs -> {"tokens", "weights"}: BOS + prompt + answer, weight `answer_weight` on
  the answer's tokens and 1 elsewhere. The loss is a weighted mean (training.loss divides by the summed
  mask), so a weight w makes each answer token count as w ordinary tokens."""
  def fn(pair):
    prompt, answer = pair
    ids = [np.asarray([tokenizer.bos_id], np.int32), tokenizer.encode(prompt), tokenizer.encode(answer)]
    if add_eos:
      ids.append(np.asarray([tokenizer.eos_id], np.int32))
    weights = np.ones(sum(map(len, ids)), np.float32)
    weights[1 + len(ids[1]):1 + len(ids[1]) + len(ids[2])] = answer_weight
    return {"tokens": np.concatenate(ids).astype(np.int32), "weights": weights}
  return ds.map(fn)


def whole_document_batches(docs: grain.MapDataset, *, seq_len: int, batch_size: int, seed: int,
                           shuffle: bool = True, repeat: bool = True, prefetch: int = 0) -> grain.IterDataset:
  """Like packed_batches, but no document is split over two rows (rows are padded instead): a
  retrieval example cut in two would ask its question without its needle. Every document must fit
  in seq_len + 1 tokens."""
  def fits(d):
    if len(d["tokens"]) > seq_len + 1:
      raise ValueError(f"a {len(d['tokens'])}-token document does not fit a row of seq_len + 1 = {seq_len + 1} "
                       "tokens; lower data.synthetic.max_chars or raise config.seq_len")
    return d
  docs = docs.map(fits)
  if shuffle:
    docs = docs.shuffle(seed=seed)
  if repeat:
    docs = docs.repeat()
  feats = {k: seq_len + 1 for k in ("tokens", "weights")}
  ds = grain.experimental.FirstFitPackIterDataset(docs.to_iter_dataset(), length_struct=feats,
                                                  num_packing_bins=batch_size, shuffle_bins=False)
  ds = ds.batch(batch_size, drop_remainder=True).map(to_model_batch)
  if prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


def upsample_long_documents(ds: grain.MapDataset, min_tokens: int, factor: int) -> grain.MapDataset:
  """Documents with >= min_tokens tokens appear `factor` times per epoch (LongGen's data recipe)."""
  if factor <= 1:
    return ds
  long_docs = ds.filter(lambda d: len(d["tokens"]) >= min_tokens)  # None where short; skipped later
  return grain.MapDataset.concatenate([ds] + [long_docs] * (factor - 1))


def split_documents(ds: grain.MapDataset, eval_docs: int) -> tuple[grain.MapDataset, grain.MapDataset | None]:
  """(train, eval): eval is a fixed random subset of `eval_docs` documents, disjoint from train."""
  if eval_docs <= 0:
    return ds, None
  if eval_docs >= len(ds):
    raise ValueError(f"data.eval_docs={eval_docs} leaves no training documents (source has {len(ds)})")
  perm = ds.shuffle(seed=_EVAL_SPLIT_SEED)
  return perm[eval_docs:], perm[:eval_docs]


def shard(ds: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
  """This host's disjoint slice of the documents."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  if len(ds) < shard_count:
    raise ValueError(f"{len(ds)} documents cannot be split over {shard_count} hosts")
  return ds[shard_index::shard_count]


def _relative_positions(seg_BT: np.ndarray) -> np.ndarray:
  """Position of each token within its segment's piece of the row (0 at each piece's first token)."""
  B, T = seg_BT.shape
  idx = np.broadcast_to(np.arange(T), (B, T))
  starts = np.concatenate([np.ones((B, 1), bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
  return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)


def to_model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows of T+1 tokens -> inputs/targets/positions/segment_ids/loss_mask of length T.

  A target counts only when it continues the same document as its input (not across a BOS
  boundary, not padding, whose segment id is 0).
  """
  tok, seg = packed["tokens"], packed["tokens_segment_ids"]
  seg_in, seg_tgt = seg[:, :-1], seg[:, 1:]
  mask = ((seg_tgt == seg_in) & (seg_tgt != 0)).astype(np.float32)
  if "weights" in packed:  # per-token loss weights of the target (answer tokens of the retrieval corpus)
    mask = mask * packed["weights"][:, 1:].astype(np.float32)
  return {
      "inputs": tok[:, :-1].astype(np.int32),
      "targets": tok[:, 1:].astype(np.int32),
      "positions": _relative_positions(seg_in),
      "segment_ids": seg_in.astype(np.int32),
      "loss_mask": mask,
  }


def packed_batches(docs: grain.MapDataset, *, seq_len: int, batch_size: int, seed: int,
                   shuffle: bool = True, repeat: bool = True, prefetch: int = 0) -> grain.IterDataset:
  """Tokenized documents -> an IterDataset of model batches (see module docstring)."""
  if shuffle:
    docs = docs.shuffle(seed=seed)
  if repeat:
    docs = docs.repeat()  # the shuffle reseeds itself every epoch
  ds = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
  ds = ds.batch(batch_size, drop_remainder=True).map(to_model_batch)
  if prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


def require_tokens(docs: grain.MapDataset, need: int, tokenizer: Tokenizer) -> None:
  """Raises ValueError, before anything compiles, unless the documents hold at least `need` tokens
  (one packed batch) of which some are text rather than BOS/EOS. Stops reading once they do."""
  total = text = 0
  for i in range(len(docs)):
    tokens = docs[i]["tokens"]
    total += len(tokens)
    text += int(np.sum((tokens != tokenizer.bos_id) & (tokens != tokenizer.eos_id)))
    if total >= need and text:
      return
  raise ValueError(f"the training data yields {total} tokens ({text} of text) from {len(docs)} document(s), but one "
                   f"batch needs batch_size x (seq_len + 1) = {need} with some text: add documents or lower "
                   "config.batch_size / config.seq_len")


def make_datasets(data_cfg: Any, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  shard_index: int | None = None, shard_count: int | None = None,
                  ) -> tuple[grain.IterDataset, grain.IterDataset | None]:
  """(train, eval) pipelines for this host from a config's `data` section.

  batch_size is this host's batch; shard_index/shard_count default to jax's process index/count.
  """
  if shard_index is None or shard_count is None:
    import jax
    shard_index, shard_count = jax.process_index(), jax.process_count()
  synthetic = parse_source(data_cfg.source)[0] in ("synthetic", "retrieval")  # they share data.synthetic
  source = open_corpus(data_cfg.source, data_cfg.paths, data_cfg.text_field,
                       **(dict(data_cfg.synthetic) if synthetic else {}))
  if isinstance(source, RetrievalSource):
    return _retrieval_datasets(source, data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                               shard_index=shard_index, shard_count=shard_count)
  train_docs, eval_docs = split_documents(grain.MapDataset.source(source), data_cfg.eval_docs)
  train_docs = tokenize(shard(train_docs, shard_index, shard_count), tokenizer, data_cfg.add_eos)
  require_tokens(train_docs, batch_size * (seq_len + 1), tokenizer)
  train_docs = upsample_long_documents(train_docs, data_cfg.upsample_min_tokens, data_cfg.upsample_factor)
  train = packed_batches(train_docs, seq_len=seq_len, batch_size=batch_size, seed=seed,
                         prefetch=data_cfg.prefetch)
  evals = None
  if eval_docs is not None:
    eval_docs = tokenize(shard(eval_docs, shard_index, shard_count), tokenizer, data_cfg.add_eos)
    evals = packed_batches(eval_docs, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=False)
  return train, evals


def _retrieval_datasets(source: RetrievalSource, data_cfg: Any, tokenizer: Tokenizer, *, seq_len: int,
                        batch_size: int, seed: int, shard_index: int, shard_count: int):
  """make_datasets for the retrieval corpus: answers weighted, whole documents per row (data.upsample_*
  does not apply: the corpus draws its own lengths)."""
  train_docs, eval_docs = split_documents(grain.MapDataset.source(AnswerPairs(source)), data_cfg.eval_docs)
  w = source.answer_weight
  train_docs = tokenize_answers(shard(train_docs, shard_index, shard_count), tokenizer, w, data_cfg.add_eos)
  require_tokens(train_docs, batch_size * (seq_len + 1), tokenizer)
  train = whole_document_batches(train_docs, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                 prefetch=data_cfg.prefetch)
  evals = None
  if eval_docs is not None:
    eval_docs = tokenize_answers(shard(eval_docs, shard_index, shard_count), tokenizer, w, data_cfg.add_eos)
    evals = whole_document_batches(eval_docs, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=False)
  return train, evals
