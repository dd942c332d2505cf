"""Attention over sequences split across the mesh's `context` axis (context parallelism).

Inputs are in the load-balanced layout of `parallel.layout`: with cp devices and chunks of c
tokens, device r holds chunks r and 2cp-1-r (2c tokens, "lo" then "hi"). Masks follow the
original token order, which each device knows from its index.

The per-step contract. Attention kernels take their query offset as a static int (their tile
layouts are built on the host), but a device learns its place in the sequence only at run time.
So every call below is one of a few static cases, each an ordinary call of an attention
implementation with `return_lse=True` (any registered one, the registry's choice for the call's
features), selected on the device index with `lax.cond`/`lax.switch`:

  ring step 0        own chunks: causal over the local 2c tokens (lo precedes hi), q_offset 0
  ring step s > 0    K/V of device j = (r - s) mod cp:
                       j < r: every local query sees chunk j entirely   (q 2c x k c, q_offset c)
                       j > r: only the hi queries see both chunks, all  (q c x k 2c, q_offset 2c)
                     (chunk 2cp-1-j is later than both local chunks when j < r, and chunk j is
                     later than lo when j > r: those pairs are empty and never computed)
  gathered, dev. r   lo over keys [0, (r+1)c) at q_offset r*c; hi over [0, (2cp-r)c) at (2cp-1-r)*c

Every ring step therefore does the same work (2c x c pairs) on every device.

Strategies (`ContextStrategy`, a train-config setting, not part of the model's weights or config):
  ring        full layers: K/V (and kv segment ids) rotate by ppermute, issued before each step's
              compute so they overlap; partial results merged eagerly by LSE; a custom backward
              rotates K/V again, their dK/dV accumulators one step behind (also during compute),
              and brings those home, so attention memory per device stays O(T / cp). Each backward
              step uses the implementation's backward given the final out and LSE where it has one
              (registry), else the step's vjp (which recomputes the step's forward).
  ring_loop   the same ring with its middle steps (1 .. cp-2) as one `lax.fori_loop` instead of
              unrolled: the program stops growing with the context axis (from cp = 3; smaller
              than the ring's from cp = 4). Same arithmetic; whether XLA overlaps each rotation
              with compute as well inside a loop is a GPU measurement (benchmarks/
              context_parallel.py), hence not the default.
  all_gather  any pattern: every device gathers the whole K/V (O(T) memory, one collective).
  halo        sink_window layers: each chunk receives only the window - 1 keys before it, by
              ppermute from the devices holding them (more hops only when a chunk is shorter
              than the window), and the `sink` first keys by a small all-reduce; then one call
              over [sinks, halo, chunk] (the spec holds in those coordinates). Gradients flow
              back the same way (autodiff of ppermute / psum). Memory O(T / cp + window).
              block_sparse layers: the local blocks by the same halo, widened to a multiple of
              vert_stride blocks so that the halo starts on a stride boundary (then the strided
              blocks inside it are the spec's own, in local coordinates); the strided blocks
              before the halo, 1/vert_stride of the keys, gathered compactly from every device.
              Needs chunks of a whole number of vert_stride x block_size tokens (else all_gather).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from longgen_jax.attention import SegmentIds, attention, registry
from longgen_jax.attention.sharding import CONTEXT_AXIS, active_axes, axes_size, split_axes
from longgen_jax.attention.spec import AttentionSpec

FULL_STRATEGIES = ("ring", "ring_loop", "all_gather")
# Names of the ring's results for remat policies: saving them spares the backward a second ring.
RING_OUT, RING_LSE = "context_ring_out", "context_ring_lse"
SPARSE_STRATEGIES = ("halo", "all_gather")


@dataclasses.dataclass(frozen=True)
class ContextStrategy:
  """How attention layers exchange K/V over the context axis: `full` for full layers, `sparse` for
  sink_window / block_sparse layers."""

  full: str = "ring"
  sparse: str = "halo"

  def __post_init__(self):
    if self.full not in FULL_STRATEGIES:
      raise ValueError(f"context strategy for full layers must be one of {FULL_STRATEGIES}, got {self.full!r}")
    if self.sparse not in SPARSE_STRATEGIES:
      raise ValueError(f"context strategy for sparse layers must be one of {SPARSE_STRATEGIES}, got {self.sparse!r}")

  def for_spec(self, spec: AttentionSpec, seq_len: int, context: int) -> str:
    """The strategy for a layer over `seq_len` tokens split over `context` devices. halo falls back to
    all_gather (with a warning) where it cannot serve: block_sparse chunks off the stride grid
    (see _strided_before_halo), sinks beyond the first half of the sequence."""
    if spec.is_full:
      return self.full
    chunk = seq_len // (2 * context)
    if self.sparse == "halo" and ((spec.kind == "block_sparse" and chunk % (spec.vert_stride * spec.block_size))
                                  or spec.sink > context * chunk):
      _warn_fallback(spec, seq_len, context)
      return "all_gather"
    return self.sparse


@functools.lru_cache(maxsize=None)
def _warn_fallback(spec: AttentionSpec, seq_len: int, context: int):
  warnings.warn(f"{spec} over {seq_len} tokens in {2 * context} chunks: halo exchange needs chunks of whole "
                "vert_stride x block_size tokens and sinks within the first half; this layer gathers all K/V "
                "(O(T) memory per device) instead", stacklevel=4)


def context_attention(q, k, v, spec: AttentionSpec, *, impl: str = "auto",
                      segment_ids: SegmentIds | jax.Array | None = None, return_lse: bool = False,
                      strategy: ContextStrategy = ContextStrategy()):
  """`attention()` of sequences split over the context axis of the surrounding `jax.set_mesh`.

  q [B, T, Hq, D], k, v [B, T, Hkv, D] and segment ids [B, T] are global arrays in the layout of
  `parallel.layout` (T a multiple of 2 x context). Without a context axis this is `attention()`.
  Returns out [B, T, Hq, D] (and lse [B, Hq, T] if asked), in the same layout.
  """
  if not active_axes((CONTEXT_AXIS,)):
    return attention(q, k, v, spec, impl=impl, segment_ids=segment_ids, return_lse=return_lse)
  cp = axes_size((CONTEXT_AXIS,))
  B, T = q.shape[:2]
  if k.shape[1] != T or v.shape != k.shape:
    raise ValueError(f"context-parallel attention is self-attention: q {q.shape}, k {k.shape}, v {v.shape}")
  if T % (2 * cp):
    raise ValueError(f"sequence length {T} does not split into 2 x context = {2 * cp} chunks; lay the batch out "
                     "with longgen_jax.parallel.layout.to_context_layout (it pads)")
  if isinstance(segment_ids, SegmentIds):
    if segment_ids.q is not segment_ids.kv:
      raise ValueError("context-parallel attention takes one segment_ids array for queries and keys")
    segment_ids = segment_ids.q
  if segment_ids is not None and segment_ids.shape != (B, T):
    raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
  features = registry.call_features(segment_ids=segment_ids is not None, q_offset=True, lse=True)
  fn, backward = registry.resolve_with_backward(impl, spec, features)
  batch, heads = split_axes(B, k.shape[2], spec)
  b = batch or None
  x_spec, seg_spec = P(b, CONTEXT_AXIS, heads, None), P(b, CONTEXT_AXIS)
  kind = strategy.for_spec(spec, T, cp)
  local_fn, takes_backward = _LOCAL[kind]
  local = functools.partial(local_fn, (fn, backward) if takes_backward else fn, spec, CONTEXT_AXIS, cp)
  has_seg = segment_ids is not None

  def per_device(q, k, v, *seg):
    out, lse = local(q, k, v, *(seg * 2 if has_seg else (None, None)))
    return (out, lse) if return_lse else out

  out_specs = (x_spec, P(b, heads, CONTEXT_AXIS)) if return_lse else x_spec
  in_specs = (x_spec,) * 3 + ((seg_spec,) if has_seg else ())
  args = (q, k, v) + ((segment_ids,) if has_seg else ())
  return jax.shard_map(per_device, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


# ----------------------------------------------------------------------------- static cases


def _call(fn, spec, q, k, v, qs, ks, q_offset: int):
  return fn(q, k, v, spec, q_segment_ids=qs, kv_segment_ids=ks, q_offset=q_offset, return_lse=True)


def _half(x, which: int | None, axis: int = 1):
  """The lo (0) or hi (1) chunk of a local [B, 2c, ...] array along `axis`; None: all of it (and None
  passes through)."""
  if x is None or which is None:
    return x
  c = x.shape[axis] // 2
  return jax.lax.slice_in_dim(x, which * c, (which + 1) * c, axis=axis)


def _place(x, which: int | None, fill: float = 0.0, axis: int = 1):
  """The inverse of _half: x as the lo (0) or hi (1) chunk, `fill` in the other; None: x itself."""
  if which is None:
    return x
  other = jnp.full_like(x, fill)
  return jnp.concatenate([other, x] if which else [x, other], axis=axis)


def _per_device_chunks(r, cp, q, qs, for_chunk):
  """for_chunk(chunk index, q_chunk, q_seg_chunk) -> (out, lse) for both local chunks, with the chunk
  index static: a switch over the device index."""
  def on_device(d: int):
    def run():
      lo_r, hi_r = for_chunk(d, _half(q, 0), _half(qs, 0)), for_chunk(2 * cp - 1 - d, _half(q, 1), _half(qs, 1))
      return jnp.concatenate([lo_r[0], hi_r[0]], axis=1), jnp.concatenate([lo_r[1], hi_r[1]], axis=2)
    return run

  return jax.lax.switch(r, [on_device(d) for d in range(cp)])


# A ring step s > 0 is one of two static cases, by whether the K/V came from an earlier device j:
#   j < r: its lo chunk precedes both local chunks   -> every local query x its lo chunk, q_offset c
#   j > r: its chunks lie between the local lo and hi -> the local hi queries x both its chunks, q_offset 2c
# as (query half, key half, q_offset in chunks); step 0 is the causal call over the local chunks.
_OWN, _EARLIER, _LATER = (None, None, 0), (None, 0, 1), (1, None, 2)


def _ring_case(cp: int, s, r, step):
  """step(query half, key half, q_offset in chunks) for ring step s's static case on device r (s an int,
  or traced inside ring_loop's loop, where it is never 0: step 0 must be static, its case is not the
  cond's)."""
  if isinstance(s, (int, np.integer)) and s == 0:
    return step(*_OWN)
  return jax.lax.cond((r - s) % cp < r, lambda: step(*_EARLIER), lambda: step(*_LATER))


