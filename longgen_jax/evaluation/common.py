"""What the evaluations share: their error type and argument checks."""

from __future__ import annotations


class EvalError(ValueError):
  """A bad evaluation argument, reported as one line by the CLI."""


def check_vocab(cfg, top: int):
  """The tokenizer's ids must be rows of the model's embedding."""
  vocab = cfg.vocab_size
  if top >= vocab:
    raise EvalError(f"tokenizer ids reach {top} but the model's vocab_size is {vocab}: "
                    "wrong --tokenizer for this checkpoint?")


def format_length(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)
