"""Attention patterns: the contract every attention implementation computes.

Token i (query) may attend token j (key) only if j <= i, and:
  full:                         always
  sink_window(S, W):            j < S or i - j < W
  block_sparse(b, L, V, homo):  qb - kb < L or (kb + h*s) % V == 0
                                with qb = i // b, kb = j // b, h the kv head,
                                s = max(1, V // num_kv_heads) (0 when homo_head).
Positions are absolute. Query heads of one GQA group share their kv head's pattern.

This module is the one home of the pattern: the predicate (`allowed`, written once and generic
over the integer ops, so kernels pass their own division), parsing and printing, per-row
attended-key counts, and the tile summaries below.

`BlockLayout` is the host-side (numpy) summary kernels iterate over: for every
(kv head, query tile) the key tiles that hold at least one allowed pair, each
marked full (every pair allowed, no padding) or partial, plus the transpose.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from typing import Literal

import numpy as np

Kind = Literal["full", "sink_window", "block_sparse"]


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """One layer's attention pattern. Frozen and hashable (usable as a jit static arg)."""

  kind: Kind = "full"
  sink: int = 0
  window: int = 0
  block_size: int = 0
  local_blocks: int = 0
  vert_stride: int = 0
  homo_head: bool = False

  @classmethod
  def full(cls) -> AttentionSpec:
    return cls("full")

  @classmethod
  def sink_window(cls, sink: int, window: int) -> AttentionSpec:
    return cls("sink_window", sink=sink, window=window)

  @classmethod
  def block_sparse(cls, block_size: int, local_blocks: int, vert_stride: int,
                   homo_head: bool = False) -> AttentionSpec:
    return cls("block_sparse", block_size=block_size, local_blocks=local_blocks,
               vert_stride=vert_stride, homo_head=homo_head)

  def __post_init__(self):
    for name in ("sink", "window", "block_size", "local_blocks", "vert_stride"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{self.kind}: {name} must be an int, got {value!r} ({type(value).__name__})")
      if value >= 2**31:
        raise ValueError(f"{self.kind}: {name}={value} does not fit int32 positions (must be < 2**31)")
      object.__setattr__(self, name, int(value))
    if not isinstance(self.homo_head, (bool, np.bool_)):
      raise TypeError(f"block_sparse: homo_head must be a bool, got {self.homo_head!r}")
    if self.kind == "full":
      if (self.sink, self.window, self.block_size, self.local_blocks, self.vert_stride) != (0,) * 5:
        raise ValueError(f"full attention takes no parameters, got {self}")
    elif self.kind == "sink_window":
      if self.sink < 0:
        raise ValueError(f"sink_window: sink must be >= 0, got {self.sink}")
      if self.window < 1:
        raise ValueError(f"sink_window: window must be >= 1, got {self.window}")
    elif self.kind == "block_sparse":
      for name in ("block_size", "local_blocks", "vert_stride"):
        if getattr(self, name) < 1:
          raise ValueError(f"block_sparse: {name} must be >= 1, got {getattr(self, name)}")
    else:
      raise ValueError(f"unknown attention kind {self.kind!r}; expected full, sink_window or block_sparse")

  @property
  def is_full(self) -> bool:
    return self.kind == "full"

  def head_dependent(self, num_kv_heads: int) -> bool:
    """Whether the pattern differs between kv heads."""
    return self.kind == "block_sparse" and self.stride_shift(num_kv_heads) > 0 and num_kv_heads > 1

  def stride_shift(self, num_kv_heads: int) -> int:
    """The per-head phase step s of the strided blocks (0 for homo_head)."""
    if self.kind != "block_sparse" or self.homo_head:
      return 0
    return max(1, self.vert_stride // num_kv_heads)

  def stride_phase(self, kv_head: int, num_kv_heads: int) -> int:
    """(kv_head * s) % V: kv heads with equal phases have equal block_sparse patterns."""
    if self.kind != "block_sparse":
      return 0
    return (kv_head * self.stride_shift(num_kv_heads)) % self.vert_stride

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> AttentionSpec:
    return cls(**d)

  def __str__(self) -> str:
    if self.kind == "full":
      return "full"
    if self.kind == "sink_window":
      return f"sink_window({self.sink},{self.window})"
    homo = ",homo" if self.homo_head else ""
    return f"block_sparse({self.block_size},{self.local_blocks},{self.vert_stride}{homo})"

  @classmethod
  def parse(cls, text: str) -> AttentionSpec:
    """The inverse of str(): 'full', 'sink_window(64,1984)', 'block_sparse(64,16,64[,homo])'."""
    return parse_spec(text)


_SPEC_RE = re.compile(r"^\s*(full|sink_window|block_sparse)\s*(?:\(([^)]*)\))?\s*$")


def parse_spec(text: str | AttentionSpec) -> AttentionSpec:
  """'full', 'sink_window(64,1984)', 'block_sparse(64,16,64)' or 'block_sparse(64,16,64,homo)'.

  An AttentionSpec passes through unchanged.
  """
  if isinstance(text, AttentionSpec):
    return text
  m = _SPEC_RE.match(text)
  if not m:
    raise ValueError(f"cannot parse attention spec {text!r}; expected e.g. 'full', "
                     "'sink_window(64,1984)' or 'block_sparse(64,16,64)'")
  kind, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
  homo = bool(args) and args[-1] in ("homo", "homo_head", "True")
  if homo:
    args = args[:-1]
  try:
    nums = [int(a) for a in args]
    if kind == "full" and not nums:
      return AttentionSpec.full()
    if kind == "sink_window" and len(nums) == 2:
      return AttentionSpec.sink_window(*nums)
    if kind == "block_sparse" and len(nums) == 3:
      return AttentionSpec.block_sparse(*nums, homo_head=homo)
  except ValueError as e:
    raise ValueError(f"cannot parse attention spec {text!r}: {e}") from None
  raise ValueError(f"wrong arguments in attention spec {text!r}")


def allowed(spec: AttentionSpec, q_pos, k_pos, kv_head, num_kv_heads: int, *,
            div=operator.floordiv, mod=operator.mod):
  """THE pattern predicate, elementwise; broadcasts its three position/head arguments.

  Works on numpy arrays, jax arrays and in-kernel values. Kernels whose positions are
  non-negative may pass cheaper integer ops (e.g. `lax.div`/`lax.rem`, or shifts for powers
  of two); `div(x, n)` and `mod(x, n)` must equal floor division and modulo for x >= 0.
  """
  causal = k_pos <= q_pos
  if spec.kind == "full":
    return causal
  if spec.kind == "sink_window":
    near = q_pos - k_pos < spec.window
    return causal & (((k_pos < spec.sink) | near) if spec.sink > 0 else near)
  q_block, k_block = div(q_pos, spec.block_size), div(k_pos, spec.block_size)
  return causal & (local_block(spec, q_block, k_block)
                   | strided_block(spec, k_block, kv_head, num_kv_heads, mod=mod))


def local_block(spec: AttentionSpec, q_block, k_block):
  """block_sparse: key block k_block is one of the `local_blocks` nearest to query block q_block."""
  return q_block - k_block < spec.local_blocks


def strided_block(spec: AttentionSpec, k_block, kv_head, num_kv_heads: int, *, mod=operator.mod):
  """block_sparse: key block k_block is one of kv_head's vertically strided blocks."""
  return mod(k_block + kv_head * spec.stride_shift(num_kv_heads), spec.vert_stride) == 0


def attended_keys_per_query(spec: AttentionSpec, seq_len: int, num_kv_heads: int) -> float:
  """Mean number of keys a query attends (causal), over the queries of one sequence from position
  0 and over kv heads: the attention FLOP count's pair count."""
  i = np.arange(seq_len, dtype=np.float64)
  if spec.kind == "full":
    return float(np.mean(i + 1))
  if spec.kind == "sink_window":
    recent = np.minimum(i + 1, spec.window)
    return float(np.mean(recent + np.minimum(spec.sink, np.maximum(0, i + 1 - spec.window))))
  b = spec.block_size
  nb = -(-seq_len // b)
  qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
  s = spec.stride_shift(num_kv_heads)
  heads = num_kv_heads if s else 1
  total = 0.0
  for h in range(heads):
    ok = (kb < qb) & allowed(spec, qb * b, kb * b, h, num_kv_heads)  # whole off-diagonal blocks
    total += ok.sum() * b * b + nb * b * (b + 1) / 2  # + the causal diagonal block
  return min(total / heads / (nb * b), float(np.mean(i + 1)))


def dense_mask(spec: AttentionSpec, q_len: int, kv_len: int, num_kv_heads: int,
               q_offset: int = 0) -> np.ndarray:
  """bool[num_kv_heads, q_len, kv_len]: which (query, key) pairs each kv head may attend."""
  q_pos = (q_offset + np.arange(q_len))[None, :, None]
  k_pos = np.arange(kv_len)[None, None, :]
  heads = np.arange(num_kv_heads)[:, None, None]
  mask = allowed(spec, q_pos, k_pos, heads, num_kv_heads)
  return np.broadcast_to(mask, (num_kv_heads, q_len, kv_len)).copy()


# ----------------------------------------------------------------------------- block layout


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Which key tiles each query tile visits (and the transpose), per kv head.

  The leading head axis has size num_kv_heads when the pattern is head dependent and 1
  otherwise (broadcast). Lists are padded to a fixed width by repeating the last valid
  entry (so a pipelined kernel re-uses the tile it already has); entries at or beyond
  the count must be skipped.
  """

  block_q: int
  block_k: int
  q_len: int
  kv_len: int
  q_offset: int
  kv_index: np.ndarray   # int32[H, nq, max_kv]  key tiles per query tile, ascending
  kv_full: np.ndarray    # bool [H, nq, max_kv]  True: every pair allowed, no padding
  kv_count: np.ndarray   # int32[H, nq]
  q_index: np.ndarray    # int32[H, nk, max_q]   query tiles per key tile, ascending
  q_full: np.ndarray     # bool [H, nk, max_q]
  q_count: np.ndarray    # int32[H, nk]

  @property
  def num_q_blocks(self) -> int:
    return self.kv_index.shape[1]

  @property
  def num_k_blocks(self) -> int:
    return self.q_index.shape[1]

  @property
  def num_heads(self) -> int:
    return self.kv_index.shape[0]

  def visited_pairs(self) -> int:
    """Number of (head, query tile, key tile) triples visited (before head broadcast)."""
    return int(self.kv_count.sum())


def _tile_bounds(n_tiles: int, tile: int, length: int, offset: int):
  """First and last absolute position of each tile (clipped to the sequence)."""
  start = offset + np.arange(n_tiles, dtype=np.int32) * tile
  end = offset + np.minimum((np.arange(n_tiles, dtype=np.int32) + 1) * tile, length) - 1
  return start, end


def _has_multiple(lo, hi, residue, modulus):
  """Whether some x in [lo, hi] has x % modulus == residue."""
  return lo + (residue - lo) % modulus <= hi


def _tile_any_all(spec: AttentionSpec, q0, q1, k0, k1, head, num_kv_heads):
  """Exact any/all of `allowed` over tiles with query range [q0,q1] x key range [k0,k1].

  Arguments broadcast: q0/q1 [nq, 1], k0/k1 [1, nk]; `head` is the kv head.
  """
  causal_any = k0 <= q1
  causal_all = k1 <= q0
  if spec.kind == "full":
    return causal_any, causal_all
  if spec.kind == "sink_window":
    sink, window = spec.sink, spec.window
    # Closest causal pair: distance max(0, q0 - k1).
    any_ = causal_any & ((k0 < sink) | (q0 - k1 < window))
    all_ = causal_all & ((k1 < sink) | (q1 - np.maximum(k0, sink) < window))
    return any_, all_
  b, L, V = spec.block_size, spec.local_blocks, spec.vert_stride
  residue = (-head * spec.stride_shift(num_kv_heads)) % V  # kb with (kb + h*s) % V == 0
  # Local: the causal pair with the smallest block distance.
  local_any = causal_any & ((k0 > q0) | (q0 // b - np.minimum(k1, q0) // b < L))
  # Strided: any strided key block at or before the last query.
  stride_any = causal_any & _has_multiple(k0 // b, np.minimum(k1, q1) // b, residue, V)
  # All: every key block that is not local for the last query block is strided (two
  # consecutive blocks are both strided only when V == 1).
  lo, hi = k0 // b, np.minimum(k1 // b, q1 // b - L)
  all_ = causal_all & ((hi < lo) | (V == 1) | ((hi == lo) & ((lo - residue) % V == 0)))
  return local_any | stride_any, all_


def _ragged_lists(any_: np.ndarray, full: np.ndarray):
  """bool[H, n, m] -> padded ascending index lists, full flags and counts."""
  count = any_.sum(-1).astype(np.int32)
  width = max(1, int(count.max(initial=0)))
  h, r, c = np.nonzero(any_)
  row_start = np.concatenate([[0], np.cumsum(count.reshape(-1))])[:-1]
  slot = np.arange(h.size) - row_start[h * any_.shape[1] + r]
  index = np.zeros(any_.shape[:2] + (width,), np.int32)
  flags = np.zeros(any_.shape[:2] + (width,), bool)
  index[h, r, slot] = c
  flags[h, r, slot] = full[h, r, c]
  # Pad by repeating the last valid entry (or 0 for empty rows).
  last = np.take_along_axis(index, np.maximum(count - 1, 0)[..., None], -1)
  pad = np.arange(width)[None, None, :] >= count[..., None]
  index = np.where(pad, last, index)
  return index, flags & ~pad, count


def _stack_heads(per_head):
  """Stacks per-head ragged lists along the head axis, padded to the widest."""
  width = max(index.shape[-1] for index, _, _ in per_head)
  n = per_head[0][0].shape[1]
  index = np.empty((len(per_head), n, width), np.int32)
  full = np.zeros((len(per_head), n, width), bool)
  for h, (i, f, _) in enumerate(per_head):
    index[h, :, :i.shape[-1]] = i[0]
    index[h, :, i.shape[-1]:] = i[0, :, -1:]  # keep repeating the last entry
    full[h, :, :f.shape[-1]] = f[0]
  return index, full, np.concatenate([c for _, _, c in per_head])


@functools.lru_cache(maxsize=64)
def block_layout(spec: AttentionSpec, q_len: int, kv_len: int, num_kv_heads: int,
                 block_q: int, block_k: int, q_offset: int = 0) -> BlockLayout:
  """Block layout for `spec` over query tiles of `block_q` and key tiles of `block_k`.

  Query tile t covers absolute positions q_offset + [t*block_q, (t+1)*block_q); key tile u
  covers [u*block_k, (u+1)*block_k). A tile that runs past the sequence end is never full.
  """
  if min(q_len, kv_len, block_q, block_k, num_kv_heads) < 1 or q_offset < 0:
    raise ValueError(f"bad layout request: q_len={q_len} kv_len={kv_len} heads={num_kv_heads} "
                     f"block_q={block_q} block_k={block_k} q_offset={q_offset}")
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  q0, q1 = _tile_bounds(nq, block_q, q_len, q_offset)
  k0, k1 = _tile_bounds(nk, block_k, kv_len, 0)
  n_heads = num_kv_heads if spec.head_dependent(num_kv_heads) else 1
  unpadded = (((np.arange(nk) + 1) * block_k <= kv_len)[None, :]
              & ((np.arange(nq) + 1) * block_q <= q_len)[:, None])
  rows, cols = [], []
  for head in range(n_heads):  # one head at a time keeps temporaries at [nq, nk]
    any_, all_ = _tile_any_all(spec, q0[:, None], q1[:, None], k0[None, :], k1[None, :],
                               head, num_kv_heads)
    any_ = np.broadcast_to(any_, (nq, nk))
    full = all_ & unpadded & any_
    rows.append(_ragged_lists(any_[None], full[None]))
    cols.append(_ragged_lists(any_.T[None], full.T[None]))
  kv_index, kv_full, kv_count = _stack_heads(rows)
  q_index, q_full, q_count = _stack_heads(cols)
  return BlockLayout(block_q, block_k, q_len, kv_len, q_offset,
                     kv_index, kv_full, kv_count, q_index, q_full, q_count)
