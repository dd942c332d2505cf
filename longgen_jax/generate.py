"""Text generation with per-layer KV caches: `generate(model, prompts, ...)` and a CLI.

Prompts are right-padded (see longgen_jax.inference). Decoding runs in one compiled
`lax.while_loop` that stops at max_new_tokens or when every sequence has emitted a stop
token. Streaming (`generate_stream`, the CLI) re-enters the same compiled loop for
`stream_every` steps at a time and yields the new tokens in between: no host callbacks, so
the loop stays a plain XLA while loop, and the caches are donated between calls.

  python -m longgen_jax.generate --ckpt DIR --prompt "Once upon a time" --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longgen_jax import inference
from longgen_jax.kv_cache import cache_layouts, describe_cache, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
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
                    pad_id: int = 0, stream_every: int = 16) -> Iterator[np.ndarray]:
  """Yields int32 [B, n] blocks of new tokens (pad_id after a sequence's stop token).

  Arguments are checked on the call; prefill starts at the first next().
  """
  if max_new_tokens < 1 or stream_every < 1:
    raise ValueError(f"max_new_tokens and stream_every must be >= 1, got {max_new_tokens} and {stream_every}")
  sampling = Sampling(temperature, top_k, top_p, tuple(int(t) for t in stop_tokens), pad_id)
  tokens, lengths = pad_prompts(prompts, pad_id)
  vocab = model.config.vocab_size
  real = tokens[np.arange(tokens.shape[1]) < lengths[:, None]]
  if real.min() < 0 or real.max() >= vocab:
    bad = real.min() if real.min() < 0 else real.max()
    raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab})")
  capacity = tokens.shape[1] + max_new_tokens
  if capacity > model.config.max_seq_len:
    print(f"warning: prompt + new tokens ({capacity}) exceeds the model's max_seq_len "
          f"({model.config.max_seq_len})", file=sys.stderr)
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
             pad_id: int = 0) -> list[list[int]]:
  """Generates up to max_new_tokens per prompt (token-id lists of any lengths).

  Returns the new tokens of each prompt, cut before its first stop token. Prefill runs in
  chunks of chunk_len; decoding is one compiled loop. kv_int8 stores full layers' KV in int8.
  """
  blocks = list(generate_stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                                chunk_len=chunk_len, kv_int8=kv_int8, attn_impl=attn_impl,
                                cache_dtype=cache_dtype, pad_id=pad_id, stream_every=max_new_tokens))
  out = np.concatenate(blocks, axis=1)
  return [_cut(row, stop_tokens) for row in out]


def _cut(row, stop_tokens) -> list[int]:
  row = [int(t) for t in row]
  for i, t in enumerate(row):
    if t in stop_tokens:
      return row[:i]
  return row


# ----------------------------------------------------------------------------- CLI


def resolve_tokenizer(name: str | None, ckpt: str | None):
  """--tokenizer, else the checkpoint's own tokenizer files, else the built-in byte tokenizer."""
  import os
  from longgen_jax.tokenizer import load_tokenizer
  if not name and ckpt:
    for f in ("tokenizer.json", "tokenizer.model"):
      if os.path.exists(os.path.join(ckpt, f)):
        return load_tokenizer(os.path.join(ckpt, f))
  return load_tokenizer(name or "byte")


def _load_model(args):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  if args.ckpt:
    from longgen_jax.convert import load_pretrained
    return load_pretrained(args.ckpt, dtype=dtype, param_dtype=dtype, attn_impl=args.attn_impl,
                           remat="none")
  from longgen_jax.config import preset
  from longgen_jax.model import Llama
  cfg = preset(args.preset)
  return Llama(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype, param_dtype=dtype, attn_impl=args.attn_impl)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m longgen_jax.generate", description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--ckpt", help="longgen_jax checkpoint dir (config.json + params/) or a HF Llama dir")
  src.add_argument("--preset", help="random weights from a preset (e.g. tiny), for smoke tests")
  txt = p.add_mutually_exclusive_group(required=True)
  txt.add_argument("--prompt", help="prompt text")
  txt.add_argument("--prompt-file", help="file holding the prompt text")
  p.add_argument("--tokenizer", default=None,
                 help="'byte', a SentencePiece .model, or a dir with tokenizer.json "
                      "(default: the checkpoint's own, else byte)")
  p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--stop-token", type=int, action="append", default=None,
                 help="stop token id (repeatable; default: the tokenizer's EOS)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chunk-len", type=int, default=2048, help="prefill chunk length")
  p.add_argument("--kv-int8", action="store_true", help="int8 KV cache for the full layers")
  p.add_argument("--attn-impl", default="auto", choices=inference.PREFILL_IMPLS)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--stream-every", type=int, default=8, help="decode steps between printed updates")
  args = p.parse_args(argv)

  tok = resolve_tokenizer(args.tokenizer, args.ckpt)
  text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
  ids = ([] if args.no_bos else [int(tok.bos_id)]) + [int(i) for i in tok.encode(text)]
  model = _load_model(args)
  stops = args.stop_token if args.stop_token is not None else [int(tok.eos_id)]
  capacity = len(ids) + args.max_new_tokens
  print(describe_cache(model.config, capacity, 1, dtype=model.dtype, kv_int8=args.kv_int8), file=sys.stderr)
  t0 = time.perf_counter()
  new: list[int] = []
  shown = ""
  sys.stdout.write(text)
  for block in generate_stream(model, [ids], max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               stop_tokens=stops, seed=args.seed, chunk_len=args.chunk_len,
                               kv_int8=args.kv_int8, attn_impl=args.attn_impl,
                               stream_every=args.stream_every):
    new += _cut(block[0], stops)
    decoded = tok.decode(new)
    if decoded.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
      continue
    sys.stdout.write(decoded[len(shown):])
    sys.stdout.flush()
    shown = decoded
    if any(int(t) in stops for t in block[0]):
      break
  sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
  dt = time.perf_counter() - t0
  print(f"[{len(ids)} prompt tokens, {len(new)} new tokens, {dt:.2f} s incl. compile]", file=sys.stderr)


if __name__ == "__main__":
  main()


class _CallableModule(type(sys)):
  """`longgen_jax.generate` is both this module and the function: importing the submodule
  rebinds the package attribute to the module, so the module forwards calls to generate()."""

  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
