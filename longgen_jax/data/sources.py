"""Random-access document sources (len + getitem -> str) for grain's MapDataset.

Random access is what makes shuffling global and deterministic, per-host sharding a slice, and the
iterator state a few integers. Sources: local text files (one document per file), JSONL and Parquet
(a text field per row), ArrayRecord (one UTF-8 document per record), and a synthetic long-context corpus.
"""

from __future__ import annotations

import bisect
import glob
import json
import os

import numpy as np


def expand_paths(paths: str | list[str]) -> list[str]:
  """Comma-separated globs -> sorted files; a pattern that matches nothing is an error."""
  patterns = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else list(paths)
  files = []
  for pattern in filter(None, patterns):
    found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not found:
      raise FileNotFoundError(f"data path {pattern!r} matches no files")
    files.extend(f for f in found if os.path.isfile(f))
  if not files:
    raise FileNotFoundError(f"no data files given (data.paths={paths!r})")
  return files


class TextFilesSource:
  """Each file is one document (books, code files: the long documents LongGen wants)."""

  def __init__(self, paths):
    self.files = expand_paths(paths)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i) -> str:
    with open(self.files[i], "rb") as f:
      raw = f.read()
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line = raw[:e.start].count(b"\n") + 1
      raise ValueError(f"{self.files[i]} line {line}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                       "convert it or leave it out of config.data.paths") from None


class _RowIndex:
  """Maps a global row index to (file, local row) from per-file row counts."""

  def __init__(self, counts: list[int]):
    self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()

  def __len__(self):
    return self.starts[-1]

  def locate(self, i: int) -> tuple[int, int]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    f = bisect.bisect_right(self.starts, i) - 1
    return f, i - self.starts[f]


class JsonlSource:
  """One JSON object per line; `text_field` holds the document. Line offsets are indexed once."""

  def __init__(self, paths, text_field: str = "text"):
    self.files, self.text_field = expand_paths(paths), text_field
    self.offsets, self.line_numbers = [], []
    for path in self.files:
      offs, lines, pos = [], [], 0
      with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
          if line.strip():
            offs.append(pos)
            lines.append(n)
          pos += len(line)
      self.offsets.append(offs)
      self.line_numbers.append(lines)
    self.index = _RowIndex([len(o) for o in self.offsets])

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i) -> str:
    f, r = self.index.locate(i)
    where = f"{self.files[f]} line {self.line_numbers[f][r]}"
    with open(self.files[f], "rb") as fh:
      fh.seek(self.offsets[f][r])
      raw = fh.readline()
    try:
      row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{where}: not a JSON object of UTF-8 text ({type(e).__name__}: {e})") from None
    if not isinstance(row, dict) or self.text_field not in row:
      keys = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise KeyError(f"{where}: no field {self.text_field!r} (keys: {keys})")
    if not isinstance(row[self.text_field], str):
      raise ValueError(f"{where}: field {self.text_field!r} is a {type(row[self.text_field]).__name__}, not text")
    return row[self.text_field]


class ParquetSource:
  """Rows of Parquet files; reads one row group at a time and keeps the last one."""

  def __init__(self, paths, text_field: str = "text"):
    import pyarrow.parquet as pq
    self.files, self.text_field = expand_paths(paths), text_field
    self._groups = []  # (file, row group, first row of the group)
    counts = []
    for fi, path in enumerate(self.files):
      meta = pq.ParquetFile(path).metadata
      if text_field not in meta.schema.names:
        raise KeyError(f"{path}: no column {text_field!r} (columns: {meta.schema.names})")
      for g in range(meta.num_row_groups):
        self._groups.append((fi, g))
        counts.append(meta.row_group(g).num_rows)
    self.index = _RowIndex(counts)
    self._cache_key, self._cache = None, None

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i) -> str:
    import pyarrow.parquet as pq
    g, r = self.index.locate(i)
    if self._cache_key != g:
      fi, rg = self._groups[g]
      table = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=[self.text_field])
      self._cache_key, self._cache = g, table.column(self.text_field).to_pylist()
    return self._cache[r]


class ArrayRecordSource:
  """ArrayRecord files whose records are UTF-8 documents (grain's own ArrayRecordDataSource)."""

  def __init__(self, paths):
    import grain
    self.files = expand_paths(paths)
    self._src = grain.sources.ArrayRecordDataSource(self.files)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i) -> str:
    rec = self._src[i]
    return rec.decode("utf-8", "replace") if isinstance(rec, bytes) else str(rec)


