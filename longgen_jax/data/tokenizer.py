"""Tokenizers behind one small interface: built-in bytes, a Hugging Face tokenizer dir, SentencePiece.

The byte-level tokenizer needs no files, so the tiny CPU run works offline; its 259 ids fit the tiny
preset's 512-entry vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> np.ndarray: ...   # int32 ids, no special tokens

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: pad 0, bos 1, eos 2."""
  pad_id, bos_id, eos_id = 0, 1, 2
  _OFFSET = 3
  vocab_size = 256 + _OFFSET

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self._OFFSET

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64)
    return bytes((ids[ids >= self._OFFSET] - self._OFFSET).astype(np.uint8)).decode("utf-8", "replace")


class HFTokenizer:
  """A `tokenizer.json` (Hugging Face `tokenizers`), with BOS/EOS named in tokenizer_config.json."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tok
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    self._tok = _Tok.from_file(file)
    cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    cfg = json.load(open(cfg_file)) if os.path.exists(cfg_file) else {}

    def token_id(key, default):
      tok = cfg.get(key, default)
      tok = tok.get("content") if isinstance(tok, dict) else tok
      return self._tok.token_to_id(tok) if tok is not None else None

    self.bos_id = token_id("bos_token", "<s>")
    self.eos_id = token_id("eos_token", "</s>")
    if self.bos_id is None:
      raise ValueError(f"tokenizer at {path!r} has no BOS token (looked for bos_token or '<s>')")
    pad = token_id("pad_token", None)
    self.pad_id = pad if pad is not None else 0
    self.eos_id = self.eos_id if self.eos_id is not None else self.bos_id
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


class SentencePieceTokenizer:
  """A SentencePiece `.model` file (Llama-2's tokenizer.model)."""

  def __init__(self, path: str):
    import sentencepiece as spm
    if not os.path.exists(path):
      raise FileNotFoundError(f"no SentencePiece model at {path!r}")
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.vocab_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0:
      raise ValueError(f"SentencePiece model {path!r} defines no BOS id")
    self.pad_id = max(self._sp.pad_id(), 0)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def load_tokenizer(name: str) -> Tokenizer:
  """'byte', a SentencePiece '*.model' file, or a Hugging Face dir / tokenizer.json."""
  if name in ("", "byte"):
    return ByteTokenizer()
  if name.endswith(".model"):
    return SentencePieceTokenizer(name)
  if os.path.isdir(name) and os.path.exists(os.path.join(name, "tokenizer.json")):
    return HFTokenizer(name)
  if name.endswith("tokenizer.json") and os.path.exists(name):
    return HFTokenizer(name)
  if os.path.isdir(name) and os.path.exists(os.path.join(name, "tokenizer.model")):
    return SentencePieceTokenizer(os.path.join(name, "tokenizer.model"))
  raise FileNotFoundError(
      f"tokenizer {name!r} not found: use 'byte', a SentencePiece .model file, or a directory "
      "holding tokenizer.json (Hugging Face) or tokenizer.model")


def resolve_tokenizer(name: str | None, ckpt: str | None = None) -> Tokenizer:
  """`name`, else the checkpoint directory's own tokenizer files, else the built-in byte tokenizer."""
  if not name and ckpt:
    for f in ("tokenizer.json", "tokenizer.model"):
      if os.path.exists(os.path.join(ckpt, f)):
        return load_tokenizer(os.path.join(ckpt, f))
  return load_tokenizer(name or "byte")