def _ring_step(fn, spec, cp: int, s, r, q, k, v, qs, ks):
  """(out [B, 2c, H, D], lse [B, H, 2c]) of the local queries over the K/V held at ring step s."""
  c = q.shape[1] // 2

  def step(qh, kh, chunks):
    out, lse = _call(fn, spec, _half(q, qh), _half(k, kh), _half(v, kh), _half(qs, qh), _half(ks, kh), chunks * c)
    return _place(out, qh), _place(lse, qh, -jnp.inf, axis=2)

  return _ring_case(cp, s, r, step)


def _rows(w_BHT):
  """[B, H, T] -> [B, T, H, 1], to scale out [B, T, H, D]."""
  return jnp.swapaxes(w_BHT, 1, 2)[..., None]


def _merge(out, lse, out_s, lse_s):
  """Running (out, lse) combined with one more partial result over disjoint keys (float32)."""
  new = jnp.logaddexp(lse, lse_s)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  return (out * _rows(jnp.exp(lse - safe)) + out_s.astype(jnp.float32) * _rows(jnp.exp(lse_s - safe)), new)


def _next_device(cp: int):
  return [(i, (i + 1) % cp) for i in range(cp)]


# ----------------------------------------------------------------------------- ring


def _steps(cp: int, looped: bool, one_step, carry):
  """Runs one_step(s, carry, rotate) for ring steps s = 0 .. cp-1 (rotate: whether the K/V move on for a
  next step), unrolled, or with the middle steps as one fori_loop (the first and last are special)."""
  if not looped:
    for s in range(cp):
      carry = one_step(s, carry, s + 1 < cp)
    return carry
  carry = one_step(0, carry, cp > 1)
  if cp > 2:
    carry = jax.lax.fori_loop(1, cp - 1, lambda s, c: one_step(s, c, True), carry)
  return one_step(cp - 1, carry, False) if cp > 1 else carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring(looped, fns, spec, axis, cp, q, k, v, qs, ks):
  return _ring_forward(looped, fns[0], spec, axis, cp, q, k, v, qs, ks)