# ----------------------------------------------------------------------------- synthetic

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
# The pass-key phrasing; evaluate.py builds its needle-in-a-haystack prompts from the same strings.
PASSKEY_FACT = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


class SyntheticLongContextSource:
  """Deterministic long-context documents: a pass key or key-value pairs hidden in filler text.

  Document i depends only on (seed, i). Each ends with a question whose answer appears once, far
  earlier, so a model can only predict it by attending back: the skill LongGen trains for. Lengths
  are log-uniform in [min_chars, max_chars], so some documents span several packed sequences.
  """

  def __init__(self, num_docs: int, seed: int = 0, min_chars: int = 200, max_chars: int = 4000):
    if num_docs < 1 or not 0 < min_chars <= max_chars:
      raise ValueError(f"synthetic source needs num_docs >= 1 and 0 < min_chars <= max_chars; got "
                       f"{num_docs}, {min_chars}, {max_chars}")
    self.num_docs, self.seed, self.min_chars, self.max_chars = num_docs, seed, min_chars, max_chars

  def __len__(self):
    return self.num_docs

  def __getitem__(self, i) -> str:
    if not 0 <= i < self.num_docs:
      raise IndexError(i)
    rng = np.random.default_rng([self.seed, i])
    n = int(np.exp(rng.uniform(np.log(self.min_chars), np.log(self.max_chars))))
    if rng.random() < 0.5:
      key = str(rng.integers(10000, 100000))
      facts = [PASSKEY_FACT.format(key=key)]
      question = f"{PASSKEY_QUESTION} {key}."
    else:
      pairs = [(f"{rng.integers(0, 16**4):04x}", str(rng.integers(100, 1000)))
               for _ in range(rng.integers(1, 4))]
      facts = [f"Key {k} holds value {v}. " for k, v in pairs]
      k, v = pairs[rng.integers(len(pairs))]
      question = f"What value does key {k} hold? Key {k} holds value {v}."
    reps = max(1, (n - sum(map(len, facts)) - len(question)) // len(FILLER))
    chunks = [FILLER] * reps
    for fact in facts:
      chunks.insert(int(rng.integers(0, len(chunks))), fact)
    return "".join(chunks) + question


def open_source(kind: str, paths: str = "", text_field: str = "text", **synthetic):
  """A document source by name: synthetic, text, jsonl, parquet or array_record."""
  if kind == "synthetic":
    return SyntheticLongContextSource(**synthetic)
  if kind == "text":
    return TextFilesSource(paths)
  if kind == "jsonl":
    return JsonlSource(paths, text_field)
  if kind == "parquet":
    return ParquetSource(paths, text_field)
  if kind == "array_record":
    return ArrayRecordSource(paths)
  raise ValueError(f"unknown data.source {kind!r}; choose synthetic, text, jsonl, parquet or array_record")


# ----------------------------------------------------------------------------- retrieval training corpus

KV_FACT = "Key {k} holds value {v}. "
KV_QUESTION = "What value does key {k} hold? Key {k} holds value"
FILLER_SENTENCES = tuple(s + ". " for s in FILLER.split(". ") if s)


def filler_text(n: int) -> tuple[str, list[int]]:
  """(the last n characters of repeated FILLER, so it ends at a sentence end; sentence starts in it,
  0 and n included). The pass-key evaluation builds its filler the same way, per token."""
  reps = n // len(FILLER) + 2
  text = FILLER * reps
  cut = len(text) - n
  starts, pos = set(), 0
  for _ in range(reps):
    for s in FILLER_SENTENCES:
      if 0 < pos - cut < n:
        starts.add(pos - cut)
      pos += len(s)
  return text[cut:], sorted({0, n, *starts})


class RetrievalSource:
  """A training corpus where long-range retrieval is learnable and is exactly what the pass-key
  evaluation asks: each document is a prompt with the evaluation's phrasing (filler, a needle at a
  random sentence boundary, the question at the end) followed by its answer.

  A fraction `kv_fraction` of documents are multi-key instead: 1-4 "Key k holds value v." needles
  scattered through the filler and a question about one of them (distractors the model must not
  copy). `example(i)` returns (prompt, answer, needle offsets) so the input pipeline can weight the
  answer tokens by `answer_weight` in the loss; `source[i]` is prompt + answer, a plain document.
  Document i depends only on (seed, i); total lengths are log-uniform in [min_chars, max_chars] (many
  short documents: dense answers; and long ones: far needles), or uniform with log_lengths=0.
  """

  def __init__(self, num_docs: int, seed: int = 0, min_chars: int = 200, max_chars: int = 4000,
               answer_weight: float = 1.0, kv_fraction: float = 0.25, log_lengths: float = 1):
    if num_docs < 1 or not 0 < min_chars <= max_chars:
      raise ValueError(f"retrieval source needs num_docs >= 1 and 0 < min_chars <= max_chars; got "
                       f"{num_docs}, {min_chars}, {max_chars}")
    if answer_weight <= 0 or not 0 <= kv_fraction <= 1:
      raise ValueError(f"retrieval source needs answer_weight > 0 and kv_fraction in [0, 1]; got "
                       f"{answer_weight}, {kv_fraction}")
    self.num_docs, self.seed = num_docs, seed
    self.min_chars, self.max_chars = min_chars, max_chars
    self.answer_weight, self.kv_fraction = float(answer_weight), float(kv_fraction)
    self.log_lengths = bool(log_lengths)

  def __len__(self):
    return self.num_docs

  def example(self, i) -> tuple[str, str, list[int]]:
    """(prompt, answer, character offsets of the needles in the prompt; the first is the asked one)."""
    if not 0 <= i < self.num_docs:
      raise IndexError(i)
    rng = np.random.default_rng([self.seed, i, 7])
    if self.log_lengths:
      n = int(np.exp(rng.uniform(np.log(self.min_chars), np.log(self.max_chars + 1))))
    else:
      n = int(rng.integers(self.min_chars, self.max_chars + 1))
    if rng.random() >= self.kv_fraction:
      key = str(rng.integers(10000, 100000))
      needles, question, answer = [PASSKEY_FACT.format(key=key)], PASSKEY_QUESTION, f" {key}."
    else:
      names = rng.choice(16**4, size=int(rng.integers(1, 5)), replace=False)
      pairs = [(f"{k:04x}", str(rng.integers(100, 1000))) for k in names]
      needles = [KV_FACT.format(k=k, v=v) for k, v in pairs]
      question, answer = KV_QUESTION.format(k=pairs[0][0]), f" {pairs[0][1]}."
    n_fill = max(0, n - len(question) - len(answer) - sum(map(len, needles)))
    filler, bounds = filler_text(n_fill)
    depths = [rng.random() for _ in needles]
    spots = [min(bounds, key=lambda b: abs(b - d * n_fill)) for d in depths]
    pieces, offsets, prev, written = [], [0] * len(needles), 0, 0
    for j in sorted(range(len(needles)), key=lambda j: (spots[j], j)):
      pieces.append(filler[prev:spots[j]])
      written += spots[j] - prev
      offsets[j] = written
      pieces.append(needles[j])
      written += len(needles[j])
      prev = spots[j]
    pieces.append(filler[prev:])
    return "".join(pieces) + question, answer, offsets

  def __getitem__(self, i) -> str:
    prompt, answer, _ = self.example(i)
    return prompt + answer


class AnswerPairs:
  """A RetrievalSource seen as (prompt, answer) pairs: what the pipeline tokenizes to weight answers."""

  def __init__(self, source: RetrievalSource):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i) -> tuple[str, str]:
    prompt, answer, _ = self.source.example(i)
    return prompt, answer


