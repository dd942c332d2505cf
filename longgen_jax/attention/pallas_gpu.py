"""Block-sparse flash attention for NVIDIA GPUs in Pallas (Triton lowering).

One kernel family serves `full`, `sink_window` and `block_sparse`: each query tile loops only
over the key tiles its `BlockLayout` lists, and evaluates the pattern predicate (`allowed`)
only on tiles the layout marks partial. Backward is two kernels and needs no atomics: dQ loops
over the same per-query-tile lists, dK/dV over the transposed per-key-tile lists (and over the
query heads of the GQA group, so K/V are never repeated).

The layout lists travel to the kernel as flat int32 tables (entry = key_tile * 2 + is_full),
read one scalar per loop step. Softmax runs in base 2 (exp2) with fp32 accumulation; the
log-sum-exp kept for backward is base 2, the one returned to callers is natural.

Packed documents (segment ids): the lists are static, the ids are data, so each call also computes
per list how many tiles at its ends belong to other documents only, and the three kernels start
(forward, dQ) or stop (dK/dV) past them: a full layer over N packed documents does ~1/N of the
causal work, with the same bits (`segment_skip`; the Mosaic GPU kernels' segment paths drop such
tiles anywhere in their lists). CPU-tested bit for bit against no skipping, GPU-tested against the reference; GPU timing:
benchmarks/packed_attention.py.

Runs compiled on Ampere and Hopper, and in interpret mode on CPU (`interpret=True`) for tests.

Forward on Hopper: for bf16/fp16, head_dim 128 and no segment ids, the forward is the Mosaic GPU
kernel in `pallas_mgpu` (wgmma, TMA, warp-specialised; same tables, same base-2 lse), chosen
because it is faster for every pattern (figures in BENCHMARKS.md); with segment ids too on the
pattern kinds in `pallas_mgpu.SEGMENT_KINDS` (GPU-tested and measured faster: all three),
`LONGGEN_JAX_MGPU_SEGMENTS=1` every pattern, 0 none. The backward below consumes
its out + lse unchanged.
`Tiles(forward="triton")` forces this module's forward.

Backward on Hopper: by default (`LONGGEN_JAX_MGPU_BACKWARD` unset or auto, read at trace time) the
kernels that measured faster than this module's run on Mosaic GPU (`pallas_mgpu_backward`; full: dQ
and dK/dV; sink_window and block_sparse: dQ, beside this module's dK/dV), for bf16/fp16 and head_dim
64/128 (segment ids where the Mosaic forward takes them); `=1` both kernels, `=0` the Triton backward
below everywhere (as on Ampere, and in interpret mode on a CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longgen_jax.attention import segment_skip
from longgen_jax.attention.padding import pad_axis, pad_segment_ids, round_up
from longgen_jax.attention.residuals import name_full_residuals
from longgen_jax.attention.spec import AttentionSpec, allowed, block_layout

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes and Triton launch knobs for the three kernels (all powers of two, >= 16)."""

  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  dkv_chunk: int = 0   # query tiles per dK/dV work unit; 0: 2x the mean list length (>= 32)
  forward: str = "auto"  # "auto": Mosaic GPU forward where supported (Hopper), else "triton";
  # "persistent": the Mosaic GPU forward and dQ (where the backward runs it) with persistent programs
  # (pallas_mgpu.MgpuTiles.persistent, MgpuBwdTiles.persistent_dq), else as "auto"

  @classmethod
  def uniform(cls, block_q: int, block_k: int, **kw) -> Tiles:
    return cls(block_q, block_k, block_q, block_k, block_q, block_k, **kw)

  def check(self):
    for name, val in dataclasses.asdict(self).items():
      if name.startswith("block_") and (val < 16 or val & (val - 1)):
        raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {val}")
    if self.forward not in ("auto", "triton", "persistent"):
      raise ValueError(f"Tiles.forward must be 'auto', 'triton' or 'persistent', got {self.forward!r}")