def _ring_forward(looped, fn, spec, axis, cp, q, k, v, qs, ks):
  r = jax.lax.axis_index(axis)

  def one_step(s, carry, rotate):
    held, out, lse = carry
    if rotate:  # the next step's K/V travel while this step computes
      arriving = jax.lax.ppermute(held, axis, _next_device(cp))
    k_s, v_s, ks_s = held
    out_s, lse_s = _ring_step(fn, spec, cp, s, r, q, k_s, v_s, qs, ks_s)
    out, lse = _merge(out, lse, out_s, lse_s)
    return _after(arriving, out, lse) if rotate else (held, out, lse)

  start = ((k, v, ks), jnp.zeros(q.shape, jnp.float32),
           jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32))
  _, out, lse = _steps(cp, looped, one_step, start)
  return out.astype(q.dtype), lse


def _after(arriving, *computed):
  """`arriving` usable only once `computed` is: the rotations depend on nothing but K/V, and without
  this tie XLA hoists them all before the first step (run back to back, not overlapped with any
  compute, and every rotated copy alive at once)."""
  return jax.lax.optimization_barrier((arriving, *computed))


def _ring_fwd(looped, fns, spec, axis, cp, q, k, v, qs, ks):
  out, lse = _ring_forward(looped, fns[0], spec, axis, cp, q, k, v, qs, ks)
  out, lse = checkpoint_name(out, RING_OUT), checkpoint_name(lse, RING_LSE)
  return (out, lse), (q, k, v, qs, ks, out, lse)


