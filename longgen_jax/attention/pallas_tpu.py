"""LongGen attention on TPU through JAX's splash attention kernels.

Splash skips key tiles by a host-side `MaskInfo` and masks inside a tile with a
*computable* mask: a function of (query position, key position) evaluated in the
kernel, so no T x T mask exists anywhere. Two things are ours:

* `MaskInfo` is built from `spec.block_layout` (vectorised numpy). Splash's own
  `process_mask` evaluates the mask tile by tile in Python, which is quadratic in
  T (~80 s per call for sink_window at 128K, three calls per layer pattern); ours
  produces the identical arrays in milliseconds (tests check equality).
* A `custom_vjp` around splash's forward, dQ and dK/dV kernels. Splash's public
  custom_vjp cannot differentiate its log-sum-exp output, which ring attention
  needs; d(lse)/d(scores) = p, so the lse cotangent folds into the kernels'
  `di = rowsum(o * do)` term as `di - dlse`. These kernels are private splash
  functions (pinned to jax 0.11.2 like the rest of the project).

A computable mask has no head argument, so a head-dependent `block_sparse`
pattern runs one splash call per group of kv heads that share a stride phase
(the query heads of a GQA group go with their kv head). Rows without an allowed
key (segment ids, queries past the last key) come out as zeros with lse = -inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib

from longgen_jax.attention.padding import round_up
from longgen_jax.attention.residuals import name_full_residuals
from longgen_jax.attention.spec import AttentionSpec, allowed, block_layout

LANES = 128  # splash tiles are multiples of the TPU lane width
MASK_VALUE = sk.DEFAULT_MASK_VALUE
# lse of a row that saw only masked scores is ~MASK_VALUE (or -inf if no tile ran).
_EMPTY_LSE = 0.5 * MASK_VALUE


# ----------------------------------------------------------------------------- in-kernel mask


def _div(x, n: int):
  """x // n for x >= 0; a shift when n is a power of two (cheap on the VPU)."""
  return x >> (n.bit_length() - 1) if n & (n - 1) == 0 else x // n


def _mod(x, n: int):
  return x & (n - 1) if n & (n - 1) == 0 else x % n


@dataclasses.dataclass(frozen=True)
class PatternMask:
  """`allowed(spec, q, k, kv_head)` plus key padding, on numpy or in-kernel jax arrays.

  Hashable by value (splash takes it as a static jit argument). kv heads that share a
  stride phase share one mask: pass the first head of the group.
  """

  spec: AttentionSpec
  kv_head: int = 0
  num_kv_heads: int = 1
  kv_len: int | None = None  # keys at or past kv_len are padding

  def __call__(self, q_pos, k_pos):
    ok = allowed(self.spec, q_pos, k_pos, self.kv_head, self.num_kv_heads, div=_div, mod=_mod)
    return ok if self.kv_len is None else ok & (k_pos < self.kv_len)


class LongGenMask(mask_lib._ComputableMask):  # pylint: disable=protected-access
  """The same pattern as a splash `Mask` (lazy, per tile): for splash's own tooling and tests."""

  def __init__(self, shape: tuple[int, int], fn: PatternMask, q_offset: int = 0):
    super().__init__(shape, fn)
    self.fn, self.q_offset = fn, q_offset
    self.q_sequence = (q_offset + np.arange(shape[0])).astype(np.int32)

  def __eq__(self, other):
    return isinstance(other, LongGenMask) and (self.shape, self.fn, self.q_offset) == (
        other.shape, other.fn, other.q_offset)

  def __hash__(self):
    return hash((LongGenMask, self.shape, self.fn, self.q_offset))


# ----------------------------------------------------------------------------- MaskInfo


def _downcast(x_int32: np.ndarray) -> np.ndarray:
  """Smallest int type holding the values (scalar memory on TPU is scarce); as splash does."""
  top = int(x_int32.max(initial=0))
  for dtype in (np.int8, np.int16):
    if top <= np.iinfo(dtype).max:
      return x_int32.astype(dtype)
  return x_int32.astype(np.int32)


