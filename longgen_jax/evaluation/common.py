"""What the evaluations share: their error type, argument checks and generation shapes."""

from __future__ import annotations

from longgen_jax.attention.padding import round_up


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


def shared_shapes(config, prompt_lengths, max_new_tokens: int, chunk_len: int) -> tuple[int, int]:
  """(chunk_len, capacity) under which prompts of all these lengths share one set of compiled programs
  (`generate(..., chunk_len, capacity)`: a fixed cache, prompts padded to whole chunks). The chunk shrinks to
  a power of two within the shortest prompt when whole chunks would pad that prompt to more than twice its
  length (not below any layer's attention sink, which a later chunk must hold)."""
  shortest, longest = min(prompt_lengths), max(prompt_lengths)
  sink = max((s.sink for s in config.layer_specs if s.kind == "sink_window"), default=1)
  if round_up(shortest, chunk_len) > 2 * shortest:
    within = 1 << (shortest.bit_length() - 1)   # the largest power of two <= shortest
    if within >= sink:
      chunk_len = min(chunk_len, within)
  return chunk_len, max(longest + max_new_tokens, round_up(longest, chunk_len))
