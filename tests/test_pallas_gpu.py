"""Pallas GPU attention kernel vs the dense reference.

CPU: the Triton-style kernels run in interpret mode on tiny shapes chosen to hit edge tiles
(lengths not a multiple of the tile, q_offset with S > T, empty rows). GPU (`gpu_only`): the
same checks with the kernels compiled, at sizes where tiles are many and inputs are bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longgen_jax.attention import segment_skip
from longgen_jax.attention.pallas_gpu import Tiles, pallas_attention
from longgen_jax.attention.reference import reference_attention
from longgen_jax.attention.spec import AttentionSpec
from tests.conftest import gpu_only, rel_err, saved_residuals

FULL = AttentionSpec.full()
SINK = AttentionSpec.sink_window(5, 13)
SPARSE = AttentionSpec.block_sparse(8, 2, 3)


def _inputs(seed, B, T, S, Hq, Hkv, D, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, Hkv, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.float32).astype(dtype)
  d_out = jax.random.normal(ks[3], (B, T, Hq, D), jnp.float32)
  d_lse = jax.random.normal(ks[4], (B, Hq, T), jnp.float32)
  return q, k, v, d_out, d_lse


def _loss(attn, d_out, d_lse):
  """Scalar whose gradient pulls on both outputs (lse only where finite)."""
  def f(q, k, v):
    out, lse = attn(q, k, v)
    return (jnp.sum(out.astype(jnp.float32) * d_out)
            + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * d_lse))
  return f


def _check(spec, B, T, S, Hq, Hkv, D, *, seed=0, dtype=jnp.float32, q_offset=0, segments=None,
           tol=2e-5, grad_tol=None, **kernel_kw):
  """Outputs, lse and dq/dk/dv of the kernel vs the reference (computed in float32)."""
  q, k, v, d_out, d_lse = _inputs(seed, B, T, S, Hq, Hkv, D, dtype)
  seg = {} if segments is None else dict(q_segment_ids=segments[0], kv_segment_ids=segments[1])
  ours = lambda q, k, v: pallas_attention(q, k, v, spec, q_offset=q_offset, return_lse=True,
                                          **seg, **kernel_kw)
  ref = lambda q, k, v: reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), spec, q_offset=q_offset,
                                            return_lse=True, **seg)
  out, lse = jax.jit(ours)(q, k, v)
  # Jitted: op by op, XLA compiles (and on GPU autotunes) every float32 dot of the reference's
  # backward on its own, which took ~40 s a test on an H200.
  with jax.default_matmul_precision("float32"):   # no tf32 in the ground truth on GPU
    ref_out, ref_lse = jax.jit(ref)(q, k, v)
    ref_grads = jax.jit(jax.grad(_loss(ref, d_out, d_lse), (0, 1, 2)))(q, k, v)
  assert out.shape == ref_out.shape and out.dtype == q.dtype and lse.shape == (B, Hq, T)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert rel_err(out, ref_out) < tol, rel_err(out, ref_out)
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)  # -inf exactly on empty rows
  assert rel_err(np.where(finite, lse, 0), np.where(finite, ref_lse, 0)) < tol
  grads = jax.jit(jax.grad(_loss(ours, d_out, d_lse), (0, 1, 2)))(q, k, v)
  for name, g, r in zip("qkv", grads, ref_grads):
    assert g.shape == r.shape and np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert rel_err(g, r) < (grad_tol or tol), (name, rel_err(g, r))
  return out


# pattern, group size G (Hq = G * Hkv), Hkv, tile (block_q, block_k), T, S, q_offset: every
# pattern sees every group size; tiles of 16 and 32 (and mixed); T a multiple of the tile and
# not; queries as the last T of S > T positions (a chunk after a prefix: absolute positions).
CASES = [
    (FULL, 1, 2, (16, 16), 48, 48, 0),
    (FULL, 4, 1, (32, 16), 40, 40, 0),
    (FULL, 8, 1, (16, 32), 24, 72, 40),
    (SINK, 1, 1, (16, 16), 45, 45, 0),
    (SINK, 4, 2, (16, 32), 24, 72, 40),
    (SINK, 8, 1, (32, 32), 50, 50, 0),
    (SPARSE, 1, 2, (16, 16), 64, 64, 0),     # head-dependent strides (Hkv=2)
    (SPARSE, 4, 2, (32, 16), 37, 37, 0),
    (SPARSE, 8, 1, (16, 16), 24, 72, 40),
]


@pytest.mark.parametrize("spec,G,Hkv,tile,T,S,q_offset", CASES, ids=lambda x: str(x))
def test_interpret_matches_reference(spec, G, Hkv, tile, T, S, q_offset):
  _check(spec, 1, T, S, G * Hkv, Hkv, 16, q_offset=q_offset, block_q=tile[0], block_k=tile[1],
         interpret=True)


def test_interpret_segments_and_empty_rows():
  """Two packed documents; query row 3 has a segment no key carries, so it attends nothing."""
  T = 40
  seg = np.zeros((2, T), np.int32)
  seg[:, 21:] = 1
  seg[1, 10:] = 2
  q_seg = seg.copy()
  q_seg[0, 3] = 7
  out = _check(SINK, 2, T, T, 4, 2, 16, segments=(jnp.asarray(q_seg), jnp.asarray(seg)),
               block_q=16, block_k=16, interpret=True)
  np.testing.assert_array_equal(np.asarray(out[0, 3]), 0.0)


def test_interpret_queries_past_last_key():
  """Query positions run past the last key (S = 25 < q_offset + T = 30): the last key tile is
  partial for every query tile that lists it. head_dim 24 is zero-padded to 32 inside."""
  _check(SPARSE, 1, 20, 25, 2, 1, 24, q_offset=10, block_q=16, block_k=16, interpret=True)


def test_interpret_bf16_and_tiles_object():
  tiles = Tiles(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=16,
                block_k_dkv=16)
  _check(SPARSE, 1, 48, 48, 4, 1, 32, dtype=jnp.bfloat16, tol=2e-2, tiles=tiles, interpret=True)


@pytest.mark.parametrize("spec", [SINK, SPARSE], ids=str)
def test_interpret_split_dkv_lists(spec):
  """dK/dV lists cut into one-query-tile work units: the extra partial tiles must add up."""
  _check(spec, 1, 40, 72, 4, 2, 16, q_offset=32, tiles=Tiles.uniform(16, 16, dkv_chunk=1),
         interpret=True)


def test_interpret_segments_with_offset_and_group_8():
  """Segment ids together with q_offset (queries = the last T of S keys) and GQA group 8:
  segment ids must be applied on tiles the layout marks full, too."""
  T, S = 24, 72
  seg = np.zeros((1, S), np.int32)
  seg[:, 30:] = 1
  seg[:, 60:] = 2
  q_seg = seg[:, S - T:].copy()
  q_seg[0, 2] = 9   # a row with no allowed key
  _check(FULL, 1, T, S, 8, 1, 16, q_offset=S - T, segments=(jnp.asarray(q_seg), jnp.asarray(seg)),
         block_q=16, block_k=16, interpret=True)


@pytest.mark.parametrize("spec,G,Hkv,tiles", [
    (FULL, 2, 2, Tiles.uniform(16, 16)),
    (FULL, 4, 1, Tiles(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=16, block_k_dkv=16)),
    (SINK, 1, 2, Tiles.uniform(16, 16, dkv_chunk=2)),   # dK/dV lists cut into units: ends clip units too
], ids=str)
def test_interpret_packed_documents_skip_foreign_tiles_exactly(spec, G, Hkv, tiles, monkeypatch):
  """Packed documents: the tiles at the list ends that share no segment id with the row's tile are
  skipped (segment_skip.ENABLED), which must change nothing, not one bit, and must skip some.
  Rows: documents in order of uneven lengths (T not a multiple of the tile), and ids out of order."""
  from longgen_jax.attention import pallas_gpu
  T = 150
  in_order = np.repeat([1, 2, 3, 4], [40, 35, 27, 48])
  shuffled = np.repeat([3, 1, 3, 2, 1], [30, 30, 30, 30, 30])   # not monotonic: skipping must stay exact
  seg = jnp.asarray(np.stack([in_order, shuffled]), jnp.int32)
  out = {}
  for skip in (True, False):
    monkeypatch.setattr(segment_skip, "ENABLED", skip)
    q, k, v, d_out, d_lse = _inputs(3, 2, T, T, G * Hkv, Hkv, 16)
    ours = lambda q, k, v: pallas_attention(q, k, v, spec, q_segment_ids=seg, kv_segment_ids=seg,
                                            return_lse=True, tiles=tiles, interpret=True)
    out[skip] = (jax.jit(ours)(q, k, v), jax.jit(jax.grad(_loss(ours, d_out, d_lse), (0, 1, 2)))(q, k, v))
  for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _check(spec, 2, T, T, G * Hkv, Hkv, 16, seed=3, segments=(seg, seg), tiles=tiles, interpret=True)
  # Something was skipped: the forward's leading skips and the dK/dV ends of the in-order row.
  monkeypatch.setattr(segment_skip, "ENABLED", True)
  cfg, _, _, _, qseg, kseg = pallas_gpu._prepare(q, k, v, spec, seg, seg, 0, tiles, None, None, True)
  lay = cfg.layout(tiles.block_q, tiles.block_k)
  skips = np.asarray(pallas_gpu._leading_foreign(cfg, lay, qseg, kseg, tiles.block_q, tiles.block_k))
  lay_dkv = cfg.layout(tiles.block_q_dkv, tiles.block_k_dkv)
  ends = np.asarray(pallas_gpu._live_ends(cfg, lay_dkv, qseg, kseg, tiles.block_q_dkv, tiles.block_k_dkv))
  n_rows, n_cols = lay.kv_count.size, lay_dkv.q_count.size
  if spec.is_full:   # sink_window's lists are short already: the window itself stays in its document
    assert skips[:n_rows].sum() > 0
  assert (ends[:n_cols] < lay_dkv.q_count.reshape(-1)).any()


def test_interpret_whole_query_tiles_without_keys():
  """sink 0: queries more than `window` past the last key see nothing, so whole query tiles
  have an empty list (count 0): zero output, lse -inf, zero gradients."""
  _check(AttentionSpec.sink_window(0, 8), 1, 40, 20, 2, 1, 16, q_offset=20, block_q=16,
         block_k=16, interpret=True)


@pytest.mark.parametrize("spec", [AttentionSpec.block_sparse(12, 1, 3),
                                  AttentionSpec.block_sparse(8, 2, 4, homo_head=True)], ids=str)
def test_interpret_pattern_blocks_unaligned_and_homo(spec):
  """Pattern blocks that straddle kernel tiles (12 vs 16), and homo_head with several kv heads."""
  _check(spec, 1, 56, 56, 4, 2, 16, block_q=16, block_k=16, interpret=True)


def test_interpret_forward_tile_smaller_than_backward_tile():
  # T is padded to the largest query tile of the three kernels: backward tiles past the
  # forward's last tile must still read written out/lse rows.
  tiles = Tiles(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=32,
                block_k_dkv=16)
  _check(FULL, 1, 10, 10, 2, 1, 16, tiles=tiles, interpret=True)


def test_bad_tiles_raise():
  q = jnp.zeros((1, 16, 1, 16))
  with pytest.raises(ValueError, match="power of two"):
    pallas_attention(q, q, q, FULL, block_q=24, interpret=True)


@pytest.mark.parametrize("spec,T,q_offset", [(FULL, 40, 0), (SINK, 40, 0), (FULL, 24, 16)],
                         ids=["full layer", "sparse layer", "full, queries after a prefix"])
def test_remat_full_keeps_full_attention_output_instead_of_rerunning_it(spec, T, q_offset):
  """Under remat="full" a full layer's attention output and lse are residuals the backward keeps (named
  in the kernel's custom_vjp forward: attention.residuals), so it need not rerun the forward kernel; a
  sparse layer's are not kept (cheap to recompute), nor a piece's (queries after a prefix, as in a
  context-parallel halo). The gradient is the same either way."""
  from longgen_jax.attention.residuals import FULL_LSE, FULL_OUT
  from longgen_jax.model.config import REMAT_POLICIES
  q, k, v, d_out, _ = _inputs(3, 1, T, 40, 4, 2, 16, jnp.float32)
  f = lambda q, k, v: jnp.sum(d_out * pallas_attention(q, k, v, spec, q_offset=q_offset, block_q=16, block_k=16,
                                                       interpret=True))
  kept = jax.checkpoint(f, policy=REMAT_POLICIES["full"])
  saved = saved_residuals(kept, q, k, v)
  named = {name for name in (FULL_OUT, FULL_LSE) if f"named '{name}'" in saved}
  assert named == ({FULL_OUT, FULL_LSE} if spec.is_full and T == 40 else set()), saved
  recompute = jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)
  for a, b in zip(jax.grad(kept, (0, 1, 2))(q, k, v), jax.grad(recompute, (0, 1, 2))(q, k, v)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- compiled on GPU


@gpu_only
@pytest.mark.parametrize("spec", [FULL, AttentionSpec.sink_window(64, 448),
                                  AttentionSpec.block_sparse(64, 4, 8)], ids=str)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_gpu_matches_reference(spec, G):
  Hkv = 2
  _check(spec, 2, 1000, 1000, G * Hkv, Hkv, 128, dtype=jnp.bfloat16, tol=1e-2, seed=G)


@gpu_only
def test_remat_full_keeps_cudnn_attention_output():
  """All-full baselines on cuDNN get the same remat as our full layers: its forward's outputs are kept."""
  from longgen_jax.attention.cudnn import cudnn_attention
  from longgen_jax.model.config import CUDNN_ATTENTION_FORWARD, REMAT_POLICIES
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 4, 64), jnp.bfloat16)
  f = lambda q: jnp.sum(cudnn_attention(q, q, q, FULL).astype(jnp.float32))
  policies = {"full": REMAT_POLICIES["full"], "none kept": jax.checkpoint_policies.nothing_saveable}
  saved = {name: saved_residuals(jax.checkpoint(f, policy=policy), q) for name, policy in policies.items()}
  assert CUDNN_ATTENTION_FORWARD in saved["full"] and CUDNN_ATTENTION_FORWARD not in saved["none kept"], saved