def _block_grid(spec: AttentionSpec, q_len_p: int, kv_len: int, kv_len_p: int, num_kv_heads: int,
                kv_head: int, block_q: int, block_k: int, q_offset: int) -> np.ndarray:
  """int32[nq, nk]: 0 no allowed pair, 1 some, 2 all (splash's block_mask before shrinking)."""
  lay = block_layout(spec, q_len_p, kv_len, num_kv_heads, block_q, block_k, q_offset)
  h = kv_head if lay.num_heads > 1 else 0
  idx_QM, full_QM, count_Q = lay.kv_index[h], lay.kv_full[h], lay.kv_count[h]
  valid_QM = np.arange(idx_QM.shape[1])[None, :] < count_Q[:, None]
  rows_QM = np.broadcast_to(np.arange(idx_QM.shape[0])[:, None], idx_QM.shape)
  grid = np.zeros((q_len_p // block_q, kv_len_p // block_k), np.int32)
  grid[rows_QM[valid_QM], idx_QM[valid_QM]] = 1 + full_QM[valid_QM]
  return grid


def _shrink(grid_NM: np.ndarray, pad_front: bool):
  """Per row, the nonzero columns in order, padded with 0 to the widest row.

  Returns (block_mask, data_next) [N, W]. splash pads forward/dQ lists at the back and
  dK/dV lists at the front (so the last step of a column is always a real one).
  """
  nonzero = grid_NM > 0
  count_N = nonzero.sum(1)
  width = max(1, int(count_N.max(initial=0)))
  order_NM = np.argsort(~nonzero, axis=1, kind="stable")  # nonzero columns first, ascending
  slot_NW = np.arange(width)[None, :] - ((width - count_N)[:, None] if pad_front else 0)
  valid_NW = (slot_NW >= 0) & (slot_NW < count_N[:, None])
  cols_NW = np.take_along_axis(order_NM, np.clip(slot_NW, 0, grid_NM.shape[1] - 1), 1)
  data_next = np.where(valid_NW, cols_NW, 0).astype(np.int32)
  block_mask = np.where(valid_NW, np.take_along_axis(grid_NM, cols_NW, 1), 0).astype(np.int32)
  return block_mask, data_next


def mask_info(spec: AttentionSpec, q_len_p: int, kv_len: int, kv_len_p: int, num_kv_heads: int,
              kv_head: int, block_q: int, block_k: int, q_offset: int = 0,
              dkv: bool = False) -> mask_info_lib.MaskInfo:
  """splash's MaskInfo for one kv head's pattern (== process_mask / process_mask_dkv output).

  q_len_p, kv_len_p: padded lengths (multiples of the blocks); keys >= kv_len are padding.
  """
  grid = _block_grid(spec, q_len_p, kv_len, kv_len_p, num_kv_heads, kv_head, block_q, block_k,
                     q_offset)
  if dkv:
    block_mask, data_next = (x.T for x in _shrink(grid.T, pad_front=True))
  else:
    block_mask, data_next = _shrink(grid, pad_front=False)
  return mask_info_lib.MaskInfo(
      data_next=_downcast(data_next)[None], mask_next=None,
      block_mask=_downcast(block_mask)[None], partial_mask_blocks=None,
      q_sequence=(q_offset + np.arange(q_len_p)).astype(np.int32))


# ----------------------------------------------------------------------------- block sizes


def default_block_sizes(spec: AttentionSpec) -> sk.BlockSizes:
  """512-token tiles; 128-wide key tiles for block_sparse so strided blocks waste less.

  Not tuned on hardware (no TPU was available when this was written).
  """
  bq, bkv = 512, (128 if spec.kind == "block_sparse" else 512)
  return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                       block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def fit_block_sizes(bs: sk.BlockSizes, q_len: int, kv_len: int):
  """Clamps tiles to the (lane-rounded) lengths; returns (block sizes, padded T, padded S)."""
  if bs.use_fused_bwd_kernel:
    raise ValueError("use_fused_bwd_kernel is not supported: its dQ buffer is [kv_blocks, H, T, D] "
                     "float32, too large at long context")
  tq, tk = round_up(q_len, LANES), round_up(kv_len, LANES)
  fq = lambda b, dflt: min(b if b is not None else dflt, tq)
  fk = lambda b, dflt: min(b if b is not None else dflt, tk)
  bq, bkv = fq(bs.block_q, None), fk(bs.block_kv, None)
  bq_dkv, bkv_dkv = fq(bs.block_q_dkv, bq), fk(bs.block_kv_dkv, bkv)
  bq_dq, bkv_dq = fq(bs.block_q_dq, bq), fk(bs.block_kv_dq, bkv)
  fc = lambda c, b: c if c is not None and c <= b and b % c == 0 else b
  fitted = sk.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=fc(bs.block_kv_compute, bkv),
      block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv,
      block_kv_dkv_compute=fc(bs.block_kv_dkv_compute, bkv_dkv),
      block_q_dq=bq_dq, block_kv_dq=bkv_dq,
      q_layout=bs.q_layout, k_layout=bs.k_layout, v_layout=bs.v_layout)
  for name in ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
               "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"):
    if getattr(fitted, name) % LANES:
      raise ValueError(f"splash block size {name}={getattr(fitted, name)} must be a multiple of {LANES}")
  q_len_p = round_up(q_len, math.lcm(bq, bq_dkv, bq_dq))
  kv_len_p = round_up(kv_len, math.lcm(bkv, bkv_dkv, bkv_dq))
  return fitted, q_len_p, kv_len_p


