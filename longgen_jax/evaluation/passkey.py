"""Pass-key (needle) retrieval over a grid of context lengths x needle depths.

For every (length, depth) cell, `samples` prompts of exactly `length` tokens hide a random
5-digit pass key in filler text, with the needle starting at fraction `depth` of the filler
(0 = right after BOS, 1 = right before the question). The phrasing is the synthetic training
corpus' (data.sources.SyntheticLongContextSource), so a model trained on it can answer. The
answer is generated greedily (`generate`) and scored by exact match of the first run of digits.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from longgen_jax.data.sources import FILLER, PASSKEY_FACT, PASSKEY_QUESTION
from longgen_jax.evaluation.common import EvalError, check_vocab, format_length, shared_shapes, wilson_interval
from longgen_jax.model.generation import generate

FILLER_SENTENCES = tuple(re.findall(r"[^.]*\. ", FILLER))


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
                 seed: int = 0, batch_size: int = 1, chunk_len: int = 2048, kv_int8: bool = False,
                 attn_impl: str | None = None, progress: bool | None = None) -> dict:
  """Accuracy of greedy pass-key retrieval per (length, depth) cell; see the module docstring.
  kv_int8 keeps the full layers' KV cache in int8 (half the cache: longer prompts or larger batches)."""
  from tqdm import tqdm
  check_passkey_args(model.config, tok, lengths, depths, samples, batch_size)
  max_new = _answer_tokens(tok)
  # one cache length (and chunk) for the whole grid: every length runs the same compiled prefill and decode
  # programs, compiled once instead of once per length
  chunk_len, capacity = shared_shapes(model.config, lengths, max_new, chunk_len)
  acc = np.zeros((len(lengths), len(depths)))
  correct = np.zeros((len(lengths), len(depths)), int)
  ci = np.zeros((len(lengths), len(depths), 2))  # 95% Wilson interval of each cell
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
                            stop_tokens=[tok.eos_id], chunk_len=chunk_len, kv_int8=kv_int8,
                            attn_impl=attn_impl, pad_id=tok.pad_id, capacity=capacity)
      texts = [tok.decode(o) for o in outputs]
      hits = [score_answer(t, p.key) for t, p in zip(texts, prompts)]
      acc[i, j] = float(np.mean(hits))
      correct[i, j] = sum(hits)
      ci[i, j] = wilson_interval(sum(hits), len(hits))
      cells.append({"length": length, "depth": depth, "accuracy": acc[i, j], "hits": sum(hits),
                    "samples": len(hits), "ci95": list(ci[i, j]),
                    "needle_starts": [p.needle_start for p in prompts],
                    "answers": [{"key": p.key, "output": t, "correct": h}
                                for p, t, h in zip(prompts, texts, hits)]})
      bar.set_postfix(length=length, depth=depth, acc=f"{acc[i, j]:.2f}")
      bar.update()
  bar.close()
  per_length = [wilson_interval(int(c), len(depths) * samples) for c in correct.sum(axis=1)]
  return {"mode": "passkey", "lengths": list(lengths), "depths": list(depths), "samples": samples,
          "seed": seed, "accuracy": acc.tolist(), "mean_accuracy": float(acc.mean()), "cells": cells,
          "ci95": ci.tolist(), "accuracy_by_length": acc.mean(axis=1).tolist(),
          "ci95_by_length": [list(c) for c in per_length],
          "mean_ci95": list(wilson_interval(int(correct.sum()), correct.size * samples))}


def check_passkey_args(cfg, tok, lengths, depths, samples, batch_size):
  """Fails on bad arguments before the model is loaded or anything compiles."""
  if not lengths or not depths:
    raise EvalError("give at least one length and one depth")
  if samples < 1 or batch_size < 1:
    raise EvalError(f"--samples and --batch-size must be >= 1, got {samples} and {batch_size}")
  bad = [d for d in depths if not 0 <= d <= 1]
  if bad:
    raise EvalError(f"depths must be in [0, 1], got {bad}")
  check_vocab(cfg, tok.vocab_size - 1)
  max_len = cfg.max_seq_len
  too_long = [n for n in lengths if n + _answer_tokens(tok) > max_len]
  if too_long:
    raise EvalError(f"length {too_long[0]} plus the answer exceeds the model's max_seq_len {max_len}; "
                    "evaluate shorter lengths or raise it with --max-seq-len")
  for n in lengths:  # too short: fail before any compile
    passkey_prompt(tok, n, 0.0, "10000")


def format_grid(res: dict) -> str:
  """Depth rows x length columns of accuracies, and a mean row."""
  lens = [format_length(n) for n in res["lengths"]]
  acc = np.asarray(res["accuracy"])  # [lengths, depths]
  w = max(6, *(len(s) for s in lens))
  lines = ["depth  " + " ".join(s.rjust(w) for s in lens)]
  for j, d in enumerate(res["depths"]):
    lines.append(f"{d:<5.2f}  " + " ".join(f"{a:.2f}".rjust(w) for a in acc[:, j]))
  lines.append("mean   " + " ".join(f"{a:.2f}".rjust(w) for a in acc.mean(axis=1)))
  lo, hi = res.get("mean_ci95", (float("nan"),) * 2)
  lines.append(f"overall {res['mean_accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}; {res['samples']} samples per cell)")
  return "\n".join(lines)