def _ring_bwd(looped, fns, spec, axis, cp, res, cotangents):
  """Rotates K/V again, each with its dK/dV accumulator; the last hop brings those home."""
  q, k, v, qs, ks, out, lse = res
  dout, dlse = cotangents
  r = jax.lax.axis_index(axis)

  def one_step(s, carry, rotate):
    held, dq, sending = carry  # sending: dK/dV of the block held last step, travelling during this step
    if rotate:
      arriving = jax.lax.ppermute(held, axis, _next_device(cp))
    if sending is not None:
      received = jax.lax.ppermute(sending, axis, _next_device(cp))
    dq_s, dk_s, dv_s = _ring_step_grads(fns, spec, cp, s, r, q, *held[:2], qs, held[2], out, lse, dout, dlse)
    dq = dq + dq_s.astype(jnp.float32)
    grads = (dk_s.astype(jnp.float32), dv_s.astype(jnp.float32))
    if sending is not None:  # the block held now is the one whose dK/dV just arrived
      grads = jax.tree.map(jnp.add, grads, received)
    return _after(arriving, dq, grads) if rotate else (held, dq, grads)

  # Tied to the cotangent so XLA cannot merge these rotations with the forward's (CSE would keep
  # every rotated K/V copy alive from the forward to the backward: O(T) memory per device).
  held, _ = jax.lax.optimization_barrier(((k, v, ks), dout))
  _, dq, sending = _steps(cp, looped, one_step, (held, jnp.zeros(q.shape, jnp.float32), None))
  dk, dv = jax.lax.ppermute(sending, axis, _next_device(cp))  # the last hop: home
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), _float0_like(qs), _float0_like(ks)


def _ring_step_grads(fns, spec, cp, s, r, q, k, v, qs, ks, out, lse, dout, dlse):
  """(dq, dk, dv) of ring step s's share of the gradient, given the final out and lse.

  With the implementation's backward given statistics: the same static cases as the forward.
  Without one: the step's own vjp with its share of the cotangents, which recomputes the step's
  forward. For out = sum_s w_s out_s, lse = logsumexp_s lse_s, w_s = exp(lse_s - lse):
  d/d out_s = w_s dout and d/d lse_s = w_s (dout . (out_s - out) + dlse).
  """
  fn, bwd = fns
  if bwd is None:
    (out_s, lse_s), step_vjp = jax.vjp(lambda q, k, v: _ring_step(fn, spec, cp, s, r, q, k, v, qs, ks), q, k, v)
    w = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
    dout32 = dout.astype(jnp.float32)
    dot = jnp.swapaxes(jnp.sum(dout32 * (out_s.astype(jnp.float32) - out.astype(jnp.float32)), axis=-1), 1, 2)
    return step_vjp(((dout32 * _rows(w)).astype(out_s.dtype), w * (dot + dlse)))

  c = q.shape[1] // 2

  def step(qh, kh, chunks):
    rows = lambda x, axis=1: _half(x, qh, axis)
    dq, dk, dv = bwd(rows(q), _half(k, kh), _half(v, kh), rows(out), rows(lse, 2), rows(dout), rows(dlse, 2), spec,
                     q_segment_ids=rows(qs), kv_segment_ids=_half(ks, kh), q_offset=chunks * c)
    return _place(dq, qh), _place(dk, kh), _place(dv, kh)

  return _ring_case(cp, s, r, step)