def default_tiles() -> Tiles:
  """The measured defaults (BENCHMARKS.md) serve every pattern, head_dim and dtype so far."""
  return Tiles()


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Everything static about one call (hashable: a custom_vjp nondiff argument)."""

  spec: AttentionSpec
  tiles: Tiles
  T: int            # true query length
  S: int            # true key length
  Tp: int           # padded lengths (multiples of every query / key tile)
  Sp: int
  Hkv: int
  G: int            # query heads per kv head
  q_offset: int
  has_seg: bool
  interpret: bool
  head_dim: int     # true head_dim (the softmax scale); arrays may be zero-padded past it

  @property
  def scale(self) -> float:
    return 1.0 / math.sqrt(self.head_dim)

  @property
  def head_dependent(self) -> bool:
    return self.spec.head_dependent(self.Hkv)

  def layout(self, bq: int, bk: int):
    # Over the padded query length: padded rows (zero q, zero dO) are ordinary rows, so every
    # kernel's tiles cover all Tp rows and no backward tile reads an unwritten out/lse row.
    return block_layout(self.spec, self.Tp, self.S, self.Hkv, bq, bk, self.q_offset)


def _tables(index, full, count):
  """Layout lists -> flat int32 tables (entry = tile * 2 + full) and counts, and the width."""
  width = index.shape[-1]
  entries = (index.astype(np.int32) * 2 + full.astype(np.int32)).reshape(-1)
  return jnp.asarray(entries), jnp.asarray(count.reshape(-1).astype(np.int32)), width


def _csr_tables(index, full, count):
  """Layout lists -> (entries, offsets): each row's real entries (tile * 2 + full) back to back,
  int32[max(1, sum(count))], and where each row starts, int32[rows]; plus the numpy (tile, row, slot) of
  every entry (for `_live_ends`). For the transposed (dK/dV) lists a dense [rows, width] table pads every
  row to the longest (the sink's key tile, every strided one: all later query tiles): 512 MiB at 128K for
  block_sparse(64,16,64) over 32 kv heads (64x64 tiles), 8.2 MiB this way."""
  count = count.reshape(-1).astype(np.int64)
  index2, full2 = index.reshape(count.size, -1), full.reshape(count.size, -1)
  rows, slots = np.nonzero(np.arange(index2.shape[1])[None] < count[:, None])   # real entries, row-major
  tile = index2[rows, slots].astype(np.int32)
  entries = tile * 2 + full2[rows, slots].astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int32)
  entries = entries if entries.size else np.zeros(1, np.int32)   # a kernel operand cannot be empty
  return jnp.asarray(entries), jnp.asarray(offsets), (tile, rows.astype(np.int32), slots.astype(np.int32))


def _whole(x):
  """BlockSpec covering a whole (small, 1-D) array for every program."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _params(cfg: _Cfg, bwd: bool):
  t = cfg.tiles
  return plgpu.CompilerParams(num_warps=t.num_warps_bwd if bwd else t.num_warps,
                              num_stages=t.num_stages_bwd if bwd else t.num_stages)


def _tile_mask(cfg: _Cfg, q_pos, k_pos, kv_head):
  """Pattern predicate for one partial tile, with keys past the sequence end masked."""
  mask = allowed(cfg.spec, q_pos[:, None], k_pos[None, :], kv_head, cfg.Hkv)
  return mask & (k_pos < cfg.S)[None, :]


def _scores(cfg: _Cfg, q, k, q_pos, k_pos, kv_head, full, seg_mask):
  """Base-2 scaled scores of one tile, -inf where not allowed."""
  s = _dot(q, k, trans_b=True) * (LOG2E * cfg.scale)
  if seg_mask is not None:
    s = jnp.where(seg_mask, s, -jnp.inf)
  return jax.lax.cond(full, lambda s: s,
                      lambda s: jnp.where(_tile_mask(cfg, q_pos, k_pos, kv_head), s, -jnp.inf), s)


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
  """2-D matmul with fp32 accumulation (exact fp32, no tf32, for fp32 inputs)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _unpack(entry):
  return jax.lax.shift_right_logical(entry, 1), (entry & 1) == 1


# ----------------------------------------------------------------------------- packed documents
# The tiles at the list ends that other documents own are skipped (segment_skip: why that is exact).


def _leading_foreign(cfg: _Cfg, lay, qseg, kseg, bq: int, bk: int):
  """int32[B * H' * nq]: per (batch, query-tile list) how many leading key tiles to skip."""
  return segment_skip.leading_foreign(lay.kv_index, lay.kv_count, qseg, kseg, bq, bk, cfg.T, cfg.S).reshape(-1)


def _live_ends(cfg: _Cfg, lay, qseg, kseg, bq: int, bk: int, flat=None):
  """int32[B * H' * nk]: per (batch, key-tile list) one past the last query tile to visit. `flat`: the
  (tile, row, slot) arrays of `_csr_tables` for `lay`'s transposed lists, when the caller has them."""
  flat = flat or _csr_tables(lay.q_index, lay.q_full, lay.q_count)[2]
  return segment_skip.live_ends(*flat, lay.q_count, kseg, qseg, bk, bq, cfg.S, cfg.T).reshape(-1)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(ent_ref, cnt_ref, q_ref, k_ref, v_ref, *rest, cfg: _Cfg, width: int, nq: int):
  if cfg.has_seg:
    qseg_ref, kseg_ref, skip_ref, o_ref, lse_ref = rest
  else:
    o_ref, lse_ref = rest
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  qt, h = nq - 1 - pl.program_id(0), pl.program_id(2)   # long rows (full) first
  kv_head = h // cfg.G
  row = (kv_head if cfg.head_dependent else 0) * nq + qt
  first = skip_ref[pl.program_id(1) * cnt_ref.shape[0] + row] if cfg.has_seg else 0
  q = q_ref[...]
  q_pos = cfg.q_offset + qt * bq + jnp.arange(bq)
  qseg = qseg_ref[...] if cfg.has_seg else None

  def body(j, carry):
    acc, m, l = carry
    kt, full = _unpack(ent_ref[row * width + j])
    ks = pl.ds(kt * bk, bk)
    k_pos = kt * bk + jnp.arange(bk)
    seg_mask = (qseg[:, None] == kseg_ref[ks][None, :]) if cfg.has_seg else None
    s = _scores(cfg, q, k_ref[ks, :], q_pos, k_pos, kv_head, full, seg_mask)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # empty so far: keep exp2 finite
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    v = v_ref[ks, :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(first, cnt_ref[row], body, init)
  ok = l > 0
  o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log2(jnp.where(ok, l, 1.0)), -jnp.inf)


def _forward(cfg: _Cfg, q, k, v, qseg, kseg):
  """Padded inputs -> out [B,Tp,Hq,D], base-2 lse [B,Hq,Tp] (-inf for empty rows)."""
  if cfg.tiles.forward != "triton" and not cfg.interpret and cfg.head_dim == q.shape[-1]:
    from longgen_jax.attention import pallas_mgpu
    if pallas_mgpu.supported(q.dtype, q.shape[-1], cfg.has_seg, spec=cfg.spec):
      tiles = pallas_mgpu.default_mgpu_tiles(cfg.spec, persistent=cfg.tiles.forward == "persistent")
      return pallas_mgpu.mgpu_forward(q, k, v, cfg.spec, T=cfg.T, S=cfg.S, q_offset=cfg.q_offset,
                                      head_dim=cfg.head_dim, tiles=tiles, q_segment_ids=qseg, kv_segment_ids=kseg)
  B, Tp, Hq, D = q.shape
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  lay = cfg.layout(bq, bk)
  nq = lay.num_q_blocks
  ent, cnt, width = _tables(lay.kv_index, lay.kv_full, lay.kv_count)
  G, Sp = cfg.G, cfg.Sp
  qmap = lambda i, b, h: (b, nq - 1 - i, h, 0)
  in_specs = [_whole(ent), _whole(cnt),
              pl.BlockSpec((None, bq, None, D), qmap),
              pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
              pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, h // G, 0))]
  args = [ent, cnt, q, k, v]
  if cfg.has_seg:
    skip = _leading_foreign(cfg, lay, qseg, kseg, bq, bk)
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, nq - 1 - i)),
                 pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)), _whole(skip)]
    args += [qseg, kseg, skip]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, width=width, nq=nq),
      grid=(nq, B, Hq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, D), qmap),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32)],
      compiler_params=_params(cfg, bwd=False),
      interpret=cfg.interpret,
      name="longgen_flash_fwd",
  )(*args)
  return out, lse


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(ent_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               cfg: _Cfg, width: int, nq: int):
  if cfg.has_seg:
    qseg_ref, kseg_ref, skip_ref, dq_ref = rest
  else:
    (dq_ref,) = rest
  bq, bk = cfg.tiles.block_q_dq, cfg.tiles.block_k_dq
  qt, h = nq - 1 - pl.program_id(0), pl.program_id(2)
  kv_head = h // cfg.G
  row = (kv_head if cfg.head_dependent else 0) * nq + qt
  first = skip_ref[pl.program_id(1) * cnt_ref.shape[0] + row] if cfg.has_seg else 0
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = cfg.q_offset + qt * bq + jnp.arange(bq)
  qseg = qseg_ref[...] if cfg.has_seg else None

  def body(j, dq):
    kt, full = _unpack(ent_ref[row * width + j])
    ks = pl.ds(kt * bk, bk)
    k_pos = kt * bk + jnp.arange(bk)
    seg_mask = (qseg[:, None] == kseg_ref[ks][None, :]) if cfg.has_seg else None
    k, v = k_ref[ks, :], v_ref[ks, :]
    p = jnp.exp2(_scores(cfg, q, k, q_pos, k_pos, kv_head, full, seg_mask) - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(first, cnt_ref[row], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward_dq(cfg: _Cfg, q, k, v, do, lse, delta, qseg, kseg):
  B, Tp, Hq, D = q.shape
  bq, bk = cfg.tiles.block_q_dq, cfg.tiles.block_k_dq
  lay = cfg.layout(bq, bk)
  nq = lay.num_q_blocks
  ent, cnt, width = _tables(lay.kv_index, lay.kv_full, lay.kv_count)
  G, Sp = cfg.G, cfg.Sp
  qmap = lambda i, b, h: (b, nq - 1 - i, h, 0)
  rowmap = lambda i, b, h: (b, h, nq - 1 - i)
  in_specs = [_whole(ent), _whole(cnt),
              pl.BlockSpec((None, bq, None, D), qmap),
              pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
              pl.BlockSpec((None, Sp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
              pl.BlockSpec((None, bq, None, D), qmap),
              pl.BlockSpec((None, None, bq), rowmap),
              pl.BlockSpec((None, None, bq), rowmap)]
  args = [ent, cnt, q, k, v, do, lse, delta]
  if cfg.has_seg:
    skip = _leading_foreign(cfg, lay, qseg, kseg, bq, bk)
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, nq - 1 - i)),
                 pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)), _whole(skip)]
    args += [qseg, kseg, skip]
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, width=width, nq=nq),
      grid=(nq, B, Hq),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, D), qmap),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(cfg, bwd=True),
      interpret=cfg.interpret,
      name="longgen_flash_bwd_dq",
  )(*args)