@gpu_only
def test_gpu_offset_segments_fp16():
  T, S = 384, 1024
  seg = np.zeros((1, S), np.int32)
  seg[:, 700:] = 1
  q_seg = seg[:, S - T:].copy()
  q_seg[0, 5] = 9   # a row with no allowed key
  _check(AttentionSpec.block_sparse(64, 2, 4), 1, T, S, 8, 2, 64, dtype=jnp.float16, tol=1e-2,
         q_offset=S - T, segments=(jnp.asarray(q_seg), jnp.asarray(seg)))


@gpu_only
def test_gpu_packed_segments_skip_foreign_tiles_exactly(monkeypatch):
  """Compiled: four packed documents of uneven lengths (T not a multiple of 64), full layer, GQA 4,
  bf16: the same bits with and without skipping the tiles other documents own, and the reference.
  (On Hopper the Mosaic segment paths by default, pallas_mgpu.SEGMENT_KINDS; the Triton ones in the
  `triton` pass of scripts/gpu_tests.sh, LONGGEN_JAX_MGPU_SEGMENTS=0, and on Ampere.)"""
  T = 2000
  seg = jnp.asarray(np.repeat([1, 2, 3, 4], [700, 300, 650, 350])[None], jnp.int32)
  q, k, v, d_out, d_lse = _inputs(5, 1, T, T, 8, 2, 128, jnp.bfloat16)
  got = {}
  for skip in (False, True):
    monkeypatch.setattr(segment_skip, "ENABLED", skip)
    ours = lambda q, k, v: pallas_attention(q, k, v, FULL, q_segment_ids=seg, kv_segment_ids=seg, return_lse=True)
    got[skip] = (jax.jit(ours)(q, k, v), jax.jit(jax.grad(_loss(ours, d_out, d_lse), (0, 1, 2)))(q, k, v))
  for a, b in zip(jax.tree.leaves(got[True]), jax.tree.leaves(got[False])):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  _check(FULL, 1, T, T, 8, 2, 128, seed=5, dtype=jnp.bfloat16, tol=1e-2, segments=(seg, seg))