def _float0_like(x):
  """The cotangent of an integer input (segment ids)."""
  return None if x is None else np.zeros(x.shape, jax.dtypes.float0)


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------- all-gather


def _natural_order(x_gathered, cp: int):
  """[B, T, ...] gathered from the layout (device r's lo, hi chunks at slots 2r, 2r+1) -> token order."""
  B, T = x_gathered.shape[:2]
  x = x_gathered.reshape(B, cp, 2, T // (2 * cp), *x_gathered.shape[2:])
  return jnp.concatenate([x[:, :, 0], x[:, ::-1, 1]], axis=1).reshape(x_gathered.shape)


def _gathered(fn, spec, axis, cp, q, k, v, qs, ks):
  """Each device gathers all K/V (in token order) and attends its two chunks at their static offsets."""
  gather = lambda x: None if x is None else _natural_order(
      jax.lax.all_gather(x, axis, axis=1, tiled=True), cp)
  k_all, v_all, ks_all = gather(k), gather(v), gather(ks)
  c = q.shape[1] // 2

  def for_chunk(chunk: int, q_c, qs_c):
    keys = lambda x: None if x is None else x[:, :(chunk + 1) * c]  # nothing after the chunk is visible
    return _call(fn, spec, q_c, keys(k_all), keys(v_all), qs_c, keys(ks_all), chunk * c)

  return _per_device_chunks(jax.lax.axis_index(axis), cp, q, qs, for_chunk)


# ----------------------------------------------------------------------------- halo

_TILE = 128  # a multiple of the kernels' query/key tiles


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _halo(fn, spec, axis, cp, q, k, v, qs, ks):
  """sink_window / block_sparse: the near keys from the preceding chunks by ppermute, the far ones
  (sinks, strided blocks) gathered small (module docstring)."""
  c = q.shape[1] // 2
  r = jax.lax.axis_index(axis)
  chunks = [tuple(_half(x, i) for x in (k, v, ks)) for i in (0, 1)]  # (k, v, seg) of lo and hi
  if spec.kind == "sink_window":  # keys a chunk needs from before itself, sinks for every device; where
    # chunks are whole tiles, a few more keys so the chunk starts on a tile of the [sinks, halo, chunk] buffer
    tile = _TILE if c % _TILE == 0 else 1
    halo, sinks = _round_up(spec.sink + spec.window - 1, tile) - spec.sink, spec.sink
  else:
    halo, sinks = _round_up((spec.local_blocks - 1) * spec.block_size, spec.vert_stride * spec.block_size), 0
  halo = min(halo, (2 * cp - 1) * c)
  received = _receive_halos(axis, cp, c, halo, *chunks)
  first = _first_keys(axis, cp, c, r, chunks[0], sinks) if sinks else None
  parts = [_near(fn, spec, cp, c, r, i, _half(q, i), _half(qs, i), chunks[i], received[i], first, halo)
           for i in (0, 1)]
  out = jnp.concatenate([parts[0][0], parts[1][0]], axis=1)
  lse = jnp.concatenate([parts[0][1], parts[1][1]], axis=2)
  if spec.kind == "sink_window":
    return out, lse
  far_out, far_lse = _strided_before_halo(fn, spec, axis, cp, c, r, q, qs, chunks, halo)
  out, lse = _merge(out.astype(jnp.float32), lse, far_out, far_lse)
  return out.astype(q.dtype), lse


def _receive_halos(axis, cp, c, halo, lo, hi):
  """((k, v, seg) of the `halo` keys before the lo chunk, the same before the hi chunk), each
  [B, halo, ...] in token order (zeros where a chunk is too close to position 0 to have them).

  Hop h brings chunk a - h for a local chunk a. Chunk m lives on device m (lo) for m < cp and on
  device 2cp-1-m (hi) otherwise, so: lo halos come from device r-h's lo chunk; hi halos from
  device r+h's hi chunk while r+h < cp, else from device 2cp-1-r-h's lo chunk (the fold).
  """
  if halo == 0:
    empty = jax.tree.map(lambda x: x[:, :0], lo)
    return empty, empty
  r = jax.lax.axis_index(axis)
  lo_parts, hi_parts = [], []
  for h in range(1, -(-halo // c) + 1):
    need = min(c, halo - (h - 1) * c)  # the last `need` keys of the source chunk
    lo_tail, hi_tail = (jax.tree.map(lambda x: x[:, c - need:], chunk) for chunk in (lo, hi))
    lo_parts.append(_shift(lo_tail, axis, [(s, s + h) for s in range(cp - h)]))
    from_hi = _shift(hi_tail, axis, [(s, s - h) for s in range(h, cp)])
    fold = _shift(lo_tail, axis, [(2 * cp - 1 - d - h, d) for d in range(cp)
                                  if d + h >= cp and 2 * cp - 1 - d - h >= 0])
    hi_parts.append(jax.tree.map(lambda a, b: jnp.where(r + h < cp, a, b), from_hi, fold))
  in_order = lambda parts: jax.tree.map(lambda *xs: jnp.concatenate(xs[::-1], axis=1), *parts)  # farthest first
  return in_order(lo_parts), in_order(hi_parts)


def _shift(xs, axis, pairs):
  """ppermute of a pytree along `pairs` (src, dst); devices that receive nothing get zeros."""
  if not pairs:
    return jax.tree.map(jnp.zeros_like, xs)
  return jax.lax.ppermute(xs, axis, pairs)


def _first_keys(axis, cp, c, r, lo, n: int):
  """(k, v, seg) of the sequence's first n keys (the sinks) on every device: one small psum from
  the lowest devices' lo chunks (ContextStrategy.for_spec keeps n within the first half)."""
  holders = -(-n // c)

  def gather(x):
    if holders == 1:  # all on device 0: all-reduce just those n keys
      return jax.lax.psum(jnp.where(r == 0, x[:, :n], jnp.zeros_like(x[:, :n])), axis)
    slot = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((x.shape[0], holders * c) + x.shape[2:], x.dtype), x,
                                               jnp.minimum(r, holders - 1) * c, axis=1)
    return jax.lax.psum(jnp.where(r < holders, slot, jnp.zeros_like(slot)), axis)[:, :n]

  return jax.tree.map(gather, lo)


def _near(fn, spec, cp, c, r, half, q_c, qs_c, chunk, halo_kv, first, halo):
  """(out, lse) of one local chunk over its near keys (sinks, window or local blocks): one call.

  A chunk far enough from position 0 attends [sinks, halo, itself]: in those buffer coordinates
  the spec itself holds (key distances are the true ones, sinks sit below `sink`, and a block
  halo starts on a stride boundary). A chunk nearer attends the contiguous keys [0, its end).
  Which case (and the early chunk's offset) is static per device: a switch over device groups.
  """
  S = spec.sink if spec.kind == "sink_window" else 0

  def case(d: int):
    index = d if half == 0 else 2 * cp - 1 - d
    return ("far",) if index * c - halo >= S else ("near_start", index * c)

  def run(which):
    def attend():
      if which[0] == "far":
        parts, q_offset = ([first] if S else []) + [halo_kv, chunk], S + halo
      else:
        start = which[1]  # the chunk's first position
        lead = start - halo  # > 0: the keys below it are sinks, from `first`
        parts = ([jax.tree.map(lambda x: x[:, :lead], first)] if lead > 0 else []) + [
            jax.tree.map(lambda x: x[:, max(0, -lead):], halo_kv), chunk]
        q_offset = start
      keys = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts)
      return _call(fn, spec, q_c, keys[0], keys[1], qs_c, keys[2], q_offset)
    return attend

  cases = sorted({case(d) for d in range(cp)})
  if len(cases) == 1:
    return run(cases[0])()
  index = jnp.asarray([cases.index(case(d)) for d in range(cp)], jnp.int32)[r]
  return jax.lax.switch(index, [run(which) for which in cases])


def _nothing(q_c):
  """(out, lse) of queries that see no key."""
  B, c, H, _ = q_c.shape
  return jnp.zeros(q_c.shape, jnp.float32), jnp.full((B, H, c), -jnp.inf, jnp.float32)


def _strided_before_halo(fn, spec, axis, cp, c, r, q, qs, chunks, halo):
  """block_sparse: (out, lse) of every local query over the strided blocks before its chunk's halo.

  Chunks start on stride boundaries, so kv head h's strided blocks in a chunk are its blocks
  phase_h, phase_h + V, ...: each device takes those (1/V of its keys) and all devices gather
  them, in token order. Before the halo every such block is visible to every query of the chunk:
  a prefix of the gathered list, static per device (a switch). When kv heads have different
  phases they see different keys, so heads fold into the batch for that call.
  """
  b, V = spec.block_size, spec.vert_stride
  B, _, K, D = chunks[0][0].shape
  G = q.shape[2] // K
  per_head = spec.head_dependent(K)
  phases = [(-spec.stride_phase(h, K)) % V for h in range(K if per_head else 1)]  # strided block within V

  def strided(x):  # [B, c, K, D] -> [B, c/V, K, D] (per head: [B, K, c/V, D]); ids [B, c] -> [B, c/V] ([B, K, c/V])
    blocks = x.reshape(B, c // (b * V), V, b, *x.shape[2:])
    if not per_head:
      return blocks[:, :, phases[0]].reshape(B, c // V, *x.shape[2:])
    picked = jnp.stack([blocks[:, :, phases[h], :, h] if x.ndim == 4 else blocks[:, :, phases[h]]
                        for h in range(K)], axis=1)
    return picked.reshape(B, K, c // V, *picked.shape[4:])

  def gathered(lo, hi):
    axis_t = 2 if per_head else 1
    every = jax.lax.all_gather(jnp.concatenate([strided(lo), strided(hi)], axis=axis_t), axis, axis=axis_t,
                               tiled=True)  # in layout order
    every = _natural_order(jnp.moveaxis(every, axis_t, 1), cp)
    every = jnp.moveaxis(every, 1, axis_t)
    return every.reshape(B * K, *every.shape[2:]) if per_head else every  # kv heads into the batch

  far = jax.tree.map(gathered, chunks[0], chunks[1])
  far_k, far_v, far_seg = far
  if per_head:
    far_k, far_v = far_k[:, :, None], far_v[:, :, None]

  def for_chunk(chunk: int, q_c, qs_c):
    visible = (chunk * c - halo) // V  # gathered keys before the halo's first token
    if visible <= 0:
      return _nothing(q_c)
    head = lambda x: x[:, :visible]
    if not per_head:
      out, lse = _call(fn, AttentionSpec.full(), q_c, head(far_k), head(far_v), qs_c,
                       None if far_seg is None else head(far_seg), visible)
      return out.astype(jnp.float32), lse
    q_f = q_c.reshape(B, c, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B * K, c, G, D)
    qs_f = None if qs_c is None else jnp.repeat(qs_c, K, axis=0)
    out, lse = _call(fn, AttentionSpec.full(), q_f, head(far_k), head(far_v), qs_f,
                     None if far_seg is None else head(far_seg), visible)
    out = out.reshape(B, K, c, G, D).transpose(0, 2, 1, 3, 4).reshape(q_c.shape)
    return out.astype(jnp.float32), lse.reshape(B, K * G, c)

  return _per_device_chunks(r, cp, q, qs, for_chunk)


# Each strategy's per-device function, and whether it takes the implementation's backward with its forward
# (the ring's own VJP calls it; JAX differentiates the others through their attention calls).
_LOCAL = {"ring": (functools.partial(_ring, False), True), "ring_loop": (functools.partial(_ring, True), True),
          "all_gather": (_gathered, False), "halo": (_halo, False)}