# ----------------------------------------------------------------------------- backward: dK, dV


@dataclasses.dataclass(frozen=True, eq=False)
class _Units:
  """dK/dV work units: each walks at most `chunk` query tiles of one key tile's list.

  A key tile whose list is much longer than the mean (the sink tile, every strided tile, is
  visited by all later query tiles) would otherwise be one program walking it all, a serial
  tail that grows with T. Its first chunk writes dK/dV directly; later chunks write fp32
  partial tiles into numbered slots that `_add_extras` folds in afterwards (no atomics).
  """

  kt: np.ndarray      # int32[H', U] key tile of each unit
  start: np.ndarray   # int32[H', U] first list slot
  stop: np.ndarray    # int32[H', U] one past the last list slot
  slot: np.ndarray    # int32[H', U] -1: write dK/dV directly; else the extra slot
  n_slots: int        # extra slots + 1 (the last one takes padding units)
  long_kt: np.ndarray     # int32[H', nL] key tiles with extra slots
  long_slots: np.ndarray  # int32[H', nL, X] their slots (padded)
  long_valid: np.ndarray  # bool [H', nL, X]


@functools.lru_cache(maxsize=64)
def _units(cfg: _Cfg, bq: int, bk: int) -> _Units:
  lay = cfg.layout(bq, bk)
  count = lay.q_count
  chunk = cfg.tiles.dkv_chunk or max(32, 2 * int(np.ceil(count.mean())))
  per_head, extras = [], []
  for hp in range(count.shape[0]):
    units, ext = [], {}
    for kt, n in enumerate(count[hp]):
      n = int(n)
      for c in range(max(1, -(-n // chunk))):
        slot = -1 if c == 0 else sum(len(v) for v in ext.values())
        if c:
          ext.setdefault(kt, []).append(slot)
        units.append((kt, c * chunk, min(n, (c + 1) * chunk), slot))
    per_head.append(units)
    extras.append(ext)
  U = max(len(u) for u in per_head)
  n_ext = max(sum(len(v) for v in e.values()) for e in extras)
  table = np.zeros((len(per_head), U, 4), np.int32)
  table[..., 3] = n_ext                                   # padding units: the spare slot
  for hp, units in enumerate(per_head):
    table[hp, :len(units)] = units
  nL = max(1, max(len(e) for e in extras))
  X = max([1] + [len(v) for e in extras for v in e.values()])
  long_kt = np.zeros((len(extras), nL), np.int32)
  long_slots = np.zeros((len(extras), nL, X), np.int32)
  long_valid = np.zeros((len(extras), nL, X), bool)
  for hp, ext in enumerate(extras):
    for l, (kt, slots) in enumerate(sorted(ext.items())):
      long_kt[hp, l] = kt
      long_slots[hp, l, :len(slots)] = slots
      long_valid[hp, l, :len(slots)] = True
  return _Units(table[..., 0], table[..., 1], table[..., 2], table[..., 3], n_ext + 1,
                long_kt, long_slots, long_valid)


def _dkv_kernel(ent_ref, off_ref, kt_ref, start_ref, stop_ref, slot_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, *rest, cfg: _Cfg, nk: int, n_units: int, n_rows: int):
  if cfg.has_seg:
    qseg_ref, kseg_ref, end_ref, dk_ref, dv_ref, ek_ref, ev_ref = rest
  else:
    dk_ref, dv_ref, ek_ref, ev_ref = rest
  bq, bk, G = cfg.tiles.block_q_dkv, cfg.tiles.block_k_dkv, cfg.G
  u, kv_head = pl.program_id(0), pl.program_id(2)
  hp = kv_head if cfg.head_dependent else 0
  unit = hp * n_units + u
  kt, slot = kt_ref[unit], slot_ref[unit]
  row = hp * nk + kt
  first = off_ref[row]   # the row's entries in the flat (CSR) table
  ks = pl.ds(kt * bk, bk)
  k, v = k_ref[ks, :], v_ref[ks, :]
  k_pos = kt * bk + jnp.arange(bk)
  kseg = kseg_ref[ks] if cfg.has_seg else None

  def body(it, carry):
    dk, dv = carry
    j, g = jax.lax.div(it, G), jax.lax.rem(it, G)   # query tile slot, head in the group
    qt, full = _unpack(ent_ref[first + j])
    qs = pl.ds(qt * bq, bq)
    q_pos = cfg.q_offset + qt * bq + jnp.arange(bq)
    seg_mask = (qseg_ref[qs][:, None] == kseg[None, :]) if cfg.has_seg else None
    q, do = q_ref[qs, g, :], do_ref[qs, g, :]
    lse, delta = lse_ref[g, qs], delta_ref[g, qs]
    p = jnp.exp2(_scores(cfg, q, k, q_pos, k_pos, kv_head, full, seg_mask) - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  stop = stop_ref[unit]
  if cfg.has_seg:   # query tiles past the last one sharing a segment with this key tile add nothing
    stop = jnp.minimum(stop, end_ref[pl.program_id(1) * n_rows + row])
  dk, dv = jax.lax.fori_loop(start_ref[unit] * G, jnp.maximum(stop, start_ref[unit]) * G, body, (zeros, zeros))
  dk = dk * cfg.scale

  @pl.when(slot < 0)
  def _():
    dk_ref[ks, :] = dk.astype(dk_ref.dtype)
    dv_ref[ks, :] = dv.astype(dv_ref.dtype)

  @pl.when(slot >= 0)
  def _():
    ek_ref[slot] = dk
    ev_ref[slot] = dv


def _add_extras(cfg: _Cfg, units: _Units, bk: int, d_BSKD, e_BKEkD):
  """Folds the extra partial tiles into the long key tiles (unique targets: no races)."""
  B, Sp, Hkv, D = d_BSKD.shape
  heads = np.arange(Hkv) if cfg.head_dependent else np.zeros(Hkv, np.int64)
  long_kt = units.long_kt[heads]                       # [Hkv, nL]
  slots = units.long_slots[heads]                      # [Hkv, nL, X]
  valid = units.long_valid[heads]
  h_idx = np.arange(Hkv)[:, None, None]
  parts = e_BKEkD[:, h_idx, slots]                     # [B, Hkv, nL, X, bk, D]
  extra = jnp.sum(jnp.where(valid[None, :, :, :, None, None], parts, 0.0), axis=3)
  d5 = d_BSKD.reshape(B, Sp // bk, bk, Hkv, D)
  # Padding entries (heads with fewer long tiles) add zeros, so repeated targets are harmless.
  d5 = d5.at[:, long_kt, :, np.arange(Hkv)[:, None], :].add(
      extra.transpose(1, 2, 0, 3, 4).astype(d5.dtype))
  return d5.reshape(B, Sp, Hkv, D)


def _backward_dkv(cfg: _Cfg, q, k, v, do, lse, delta, qseg, kseg):
  B, Tp, Hq, D = q.shape
  bq, bk, G = cfg.tiles.block_q_dkv, cfg.tiles.block_k_dkv, cfg.G
  lay = cfg.layout(bq, bk)
  nk = lay.num_k_blocks
  ent, off, flat = _csr_tables(lay.q_index, lay.q_full, lay.q_count)
  units = _units(cfg, bq, bk)
  n_units = units.kt.shape[1]
  utab = [jnp.asarray(a.reshape(-1)) for a in (units.kt, units.start, units.stop, units.slot)]
  Sp, E = cfg.Sp, units.n_slots
  seq = lambda i, b, h: (b, 0, h, 0)
  in_specs = [_whole(ent), _whole(off)] + [_whole(a) for a in utab] + [
      pl.BlockSpec((None, Tp, G, D), seq),
      pl.BlockSpec((None, Sp, None, D), seq),
      pl.BlockSpec((None, Sp, None, D), seq),
      pl.BlockSpec((None, Tp, G, D), seq),
      pl.BlockSpec((None, G, Tp), lambda i, b, h: (b, h, 0)),
      pl.BlockSpec((None, G, Tp), lambda i, b, h: (b, h, 0))]
  args = [ent, off, *utab, q, k, v, do, lse, delta]
  if cfg.has_seg:
    ends = _live_ends(cfg, lay, qseg, kseg, bq, bk, flat)
    in_specs += [pl.BlockSpec((None, Tp), lambda i, b, h: (b, 0)),
                 pl.BlockSpec((None, Sp), lambda i, b, h: (b, 0)), _whole(ends)]
    args += [qseg, kseg, ends]
  extra_spec = pl.BlockSpec((None, None, E, bk, D), lambda i, b, h: (b, h, 0, 0, 0))
  extra_shape = jax.ShapeDtypeStruct((B, cfg.Hkv, E, bk, D), jnp.float32)
  dk, dv, ek, ev = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, nk=nk, n_units=n_units, n_rows=lay.q_count.size),
      grid=(n_units, B, cfg.Hkv),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, Sp, None, D), seq), pl.BlockSpec((None, Sp, None, D), seq),
                 extra_spec, extra_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 extra_shape, extra_shape],
      compiler_params=_params(cfg, bwd=True),
      interpret=cfg.interpret,
      name="longgen_flash_bwd_dkv",
  )(*args)
  if E > 1:
    dk, dv = _add_extras(cfg, units, bk, dk, ek), _add_extras(cfg, units, bk, dv, ev)
  return dk, dv