@gpu_only
def test_gpu_fp32_tight():
  _check(AttentionSpec.sink_window(16, 100), 1, 300, 300, 4, 1, 64, tol=1e-4)


@gpu_only
@pytest.mark.parametrize("spec", [AttentionSpec.sink_window(64, 192),
                                  AttentionSpec.block_sparse(64, 2, 4)], ids=str)
def test_gpu_split_dkv_lists(spec):
  _check(spec, 1, 2048, 2048, 8, 2, 128, dtype=jnp.bfloat16, tol=1e-2,
         tiles=Tiles(dkv_chunk=3))


@gpu_only
def test_gpu_dispatch():
  from longgen_jax.attention import attention
  q, k, v, _, _ = _inputs(0, 1, 256, 256, 4, 2, 64, jnp.bfloat16)
  out = attention(q, k, v, FULL, impl="pallas")
  ref = reference_attention(q, k, v, FULL)
  assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("spec", [FULL, AttentionSpec.sink_window(4, 12), AttentionSpec.block_sparse(4, 1, 3)], ids=str)
def test_dkv_lists_flat_hold_each_list_and_nothing_else(spec):
  """The dK/dV kernel's transposed lists travel flat (CSR): row r's entries are entries[offsets[r]:][:count[r]],
  in list order, and the table is exactly as long as the real entries (the sink's and strided key tiles make the
  dense [rows, width] form mostly padding)."""
  from longgen_jax.attention import pallas_gpu
  from longgen_jax.attention.spec import block_layout
  lay = block_layout(spec, 200, 200, 3, 8, 8)
  entries, offsets, (tile, rows, slots) = pallas_gpu._csr_tables(lay.q_index, lay.q_full, lay.q_count)
  entries, offsets, count = np.asarray(entries), np.asarray(offsets), lay.q_count.reshape(-1)
  assert entries.size == max(1, count.sum()) and offsets.size == count.size
  index, full = lay.q_index.reshape(count.size, -1), lay.q_full.reshape(count.size, -1)
  for r, n in enumerate(count):
    got = entries[offsets[r]:offsets[r] + n]
    np.testing.assert_array_equal(got // 2, index[r, :n])
    np.testing.assert_array_equal(got % 2, full[r, :n])
    np.testing.assert_array_equal(tile[rows == r], index[r, :n])
    np.testing.assert_array_equal(slots[rows == r], np.arange(n))
  assert count.max() > 2 * np.median(count) or spec.is_full   # a long row: what the flat form saves
