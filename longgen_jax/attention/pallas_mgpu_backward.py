"""Block-sparse flash attention BACKWARD for Hopper in Pallas Mosaic GPU (wgmma + TMA).

Written without a GPU (it lowers to a Mosaic GPU module on CPU: tests/test_pallas_mgpu.py lowers it
for `cuda`). On the GPU (2026-11-27, JAX 0.11.2): both kernels compile in 2-4 s together (H100,
T 4096); the kernels alone match the float32 vjp (relative error 2.4e-3 to 2.8e-3, as the Triton
backward) on full / sink_window / block_sparse, B 1-2, GQA 1-8, head_dim 64/128, bf16/fp16, q_offset,
non-multiple lengths and empty rows; timed on an H100 beside the Triton backward and cuDNN
(BENCHMARKS.md): full fwd+bwd 1.24x faster than with the Triton backward (1010.6 vs 1250.1 ms at
128K, cuDNN 915.9), sink_window 1.01x, block_sparse 1.04x slower. Per kernel (one H200, 128K,
benchmarks/kernel_profile.py): on the sparse patterns this dQ is 1.34-1.36x faster than the Triton
dQ and this dK/dV 1.19-1.20x SLOWER than the Triton dK/dV, so the two cancel; `auto` therefore runs
only this dQ beside the Triton dK/dV there. The whole GPU suite passed with each setting of the switch
(one H200, 2026-11-27, at the commit that added the per-kernel choice: 1 132 passed, auto 42, segments
22, 0 144), and `auto` is the fastest of the three backwards on every pattern timed (BENCHMARKS.md):
so `auto` is the default.

Switch: `LONGGEN_JAX_MGPU_BACKWARD` = auto or unset (the default: per pattern, only the kernels that
measured faster than their Triton counterparts, `FASTER_THAN_TRITON`), 1 (both kernels, every call
they support), 0 (never: the Triton backward, as on Ampere). Read when `pallas_gpu`'s backward
is TRACED (jit caches traces, so set it before the first call), or `with forced(True):` (or
`forced("dq")`) around the tracing (the benchmark times the backwards in one process that way).
Why an environment switch and not a `Tiles` field: flipping it needs no change to any caller
(training, ring attention, the benchmarks all reach the backward through `pallas_gpu`), the next
device session flips it without editing code, and it keeps `Tiles` (a jit static argument
everywhere) unchanged.

Same inputs as the Triton backward: padded q, k, v, dO, the base-2 lse of the forward with
empty rows (-inf) already replaced by +inf (so p = exp2(s - lse) = 0 there, no NaN), and
delta = rowsum(dO * out) - log2(e) * dlse (the lse cotangent folds into delta). Two kernels,
no atomics, so gradients are bit-for-bit deterministic:

dQ: one program = one (query head, 128-row query tile, batch), as the forward: two compute
  warpgroups own 64 rows each and walk the same key-tile list (`kv_table`, full tiles first,
  then partial ones under the pattern mask); a memory warpgroup streams the listed K/V tiles
  into a `stages`-deep SMEM ring. Per key tile: S = Q K^T, dP = dO V^T, P = exp2(S c - lse),
  dS = P (dP - delta), dQ += dS K (three wgmmas; Q, dO, lse, delta stay resident).

dK/dV: one program = two 64-key tiles of one kv head (one per compute warpgroup, each with its
  OWN query-tile list: the transposed layout at 64 x 64, full first), and the G query heads of
  that kv head are looped over INSIDE the program (step = (list slot, head)), so GQA needs no
  repeated K/V and no cross-program reduction. The memory warpgroup streams (Q, dO, lse,
  delta) of each step into a per-warpgroup ring. Per step: S^T = K Q^T, P^T, dV += P^T dO,
  dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (four wgmmas).
  Why two independent key tiles per program rather than one 128-key tile split in halves
  (JAX's dense example): block_sparse's strided 64-blocks would make the non-strided half
  walk the strided half's long list for nothing (~1.7x the work at (64,16,64)). Load balance:
  the key tiles of one head are sorted by list length (longest first) and paired. The grid is
  (h, p, b), but Mosaic GPU launches it with the axes reversed (batch rows fastest, then pairs,
  then heads; read from the lowered module), so the longest programs of each head start first
  WITHIN that head, and the last head's longest program starts near the end: a tail where one list
  is far longer than the mean (the sink's key tile, visited by every query tile), not measured;
  lists are not split, which
  avoids fp32 partial tiles and a second reduction pass (MQA with huge G is the case where
  the longest program could dominate: see benchmarks/NOTES_attention.md).

Supported: bf16/fp16, head_dim 64 or 128, Hopper; segment ids on the pattern kinds where the Mosaic
forward's switch allows them (`pallas_mgpu.segments_enabled`; `supported()`). The segment paths, on
lists rebuilt per batch row, passed the mgpu_segments GPU pass (34 tests, H200, 2026-11-27).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from longgen_jax.attention import segment_skip
from longgen_jax.attention.padding import pad_axis, pad_segment_ids, round_up
from longgen_jax.attention.pallas_mgpu import (BLOCK_Q, HALF, LOG2E, _tile_mask, env_switch, env_value,
                                               full_first_table, is_hopper, kv_table, list_walk, load_ids,
                                               program_grid, query_tile_programs, same_segment,
                                               segments_enabled, split_segment_refs)
from longgen_jax.attention.spec import AttentionSpec, block_layout

ENV = "LONGGEN_JAX_MGPU_BACKWARD"
DEFAULT = "auto"   # the switch when ENV is unset (module docstring: why)
BQ_DKV = 64   # query rows per dK/dV step (the wgmma N of S^T)
BK_DKV = 64   # key rows per compute warpgroup in dK/dV (the wgmma M)

_FORCED: list[frozenset[str] | None] = [None]

KERNELS = frozenset({"dq", "dkv"})

# Per pattern kind, which of this backward's two kernels beat the Triton one's (each kernel can run
# beside the other backward's: same inputs, same outputs). `LONGGEN_JAX_MGPU_BACKWARD=auto` follows it.
# full: fwd+bwd ms at 32K / 128K with both kernels, one H100, JAX 0.11.2, 2026-11-27, B 1, 32 query /
# 8 kv heads, head_dim 128, bf16 (BENCHMARKS.md, "The Mosaic GPU backward, timed"); not profiled per
# kernel. Sparse kinds: per-kernel GPU time at 128K, same shapes, one H200, 2026-11-27
# (benchmarks/kernel_profile.py; BENCHMARKS.md, "Per kernel"): the Mosaic dQ is faster, its dK/dV slower.
# Checked whole (fwd+bwd ms, H200, same shapes, one run; BENCHMARKS.md "Attention, H200"): this table's
# choice beat both kernels Mosaic and both Triton on every row (64-key dK/dV programs then; full layers now
# run 128: DKV_KEYS_BY_KIND): full 64.2 / 1012.3 (Mosaic dQ only 71.2 /
# 1123.6, Triton 78.3 / 1265.5); sink_window 10.0 / 41.2 (10.3 / 44.7, 10.9 / 44.5); block_sparse 6.74 /
# 42.5 (8.08 / 45.2, 7.12 / 45.9).
FASTER_THAN_TRITON: dict[str, frozenset[str]] = {
    "full": KERNELS,                      # 62.52 / 1010.59 vs Triton 77.66 / 1250.10 (cuDNN 55.40 / 915.94)
    "sink_window": frozenset({"dq"}),     # dQ 10.43 vs 13.94 ms; dK/dV 22.64 vs 19.05
    "block_sparse": frozenset({"dq"}),    # dQ 10.10 vs 13.77 ms; dK/dV 23.73 vs 19.71
}


@dataclasses.dataclass(frozen=True)
class MgpuBwdTiles:
  """dQ key tile width and ring depths. SMEM at head_dim 128, bf16 (limit 227 KB; checked when
  lowering): dQ 64 KB (Q, dO of two warpgroups) + 2 x stages_dq x 16 KB x block_k_dq / 64 (K, V
  ring) -> 128 KB at the defaults; dK/dV 64 KB (K, V of two key tiles) + 2 x 2 x stages_dkv x
  16 KB (Q, dO rings of two warpgroups) -> 193 KB at stages_dkv 2 (3 fits only at head_dim 64).
  block_k_dq 64 keeps S, dP, dS and the dQ accumulator within the 232 registers of a compute
  warpgroup; 128 lowers too (CHECK ON GPU: spills).

  dkv_keys: keys per dK/dV program. 64: two independent 64-key tiles, one per compute warpgroup,
  each with its own query-tile list and Q/dO ring. 128: one 128-key tile whose halves the two
  warpgroups take, walking ONE list with ONE ring, so each Q/dO tile streamed serves 128 keys instead
  of 64: twice the matmul work per byte of the ring, and SMEM for stages_dkv 3 (162 KB at head_dim
  128). Its cost: a half whose keys a query tile does not reach still computes (masked), and
  block_sparse's strided 64-blocks pull their long lists into the other half. Both GPU-tested; which
  is faster depends on the pattern (`DKV_KEYS_BY_KIND`, what `default_tiles` picks)."""

  block_k_dq: int = 64
  stages_dq: int = 2
  stages_dkv: int = 2
  dkv_keys: int = 64
  persistent_dq: bool = False   # dQ as the forward's persistent programs (`pallas_mgpu.MgpuTiles.persistent`)
  programs: int = 0             # persistent programs; 0: the device's SM count


DKV_KEYS_ENV = "LONGGEN_JAX_MGPU_DKV_KEYS"
# Keys per dK/dV program by pattern kind, where 128 measured faster than 64 (others: 64). Mosaic dQ +
# dK/dV fwd+bwd ms with 128 / 64 keys at 32K and 128K, one H200, JAX 0.11.2, 2026-11-27, B 1, 32 query /
# 8 kv heads, head_dim 128, bf16 (benchmarks/attention.py --mgpu-bwd; BENCHMARKS.md): full 60.66 / 976.1
# (64: 128K 1004.5; cuDNN causal 56.07 / 908.6). The sparse kinds lose with 128: sink_window 11.78 /
# 50.23 vs 43.53, block_sparse 9.85 / 58.27 vs 44.36 at 128K (a half whose queries do not reach its keys
# still computes; the strided blocks' long lists), so they keep 64 (and `auto` runs the Triton dK/dV there).
DKV_KEYS_BY_KIND = {"full": 2 * BK_DKV}
_TILES: list[MgpuBwdTiles | None] = [None]


def default_tiles(spec: AttentionSpec | None = None) -> MgpuBwdTiles:
  """The tiles `mgpu_backward` uses for pattern `spec` when given none, read at trace time: the
  `using_tiles` override, else MgpuBwdTiles() with dkv_keys from LONGGEN_JAX_MGPU_DKV_KEYS = auto or
  unset (per pattern kind, `DKV_KEYS_BY_KIND`), 64 or 128."""
  if _TILES[0] is not None:
    return _TILES[0]
  keys = env_value(DKV_KEYS_ENV, "auto")
  if keys == "auto":
    return MgpuBwdTiles(dkv_keys=DKV_KEYS_BY_KIND.get(spec.kind if spec is not None else "", BK_DKV))
  if keys not in (str(BK_DKV), str(2 * BK_DKV)):
    raise ValueError(f"{DKV_KEYS_ENV} must be auto, {BK_DKV} or {2 * BK_DKV}, got {keys!r}")
  return MgpuBwdTiles(dkv_keys=int(keys))


@contextlib.contextmanager
def using_tiles(tiles: MgpuBwdTiles | None):
  """Overrides `default_tiles` while tracing inside this block (None: no override)."""
  old, _TILES[0] = _TILES[0], tiles
  try:
    yield
  finally:
    _TILES[0] = old


def mosaic_kernels(spec: AttentionSpec | None = None) -> frozenset[str]:
  """Which backward kernels (of `KERNELS`: "dq", "dkv") `pallas_gpu` should run here for a call with
  pattern `spec` (where `supported`); the others stay Triton. The `forced` override, else the
  environment switch (module docstring): 1 both, auto the measured table, 0 none."""
  if _FORCED[0] is not None:
    return _FORCED[0]
  if env_value(ENV, DEFAULT) == "auto":
    return FASTER_THAN_TRITON.get(spec.kind, frozenset()) if spec is not None else frozenset()
  return KERNELS if env_switch(ENV, DEFAULT) else frozenset()


@contextlib.contextmanager
def forced(on: bool | str | None):
  """Overrides the environment switch while tracing inside this block: True (both kernels), False
  (none), "dq" or "dkv" (that one), None (follow the switch)."""
  kernels = None if on is None else KERNELS if on is True else frozenset() if on is False else frozenset({on})
  if kernels is not None and not kernels <= KERNELS:
    raise ValueError(f"forced({on!r}): expected True, False, None or one of {sorted(KERNELS)}")
  old, _FORCED[0] = _FORCED[0], kernels
  try:
    yield
  finally:
    _FORCED[0] = old


def supported(dtype, head_dim: int, has_segments: bool, device=None, spec: AttentionSpec | None = None) -> bool:
  """Whether this backward serves the call with pattern `spec` (else the Triton backward does). Segment
  ids where `pallas_mgpu.segments_enabled(spec)` (by default the kinds in `pallas_mgpu.SEGMENT_KINDS`)."""
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim in (64, 128) and (not has_segments or segments_enabled(spec)) and is_hopper(device))


def q_table(spec: AttentionSpec, Tp: int, S: int, Hkv: int, n_key_tiles: int,
            q_offset: int = 0, block_k: int = BK_DKV) -> np.ndarray:
  """int32[H', n_key_tiles, 2 + width]: per (kv head, block_k-key tile) [count, n_full, q tiles...].

  The transposed layout at 64 x block_k over Tp query rows (padded rows are ordinary rows) and S
  keys: the query tiles that visit each key tile, full ones first (ascending), then partial
  ones (ascending); slots past `count` repeat the last listed tile. Key tiles past the
  layout's (keys only at or past S) get count 0. With segment ids the kernel walks it rebuilt per
  batch row (`segment_skip.segment_lists`).
  """
  lay = block_layout(spec, Tp, S, Hkv, BQ_DKV, block_k, q_offset)
  tab = full_first_table(lay.q_index, lay.q_full, lay.q_count)
  nk = tab.shape[1]
  if n_key_tiles < nk:
    raise ValueError(f"{n_key_tiles} key tiles cannot hold the layout's {nk}")
  if n_key_tiles > nk:
    tab = np.concatenate([tab, np.zeros((tab.shape[0], n_key_tiles - nk, tab.shape[2]), np.int32)], 1)
  return tab


def unit_pairs(qtab: np.ndarray) -> np.ndarray:
  """int32[H', P, 2, 3]: the dK/dV programs, per kv head: (key tile, count, n_full) of the two
  compute warpgroups, longest lists first (pairs of similar length; stable by key tile). An odd
  tile count leaves the last program's second warpgroup a dummy (-1, 0, 0) that writes nothing.
  """
  H, nk = qtab.shape[:2]
  P = -(-nk // 2)
  out = np.zeros((H, P, 2, 3), np.int32)
  out[..., 0] = -1
  for h in range(H):
    order = np.argsort(-qtab[h, :, 0], kind="stable")
    units = np.stack([order, qtab[h, order, 0], qtab[h, order, 1]], -1)
    out[h].reshape(-1, 3)[:nk] = units
  return out


def unit_singles(qtab: np.ndarray) -> np.ndarray:
  """int32[H', nk, 2, 3]: the dK/dV programs of `dkv_keys` 128, per kv head: (key tile, count, n_full),
  longest lists first, the same unit for both compute warpgroups (each takes one half of the tile)."""
  order = np.argsort(-qtab[..., 0], axis=-1, kind="stable")                        # [H', nk]
  units = np.stack([order, np.take_along_axis(qtab[..., 0], order, -1),
                    np.take_along_axis(qtab[..., 1], order, -1)], -1).astype(np.int32)
  return np.repeat(units[:, :, None], 2, axis=2)


def mgpu_backward(q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT, spec: AttentionSpec, *,
                  S: int, T: int | None = None, q_offset: int = 0, head_dim: int | None = None,
                  tiles: MgpuBwdTiles | None = None, q_segment_ids=None, kv_segment_ids=None,
                  interpret=None, kernels=KERNELS):
  """(dq, dk, dv) in the inputs' dtype, for arrays padded past the true key length S; with `kernels`
  a subset of KERNELS, only those run and the others' gradients are None.

  lse_BHT: base-2 lse of the forward (+inf or -inf on rows without an allowed key); delta_BHT:
  rowsum(dO * out) - log2(e) * dlse (both float32 [B, Hq, Tp]). Rows past the true query
  length T (default: all rows are real) must have zero dO and delta (then they contribute
  nothing). Lengths are padded here to what the kernels tile (128 query rows, 64/128 keys) and
  sliced back. Segment ids (int32
  [B, Tp] / [B, Sp], where the forward's are: `supported`): both kernels walk their lists rebuilt per
  batch row (`segment_skip.segment_lists`: other documents' tiles dropped, one-document full tiles
  unmasked); the mask of the others also compares ids (the resident side's once per warpgroup, the
  streamed side's per tile from GMEM).
  """
  tiles = tiles or default_tiles(spec)
  B, Tp_in, Hq, D = q_BTHD.shape
  Sp_in, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  if Hq % Hkv:
    raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
  if D % 64 or D > 128:
    raise ValueError(f"mgpu backward needs head_dim 64 or 128, got {D}")
  if tiles.block_k_dq % 64:
    raise ValueError(f"block_k_dq must be a multiple of 64, got {tiles.block_k_dq}")
  if tiles.dkv_keys not in (BK_DKV, 2 * BK_DKV):
    raise ValueError(f"dkv_keys must be {BK_DKV} or {2 * BK_DKV}, got {tiles.dkv_keys}")
  if not set(kernels) <= KERNELS:
    raise ValueError(f"kernels must be a subset of {sorted(KERNELS)}, got {sorted(kernels)}")
  Tp = round_up(Tp_in, BLOCK_Q)
  Sp = round_up(max(Sp_in, S), math.lcm(BK_DKV, tiles.block_k_dq, tiles.dkv_keys))   # every kernel's key tile
  q = pad_axis(q_BTHD, 1, Tp)
  do = pad_axis(do_BTHD.astype(q_BTHD.dtype), 1, Tp)
  lse = lse_BHT.astype(jnp.float32)
  lse = pad_axis(jnp.where(lse == -jnp.inf, jnp.inf, lse), 2, Tp, jnp.inf)   # empty/padded rows: p = 0
  delta = pad_axis(delta_BHT.astype(jnp.float32), 2, Tp)
  k, v = pad_axis(k_BSKD, 1, Sp), pad_axis(v_BSKD, 1, Sp)
  segments = pad_segment_ids(q_segment_ids, kv_segment_ids, Tp, Sp) if q_segment_ids is not None else ()
  scale = 1.0 / math.sqrt(head_dim or D)
  dq = dk = dv = None
  if "dq" in kernels:
    dq = _dq_call(q, k, v, do, lse, delta, spec, S=S, T=T or Tp_in, q_offset=q_offset, scale=scale, tiles=tiles,
                  segments=segments, interpret=interpret)[:, :Tp_in]
  if "dkv" in kernels:
    dk, dv = _dkv_call(q, k, v, do, lse, delta, spec, S=S, T=T or Tp_in, q_offset=q_offset, scale=scale,
                       tiles=tiles, segments=segments, interpret=interpret)
    dk, dv = dk[:, :Sp_in], dv[:, :Sp_in]
  return dq, dk, dv


def _transforms():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


# ----------------------------------------------------------------------------- dQ


def _dq_call(q, k, v, do, lse, delta, spec, *, S, T, q_offset, scale, tiles, segments=(), interpret=None):
  from jax.experimental.pallas import mosaic_gpu as plgpu   # Hopper-only backend

  B, Tp, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  bk, stages = tiles.block_k_dq, tiles.stages_dq
  dtype = q.dtype
  has_seg = bool(segments)
  table = kv_table(spec, Tp, S, Hkv, bk, q_offset)   # [H', nq, 2 + width], 128-row tiles
  nq = table.shape[1]
  per_head = spec.head_dependent(Hkv)
  c = scale * LOG2E

  def longgen_flash_bwd_dq_mgpu(tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    qseg_ref, kseg_ref, refs = split_segment_refs(refs, has_seg)
    (dq_ref, q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem,
     q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar, k_free, v_free) = refs

    def walk(b, h, qt):
      kv_head = lax.div(h, jnp.int32(G))
      hl = kv_head if per_head else 0
      return (kv_head, *list_walk(tab_ref, b, hl, qt, per_batch=has_seg))   # as the forward's

    def compute(wg, b, h, qt, kv_head, count, n_full, tile_of, base):
      """Warpgroup wg's 64 rows of one query tile; base as in the forward (None: one tile per program)."""
      ring = (lambda j: j) if base is None else (lambda j: base + j)
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
      q_base = qt * BLOCK_Q + wg * HALF
      rows = pl.ds(q_base, HALF)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, do_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem, lse_bar.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem, delta_bar.at[wg])
      for bar in (q_bar, do_bar, lse_bar, delta_bar):
        plgpu.barrier_wait(bar.at[wg])
      # CHECK ON GPU: 1-D f32 SMEM -> row-vector layout, as JAX's attention_mgpu backward does.
      lse_r = plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(1))
      delta_r = plgpu.load(delta_smem, layout=plgpu.Layout.WGMMA.reduce(1))
      q_seg = load_ids(qseg_ref.at[b, rows], 1) if has_seg else None
      dq = plgpu.layout_cast(jnp.full((HALF, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def step(j, dq, masked: bool):
        slot = lax.rem(ring(j), jnp.int32(stages))
        if masked:
          kt = tile_of(j)
          k_seg = load_ids(kseg_ref.at[b, pl.ds(kt * bk, bk)], 0) if has_seg else None   # overlaps the wgmmas
        plgpu.barrier_wait(k_bar.at[slot])

        def s_fn(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]
        s = pl.run_scoped(s_fn, plgpu.ACC((HALF, bk), jnp.float32))
        plgpu.barrier_wait(v_bar.at[slot])

        def dp_fn(acc_ref):
          plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]
        dp = pl.run_scoped(dp_fn, plgpu.ACC((HALF, bk), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot])
        if masked:
          q_pos = plgpu.broadcasted_iota(jnp.int32, (HALF, bk), 0, layout=plgpu.Layout.WGMMA)
          k_pos = plgpu.broadcasted_iota(jnp.int32, (HALF, bk), 1, layout=plgpu.Layout.WGMMA)
          ok = _tile_mask(spec, q_pos + (q_offset + q_base), k_pos + kt * bk, kv_head, Hkv, S)
          if has_seg:
            ok = ok & same_segment(q_seg, k_seg, (HALF, bk))
          s = jnp.where(ok, s, -jnp.inf)
        # lse = +inf on empty rows and s = -inf on masked pairs: both give p = 0, never NaN.
        p = jnp.exp2(s * c - lax.broadcast_in_dim(lse_r, s.shape, [0]))
        ds = p * (dp - lax.broadcast_in_dim(delta_r, dp.shape, [0]))

        def dq_fn(acc_ref):
          plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])
        dq = pl.run_state(dq_fn)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(n_full, count, functools.partial(step, masked=True), dq)
      q_smem[...] = (dq * scale).astype(dtype)        # Q is no longer read: stage dQ there
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)   # (persistent: the next query tile's Q lands in q_smem)

    query_tile_programs(tiles.persistent_dq, (B, nq, Hq), walk, compute,   # the forward's K/V ring, same lists
                        (k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, bk, stages))

  # as the forward's: with segment ids, the lists rebuilt per batch row
  table = segment_skip.segment_lists(table, *segments, BLOCK_Q, bk, T, S) if has_seg else jnp.asarray(table)
  tr = _transforms()
  return plgpu.kernel(
      longgen_flash_bwd_dq_mgpu,
      out_type=jax.ShapeDtypeStruct((B, Tp, Hq, D), dtype),
      scratch_types=[
          plgpu.SMEM((2, HALF, D), dtype, transforms=tr),          # Q (then dQ), per warpgroup
          plgpu.SMEM((2, HALF, D), dtype, transforms=tr),          # dO
          plgpu.SMEM((2, HALF), jnp.float32),                      # lse
          plgpu.SMEM((2, HALF), jnp.float32),                      # delta
          plgpu.SMEM((stages, bk, D), dtype, transforms=tr),       # K ring
          plgpu.SMEM((stages, bk, D), dtype, transforms=tr),       # V ring
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),      # both warpgroups free a slot
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      ],
      **program_grid(tiles.persistent_dq, tiles.programs, (B, nq, Hq)),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(table, q, k, v, do, lse, delta, *segments)


# ----------------------------------------------------------------------------- dK, dV


def _dkv_call(q, k, v, do, lse, delta, spec, *, S, T, q_offset, scale, tiles, segments=(), interpret=None):
  from jax.experimental.pallas import mosaic_gpu as plgpu   # Hopper-only backend

  B, Tp, Hq, D = q.shape
  Sp, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  stages = tiles.stages_dkv
  dtype = q.dtype
  has_seg = bool(segments)
  shared = tiles.dkv_keys == 2 * BK_DKV      # one 128-key tile per program, a half per warpgroup
  key_tile = tiles.dkv_keys
  qtab = q_table(spec, Tp, S, Hkv, Sp // key_tile, q_offset, block_k=key_tile)
  # Programs are paired (and ordered) by the static lists' lengths; with segment ids each warpgroup's
  # list, count and n_full come from the per-batch rebuild instead (segment_skip.segment_lists).
  units = unit_singles(qtab) if shared else unit_pairs(qtab)  # [H', P, 2, 3]
  P = units.shape[1]
  rings = 1 if shared else 2                  # Q/dO/lse/delta rings: one shared, or one per warpgroup
  per_head = spec.head_dependent(Hkv)
  c = scale * LOG2E

  def longgen_flash_bwd_dkv_mgpu(unit_ref, qtab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    qseg_ref, kseg_ref, refs = split_segment_refs(refs, has_seg)
    (dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
     k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, free) = refs
    b, kv_head, pair, wg = (lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("p"),
                            lax.axis_index("wg"))
    hp = kv_head if per_head else 0

    # This program's warpgroup w walks the list of its unit's key tile: the static one (count and
    # n_full in the unit), or with segment ids the one rebuilt for batch row b (a dummy unit: 0, 0).
    def list_field(w, field):   # field 0: count, 1: n_full
      if not has_seg:
        return unit_ref[hp, pair, w, 1 + field]
      kt = unit_ref[hp, pair, w, 0]
      return jnp.where(kt >= 0, qtab_ref[b, hp, jnp.maximum(kt, 0), field], 0)

    def q_tile(kt, j):          # the query tile in slot j of key tile kt's list (kt >= 0)
      return qtab_ref[b, hp, kt, 2 + j] if has_seg else qtab_ref[hp, kt, 2 + j]

    @pl.when(wg < 2)
    def _compute():
      # CHECK ON GPU: register pressure. dK and dV accumulators (64 x D fp32 each: 64 + 64
      # registers per thread at D 128) live across the loop beside S^T, P^T, dP^T, dS^T (32 each)
      # and their bf16 copies; ptxas spills would show as a slow kernel, not a wrong one.
      plgpu.set_max_registers(232, action="increase")
      kt, count, n_full = unit_ref[hp, pair, wg, 0], list_field(wg, 0), list_field(wg, 1)
      k_w, v_w = k_smem.at[wg], v_smem.at[wg]
      if shared:   # this warpgroup's half of the program's 128-key tile (never a dummy)
        keys = pl.ds(kt * key_tile + wg * BK_DKV, BK_DKV)
      else:
        keys = pl.ds(jnp.maximum(kt, 0) * BK_DKV, BK_DKV)

      @pl.when(kt >= 0)   # CHECK ON GPU: waits under pl.when keep each thread's phase bits
      def _():             # consistent (every barrier of a group is waited once per phase)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_w, k_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_w, v_bar.at[wg])
        plgpu.barrier_wait(k_bar.at[wg])
        plgpu.barrier_wait(v_bar.at[wg])

      k_seg = load_ids(kseg_ref.at[b, keys], 1) if has_seg else None   # this warpgroup's 64 keys: rows of S^T
      zeros_kd = plgpu.layout_cast(jnp.full((BK_DKV, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)
      zeros_kq = plgpu.layout_cast(jnp.full((BK_DKV, BQ_DKV), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def step(it, carry, masked: bool):
        dk, dv = carry
        ring = lax.rem(it, jnp.int32(stages)) if shared else wg * stages + lax.rem(it, jnp.int32(stages))
        q_s, do_s = q_smem.at[ring], do_smem.at[ring]
        if masked:
          qt = q_tile(kt, lax.div(it, jnp.int32(G)))
          q_seg = load_ids(qseg_ref.at[b, pl.ds(qt * BQ_DKV, BQ_DKV)], 0) if has_seg else None   # columns of S^T
        plgpu.barrier_wait(q_bar.at[ring])

        def st_fn(acc_ref):                     # S^T = K Q^T  [keys, queries]
          plgpu.wgmma(acc_ref, k_w, q_s.transpose((1, 0)))
          return acc_ref[...]
        sT = pl.run_scoped(st_fn, plgpu.ACC((BK_DKV, BQ_DKV), jnp.float32))
        plgpu.barrier_wait(lse_bar.at[ring])
        # CHECK ON GPU: column-vector layout (reduce(0)) from a 1-D f32 SMEM ring slot.
        lse_c = plgpu.load(lse_smem.at[ring], layout=plgpu.Layout.WGMMA.reduce(0))
        if masked:
          k_pos = plgpu.broadcasted_iota(jnp.int32, sT.shape, 0, layout=plgpu.Layout.WGMMA)
          q_pos = plgpu.broadcasted_iota(jnp.int32, sT.shape, 1, layout=plgpu.Layout.WGMMA)
          ok = _tile_mask(spec, q_pos + (q_offset + qt * BQ_DKV),
                          k_pos + (kt * key_tile + wg * BK_DKV if shared else kt * BK_DKV), kv_head, Hkv, S)
          if has_seg:
            ok = ok & same_segment(k_seg, q_seg, sT.shape)
          sT = jnp.where(ok, sT, -jnp.inf)
        pT = jnp.exp2(sT * c - lax.broadcast_in_dim(lse_c, sT.shape, [1]))
        plgpu.barrier_wait(do_bar.at[ring])

        # CHECK ON GPU: register operand A (P^T, dS^T in the WGMMA layout of an accumulator)
        # with B = do_s (64 x D) and its transpose, as JAX's attention_mgpu backward does.
        def dv_dp_fn(refs):                     # one wait for both wgmmas
          dv_ref, dpT_ref = refs
          plgpu.wgmma(dv_ref, pT.astype(dtype), do_s)                  # dV += P^T dO
          plgpu.wgmma(dpT_ref, v_w, do_s.transpose((1, 0)))            # dP^T = V dO^T
        dv, dpT = pl.run_state(dv_dp_fn)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros_kq)))
        plgpu.barrier_wait(delta_bar.at[ring])
        delta_c = plgpu.load(delta_smem.at[ring], layout=plgpu.Layout.WGMMA.reduce(0))
        dsT = pT * (dpT - lax.broadcast_in_dim(delta_c, dpT.shape, [1]))

        def dk_fn(acc_ref):
          plgpu.wgmma(acc_ref, dsT.astype(dtype), q_s)                 # dK += dS^T Q
        dk = pl.run_state(dk_fn)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(free.at[ring])     # Q, dO, lse, delta of this slot all read
        return dk, dv

      carry = lax.fori_loop(0, n_full * G, functools.partial(step, masked=False), (zeros_kd, zeros_kd))
      dk, dv = lax.fori_loop(n_full * G, count * G, functools.partial(step, masked=True), carry)

      @pl.when(kt >= 0)
      def _():
        k_w[...] = (dk * scale).astype(dtype)   # K, V no longer read: stage dK, dV there
        v_w[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_w, dk_ref.at[b, keys, kv_head])
        plgpu.copy_smem_to_gmem(v_w, dv_ref.at[b, keys, kv_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      kts = [unit_ref[hp, pair, w, 0] for w in range(2)]
      steps = [list_field(w, 0) * G for w in range(2)]

      def fetch(w, it, slot):
        j, g = lax.div(it, jnp.int32(G)), lax.rem(it, jnp.int32(G))
        qt = q_tile(jnp.maximum(kts[w], 0), j)
        h = kv_head * G + g
        rows = pl.ds(qt * BQ_DKV, BQ_DKV)
        ring = w * stages + slot
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[ring], q_bar.at[ring])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[ring], lse_bar.at[ring])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[ring], do_bar.at[ring])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[ring], delta_bar.at[ring])

      for i in range(stages):
        for w in range(rings):
          pl.when(steps[w] > i)(functools.partial(fetch, w, jnp.int32(i), i))

      # One issuer for both rings, in step order; pairs have similar lengths, so neither
      # warpgroup waits long on the other's free slot. CHECK ON GPU: if the profile shows the
      # compute warpgroups starved here, give each ring its own issuing warp (or 3 stages at D 64).
      @pl.loop(stages, jnp.maximum(steps[0] if shared else jnp.maximum(steps[0], steps[1]), stages))
      def _(it):
        slot = lax.rem(it, jnp.int32(stages))
        for w in range(rings):
          @pl.when(it < steps[w])
          def _():
            plgpu.barrier_wait(free.at[w * stages + slot])
            fetch(w, it, slot)

  # rows: key tiles (ids of the keys, true length S), entries: query tiles (true length T)
  qtab = (segment_skip.segment_lists(qtab, segments[1], segments[0], key_tile, BQ_DKV, S, T) if has_seg
          else jnp.asarray(qtab))
  tr = _transforms()
  ring = rings * stages
  out_kv = jax.ShapeDtypeStruct((B, Sp, Hkv, D), dtype)
  dk, dv = plgpu.kernel(
      longgen_flash_bwd_dkv_mgpu,
      out_type=[out_kv, out_kv],
      scratch_types=[
          plgpu.SMEM((2, BK_DKV, D), dtype, transforms=tr),        # K (then dK), per warpgroup
          plgpu.SMEM((2, BK_DKV, D), dtype, transforms=tr),        # V (then dV)
          plgpu.SMEM((ring, BQ_DKV, D), dtype, transforms=tr),     # Q ring, stages per warpgroup
          plgpu.SMEM((ring, BQ_DKV, D), dtype, transforms=tr),     # dO ring
          plgpu.SMEM((ring, BQ_DKV), jnp.float32),                 # lse ring
          plgpu.SMEM((ring, BQ_DKV), jnp.float32),                 # delta ring
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=ring),
          plgpu.Barrier(num_barriers=ring),
          plgpu.Barrier(num_barriers=ring),
          plgpu.Barrier(num_barriers=ring),
          plgpu.Barrier(num_arrivals=2 if shared else 1, num_barriers=ring),   # who reads a slot frees it
      ],
      # Launched batch rows fastest, then pairs longest-first, then heads (the axes reversed).
      grid=(Hkv, P, B),
      grid_names=("h", "p", "b"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(jnp.asarray(units), qtab, q, k, v, do, lse, delta, *segments)
  return dk, dv
