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


def wilson_interval(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion: honest at 0/n and n/n, unlike p ± z·se,
  which is why cells with few samples still get a usable error bar."""
  if n < 1 or not 0 <= hits <= n:
    raise EvalError(f"a proportion needs 0 <= hits <= n and n >= 1, got {hits} of {n}")
  p = hits / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z / denom * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
  # exact at the ends (the formula's rounding could put n/n's upper bound a hair below 1, below p itself)
  return (0.0 if hits == 0 else max(0.0, center - half)), (1.0 if hits == n else min(1.0, center + half))