# ----------------------------------------------------------------------------- kernel


@functools.lru_cache(maxsize=128)
def _splash_fn(spec: AttentionSpec, q_len: int, q_len_p: int, kv_len: int, kv_len_p: int,
               num_kv_heads: int, kv_head: int, q_offset: int, bs: sk.BlockSizes, interpret: bool):
  """custom_vjp (q[H,Tp,D], k[K,Sp,D], v, seg) -> (out[H,Tp,D], lse[H,Tp]) for one example."""
  fn = PatternMask(spec, kv_head, num_kv_heads, kv_len if kv_len_p > kv_len else None)
  info = functools.partial(mask_info, spec, q_len_p, kv_len, kv_len_p, num_kv_heads, kv_head,
                           q_offset=q_offset)
  fwd_info = info(bs.block_q, bs.block_kv)
  dq_info = info(bs.block_q_dq, bs.block_kv_dq)
  dkv_info = info(bs.block_q_dkv, bs.block_kv_dkv, dkv=True)
  as_jnp = lambda mi: jax.tree.map(jnp.asarray, mi)
  common = dict(mask_value=MASK_VALUE, is_mqa=False, attn_logits_soft_cap=None,
                mask_function=fn, interpret=interpret)
  layouts = dict(q_layout=bs.q_layout, k_layout=bs.k_layout, v_layout=bs.v_layout)

  def forward(q, k, v, seg):
    out, (lse,) = sk._splash_attention_forward(  # pylint: disable=protected-access
        as_jnp(fwd_info), q, k, v, seg, None, block_sizes=bs, residual_checkpoint_name=None,
        save_residuals=True, **common)
    empty = ~(lse > _EMPTY_LSE)  # also catches NaN/-inf of rows whose tiles never ran
    out = jnp.where(empty[..., None], 0, out).astype(q.dtype)
    return out, jnp.where(empty, -jnp.inf, lse), empty

  @jax.custom_vjp
  def attend(q, k, v, seg):
    out, lse, _ = forward(q, k, v, seg)
    return out, lse

  def attend_fwd(q, k, v, seg):
    out, lse, _ = forward(q, k, v, seg)
    out, lse = name_full_residuals(spec, out, lse, T=q_len, S=kv_len, q_offset=q_offset)   # remat keeps them
    return (out, lse), (q, k, v, seg, out, lse)

  def attend_bwd(res, cotangents):
    q, k, v, seg, out, lse = res
    empty = lse == -jnp.inf   # what `forward` marked, recovered so that no residual needs the kernel
    do, dlse = cotangents
    do = jnp.where(empty[..., None], 0, do).astype(q.dtype)
    dlse = jnp.where(empty, 0.0, dlse.astype(jnp.float32))
    lse = jnp.where(empty, MASK_VALUE, lse)  # finite; no tile of an empty row contributes
    # d(lse)/d(scores) = p, so dS = p * (dO.v - di + dlse): fold dlse into di.
    di = jnp.einsum("hsd,hsd->hs", out.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    _, dk, dv = sk._splash_attention_bwd_dkv(  # pylint: disable=protected-access
        q, k, v, seg, None, lse, do, di, bq=bs.block_q_dkv, bkv=bs.block_kv_dkv,
        bkv_compute=bs.block_kv_dkv_compute, mask_info=as_jnp(dkv_info),
        use_fused_bwd_kernel=False, **layouts, **common)
    dq = sk._splash_attention_bwd_dq(  # pylint: disable=protected-access
        q, k, v, seg, None, lse, do, di, bq=bs.block_q_dq, bkv=bs.block_kv_dq,
        mask_info=as_jnp(dq_info), **layouts, **common)
    return dq, dk, dv, None

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


def _head_groups(spec: AttentionSpec, num_kv_heads: int) -> list[list[int]]:
  """kv heads that share one pattern (one splash call each), in ascending order."""
  groups: dict[int, list[int]] = {}
  for h in range(num_kv_heads):
    groups.setdefault(spec.stride_phase(h, num_kv_heads), []).append(h)
  return list(groups.values())


@functools.partial(jax.jit, static_argnames=("spec", "q_offset", "return_lse", "block_sizes",
                                             "interpret"))
def _splash_attention(q_BTHD, k_BSKD, v_BSKD, q_seg_BT, kv_seg_BS, *, spec, q_offset, return_lse,
                      block_sizes, interpret):
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  G = Hq // Hkv
  bs, Tp, Sp = fit_block_sizes(block_sizes or default_block_sizes(spec), T, S)
  scale = 1.0 / math.sqrt(D)  # splash does not scale scores
  q_BHTD = (q_BTHD.astype(jnp.float32) * scale).astype(q_BTHD.dtype).transpose(0, 2, 1, 3)
  q_BHTD = jnp.pad(q_BHTD, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  pad_kv = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  k_BKSD, v_BKSD = pad_kv(k_BSKD), pad_kv(v_BSKD)
  seg = None
  if q_seg_BT is not None:
    seg = sk.SegmentIds(q=jnp.pad(q_seg_BT.astype(jnp.int32), ((0, 0), (0, Tp - T))),
                        kv=jnp.pad(kv_seg_BS.astype(jnp.int32), ((0, 0), (0, Sp - S))))

  outs, lses, q_heads = [], [], []
  for kv_heads in _head_groups(spec, Hkv):
    fn = _splash_fn(spec, T, Tp, S, Sp, Hkv, kv_heads[0], q_offset, bs, interpret)
    qh = [h * G + g for h in kv_heads for g in range(G)]
    whole = len(kv_heads) == Hkv
    q_g = q_BHTD if whole else q_BHTD[:, np.array(qh)]
    k_g = k_BKSD if whole else k_BKSD[:, np.array(kv_heads)]
    v_g = v_BKSD if whole else v_BKSD[:, np.array(kv_heads)]
    out, lse = jax.vmap(fn, in_axes=(0, 0, 0, None if seg is None else 0))(q_g, k_g, v_g, seg)
    outs.append(out)
    lses.append(lse)
    q_heads += qh
  inverse = np.argsort(np.array(q_heads))
  out_BHTD = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)[:, inverse]
  out_BTHD = out_BHTD[:, :, :T].transpose(0, 2, 1, 3)
  if not return_lse:
    return out_BTHD
  lse_BHT = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=1)[:, inverse]
  return out_BTHD, lse_BHT[:, :, :T]