def parse_source(kind: str) -> tuple[str, dict]:
  """'retrieval(answer_weight=8, kv_fraction=0.25)' -> ('retrieval', {...}); plain names pass through.

  Arguments in the name keep the corpus' knobs in `data.source`, next to the `data.synthetic` keys
  (num_docs, seed, min_chars, max_chars) that the retrieval corpus shares with the synthetic one.
  """
  import re
  m = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", kind)
  if not m:
    raise ValueError(f"bad data.source {kind!r}: use a name, e.g. 'retrieval(answer_weight=8)'")
  args = {}
  for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
    name, _, value = part.partition("=")
    try:
      args[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f"bad data.source {kind!r}: argument {part!r} is not name=number") from None
  if args and m.group(1) != "retrieval":
    raise ValueError(f"bad data.source {kind!r}: only 'retrieval' takes arguments")
  unknown = set(args) - {"answer_weight", "kv_fraction", "log_lengths"}
  if unknown:
    raise ValueError(f"bad data.source {kind!r}: unknown argument(s) {sorted(unknown)}; "
                     "retrieval takes answer_weight, kv_fraction and log_lengths")
  return m.group(1), args


def open_corpus(kind: str, paths: str = "", text_field: str = "text", **synthetic):
  """open_source, also for 'retrieval(...)' (which takes the synthetic corpus' keyword arguments)."""
  name, args = parse_source(kind)
  if name == "retrieval":
    return RetrievalSource(**synthetic, **args)
  return open_source(name, paths, text_field, **synthetic)
