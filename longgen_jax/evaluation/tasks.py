"""Readers and scorers for RULER and BABILong task files, stored locally as JSONL.

RULER (github.com/NVIDIA/RULER, scripts/data/prepare.py and synthetic/*.py) writes one object per line:
  {"index": 0, "input": "<the long prompt>", "outputs": ["8811", ...], "length": 4071,
   "answer_prefix": " Answer: ..."}                      (answer_prefix, length optional here)
The prompt is `input`, followed by `answer_prefix` when the row has one and `input` does not already end
with it. Scored as RULER scores: string_match_all (the share of expected outputs found, case-insensitive,
in the generation; the niah/vt/cwe/fwe tasks) or string_match_part (1 if any is found; qa_1/qa_2).

BABILong (github.com/booydar/babilong; the Hugging Face datasets RMT-team/babilong*) rows:
  {"input": "<facts hidden in long text>", "question": "Where is Mary?", "target": "bathroom"}
The prompt is "<context>\\n{input}\\n</context>\\n\\nQuestion: {question}\\nAnswer:" (a base model's form of
BABILong's template, without its instructions and examples); scored as BABILong's compare_answers: the
target, lowercased, occurs in the first sentence of the lowercased generation.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import numpy as np

from longgen_jax.data.sources import expand_paths
from longgen_jax.evaluation.common import EvalError, check_vocab, shared_shapes, wilson_interval
from longgen_jax.model.generation import generate

BABILONG_TEMPLATE = "<context>\n{input}\n</context>\n\nQuestion: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class TaskExample:
  prompt: str
  references: tuple[str, ...]  # RULER: every expected output; BABILong: the one target
  index: str                   # "file:line" unless the row names its own index
  length: int | None           # the row's stated length (tokens of the authors' tokenizer), if any


def _rows(paths: str):
  """(file, line number, object) of every non-empty line of the JSONL files `paths` (globs) match."""
  for path in expand_paths(paths):
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise EvalError(f"{path} line {n}: not JSON ({e})") from None
        if not isinstance(row, dict):
          raise EvalError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        yield path, n, row


def _need(row: dict, where: str, key: str, kind):
  if key not in row:
    raise EvalError(f"{where}: no field {key!r} (keys: {sorted(row)})")
  if not isinstance(row[key], kind):
    raise EvalError(f"{where}: field {key!r} is a {type(row[key]).__name__}, expected {kind.__name__}")
  return row[key]


def read_ruler(paths: str) -> list[TaskExample]:
  """RULER rows (see the module docstring) from JSONL files."""
  out = []
  for path, n, row in _rows(paths):
    where = f"{path} line {n}"
    prompt = _need(row, where, "input", str)
    outputs = _need(row, where, "outputs", list)
    if not outputs or not all(isinstance(o, str) for o in outputs):
      raise EvalError(f"{where}: field 'outputs' must be a non-empty list of strings")
    prefix = row.get("answer_prefix") or ""
    if prefix and not prompt.endswith(prefix):
      prompt += prefix
    out.append(TaskExample(prompt, tuple(outputs), str(row.get("index", f"{path}:{n}")), row.get("length")))
  return out


def read_babilong(paths: str) -> list[TaskExample]:
  """BABILong rows (see the module docstring) from JSONL files."""
  out = []
  for path, n, row in _rows(paths):
    where = f"{path} line {n}"
    text, question = _need(row, where, "input", str), _need(row, where, "question", str)
    target = _need(row, where, "target", str)
    out.append(TaskExample(BABILONG_TEMPLATE.format(input=text, question=question), (target,),
                           str(row.get("index", f"{path}:{n}")), row.get("length")))
  return out


def ruler_string_match_all(prediction: str, references: Sequence[str]) -> float:
  """RULER's per-sample score for most tasks: the share of references found in the prediction."""
  pred = prediction.strip().lower()
  return sum(r.lower() in pred for r in references) / len(references)


