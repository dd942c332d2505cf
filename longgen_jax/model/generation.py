"""Text generation with per-layer KV caches: `generate(model, prompts, ...)` and `generate_stream`.

Prompts are right-padded (see model.inference). Decoding runs in one compiled
`lax.while_loop` that stops at max_new_tokens or when every sequence has emitted a stop
token. Streaming (`generate_stream`, the CLI) re-enters the same compiled loop for
`stream_every` steps at a time and yields the new tokens in between: no host callbacks, so
the loop stays a plain XLA while loop, and the caches are donated between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax.attention.padding import round_up
from longgen_jax.model import inference
from longgen_jax.model.config import check_count
from longgen_jax.model.kv_cache import cache_layouts, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)) or (
        self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1):
      raise ValueError(f"bad sampling settings: temperature={self.temperature} (>= 0), "
                       f"top_k={self.top_k} (>= 0), top_p={self.top_p} (in (0, 1])")


def sample(logits_BV, rng, s: Sampling):
  """Next token ids [B] from float32 logits."""
  if s.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p  # the smallest prefix reaching top_p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class LoopState:
  caches: list
  out_BN: jax.Array      # generated tokens; out[:, 0] comes from the prefill logits
  lengths_B: jax.Array   # prompt lengths: token out[:, s] sits at position lengths + s
  done_B: jax.Array      # emitted a stop token
  step: jax.Array        # out[:, :step + 1] are final
  rng: jax.Array


jax.tree_util.register_dataclass(LoopState, data_fields=[f.name for f in dataclasses.fields(LoopState)],
                                 meta_fields=[])


@functools.partial(jax.jit, static_argnames=("graphdef", "layouts", "sampling"),
                   donate_argnames=("st",))
def decode_loop(graphdef, params, layouts, sampling: Sampling, st: LoopState, stop_step):
  """Decodes until step == stop_step (dynamic) or all sequences are done."""
  model = nnx.merge(graphdef, params)
  stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

  def cond(st):
    return (st.step < stop_step) & ~jnp.all(st.done_B)

  def body(st):
    tok_B = st.out_BN[:, st.step]
    logits, caches = inference.decode_step(model, layouts, st.caches, tok_B, st.lengths_B + st.step)
    rng, key = jax.random.split(st.rng)
    nxt = jnp.where(st.done_B, sampling.pad_id, sample(logits, key, sampling))
    out = jax.lax.dynamic_update_slice(st.out_BN, nxt[:, None], (0, st.step + 1))
    done = st.done_B | jnp.isin(nxt, stops)
    return LoopState(caches, out, st.lengths_B, done, st.step + 1, rng)

  return jax.lax.while_loop(cond, body, st)


def pad_prompts(prompts, pad_id: int = 0):
  """list of token lists -> (tokens [B, T] right-padded, lengths [B])."""
  if isinstance(prompts, np.ndarray | jax.Array) and np.ndim(prompts) == 2:
    prompts = [list(p) for p in np.asarray(prompts)]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


def generate_stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    stop_tokens: Sequence[int] = (), seed: int = 0, chunk_len: int = 2048,
                    kv_int8: bool = False, attn_impl: str | None = None, cache_dtype=None,
                    pad_id: int = 0, stream_every: int = 16, capacity: int | None = None) -> Iterator[np.ndarray]:
  """Yields int32 [B, n] blocks of new tokens (pad_id after a sequence's stop token).

  capacity: the caches' length (default: the longest prompt + max_new_tokens). Calls of different prompt
  lengths with the same capacity, batch size and chunk_len share every compiled program (the prompts are
  padded to whole chunks): one compile for a grid of lengths instead of one per length.
  Arguments are checked on the call; prefill starts at the first next().
  """
  for name, n in (("max_new_tokens", max_new_tokens), ("stream_every", stream_every), ("chunk_len", chunk_len)):
    check_count(name, n)
  vocab = model.config.vocab_size
  bad_stops = [t for t in stop_tokens if not 0 <= int(t) < vocab]
  if bad_stops:
    raise ValueError(f"stop token(s) {bad_stops} are outside the model's vocabulary [0, {vocab})")
  sampling = Sampling(temperature, top_k, top_p, tuple(int(t) for t in stop_tokens), pad_id)
  # prompts are padded with token 0, whatever pad_id is (it only fills the output after a stop): padded
  # positions are masked, but an id outside the embedding would put NaN in their keys and values, and masked
  # NaN still reaches a real row as 0 * NaN
  tokens, lengths = pad_prompts(prompts)
  real = tokens[np.arange(tokens.shape[1]) < lengths[:, None]]
  if real.min() < 0 or real.max() >= vocab:
    bad = real.min() if real.min() < 0 else real.max()
    raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab})")
  needed = tokens.shape[1] + max_new_tokens
  if capacity is None:
    capacity = needed
  else:
    check_count("capacity", capacity)
    whole_chunks = round_up(tokens.shape[1], chunk_len)
    if capacity < max(needed, whole_chunks):
      raise ValueError(f"capacity {capacity} is below the longest prompt + max_new_tokens ({needed}) or the "
                       f"prompt rounded up to whole chunks of {chunk_len} ({whole_chunks})")
    tokens = np.pad(tokens, ((0, 0), (0, whole_chunks - tokens.shape[1])))
  if needed > model.config.max_seq_len:
    warnings.warn(f"prompt + new tokens ({needed}) exceeds the model's max_seq_len "
                  f"({model.config.max_seq_len})", stacklevel=2)
  layouts = cache_layouts(model.config, capacity, kv_int8)
  return _blocks(model, layouts, tokens, lengths, sampling, max_new_tokens, stream_every, seed=seed,
                 chunk_len=chunk_len, attn_impl=attn_impl, cache_dtype=cache_dtype)


def _blocks(model, layouts, tokens, lengths, sampling: Sampling, max_new_tokens: int, stream_every: int,
            *, seed, chunk_len, attn_impl, cache_dtype) -> Iterator[np.ndarray]:
  caches = init_cache(layouts, len(lengths), cache_dtype or model.dtype)
  caches, logits = inference.prefill(model, layouts, caches, tokens, lengths, chunk_len=chunk_len,
                                     attn_impl=attn_impl)
  rng, key = jax.random.split(jax.random.key(seed))
  first = sample(logits, key, sampling)
  stops = np.asarray(sampling.stop_tokens or (-1,))
  out = jnp.zeros((len(lengths), max_new_tokens), jnp.int32).at[:, 0].set(first)
  st = LoopState(caches, out, jnp.asarray(lengths), jnp.isin(first, stops), jnp.int32(0), rng)
  graphdef, params = nnx.split(model)
  yield np.asarray(out[:, :1])
  emitted = 1
  while emitted < max_new_tokens and not bool(np.all(np.asarray(st.done_B))):
    stop = min(emitted - 1 + stream_every, max_new_tokens - 1)
    st = decode_loop(graphdef, params, layouts, sampling, st, jnp.int32(stop))
    step = int(st.step)
    yield np.asarray(st.out_BN[:, emitted:step + 1])
    emitted = step + 1


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), seed: int = 0, chunk_len: int = 2048,
             kv_int8: bool = False, attn_impl: str | None = None, cache_dtype=None,
             pad_id: int = 0, capacity: int | None = None) -> list[list[int]]:
  """Generates up to max_new_tokens per prompt (token-id lists of any lengths).

  Returns the new tokens of each prompt, cut before its first stop token. Prefill runs in
  chunks of chunk_len; decoding is one compiled loop. kv_int8 stores full layers' KV in int8.
  capacity: a fixed cache length shared by calls of different prompt lengths (see generate_stream).
  """
  blocks = list(generate_stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                                chunk_len=chunk_len, kv_int8=kv_int8, attn_impl=attn_impl,
                                cache_dtype=cache_dtype, pad_id=pad_id, stream_every=max_new_tokens,
                                capacity=capacity))
  out = np.concatenate(blocks, axis=1)
  return [cut_at_stop(row, stop_tokens) for row in out]


def cut_at_stop(row, stop_tokens) -> list[int]:
  """The tokens of `row` before its first stop token."""
  row = [int(t) for t in row]
  for i, t in enumerate(row):
    if t in stop_tokens:
      return row[:i]
  return row