# ----------------------------------------------------------------------------- custom_vjp


def _mgpu_backward(cfg: _Cfg, q) -> frozenset[str]:
  """Which backward kernels ("dq", "dkv") run on Mosaic GPU instead of Triton: opt-in per call or per
  measured pattern and kernel (the default), read at trace time (pallas_mgpu_backward)."""
  if cfg.interpret or cfg.head_dim != q.shape[-1]:
    return frozenset()
  from longgen_jax.attention import pallas_mgpu_backward
  if not pallas_mgpu_backward.supported(q.dtype, q.shape[-1], cfg.has_seg, spec=cfg.spec):
    return frozenset()
  return pallas_mgpu_backward.mosaic_kernels(cfg.spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Cfg, q, k, v, qseg, kseg):
  return _forward(cfg, q, k, v, qseg, kseg)


def _flash_fwd(cfg, q, k, v, qseg, kseg):
  # The barrier: under a layer scan the residuals the backward keeps (full layers' named pair under
  # remat="full", every output under "none") are written into a [layers, ...] stack, and XLA's GPU
  # dynamic-slice fusion CLONED the forward custom call into a fusion writing that stack in place,
  # keeping the original for the layer's next op: the kernel ran twice per full layer (7B width, 128K,
  # H200: 2 scanned full layers 3.35 s vs 2.87 s unscanned). The barrier's output is what gets stacked.
  out, lse = jax.lax.optimization_barrier(_forward(cfg, q, k, v, qseg, kseg))
  out, lse = name_full_residuals(cfg.spec, out, lse, T=cfg.T, S=cfg.S, q_offset=cfg.q_offset)   # remat keeps them
  return (out, lse), (q, k, v, qseg, kseg, out, lse)