def ruler_string_match_part(prediction: str, references: Sequence[str]) -> float:
  """RULER's per-sample score for qa tasks: 1 if any reference is found in the prediction."""
  pred = prediction.strip().lower()
  return float(any(r.lower() in pred for r in references))


def babilong_match(prediction: str, references: Sequence[str]) -> float:
  """BABILong's compare_answers: the target in the first sentence of the prediction (lowercase)."""
  pred = prediction.lower().split(".")[0].split("<context>")[0].split("<example>")[0]
  return float(references[0].lower() in pred)


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "ruler_all": ruler_string_match_all, "ruler_part": ruler_string_match_part, "babilong": babilong_match}


def run_task(model, tok, examples: Sequence[TaskExample], scorer: str, *, max_new_tokens: int = 32,
             batch_size: int = 1, chunk_len: int = 2048, kv_int8: bool = False, attn_impl: str | None = None,
             progress: bool | None = None) -> dict:
  """Greedy generation for every example, scored by `scorer` (a key of SCORERS); the mean score, its
  95% Wilson interval (scores counted as hits when 1), and the score per prompt length in tokens."""
  from tqdm import tqdm
  if not examples:
    raise EvalError("no task examples to evaluate")
  if scorer not in SCORERS:
    raise EvalError(f"unknown scorer {scorer!r}; choose from {list(SCORERS)}")
  prompts = [np.concatenate([[tok.bos_id], tok.encode(e.prompt)]).astype(np.int32) for e in examples]
  check_vocab(model.config, int(max(p.max() for p in prompts)))
  longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
  if len(prompts[longest]) + max_new_tokens > model.config.max_seq_len:
    raise EvalError(f"example {examples[longest].index} takes {len(prompts[longest])} tokens, which plus "
                    f"{max_new_tokens} new tokens exceeds the model's max_seq_len {model.config.max_seq_len}; "
                    "raise it with --max-seq-len or leave the long examples out")
  score = SCORERS[scorer]
  # one cache length for every batch: prompts of any length then share the compiled prefill and decode
  # programs instead of compiling them for each new prompt length
  chunk_len, capacity = shared_shapes(model.config, [len(p) for p in prompts], max_new_tokens, chunk_len)
  rows = []
  for b in tqdm(range(0, len(examples), batch_size), desc=scorer, unit="batch",
                disable=None if progress is None else not progress):
    outs = generate(model, prompts[b:b + batch_size], max_new_tokens=max_new_tokens, stop_tokens=[tok.eos_id],
                    chunk_len=chunk_len, kv_int8=kv_int8, attn_impl=attn_impl, pad_id=tok.pad_id,
                    capacity=capacity)
    for e, p, o in zip(examples[b:b + batch_size], prompts[b:b + batch_size], outs):
      text = tok.decode(o)
      rows.append({"index": e.index, "tokens": len(p), "length": e.length, "references": list(e.references),
                   "output": text, "score": score(text, e.references)})
  scores = np.array([r["score"] for r in rows])
  by_length = {}
  for r in rows:
    by_length.setdefault(r["tokens"] if r["length"] is None else r["length"], []).append(r["score"])
  return {"mode": scorer, "examples": len(rows), "score": float(scores.mean()),
          "ci95": list(wilson_interval(int((scores == 1).sum()), len(rows))),
          "score_by_length": {str(k): float(np.mean(v)) for k, v in sorted(by_length.items())},
          "results": rows}


def format_task(res: dict) -> str:
  lines = [f"{'length':>8}  score"]
  lines += [f"{k:>8}  {v:.3f}" for k, v in res["score_by_length"].items()]
  lo, hi = res["ci95"]
  lines.append(f"{res['mode']}: {res['score']:.3f} over {res['examples']} examples (95% CI of exact hits "
               f"{lo:.3f}-{hi:.3f})")
  return "\n".join(lines)