def splash_attention(q_BTHD, k_BSKD, v_BSKD, spec: AttentionSpec, *, q_segment_ids=None,
                     kv_segment_ids=None, q_offset: int = 0, return_lse: bool = False,
                     block_sizes: sk.BlockSizes | None = None, interpret: bool = False):
  """LongGen attention with splash kernels; `interpret=True` runs them on CPU.

  Same contract as `reference_attention`. q_offset must be a Python int: it fixes
  which key tiles each query tile visits, which splash needs on the host.
  block_sizes: splash tiles (multiples of 128), clamped to the lengths;
  default `default_block_sizes(spec)`.
  """
  try:
    q_offset = int(q_offset)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError("splash attention needs a static (Python int) q_offset: the key tiles "
                     f"each query tile visits are planned on the host; got {q_offset!r}") from e
  if q_offset < 0:
    raise ValueError(f"q_offset must be >= 0, got {q_offset}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if q_BTHD.shape[2] % k_BSKD.shape[2]:
    raise ValueError(f"query heads ({q_BTHD.shape[2]}) must be a multiple of kv heads "
                     f"({k_BSKD.shape[2]})")
  return _splash_attention(q_BTHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, spec=spec,
                           q_offset=q_offset, return_lse=return_lse, block_sizes=block_sizes,
                           interpret=interpret)


def pallas_tpu_attention(q, k, v, spec: AttentionSpec, *, q_segment_ids=None, kv_segment_ids=None,
                         q_offset: int = 0, return_lse: bool = False):
  """The registered TPU implementation (compiled splash kernels)."""
  return splash_attention(q, k, v, spec, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                          q_offset=q_offset, return_lse=return_lse)