def _flash_bwd(cfg, res, cotangents):
  q, k, v, qseg, kseg, out, lse = res
  do, dlse = cotangents
  do = do.astype(q.dtype)
  # lse2 = log2(e) * lse and d lse / d s = p: the lse cotangent folds into delta.
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  delta = delta - dlse.astype(jnp.float32) * LOG2E
  lse_b = jnp.where(lse == -jnp.inf, jnp.inf, lse)          # empty rows: p = 0 everywhere
  dq = dk = dv = None
  mosaic = _mgpu_backward(cfg, q)   # LONGGEN_JAX_MGPU_BACKWARD (default auto): see pallas_mgpu_backward
  if mosaic:
    from longgen_jax.attention import pallas_mgpu_backward
    tiles = pallas_mgpu_backward.default_tiles(cfg.spec)
    if cfg.tiles.forward == "persistent":   # the persistent switch covers the dQ kernel, the forward's twin
      tiles = dataclasses.replace(tiles, persistent_dq=True)
    dq, dk, dv = pallas_mgpu_backward.mgpu_backward(q, k, v, do, lse_b, delta, cfg.spec, S=cfg.S, T=cfg.T,
                                                    q_offset=cfg.q_offset, head_dim=cfg.head_dim, tiles=tiles,
                                                    q_segment_ids=qseg, kv_segment_ids=kseg, kernels=mosaic)
  if dq is None:
    dq = _backward_dq(cfg, q, k, v, do, lse_b, delta, qseg, kseg)
  if dk is None:
    dk, dv = _backward_dkv(cfg, q, k, v, do, lse_b, delta, qseg, kseg)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _prepare(q_BTHD, k_BSKD, v_BSKD, spec: AttentionSpec, q_segment_ids, kv_segment_ids, q_offset,
             tiles: Tiles | None, block_q: int | None, block_k: int | None, interpret: bool):
  """(static config, padded q, k, v, q seg, kv seg) of one call."""
  B, T, Hq, D = q_BTHD.shape
  S, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  if Hq % Hkv:
    raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
  if tiles is None:
    tiles = default_tiles()
  if tiles.forward == "auto" and not interpret:
    from longgen_jax.attention import pallas_mgpu
    if pallas_mgpu.persistent_enabled(spec):   # read per call: part of the static config, so of jit's key
      tiles = dataclasses.replace(tiles, forward="persistent")
  if block_q or block_k:
    tiles = dataclasses.replace(tiles, **{f"block_q{s}": block_q or getattr(tiles, f"block_q{s}")
                                          for s in ("", "_dq", "_dkv")},
                                **{f"block_k{s}": block_k or getattr(tiles, f"block_k{s}")
                                   for s in ("", "_dq", "_dkv")})
  tiles.check()
  bq_max = max(tiles.block_q, tiles.block_q_dq, tiles.block_q_dkv)
  bk_max = max(tiles.block_k, tiles.block_k_dq, tiles.block_k_dkv)
  Tp, Sp, Dp = round_up(T, bq_max), round_up(S, bk_max), max(16, pl.next_power_of_2(D))
  has_seg = q_segment_ids is not None
  cfg = _Cfg(spec, tiles, T, S, Tp, Sp, Hkv, Hq // Hkv, int(q_offset), has_seg, interpret, D)
  # Zero-padding head_dim (to a power of two for Triton) changes no dot product.
  q = pad_axis(pad_axis(q_BTHD, 3, Dp), 1, Tp)
  k = pad_axis(pad_axis(k_BSKD, 3, Dp), 1, Sp)
  v = pad_axis(pad_axis(v_BSKD, 3, Dp), 1, Sp)
  qseg, kseg = pad_segment_ids(q_segment_ids, kv_segment_ids, Tp, Sp) if has_seg else (None, None)
  return cfg, q, k, v, qseg, kseg


def pallas_attention(q_BTHD, k_BSKD, v_BSKD, spec: AttentionSpec, *, q_segment_ids=None,
                     kv_segment_ids=None, q_offset: int = 0, return_lse: bool = False,
                     tiles: Tiles | None = None, block_q: int | None = None,
                     block_k: int | None = None, interpret: bool = False):
  """Block-sparse flash attention; same contract as `reference_attention`.

  `block_q`/`block_k` set one tile shape for all three kernels (tests); `tiles` sets each.
  `interpret=True` runs the kernels on CPU through the Pallas interpreter.
  """
  T, D = q_BTHD.shape[1], q_BTHD.shape[3]
  cfg, q, k, v, qseg, kseg = _prepare(q_BTHD, k_BSKD, v_BSKD, spec, q_segment_ids, kv_segment_ids, q_offset,
                                      tiles, block_q, block_k, interpret)
  out, lse2 = _flash(cfg, q, k, v, qseg, kseg)
  out = out[:, :T, :, :D]
  if not return_lse:
    return out
  return out, lse2[:, :, :T] * LN2


def pallas_attention_backward(q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BHT, dout_BTHD, dlse_BHT, spec: AttentionSpec, *,
                              q_segment_ids=None, kv_segment_ids=None, q_offset: int = 0,
                              tiles: Tiles | None = None, block_q: int | None = None,
                              block_k: int | None = None, interpret: bool = False):
  """(dq, dk, dv) of this call's share of a larger attention whose rows have output `out` and
  natural-log `lse` (over all its keys) and cotangents dout, dlse: the flash backward with the
  given statistics (ring attention's steps; with this call's own out and lse it is the call's vjp)."""
  T, D = q_BTHD.shape[1], q_BTHD.shape[3]
  S = k_BSKD.shape[1]
  cfg, q, k, v, qseg, kseg = _prepare(q_BTHD, k_BSKD, v_BSKD, spec, q_segment_ids, kv_segment_ids, q_offset,
                                      tiles, block_q, block_k, interpret)
  pad_rows = lambda x: pad_axis(pad_axis(x, 3, q.shape[3]), 1, cfg.Tp)
  lse2 = pad_axis(lse_BHT.astype(jnp.float32) / LN2, 2, cfg.Tp, -jnp.inf)  # padded rows: empty
  dlse2 = pad_axis(dlse_BHT.astype(jnp.float32) * LN2, 2, cfg.Tp)
  res = (q, k, v, qseg, kseg, pad_rows(out_BTHD.astype(q.dtype)), lse2)
  dq, dk, dv, _, _ = _flash_bwd(cfg, res, (pad_rows(dout_BTHD), dlse2))
  return dq[:, :T, :, :D], dk[:, :S, :, :D], dv[:, :S, :, :D]
