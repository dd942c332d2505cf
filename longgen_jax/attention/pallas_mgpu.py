"""Block-sparse flash attention FORWARD for Hopper in Pallas Mosaic GPU (wgmma + TMA).

Why a second forward: the Triton lowering has no warp specialisation and issues mma, not
wgmma, which caps its forward well below Hopper's rate; Mosaic GPU reaches FA3-style rates
(BENCHMARKS.md). The backward stays the
Triton one in `pallas_gpu` (it only needs out + lse).

One program = one (batch, query head, 128-row query tile): two compute warpgroups own 64 rows
each and walk the same key-tile list; a third (memory) warpgroup reads the list and issues the
TMA copies of the listed K/V tiles into a `stages`-deep SMEM ring. The lists come from
`block_layout` with block_q = 128 and are reordered on the host so that the full tiles come
first (`kv_table`): the kernel runs an unmasked loop over them, then a masked loop over the
partial ones, so the pattern predicate is only evaluated on partial tiles and no per-step
branch is needed (online softmax does not care about the order). The two compute warpgroups
are offset by half a step (a shared "schedule" barrier) so that one's softmax overlaps the
other's wgmma. Launch order: Mosaic GPU launches the grid (h, qt, b) with its axes reversed (CUDA x =
batch row, y = query tile, z = head; read from the lowered module), so the programs running together
are the query tiles of one head, longest first, and share that head's K/V tiles in L2; GQA heads
share a kv head's K/V through L2 only across that head order. K/V are never repeated.

Persistent programs (`MgpuTiles.persistent`, opt-in: `LONGGEN_JAX_MGPU_PERSISTENT=1` or a comma list of
kinds, or `pallas_gpu.Tiles(forward="persistent")`): one program per SM walks query tiles in the
grid's order (`plgpu.nd_loop`), every warpgroup counting the program's key tiles so far, so the K/V ring
runs on from one list into the next and the memory warpgroup fetches the next query tile's keys during
this one's epilogue. For short sparse rows (~17-33 key tiles) whose prologue and epilogue are not
amortised; the backward's dQ kernel has the same mode (`MgpuBwdTiles.persistent_dq`, on with the same
switch). The barrier protocol is simulated on CPU (tests/test_mgpu_ring_protocol.py); the GPU tests pass
(H200), and timed they are not faster than one program per query tile (sink_window forward -2.4%, full
+14%, the persistent dQ slower: BENCHMARKS.md, "Persistent programs timed"), so they stay opt-in.

Returns out [B,Tp,Hq,D] and the base-2 lse [B,Hq,Tp] (-inf for rows with no allowed key), the
residuals `pallas_gpu`'s backward consumes. Supported: bf16/fp16, head_dim 128 (multiples of
64 compile too); `supported()` says when to use it. Mosaic GPU kernels do not run on CPU:
host-side logic (`kv_table`, `supported`) is tested there, the lowering for CUDA too, the kernel
on the GPU.

Segment ids (packed documents), by default on the pattern kinds in `SEGMENT_KINDS`, on every kind
with `LONGGEN_JAX_MGPU_SEGMENTS=1`, none with 0 (read when the forward is traced). Segments are
run-time data, so the key-tile lists are rebuilt per batch row before the call
(`segment_skip.segment_lists`, a few small XLA ops): tiles that share no document with the query
tile are dropped wherever they are, and tiles the pattern fills whose queries and keys all lie in one
document come first and run in the unmasked loop, as without segments; the rest go through the masked
loop, whose mask also compares the row's segment id (loaded once per warpgroup) with each key's
(loaded from GMEM per tile, before the tile's QK^T so the load overlaps it). With the rebuilt lists
the mgpu_segments GPU pass (34 tests) passed and packed full layers run at the unpacked rate, 1.38-1.45x
faster than the Triton segment path (H200, 2026-11-27; figures at `SEGMENT_KINDS`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from longgen_jax.attention import segment_skip
from longgen_jax.attention.padding import pad_axis, pad_segment_ids, round_up
from longgen_jax.attention.spec import AttentionSpec, Kind, allowed, block_layout

LOG2E = math.log2(math.e)
SEGMENTS_ENV = "LONGGEN_JAX_MGPU_SEGMENTS"
HALF = 64            # query rows per compute warpgroup (one wgmma M tile)
BLOCK_Q = 2 * HALF   # query rows per program


@dataclasses.dataclass(frozen=True)
class MgpuTiles:
  """Key tile width and the depth of the K/V SMEM ring (2 x 128 x 128 fits with Q).

  persistent: one program per SM (or `programs` of them) walks query tiles in turn, its K/V ring running
  on from one tile's list into the next's, so the memory warpgroup prefetches the next query tile's keys
  during this one's epilogue and the next Q load (short sparse rows: ~17-33 key tiles, where the per-tile
  prologue and epilogue are not amortised). Opt-in (`LONGGEN_JAX_MGPU_PERSISTENT=1`): GPU-tested, measured
  no faster than one program per query tile (BENCHMARKS.md)."""

  block_k: int = 128
  stages: int = 2
  persistent: bool = False
  programs: int = 0      # persistent programs; 0: the device's SM count


PERSISTENT_ENV = "LONGGEN_JAX_MGPU_PERSISTENT"


def default_mgpu_tiles(spec: AttentionSpec, persistent: bool = False) -> MgpuTiles:
  """128-key tiles for full/sink_window; 64 for block_sparse, whose strided 64-blocks would
  leave half of every 128-key tile masked (measured: BENCHMARKS.md)."""
  tiles = MgpuTiles(64, 2) if spec.kind == "block_sparse" else MgpuTiles(128, 2)
  return dataclasses.replace(tiles, persistent=persistent)


def persistent_enabled(spec: AttentionSpec) -> bool:
  """Whether LONGGEN_JAX_MGPU_PERSISTENT asks for persistent programs (forward and dQ) for this pattern:
  1 (every pattern), a comma list of kinds (e.g. sink_window,block_sparse), or unset / 0 (none, the
  default)."""
  value = env_value(PERSISTENT_ENV)
  if value in ("1", "true", "yes", "on", "0", "false", "no", "off"):
    return env_switch(PERSISTENT_ENV)
  kinds = {k.strip() for k in value.split(",") if k.strip()}
  if not kinds <= set(get_args(Kind)):
    raise ValueError(f"{PERSISTENT_ENV} must be 1, 0 or a comma list of {', '.join(get_args(Kind))}; got {value!r}")
  return spec.kind in kinds


def num_sms(device=None) -> int:
  """Streaming multiprocessors of the device (132 on an H100 / H200 SXM; that when unknown, e.g. lowering
  for CUDA on a CPU host)."""
  device = device or jax.devices()[0]
  return (int(getattr(device, "core_count", 0) or 0) if device.platform == "gpu" else 0) or 132


def is_hopper(device=None) -> bool:
  device = device or jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def env_value(name: str, default: str = "0") -> str:
  """An environment setting of the Mosaic GPU paths, stripped and lower-cased (unset or empty: default)."""
  return os.environ.get(name, "").strip().lower() or default


def env_switch(name: str, default: str = "0") -> bool:
  """A switch read from the environment (1/true/yes/on)."""
  return env_value(name, default) in ("1", "true", "yes", "on")


# Pattern kinds whose calls WITH segment ids (packed documents) the Mosaic kernels (this forward and
# pallas_mgpu_backward) serve by default: where they passed the GPU tests and measured faster than the
# Triton kernels with segments. All three, with the per-batch lists (`segment_skip.segment_lists`):
# the mgpu_segments GPU pass (every pattern on these paths) 34 passed on an H200; timed (one H200,
# JAX 0.11.2, 2026-11-27, 32 query / 8 kv heads, head_dim 128, bf16, fwd+bwd at 128K with 1 / 4 / 16
# documents per row, benchmarks/packed_attention.py; BENCHMARKS.md "Packed documents: the Mosaic
# segment paths"), ms, Mosaic vs Triton:
#   full                     958.7 / 240.9 / 64.3   vs 1380.7 / 348.6 / 88.7   (1.38-1.45x)
#   sink_window(64,1984)      43.0 /  40.6 / 36.7   vs   47.6 /  45.2 / 41.3   (1.11-1.13x)
#   block_sparse(64,16,64)    42.6 /  27.4 / 22.9   vs   48.3 /  30.5 / 25.3   (1.10-1.13x)
# (sparse kinds: Mosaic forward and dQ, Triton dK/dV, as pallas_mgpu_backward.FASTER_THAN_TRITON says.)
SEGMENT_KINDS: frozenset[str] = frozenset({"full", "sink_window", "block_sparse"})


def segments_enabled(spec: AttentionSpec | None = None) -> bool:
  """Whether calls with segment ids and pattern `spec` may use the Mosaic kernels:
  LONGGEN_JAX_MGPU_SEGMENTS = auto or unset (the measured kinds, `SEGMENT_KINDS`), 1 (every pattern),
  0 (none: the Triton kernels take every packed call)."""
  if env_value(SEGMENTS_ENV, "auto") == "auto":
    return spec is not None and spec.kind in SEGMENT_KINDS
  return env_switch(SEGMENTS_ENV)


def supported(dtype, head_dim: int, has_segments: bool, device=None, spec: AttentionSpec | None = None) -> bool:
  """Whether this kernel serves the call with pattern `spec` (else the Triton forward does)."""
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim == 128 and (not has_segments or segments_enabled(spec)) and is_hopper(device))


def kv_table(spec: AttentionSpec, T: int, S: int, Hkv: int, block_k: int, q_offset: int = 0) -> np.ndarray:
  """int32[H', nq, 2 + width]: per (kv head, 128-row query tile) [count, n_full, tiles...].

  Tiles are the layout's key tiles, full ones first (ascending), then partial ones
  (ascending); slots past `count` repeat the last listed tile. H' is 1 unless the pattern
  differs between kv heads. With segment ids a kernel walks it rebuilt per batch row
  (`segment_skip.segment_lists`).
  """
  lay = block_layout(spec, T, S, Hkv, BLOCK_Q, block_k, q_offset)
  return full_first_table(lay.kv_index, lay.kv_full, lay.kv_count)


def full_first_table(index, full, count) -> np.ndarray:
  """int32[..., 2 + width]: a layout's per-row tile lists (`index`, `full` [..., width], `count` [...])
  as [count, n_full, tiles...] with the full tiles first, then the partial ones (each ascending), so a
  kernel runs an unmasked loop over [0, n_full) and a masked one over [n_full, count)."""
  valid = np.arange(index.shape[-1]) < count[..., None]
  rank = np.where(valid, np.where(full, 0, 1), 2)             # full, partial, padding
  ordered = np.take_along_axis(index, np.argsort(rank, axis=-1, kind="stable"), -1)
  n_full = (full & valid).sum(-1)
  return np.concatenate([count[..., None], n_full[..., None], ordered], -1).astype(np.int32)


def _tile_mask(spec: AttentionSpec, q_pos, k_pos, kv_head, Hkv: int, S: int):
  """The pattern on non-negative int32 positions (lax.div/rem are floor division/modulo there),
  with keys past the sequence end masked."""
  return allowed(spec, q_pos, k_pos, kv_head, Hkv, div=lax.div, mod=lax.rem) & (k_pos < S)


def split_segment_refs(refs, has_seg: bool):
  """(q segment ids ref, kv segment ids ref, the other refs) of a kernel whose inputs end with the
  optional segment-id arrays (None x 2 when the call has none)."""
  return (refs[0], refs[1], refs[2:]) if has_seg else (None, None, refs)


def list_walk(tab_ref, b, hl, qt, per_batch: bool):
  """(count, n_full, tile_of) of the key-tile list of query tile qt: a `kv_table` ref [H', nq, 2 + W],
  or with segment ids its rebuild per batch row [B, H', nq, 2 + W] (`segment_skip.segment_lists`:
  other documents' tiles dropped, one-document full tiles first, so they run unmasked)."""
  row = (b, hl, qt) if per_batch else (hl, qt)
  return tab_ref[(*row, 0)], tab_ref[(*row, 1)], lambda j: tab_ref[(*row, 2 + j)]


def load_ids(ids_ref, reduce_axis: int):
  """A 1-D int32 GMEM slice of segment ids as a vector of a WGMMA tile: along its rows (reduce_axis=1)
  or its columns (reduce_axis=0)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu   # Hopper-only backend
  return plgpu.load(ids_ref, layout=plgpu.Layout.WGMMA.reduce(reduce_axis), optimized=False)


def same_segment(row_ids, col_ids, shape):
  """bool[shape]: whether each tile pair's row and column lie in the same document."""
  return lax.broadcast_in_dim(row_ids, shape, [0]) == lax.broadcast_in_dim(col_ids, shape, [1])


def stream_kv_tiles(tile_of, count, k_ref, v_ref, b, kv_head, k_smem, v_smem, k_bar, v_bar, k_free, v_free,
                    bk: int, stages: int):
  """The memory warpgroup of a kernel walking one key-tile list: TMA copies of the K/V tiles
  `tile_of(j)` (j < count) of batch row `b`, kv head `kv_head`, into a `stages`-deep SMEM ring,
  slot j % stages, each copy after the compute warpgroups freed the slot."""
  from jax.experimental.pallas import mosaic_gpu as plgpu   # Hopper-only backend

  def fetch(j, slot):
    rows = pl.ds(tile_of(j) * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_smem.at[slot], v_bar.at[slot])

  for i in range(stages):
    pl.when(i < count)(functools.partial(fetch, i, i))

  @pl.loop(stages, jnp.maximum(count, stages))
  def _(j):
    slot = lax.rem(j, jnp.int32(stages))
    rows = pl.ds(tile_of(j) * bk, bk)    # read before the wait: hides latency
    plgpu.barrier_wait(k_free.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_smem.at[slot], k_bar.at[slot])
    plgpu.barrier_wait(v_free.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_smem.at[slot], v_bar.at[slot])


def stream_kv_tiles_from(base, tile_of, count, k_ref, v_ref, b, kv_head, k_smem, v_smem, k_bar, v_bar,
                         k_free, v_free, bk: int, stages: int):
  """`stream_kv_tiles` for a persistent program: this list's tile j is the program's tile base + j
  overall, so it goes to ring slot (base + j) % stages and, past the program's first `stages` tiles,
  waits for that slot's previous tile to be freed (which may belong to the previous query tile)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu   # Hopper-only backend

  @pl.loop(0, count)
  def _(j):
    g = base + j
    slot = lax.rem(g, jnp.int32(stages))
    rows = pl.ds(tile_of(j) * bk, bk)    # read before the wait: hides latency
    pl.when(g >= stages)(lambda: plgpu.barrier_wait(k_free.at[slot]))
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_smem.at[slot], k_bar.at[slot])
    pl.when(g >= stages)(lambda: plgpu.barrier_wait(v_free.at[slot]))
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_smem.at[slot], v_bar.at[slot])


def program_grid(persistent: bool, programs: int, shape: tuple[int, int, int]) -> dict:
  """`plgpu.kernel`'s grid for `query_tile_programs` over shape (B, nq, Hq): one program per (query head,
  query tile, batch row), or `programs` persistent ones (0: one per SM; never more than query tiles)."""
  if not persistent:
    B, nq, Hq = shape
    return dict(grid=(Hq, nq, B), grid_names=("h", "qt", "b"))
  return dict(grid=(min(programs or num_sms(), math.prod(shape)),), grid_names=("sm",))


def query_tile_programs(persistent: bool, shape: tuple[int, int, int], walk, compute, ring) -> None:
  """The warp-specialised body of a kernel over query tiles and their key-tile lists (the forward, dQ).

  walk(b, h, qt) -> (kv_head, count, n_full, tile_of); compute(wg, b, h, qt, kv_head, count, n_full,
  tile_of, base) runs on compute warpgroups 0 and 1; warpgroup 2 streams the listed K/V tiles into
  `ring` = (k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, block_k, stages). One query tile
  per program (base None; long rows first: causal load balance), or persistent: program p takes query
  tiles p, p + P, p + 2P, ... in the order the grid's programs launch (batch rows fastest, then query
  tiles from the longest row down, then heads: programs running together share a head's K/V in L2),
  and every warpgroup counts the program's key tiles so far (base: the ring position), so the ring
  runs on from one list into the next (tests/test_mgpu_ring_protocol.py)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu   # Hopper-only backend
  k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, bk, stages = ring
  B, nq, Hq = shape
  launch_order = (Hq, nq, B)   # nd_loop's last axis runs fastest
  if not persistent:
    b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
    qt = nq - 1 - lax.axis_index("qt")
    kv_head, count, n_full, tile_of = walk(b, h, qt)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      compute(wg, b, h, qt, kv_head, count, n_full, tile_of, None)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      stream_kv_tiles(tile_of, count, k_ref, v_ref, b, kv_head, k_smem, v_smem,
                      k_bar, v_bar, k_free, v_free, bk, stages)
    return

  wg = lax.axis_index("wg")

  @pl.when(wg < 2)
  def _compute_persistent():
    plgpu.set_max_registers(232, action="increase")

    @plgpu.nd_loop(launch_order, collective_axes="sm", init_carry=jnp.int32(0))
    def _(info, carry):   # carry: the program's key tiles so far
      h, q_rank, b = info.index
      qt = nq - 1 - q_rank
      kv_head, count, n_full, tile_of = walk(b, h, qt)
      compute(wg, b, h, qt, kv_head, count, n_full, tile_of, carry)
      return carry + count

  @pl.when(wg == 2)
  def _memory_persistent():
    plgpu.set_max_registers(40, action="decrease")

    @plgpu.nd_loop(launch_order, collective_axes="sm", init_carry=jnp.int32(0))
    def _(info, carry):
      h, q_rank, b = info.index
      kv_head, count, _, tile_of = walk(b, h, nq - 1 - q_rank)
      stream_kv_tiles_from(carry, tile_of, count, k_ref, v_ref, b, kv_head, k_smem, v_smem,
                           k_bar, v_bar, k_free, v_free, bk, stages)
      return carry + count


def mgpu_forward(q_BTHD, k_BSKD, v_BSKD, spec: AttentionSpec, *, T: int, S: int,
                 q_offset: int = 0, head_dim: int | None = None, tiles: MgpuTiles | None = None,
                 q_segment_ids=None, kv_segment_ids=None, interpret=None):
  """out [B,Tp,Hq,D] and base-2 lse [B,Hq,Tp] for arrays padded past the true T, S.

  T, S: true lengths (keys at or past S are masked; rows past T are computed as ordinary
  rows and come out finite, except that with segment ids they may skip tiles real rows need); Tp
  is the input's length, rounded up here to 128 if needed (the extra rows are sliced off again).
  `head_dim`: the true head_dim (softmax scale) if the arrays are zero-padded past it. Segment ids: int32 [B, Tp] / [B, Sp] as `pallas_gpu` pads them
  (-1 / -2 past the true lengths: padding rows then see no key, lse -inf, as in the Triton forward).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu   # Hopper-only backend

  B, Tp_in, Hq, D = q_BTHD.shape
  tiles = tiles or default_mgpu_tiles(spec)
  Sp_in, Hkv = k_BSKD.shape[1], k_BSKD.shape[2]
  G = Hq // Hkv
  bk, stages = tiles.block_k, tiles.stages
  scale = 1.0 / math.sqrt(head_dim or D)
  dtype = q_BTHD.dtype
  Tp, Sp = round_up(Tp_in, BLOCK_Q), round_up(max(Sp_in, S), bk)
  q, k, v = pad_axis(q_BTHD, 1, Tp), pad_axis(k_BSKD, 1, Sp), pad_axis(v_BSKD, 1, Sp)
  has_seg = q_segment_ids is not None
  segments = pad_segment_ids(q_segment_ids, kv_segment_ids, Tp, Sp) if has_seg else ()
  # The table spans every padded row (padding rows come out finite, as the backward needs);
  # real rows see the same keys, tiles are only marked full where the predicate says so.
  table = kv_table(spec, Tp, S, Hkv, bk, q_offset)
  nq = table.shape[1]
  per_head = spec.head_dependent(Hkv)
  c = scale * LOG2E

  def longgen_flash_fwd_mgpu(tab_ref, q_ref, k_ref, v_ref, *refs):
    qseg_ref, kseg_ref, refs = split_segment_refs(refs, has_seg)
    out_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2, k_bar, v_bar, q_bar, k_free, v_free, sched = refs

    def walk(b, h, qt):
      """(kv head, count, n_full, tile_of) of query head h's tile qt in batch row b."""
      kv_head = lax.div(h, jnp.int32(G))
      hl = kv_head if per_head else 0
      return (kv_head, *list_walk(tab_ref, b, hl, qt, per_batch=has_seg))

    def schedule():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    def compute(wg, b, h, qt, kv_head, count, n_full, tile_of, base):
      """Compute warpgroup wg's 64 rows of one query tile. base: the program's key tiles before this
      list (persistent programs; their ring runs on), None: a program of one query tile."""
      ring = (lambda j: j) if base is None else (lambda j: base + j)
      qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
      q_base = qt * BLOCK_Q + wg * HALF
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, HALF), h], qo_smem, q_bar.at[wg])
      q_seg = load_ids(qseg_ref.at[b, pl.ds(q_base, HALF)], 1) if has_seg else None
      plgpu.barrier_wait(q_bar.at[wg])
      m = plgpu.layout_cast(jnp.full((HALF,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l = plgpu.layout_cast(jnp.full((HALF,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((HALF, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(count > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0 if base is None else lax.rem(base, jnp.int32(stages))])

      pl.when(wg == 1)(schedule)

      def step(j, carry, masked: bool):
        acc, m, l = carry
        slot = lax.rem(ring(j), jnp.int32(stages))
        if masked:
          kt = tile_of(j)
          k_seg = load_ids(kseg_ref.at[b, pl.ds(kt * bk, bk)], 0) if has_seg else None   # overlaps QK^T

        def qk_fn(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
          schedule()
          return acc_ref[...]
        s = pl.run_scoped(qk_fn, plgpu.ACC((HALF, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
          q_pos = plgpu.broadcasted_iota(jnp.int32, (HALF, bk), 0, layout=plgpu.Layout.WGMMA)
          k_pos = plgpu.broadcasted_iota(jnp.int32, (HALF, bk), 1, layout=plgpu.Layout.WGMMA)
          ok = _tile_mask(spec, q_pos + (q_offset + q_base), k_pos + kt * bk, kv_head, Hkv, S)
          if has_seg:
            ok = ok & same_segment(q_seg, k_seg, (HALF, bk))
          s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1) * c)
        # A row with nothing allowed so far keeps m = -inf; exp2 against 0 keeps p = 0, no NaN.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_use, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        plgpu.barrier_arrive(sched)           # softmax done
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)             # tensor cores free

        def pv_fn(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          nxt = j + 1

          @pl.when(nxt < count)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(ring(nxt), jnp.int32(stages))])
        acc = pl.run_state(pv_fn)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m, l))
      acc, m, l = lax.fori_loop(n_full, count, functools.partial(step, masked=True), carry)
      pl.when(wg == 0)(schedule)

      ok = l > 0.0
      l_safe = jnp.where(ok, l, 1.0)
      qo_smem[...] = (acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])).astype(dtype)
      lse_smem[...] = jnp.where(ok, m + jnp.log(l_safe) * LOG2E, -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(q_base, HALF), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_base, HALF)])
      plgpu.wait_smem_to_gmem(0)   # (persistent: the next query tile's Q lands in qo_smem)

    query_tile_programs(tiles.persistent, (B, nq, Hq), walk, compute,
                        (k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, bk, stages))

  # With segment ids the lists are rebuilt per batch row from the ids (rows past T, keys past S:
  # padding, ignored for dropping; a tile holding any is never run unmasked).
  table = segment_skip.segment_lists(table, *segments, BLOCK_Q, bk, T, S) if has_seg else jnp.asarray(table)
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  out, lse = plgpu.kernel(
      longgen_flash_fwd_mgpu,
      out_type=[jax.ShapeDtypeStruct((B, Tp, Hq, D), dtype),
                jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32)],
      scratch_types=[
          plgpu.SMEM((2, HALF, D), dtype, transforms=transforms),
          plgpu.SMEM((stages, bk, D), dtype, transforms=transforms),
          plgpu.SMEM((stages, bk, D), dtype, transforms=transforms),
          plgpu.SMEM((2, HALF), jnp.float32),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2),
      ],
      **program_grid(tiles.persistent, tiles.programs, (B, nq, Hq)),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(table, q, k, v, *segments)
  return out[:, :Tp_in], lse[:, :, :Tp_in]
