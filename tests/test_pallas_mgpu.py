"""Mosaic GPU forward and backward: host-side tables and predicate on CPU (and the backward lowered for
CUDA there); the kernels on a Hopper GPU."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longgen_jax.attention import pallas_mgpu, segment_skip
from longgen_jax.attention import pallas_mgpu_backward as mbwd
from longgen_jax.attention.padding import pad_segment_ids
from longgen_jax.attention.pallas_mgpu import MgpuTiles, kv_table, mgpu_forward
from longgen_jax.attention.reference import reference_attention
from longgen_jax.attention.spec import AttentionSpec, allowed, block_layout, dense_mask
from tests.conftest import attention_grad_inputs, gpu_only, rel_err

SPECS = [AttentionSpec.full(), AttentionSpec.sink_window(64, 200),
         AttentionSpec.block_sparse(64, 4, 8)]
hopper_only = pytest.mark.skipif(not pallas_mgpu.is_hopper() if jax.default_backend() == "gpu"
                                 else True, reason="needs a Hopper GPU (Mosaic GPU wgmma)")


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("T,S,Hkv,bk,q_offset", [(1000, 1000, 2, 128, 0), (300, 812, 4, 64, 512)])
def test_kv_table_full_first(spec, T, S, Hkv, bk, q_offset):
  tab = kv_table(spec, T, S, Hkv, bk, q_offset)
  lay = block_layout(spec, T, S, Hkv, 128, bk, q_offset)
  assert tab.dtype == np.int32 and tab.shape == lay.kv_index.shape[:2] + (2 + lay.kv_index.shape[2],)
  for h in range(tab.shape[0]):
    for t in range(tab.shape[1]):
      count, n_full, tiles = tab[h, t, 0], tab[h, t, 1], tab[h, t, 2:]
      listed = lay.kv_index[h, t, :count]
      full = set(listed[lay.kv_full[h, t, :count]].tolist())
      assert count == lay.kv_count[h, t] and n_full == len(full)
      assert set(tiles[:n_full].tolist()) == full                       # full tiles first
      assert sorted(tiles[:count].tolist()) == sorted(listed.tolist())  # same set, nothing lost
      assert not set(tiles[n_full:count].tolist()) & full


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_tile_mask_matches_contract(spec):
  Hkv, S = 2, 700
  q_pos = jnp.arange(0, 800, 3)[:, None]
  k_pos = jnp.arange(0, 768)[None, :]
  for h in range(Hkv):
    got = np.asarray(pallas_mgpu._tile_mask(spec, q_pos, k_pos, h, Hkv, S))
    want = allowed(spec, np.asarray(q_pos), np.asarray(k_pos), h, Hkv) & (np.asarray(k_pos) < S)
    np.testing.assert_array_equal(got, want)


def test_default_tiles():
  assert pallas_mgpu.default_mgpu_tiles(AttentionSpec.full()).block_k == 128
  assert pallas_mgpu.default_mgpu_tiles(AttentionSpec.block_sparse(64, 16, 64)).block_k == 64


def test_persistent_forward_switch_reaches_the_static_config(monkeypatch):
  """LONGGEN_JAX_MGPU_PERSISTENT (1, or a comma list of kinds) turns pallas_gpu's default forward into the
  persistent one per pattern, in the call's static config (jit's key: no stale trace), never by default."""
  from longgen_jax.attention import pallas_gpu
  specs = (AttentionSpec.full(), AttentionSpec.sink_window(64, 200), AttentionSpec.block_sparse(64, 4, 8))
  x = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)

  def forwards():
    return [pallas_gpu._prepare(x, x, x, sp, None, None, 0, None, None, None, False)[0].tiles.forward
            for sp in specs]
  monkeypatch.delenv(pallas_mgpu.PERSISTENT_ENV, raising=False)
  assert forwards() == ["auto"] * 3 and not pallas_mgpu.default_mgpu_tiles(specs[0]).persistent
  monkeypatch.setenv(pallas_mgpu.PERSISTENT_ENV, "1")
  assert forwards() == ["persistent"] * 3
  monkeypatch.setenv(pallas_mgpu.PERSISTENT_ENV, "sink_window,block_sparse")
  assert forwards() == ["auto", "persistent", "persistent"]
  assert pallas_gpu._prepare(x, x, x, specs[1], None, None, 0, pallas_gpu.Tiles(forward="triton"), None, None,
                             False)[0].tiles.forward == "triton"          # an explicit choice stays
  monkeypatch.setenv(pallas_mgpu.PERSISTENT_ENV, " block_sparse , full")
  assert forwards() == ["persistent", "auto", "persistent"]
  monkeypatch.setenv(pallas_mgpu.PERSISTENT_ENV, "0")
  assert forwards() == ["auto"] * 3
  monkeypatch.setenv(pallas_mgpu.PERSISTENT_ENV, "sink")               # not a kind: said, not ignored
  with pytest.raises(ValueError, match="sink_window"):
    forwards()
  with pytest.raises(ValueError, match="persistent"):
    pallas_gpu.Tiles(forward="persistant").check()


def _mosaic_modules(fn, *args):
  """The Mosaic GPU modules (MLIR text, no debug info) `fn` lowers to for CUDA, read where JAX serialises
  them (an internal hook: skips where it or the Mosaic GPU bindings are missing)."""
  try:
    from jax.experimental.mosaic.gpu import core
    serde = core._run_serde_pass
  except (ImportError, AttributeError) as e:
    pytest.skip(f"Mosaic GPU lowering unavailable: {e}")
  seen = []

  def capture(module, **kw):
    if kw.get("serialize"):
      seen.append(module.operation.get_asm(enable_debug_info=False))
    return serde(module, **kw)
  core._run_serde_pass = capture
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    core._run_serde_pass = serde
  return seen


def _launch_grid(fn, *args) -> tuple[int, int, int]:
  """The (x, y, z) CUDA grid of the one Mosaic GPU kernel `fn` lowers to."""
  import re
  (text,) = _mosaic_modules(fn, *args)
  return tuple(int(n) for n in re.search(
      r"gpu\.launch .*?blocks\(.*?\) in \(%\w+ = %c(\d+), %\w+ = %c(\d+), %\w+ = %c(\d+)\)", text).groups())


@pytest.mark.parametrize("spec,T,S,Hkv,segments", [(AttentionSpec.full(), 300, 812, 2, False),
                                                    (AttentionSpec.sink_window(64, 200), 777, 777, 2, True),
                                                    (AttentionSpec.block_sparse(64, 4, 8), 1100, 1100, 2, False)])
def test_persistent_forward_lowers_to_one_program_per_sm_on_cpu(spec, T, S, Hkv, segments):
  """The persistent forward (and dQ) lowers for CUDA (with and without segment ids) to a launch of `programs`
  (or one per SM, at most one per query tile) programs instead of one per (head, query tile, row)."""
  sd = jax.ShapeDtypeStruct
  Hq = 4
  args = [sd((1, T, Hq, 128), jnp.bfloat16), sd((1, S, Hkv, 128), jnp.bfloat16), sd((1, S, Hkv, 128), jnp.bfloat16)]
  args += [sd((1, T), jnp.int32), sd((1, S), jnp.int32)] if segments else []
  nq = -(-T // 128)

  def grid(tiles):
    def f(q, k, v, *ids):
      kw = dict(q_segment_ids=ids[0], kv_segment_ids=ids[1]) if ids else {}
      return mgpu_forward(q, k, v, spec, T=T, S=S, q_offset=S - T, tiles=tiles, **kw)
    return _launch_grid(f, *args)
  base = pallas_mgpu.default_mgpu_tiles(spec)
  assert grid(base) == (1, nq, Hq)   # launch dims (x, y, z) = the grid (h, qt, b) reversed
  assert grid(dataclasses.replace(base, persistent=True, programs=5)) == (5, 1, 1)
  assert grid(dataclasses.replace(base, persistent=True)) == (min(pallas_mgpu.num_sms(), Hq * nq), 1, 1)

  # the dQ kernel, its twin (the dK/dV kernel stays one program per key tile)
  dq_args = [*args[:3], sd((1, T, Hq, 128), jnp.bfloat16), sd((1, Hq, T), jnp.float32), sd((1, Hq, T), jnp.float32),
             *args[3:]]

  def dq_grid(tiles):
    def f(q, k, v, do, lse, delta, *ids):
      kw = dict(q_segment_ids=ids[0], kv_segment_ids=ids[1]) if ids else {}
      return mbwd.mgpu_backward(q, k, v, do, lse, delta, spec, S=S, T=T, q_offset=S - T, tiles=tiles,
                                kernels=frozenset({"dq"}), **kw)[0]
    return _launch_grid(f, *dq_args)
  assert dq_grid(mbwd.MgpuBwdTiles()) == (1, nq, Hq)
  assert dq_grid(mbwd.MgpuBwdTiles(persistent_dq=True, programs=5)) == (5, 1, 1)


def test_supported_only_on_hopper_bf16_d128(monkeypatch):
  on = pallas_mgpu.is_hopper()
  monkeypatch.delenv(pallas_mgpu.SEGMENTS_ENV, raising=False)
  assert pallas_mgpu.supported(jnp.bfloat16, 128, False) == on
  assert not pallas_mgpu.supported(jnp.float32, 128, False)
  assert not pallas_mgpu.supported(jnp.bfloat16, 64, False)
  # segment ids: by default the kinds in SEGMENT_KINDS (all three: GPU-tested and measured faster), all
  # with 1, none with 0
  assert pallas_mgpu.SEGMENT_KINDS == {"full", "sink_window", "block_sparse"}
  full, sparse = AttentionSpec.full(), AttentionSpec.sink_window(64, 1984)
  for spec in (full, sparse, AttentionSpec.block_sparse(64, 16, 64)):
    assert pallas_mgpu.supported(jnp.bfloat16, 128, True, spec=spec) == (on and spec.kind in pallas_mgpu.SEGMENT_KINDS)
  monkeypatch.setattr(pallas_mgpu, "SEGMENT_KINDS", frozenset({"full"}))
  assert not pallas_mgpu.supported(jnp.bfloat16, 128, True)          # no pattern given: not measured
  assert pallas_mgpu.supported(jnp.bfloat16, 128, True, spec=full) == on
  assert not pallas_mgpu.supported(jnp.bfloat16, 128, True, spec=sparse)
  assert pallas_mgpu.supported(jnp.bfloat16, 128, False, spec=sparse) == on
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, "1")
  assert pallas_mgpu.supported(jnp.bfloat16, 128, True, spec=sparse) == on
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, "0")
  assert not pallas_mgpu.supported(jnp.bfloat16, 128, True, spec=full)
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, " ")   # set but empty: the default (auto), not off
  assert pallas_mgpu.supported(jnp.bfloat16, 128, True, spec=full) == on


def test_segment_lists_drop_other_documents_and_unmask_one_document_tiles(monkeypatch):
  """Per batch row: entries the pattern fills whose tiles lie in one document first (unmasked), then
  the rest that share a document, the others dropped; a tile holding padding is never unmasked."""
  spec, T = AttentionSpec.full(), 700
  ids = np.repeat([[1, 2, 3]], [256, 192, 252], axis=1)               # tile-aligned, then a ragged end
  other = np.repeat([[3, 1, 2]], [128, 512, 60], axis=1)               # row 1: other boundaries, ids unordered
  both = jnp.asarray(np.concatenate([ids, other]))
  qseg, kseg = pad_segment_ids(both, both, 768, 768)
  table = kv_table(spec, 768, T, 1, 64)                                  # [1, 6, 2 + 12], 128 x 64 tiles
  lists = np.asarray(segment_skip.segment_lists(table, qseg, kseg, 128, 64, T, T))
  assert lists.shape == (2,) + table.shape
  q_ids, k_ids = np.asarray(qseg), np.asarray(kseg)
  for b in range(2):
    for qt in range(table.shape[1]):
      count, n_full, entries = lists[b, 0, qt, 0], lists[b, 0, qt, 1], lists[b, 0, qt, 2:]
      static = set(table[0, qt, 2:2 + table[0, qt, 0]].tolist())
      static_full = set(table[0, qt, 2:2 + table[0, qt, 1]].tolist())
      rows = q_ids[b, qt * 128:(qt + 1) * 128]
      want_full, want_rest = [], []
      for kt in sorted(static):
        keys = k_ids[b, kt * 64:(kt + 1) * 64]
        shares = np.isin(rows[rows >= 0], keys[keys >= 0]).any() if qt * 128 < T and kt * 64 < T else False
        one_doc = len(set(rows.tolist()) | set(keys.tolist())) == 1
        if kt in static_full and one_doc:
          want_full.append(kt)
        elif shares:
          want_rest.append(kt)
      got = entries[:count].tolist()
      assert n_full == len(want_full) and sorted(got[:n_full]) == want_full, (b, qt)
      assert sorted(got[n_full:]) == want_rest, (b, qt)
  assert lists[0, 0, 1, 1] == 2 and lists[0, 0, 5, 0] < table[0, 5, 0]   # unmasked tiles; dropped tiles
  monkeypatch.setattr(segment_skip, "ENABLED", False)                     # nothing dropped, same unmasked
  kept = np.asarray(segment_skip.segment_lists(table, qseg, kseg, 128, 64, T, T))
  np.testing.assert_array_equal(kept[..., 0], np.broadcast_to(table[..., 0], kept.shape[:-1]))
  np.testing.assert_array_equal(kept[..., 1], lists[..., 1])


@pytest.mark.parametrize("spec,T,S,Hkv", [(AttentionSpec.full(), 384, 384, 1),
                                          (AttentionSpec.sink_window(64, 200), 300, 812, 2)])
def test_forward_with_segments_lowers_to_mosaic_gpu_on_cpu(spec, T, S, Hkv):
  sd = jax.ShapeDtypeStruct
  args = (sd((1, T, 4, 128), jnp.bfloat16), sd((1, S, Hkv, 128), jnp.bfloat16), sd((1, S, Hkv, 128), jnp.bfloat16),
          sd((1, T), jnp.int32), sd((1, S), jnp.int32))
  f = lambda q, k, v, qs, ks: mgpu_forward(q, k, v, spec, T=T, S=S, q_offset=S - T, q_segment_ids=qs,
                                           kv_segment_ids=ks)
  try:
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except ImportError as e:   # a jaxlib without the Mosaic GPU bindings
    pytest.skip(f"Mosaic GPU lowering unavailable: {e}")
  assert text.count("custom_call @mosaic_gpu") == 1


def _inputs(B, T, S, Hq, Hkv, seed=0, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (B, T, Hq, 128), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, Hkv, 128), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, Hkv, 128), jnp.float32).astype(dtype)
  return q, k, v


CASES = [  # spec, B, T, S, Hq, Hkv, q_offset, tiles
    (AttentionSpec.full(), 1, 1000, 1000, 4, 1, 0, MgpuTiles()),
    (AttentionSpec.sink_window(64, 200), 2, 777, 777, 4, 4, 0, MgpuTiles()),
    (AttentionSpec.sink_window(64, 200), 1, 777, 777, 4, 2, 0, MgpuTiles(64, 2)),
    (AttentionSpec.block_sparse(64, 4, 8), 1, 1100, 1100, 8, 2, 0, MgpuTiles()),
    (AttentionSpec.full(), 1, 300, 812, 4, 2, 512, MgpuTiles()),
    (AttentionSpec.full(), 1, 640, 640, 2, 1, 0, MgpuTiles(64, 3)),
    (AttentionSpec.sink_window(64, 1984), 1, 4096, 4096, 8, 1, 0, MgpuTiles()),
    # persistent programs: 1 and 3 walk many query tiles each (the ring runs on across lists; short
    # lists between long ones; empty ones: the test below), 0 = one per SM
    (AttentionSpec.full(), 1, 1000, 1000, 4, 1, 0, MgpuTiles(persistent=True, programs=1)),
    (AttentionSpec.full(), 2, 300, 812, 4, 2, 512, MgpuTiles(persistent=True, programs=3)),
    (AttentionSpec.sink_window(64, 200), 2, 777, 777, 4, 4, 0, MgpuTiles(persistent=True, programs=3)),
    (AttentionSpec.block_sparse(64, 4, 8), 1, 1100, 1100, 8, 2, 0, MgpuTiles(64, 2, persistent=True, programs=5)),
    (AttentionSpec.full(), 1, 640, 640, 2, 1, 0, MgpuTiles(64, 3, persistent=True, programs=2)),
    (AttentionSpec.sink_window(64, 1984), 1, 4096, 4096, 8, 1, 0, MgpuTiles(persistent=True)),
]


@gpu_only
@hopper_only
@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,q_offset,tiles", CASES)
def test_forward_matches_reference(spec, B, T, S, Hq, Hkv, q_offset, tiles):
  q, k, v = _inputs(B, T, S, Hq, Hkv, seed=T + Hkv)
  fwd = jax.jit(lambda q, k, v: mgpu_forward(q, k, v, spec, T=T, S=S, q_offset=q_offset, tiles=tiles))
  out, lse2 = fwd(q, k, v)
  ref, ref_lse = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), spec,
                                     q_offset=q_offset, return_lse=True)
  assert rel_err(out[:, :T], ref) < 5e-3
  assert rel_err(lse2[:, :, :T] * np.log(2), ref_lse) < 1e-5


def _packed_segments(B, T, S, q_offset, seed):
  """Document ids of packed rows: keys [B, S] in runs of random lengths, the queries' ids those of
  their positions (the queries are the last T keys when q_offset = S - T)."""
  rng = np.random.default_rng(seed)
  kseg = np.stack([np.repeat(np.arange(S), rng.integers(20, 400, S))[:S] for _ in range(B)]).astype(np.int32)
  return jnp.asarray(kseg[:, q_offset:q_offset + T]), jnp.asarray(kseg)


@gpu_only
@hopper_only
@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,q_offset", [
    (AttentionSpec.full(), 2, 1000, 1000, 4, 1, 0), (AttentionSpec.sink_window(64, 200), 1, 777, 777, 4, 2, 0),
    (AttentionSpec.block_sparse(64, 4, 8), 1, 1100, 1100, 8, 2, 0), (AttentionSpec.full(), 1, 300, 812, 4, 2, 512)])
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
def test_forward_with_segments_matches_reference(spec, B, T, S, Hq, Hkv, q_offset, persistent, monkeypatch):
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, "1")
  monkeypatch.setenv(pallas_mgpu.PERSISTENT_ENV, "1" if persistent else "0")   # pallas_attention below too
  tiles = dataclasses.replace(pallas_mgpu.default_mgpu_tiles(spec, persistent), programs=3)
  q, k, v = _inputs(B, T, S, Hq, Hkv, seed=T)
  qs, ks = _packed_segments(B, T, S, q_offset, seed=T)
  out, lse2 = jax.jit(lambda q, k, v, qs, ks: mgpu_forward(
      q, k, v, spec, T=T, S=S, q_offset=q_offset, tiles=tiles, q_segment_ids=qs, kv_segment_ids=ks))(q, k, v, qs, ks)
  ref, ref_lse = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), spec, q_offset=q_offset,
                                     q_segment_ids=qs, kv_segment_ids=ks, return_lse=True)
  assert rel_err(out[:, :T], ref) < 5e-3
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse2[:, :, :T])), finite)
  assert rel_err(jnp.where(finite, lse2[:, :, :T] * np.log(2), 0), jnp.where(finite, ref_lse, 0)) < 1e-5
  # and through pallas_attention (Mosaic forward, Triton backward): gradients with packed documents
  from longgen_jax.attention.pallas_gpu import pallas_attention
  do = jax.random.normal(jax.random.PRNGKey(3), q.shape, jnp.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)
  ours = lambda q, k, v: pallas_attention(q, k, v, spec, q_segment_ids=qs, kv_segment_ids=ks, q_offset=q_offset)
  theirs = lambda q, k, v: reference_attention(q, k, v, spec, q_segment_ids=qs, kv_segment_ids=ks,
                                               q_offset=q_offset)
  g = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
  ref_g = jax.jit(jax.grad(loss(theirs), (0, 1, 2)))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for a, b in zip(g, ref_g):
    assert rel_err(a, b) < 2e-2


@gpu_only
@hopper_only
@pytest.mark.parametrize("programs", [1, 3])
def test_persistent_forward_and_dq_with_empty_lists_between_others(programs):
  """Query tiles without a key (queries past S + 100) between ones with keys, on few persistent programs:
  the ring position does not move over an empty list, the two warpgroups' schedule stays paired."""
  spec, T, S = AttentionSpec.sink_window(0, 100), 640, 300
  q, k, v, do, dlse = attention_grad_inputs(1, T, S, 4, 1, 128, jnp.bfloat16, seed=programs)
  out, lse, (ref_dq, _, _) = _reference_grads(q, k, v, do, dlse, spec, 0)
  has_keys = np.isfinite(np.asarray(lse))                                     # [B, Hq, T]
  assert has_keys.any() and not has_keys.all()
  got, got_lse2 = jax.jit(lambda q, k, v: mgpu_forward(q, k, v, spec, T=T, S=S, tiles=MgpuTiles(
      persistent=True, programs=programs)))(q, k, v)
  np.testing.assert_array_equal(np.isfinite(np.asarray(got_lse2)), has_keys)
  rows = np.moveaxis(has_keys, 1, 2)[..., None]                               # [B, T, Hq, 1]
  assert np.all(np.where(rows, 0, np.asarray(got, np.float32)) == 0)
  assert rel_err(jnp.where(rows, got, 0), jnp.where(rows, out, 0)) < 5e-3
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  dq, _, _ = jax.jit(functools.partial(mbwd.mgpu_backward, spec=spec, S=S, kernels=frozenset({"dq"}), tiles=(
      mbwd.MgpuBwdTiles(persistent_dq=True, programs=programs))))(q, k, v, do, lse2, delta)
  assert np.isfinite(np.asarray(dq, np.float32)).all() and rel_err(dq, ref_dq) < 2e-2


@gpu_only
@hopper_only
def test_forward_empty_rows_are_zero():
  spec = AttentionSpec.sink_window(0, 100)   # queries 500.. see no key below 300
  q, k, v = _inputs(1, 256, 300, 2, 1)
  out, lse2 = mgpu_forward(q, k, v, spec, T=256, S=300, q_offset=500)
  assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.isneginf(np.asarray(lse2)))


@gpu_only
@hopper_only
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_pallas_gpu_routes_forward_and_grads(spec):
  from longgen_jax.attention.pallas_gpu import Tiles, pallas_attention
  T, Hq, Hkv = 700, 8, 2
  q, k, v = _inputs(1, T, T, Hq, Hkv, seed=7)
  do = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)

  def loss(q, k, v, tiles, impl):
    if impl == "ref":
      out, lse = reference_attention(q, k, v, spec, return_lse=True)
    else:
      out, lse = pallas_attention(q, k, v, spec, return_lse=True, tiles=tiles)
    return jnp.sum(out.astype(jnp.float32) * do) + jnp.sum(lse), (out, lse)

  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  (_, (ref, ref_lse)), ref_g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                                       static_argnums=(3, 4))(*f32, None, "ref")
  for tiles in (Tiles(), Tiles(forward="triton")):
    (_, (out, lse)), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                                 static_argnums=(3, 4))(q, k, v, tiles, "pallas")
    assert rel_err(out, ref) < 5e-3 and rel_err(lse, ref_lse) < 1e-4
    for a, b in zip(g, ref_g):
      assert rel_err(a, b) < 2e-2


# ============================================================================= backward (Mosaic GPU)
# Host side (tables, pairing, switch), a numpy walk of exactly the kernels' tile schedule, and the
# kernels lowered to Mosaic GPU modules for `cuda` run on CPU; the kernels themselves on a Hopper GPU.

BWD_SPECS = SPECS + [AttentionSpec.block_sparse(64, 2, 4, homo_head=True)]


@pytest.mark.parametrize("spec", BWD_SPECS, ids=str)
@pytest.mark.parametrize("Tp,S,Hkv,q_offset,extra", [(1024, 1000, 2, 0, 0), (384, 812, 4, 512, 3)])
def test_q_table_full_first_and_transposed(spec, Tp, S, Hkv, q_offset, extra):
  nk = -(-S // 64) + extra
  tab = mbwd.q_table(spec, Tp, S, Hkv, nk, q_offset)
  lay = block_layout(spec, Tp, S, Hkv, 64, 64, q_offset)
  mask = dense_mask(spec, Tp, nk * 64, Hkv, q_offset) & (np.arange(nk * 64) < S)[None, None, :]
  assert tab.dtype == np.int32 and tab.shape[:2] == (lay.q_index.shape[0], nk)
  for h in range(tab.shape[0]):
    for kt in range(nk):
      count, n_full, tiles = tab[h, kt, 0], tab[h, kt, 1], tab[h, kt, 2:2 + tab[h, kt, 0]]
      block = mask[h, :, kt * 64:(kt + 1) * 64].reshape(Tp // 64, 64, 64)
      want = set(np.nonzero(block.any((1, 2)))[0].tolist())
      assert set(tiles.tolist()) == want and len(tiles) == count            # exactly the visited tiles
      assert all(block[t].all() for t in tiles[:n_full])                      # full ones first, truly full
      assert all(not block[t].all() for t in tiles[n_full:])
      assert list(tiles[:n_full]) == sorted(tiles[:n_full])


@pytest.mark.parametrize("counts", [[5, 0, 9, 9, 1], [3, 3], [0], [7, 1, 4, 2, 8, 8]])
def test_unit_pairs_cover_every_key_tile_longest_first(counts):
  qtab = np.zeros((1, len(counts), 4), np.int32)
  qtab[0, :, 0] = counts
  qtab[0, :, 1] = np.array(counts) // 2
  pairs = mbwd.unit_pairs(qtab)
  assert pairs.shape == (1, -(-len(counts) // 2), 2, 3)
  flat = pairs[0].reshape(-1, 3)
  real = flat[flat[:, 0] >= 0]
  assert sorted(real[:, 0].tolist()) == list(range(len(counts)))             # each key tile once
  assert all(c == counts[kt] and f == counts[kt] // 2 for kt, c, f in real)
  assert list(flat[:len(counts), 1]) == sorted(counts, reverse=True)          # longest first
  assert (flat[len(counts):] == [-1, 0, 0]).all()                             # dummy: no tile, no steps


def test_switch_env_and_forced(monkeypatch):
  both, none = mbwd.KERNELS, frozenset()
  monkeypatch.delenv(mbwd.ENV, raising=False)   # unset: the measured per-kernel table
  assert mbwd.DEFAULT == "auto"
  assert [mbwd.mosaic_kernels(s) for s in SPECS] == [mbwd.FASTER_THAN_TRITON[s.kind] for s in SPECS]
  monkeypatch.setenv(mbwd.ENV, "1")
  assert mbwd.mosaic_kernels() == both
  with mbwd.forced(False):
    assert mbwd.mosaic_kernels() == none
  monkeypatch.setenv(mbwd.ENV, "0")
  with mbwd.forced(True):
    assert mbwd.mosaic_kernels() == both
  with mbwd.forced("dq"):
    assert mbwd.mosaic_kernels(AttentionSpec.full()) == {"dq"}
  assert mbwd.mosaic_kernels() == none
  with pytest.raises(ValueError, match="forced"):
    with mbwd.forced("dv"):
      pass
  monkeypatch.setenv(mbwd.ENV, "auto")   # per pattern and kernel, from the measured table
  assert [mbwd.mosaic_kernels(s) for s in SPECS] == [mbwd.FASTER_THAN_TRITON[s.kind] for s in SPECS]
  assert mbwd.mosaic_kernels(AttentionSpec.full()) == both
  assert mbwd.mosaic_kernels(AttentionSpec.block_sparse(64, 16, 64)) == {"dq"}
  assert mbwd.mosaic_kernels(AttentionSpec.sink_window(64, 1984)) == {"dq"}
  with mbwd.forced(True):
    assert mbwd.mosaic_kernels(AttentionSpec.block_sparse(64, 16, 64)) == both


def test_backward_supported(monkeypatch):
  on = pallas_mgpu.is_hopper()
  monkeypatch.delenv(pallas_mgpu.SEGMENTS_ENV, raising=False)
  for d in (64, 128):
    for dt in (jnp.bfloat16, jnp.float16):
      assert mbwd.supported(dt, d, False) == on
  assert not mbwd.supported(jnp.float32, 128, False)
  assert not mbwd.supported(jnp.bfloat16, 96, False)
  assert not mbwd.supported(jnp.bfloat16, 256, False)
  # segment ids: for the kinds in SEGMENT_KINDS (where the Mosaic forward takes them), else the Triton backward
  for spec in (AttentionSpec.full(), AttentionSpec.block_sparse(64, 16, 64)):
    assert mbwd.supported(jnp.bfloat16, 128, True, spec=spec) == (on and spec.kind in pallas_mgpu.SEGMENT_KINDS)
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, "1")
  assert mbwd.supported(jnp.bfloat16, 128, True, spec=AttentionSpec.block_sparse(64, 16, 64)) == on


def test_pallas_gpu_keeps_triton_backward_unless_switched(monkeypatch):
  from longgen_jax.attention import pallas_gpu
  q, k, v = _inputs(1, 200, 200, 4, 2)
  on = pallas_mgpu.is_hopper()
  monkeypatch.setenv(mbwd.ENV, "1")
  cfg = pallas_gpu._prepare(q, k, v, SPECS[0], None, None, 0, None, None, None, True)[0]
  assert not pallas_gpu._mgpu_backward(cfg, q)           # interpret mode: never
  cfg = dataclasses.replace(cfg, interpret=False)
  assert pallas_gpu._mgpu_backward(cfg, q) == (mbwd.KERNELS if on else frozenset())
  monkeypatch.setenv(mbwd.ENV, "0")
  assert not pallas_gpu._mgpu_backward(cfg, q)
  monkeypatch.setenv(mbwd.ENV, "auto")                   # full: both kernels measured faster
  assert pallas_gpu._mgpu_backward(cfg, q) == (mbwd.KERNELS if on else frozenset())
  sparse = pallas_gpu._prepare(q, k, v, AttentionSpec.block_sparse(64, 4, 8), None, None, 0, None, None, None,
                               True)[0]
  # block_sparse: only dQ (its Mosaic dK/dV measured slower than the Triton one)
  assert pallas_gpu._mgpu_backward(dataclasses.replace(sparse, interpret=False), q) == (
      {"dq"} if on else frozenset())


def _reference_grads(q, k, v, do, dlse, spec, q_offset, segments=None):
  """float32 reference: out, natural lse, and the vjp of (out, lse) at (do, dlse)."""
  seg = dict(q_segment_ids=segments[0], kv_segment_ids=segments[1]) if segments else {}
  f = lambda q, k, v: reference_attention(q, k, v, spec, q_offset=q_offset, return_lse=True, **seg)

  @jax.jit   # one compile, not one per op (op by op, GPU autotuning made this ~40 s a test)
  def out_lse_grads(q, k, v, do, dlse):
    (out, lse), vjp = jax.vjp(f, *(x.astype(jnp.float32) for x in (q, k, v)))
    return out, lse, vjp((do.astype(jnp.float32), dlse.astype(jnp.float32)))
  return out_lse_grads(q, k, v, do, dlse)


def _kernel_inputs(out, lse, do, dlse):
  """(lse2 with +inf on empty rows, delta) as pallas_gpu hands them to the backward."""
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32)) - dlse
  lse2 = lse * pallas_mgpu.LOG2E
  return jnp.where(lse2 == -jnp.inf, jnp.inf, lse2), delta


def _emulate_backward(q, k, v, do, lse2, delta, spec, S, q_offset, block_k_dq=64, segments=None, dkv_keys=64):
  """float64 numpy walk of the kernels' exact schedule: dQ over `kv_table` (128-row tiles split in
  two 64-row halves, full tiles unmasked), dK/dV over `unit_pairs` x `q_table` with the G heads
  inside (full query tiles unmasked). Wrong tables (a partial tile marked full, a missing tile, a
  key tile not covered) show up as a gradient error. segments: (q ids [B, T], kv ids [B, S]),
  padded and compared as the kernels do, the lists walked as the kernels rebuild them per batch row
  (`segment_skip.segment_lists`: other documents' tiles dropped, one-document full tiles unmasked).
  dkv_keys 128: the dK/dV programs of one 128-key tile, each warpgroup a 64-key half over the tile's
  one list."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  lse2, delta = np.asarray(lse2, np.float64), np.asarray(delta, np.float64)
  B, T, Hq, D = q.shape
  S_in, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  Tp = -(-T // 128) * 128
  Sp = -(-max(k.shape[1], S) // math.lcm(64, block_k_dq, dkv_keys)) * math.lcm(64, block_k_dq, dkv_keys)
  pad = lambda x, n, ax, val=0.0: np.concatenate(
      [x, np.full(x.shape[:ax] + (n - x.shape[ax],) + x.shape[ax + 1:], val)], ax)
  q, do, lse2, delta = pad(q, Tp, 1), pad(do, Tp, 1), pad(lse2, Tp, 2, np.inf), pad(delta, Tp, 2)
  k, v = pad(k, Sp, 1), pad(v, Sp, 1)
  has_seg = segments is not None
  if has_seg:
    qseg, kseg = (np.asarray(x, np.int32) for x in pad_segment_ids(*segments, Tp, Sp))
  scale = 1 / np.sqrt(D)
  c = scale * pallas_mgpu.LOG2E
  per_head = spec.head_dependent(Hkv)

  def mask(q0, nq, k0, nk, h, b):
    qp, kp = q_offset + q0 + np.arange(nq)[:, None], k0 + np.arange(nk)[None, :]
    ok = allowed(spec, qp, kp, h, Hkv) & (kp < S)
    return ok & (qseg[b, q0:q0 + nq, None] == kseg[b, None, k0:k0 + nk]) if has_seg else ok

  dq = np.zeros_like(q)
  bk = block_k_dq
  static = kv_table(spec, Tp, S, Hkv, bk, q_offset)
  tabs = (np.asarray(segment_skip.segment_lists(static, qseg, kseg, 128, bk, T, S)) if has_seg else
          np.broadcast_to(static, (B,) + static.shape))
  with np.errstate(invalid="ignore", over="ignore"):
    for b in range(B):
      for h in range(Hq):
        kvh = h // G
        hl = kvh if per_head else 0
        for qt in range(Tp // 128):
          count, n_full = tabs[b, hl, qt, 0], tabs[b, hl, qt, 1]
          for half in range(2):
            r = slice(qt * 128 + half * 64, qt * 128 + half * 64 + 64)
            for j in range(count):
              kt = tabs[b, hl, qt, 2 + j]
              ks = slice(kt * bk, kt * bk + bk)
              s = q[b, r, h] @ k[b, ks, kvh].T
              if j >= n_full:
                s = np.where(mask(r.start, 64, kt * bk, bk, kvh, b), s, -np.inf)
              p = np.exp2(s * c - lse2[b, h, r][:, None])
              ds = p * (do[b, r, h] @ v[b, ks, kvh].T - delta[b, h, r][:, None])
              dq[b, r, h] += ds @ k[b, ks, kvh]
    dq *= scale
    dk, dv = np.full_like(k, np.nan), np.full_like(v, np.nan)       # NaN: a tile nobody wrote
    qtab = mbwd.q_table(spec, Tp, S, Hkv, Sp // dkv_keys, q_offset, block_k=dkv_keys)
    shared = dkv_keys == 128
    units = mbwd.unit_singles(qtab) if shared else mbwd.unit_pairs(qtab)    # paired by the static lists
    qtabs = (np.asarray(segment_skip.segment_lists(qtab, kseg, qseg, dkv_keys, 64, S, T)) if has_seg else
             np.broadcast_to(qtab, (B,) + qtab.shape))
    for b in range(B):
      for kvh in range(Hkv):
        hp = kvh if per_head else 0
        for wg, (kt, count, n_full) in ((w, u) for program in units[hp] for w, u in enumerate(program)):
          if kt < 0:
            continue
          count, n_full = qtabs[b, hp, kt, 0], qtabs[b, hp, kt, 1]   # the kernel reads them per batch row
          k0 = kt * 128 + wg * 64 if shared else kt * 64
          ks = slice(k0, k0 + 64)
          dk_t, dv_t = np.zeros((64, D)), np.zeros((64, D))
          for it in range(count * G):
            j, g = divmod(it, G)
            qt, h = qtabs[b, hp, kt, 2 + j], kvh * G + g
            r = slice(qt * 64, qt * 64 + 64)
            sT = k[b, ks, kvh] @ q[b, r, h].T
            if j >= n_full:
              sT = np.where(mask(qt * 64, 64, k0, 64, kvh, b).T, sT, -np.inf)
            pT = np.exp2(sT * c - lse2[b, h, r][None, :])
            dv_t += pT @ do[b, r, h]
            dsT = pT * (v[b, ks, kvh] @ do[b, r, h].T - delta[b, h, r][None, :])
            dk_t += dsT @ q[b, r, h]
          dk[b, ks, kvh], dv[b, ks, kvh] = dk_t * scale, dv_t
  return dq[:, :T], dk[:, :S_in], dv[:, :S_in]


BWD_EMU_CASES = [  # spec, B, T, S, Hq, Hkv, D, q_offset
    (AttentionSpec.full(), 1, 300, 300, 4, 1, 64, 0),
    (AttentionSpec.sink_window(64, 200), 2, 333, 333, 4, 4, 64, 0),
    (AttentionSpec.sink_window(64, 100), 1, 200, 700, 8, 1, 64, 500),   # offset, S > T, short window
    (AttentionSpec.block_sparse(64, 2, 4), 1, 520, 520, 8, 2, 64, 0),   # head-dependent strides
    (AttentionSpec.block_sparse(64, 2, 4, homo_head=True), 1, 450, 450, 4, 4, 64, 0),
    (AttentionSpec.full(), 1, 130, 400, 2, 2, 64, 270),                  # offset, edge tiles
]


@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,D,q_offset", BWD_EMU_CASES)
def test_kernel_schedule_matches_reference_on_cpu(spec, B, T, S, Hq, Hkv, D, q_offset):
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, jnp.float32, seed=T + S)
  out, lse, (rq, rk, rv) = _reference_grads(q, k, v, do, dlse, spec, q_offset)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  for bk in (64, 128):
    dq, dk, dv = _emulate_backward(q, k, v, do, lse2, delta, spec, S, q_offset, block_k_dq=bk)
    assert np.isfinite(dk).all() and np.isfinite(dv).all()
    assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5 and rel_err(dv, rv) < 1e-5


@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,D,q_offset", [BWD_EMU_CASES[i] for i in (0, 1, 2, 3, 5)])
def test_kernel_schedule_of_128_key_programs_matches_reference_on_cpu(spec, B, T, S, Hq, Hkv, D, q_offset):
  """dkv_keys=128: one list and one ring per 128-key tile, a 64-key half per warpgroup (edge tiles,
  offsets, head-dependent strides, GQA), with and without packed documents."""
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, jnp.float32, seed=T + S + 2)
  for segments in (None, _packed_segments(B, T, S, q_offset, seed=S)):
    out, lse, (rq, rk, rv) = _reference_grads(q, k, v, do, dlse, spec, q_offset, segments)
    lse2, delta = _kernel_inputs(out, lse, do, dlse)
    dq, dk, dv = _emulate_backward(q, k, v, do, lse2, delta, spec, S, q_offset, segments=segments, dkv_keys=128)
    assert np.isfinite(dk).all() and np.isfinite(dv).all()
    assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5 and rel_err(dv, rv) < 1e-5


def test_128_key_programs_with_an_odd_multiple_dq_tile_on_cpu():
  """block_k_dq 192 beside 128-key dK/dV programs: keys pad to a common multiple (384), not the larger."""
  spec, T = AttentionSpec.full(), 570
  q, k, v, do, dlse = attention_grad_inputs(1, T, T, 2, 1, 64, jnp.float32, seed=7)
  out, lse, (rq, rk, rv) = _reference_grads(q, k, v, do, dlse, spec, 0)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  dq, dk, dv = _emulate_backward(q, k, v, do, lse2, delta, spec, T, 0, block_k_dq=192, dkv_keys=128)
  assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5 and rel_err(dv, rv) < 1e-5
  sd = jax.ShapeDtypeStruct
  args = (sd((1, T, 2, 64), jnp.bfloat16),) + (sd((1, T, 1, 64), jnp.bfloat16),) * 2 + (
      sd((1, T, 2, 64), jnp.bfloat16), sd((1, 2, T), jnp.float32), sd((1, 2, T), jnp.float32))
  f = functools.partial(mbwd.mgpu_backward, spec=spec, S=T, tiles=mbwd.MgpuBwdTiles(block_k_dq=192, dkv_keys=128))
  try:
    jax.jit(lambda *a: f(*a)).trace(*args).lower(lowering_platforms=("cuda",))
  except ImportError as e:
    pytest.skip(f"Mosaic GPU lowering unavailable: {e}")


def test_unit_singles_and_the_dkv_keys_switch(monkeypatch):
  qtab = mbwd.q_table(AttentionSpec.full(), 512, 512, 1, 4, block_k=128)
  units = mbwd.unit_singles(qtab)
  assert units.shape == (1, 4, 2, 3) and (units[:, :, 0] == units[:, :, 1]).all()
  assert units[0, :, 0, 0].tolist() == [0, 1, 2, 3] and units[0, :, 0, 1].tolist() == [8, 6, 4, 2]
  monkeypatch.delenv(mbwd.DKV_KEYS_ENV, raising=False)   # auto: per pattern kind, measured
  assert mbwd.default_tiles() == mbwd.MgpuBwdTiles()
  assert mbwd.default_tiles(AttentionSpec.full()).dkv_keys == 128
  assert mbwd.default_tiles(AttentionSpec.sink_window(64, 1984)).dkv_keys == 64
  assert mbwd.default_tiles(AttentionSpec.block_sparse(64, 16, 64)).dkv_keys == 64
  monkeypatch.setenv(mbwd.DKV_KEYS_ENV, "64")
  assert mbwd.default_tiles(AttentionSpec.full()).dkv_keys == 64
  monkeypatch.setenv(mbwd.DKV_KEYS_ENV, "")     # empty: auto
  assert mbwd.default_tiles(AttentionSpec.full()).dkv_keys == 128
  monkeypatch.setenv(mbwd.DKV_KEYS_ENV, "128")
  assert mbwd.default_tiles().dkv_keys == 128
  with mbwd.using_tiles(mbwd.MgpuBwdTiles(stages_dkv=3)):
    assert mbwd.default_tiles() == mbwd.MgpuBwdTiles(stages_dkv=3)
  monkeypatch.setenv(mbwd.DKV_KEYS_ENV, "96")
  with pytest.raises(ValueError, match="auto, 64 or 128"):
    mbwd.default_tiles()


@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,D,q_offset", [BWD_EMU_CASES[0], BWD_EMU_CASES[2], BWD_EMU_CASES[3]])
def test_kernel_schedule_with_segments_matches_reference_on_cpu(spec, B, T, S, Hq, Hkv, D, q_offset):
  """Packed documents: the per-batch lists (one-document full tiles unmasked, the others masked with
  ids compared; padding ids -1 / -2 match nothing)."""
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, jnp.float32, seed=T + S + 1)
  segments = _packed_segments(B, T, S, q_offset, seed=T)
  out, lse, (rq, rk, rv) = _reference_grads(q, k, v, do, dlse, spec, q_offset, segments)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  for bk in (64, 128):
    dq, dk, dv = _emulate_backward(q, k, v, do, lse2, delta, spec, S, q_offset, block_k_dq=bk, segments=segments)
    assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5 and rel_err(dv, rv) < 1e-5
  plain = _emulate_backward(q, k, v, do, lse2, delta, spec, S, q_offset)   # ids ignored: wrong
  assert rel_err(plain[0], rq) > 1e-3


@pytest.mark.parametrize("dkv_keys", [64, 128])
def test_kernel_schedule_runs_one_document_tiles_unmasked_on_cpu(dkv_keys):
  """Documents that fill whole tiles: their full tiles run in the unmasked loops (the lists say so),
  and the emulated schedule still matches the reference, GQA 2, edge tiles at the end."""
  spec, B, T, S, Hq, Hkv, D = AttentionSpec.full(), 2, 700, 700, 4, 2, 64
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, jnp.float32, seed=13)
  ids = np.repeat([[1, 2, 3]], [256, 256, 188], axis=1)
  segments = (jnp.asarray(np.concatenate([ids, np.repeat([[3, 1, 2]], [128, 512, 60], axis=1)])),) * 2
  out, lse, (rq, rk, rv) = _reference_grads(q, k, v, do, dlse, spec, 0, segments)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  dq, dk, dv = _emulate_backward(q, k, v, do, lse2, delta, spec, S, 0, segments=segments, dkv_keys=dkv_keys)
  assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5 and rel_err(dv, rv) < 1e-5
  qseg, kseg = pad_segment_ids(*segments, 768, 768)
  lists = np.asarray(segment_skip.segment_lists(kv_table(spec, 768, S, Hkv, 64), qseg, kseg, 128, 64, T, S))
  qlists = np.asarray(segment_skip.segment_lists(mbwd.q_table(spec, 768, S, Hkv, 768 // dkv_keys, block_k=dkv_keys),
                                                 kseg, qseg, dkv_keys, 64, S, T))
  assert lists[..., 1].sum() > 0 and qlists[..., 1].sum() > 0
  assert (lists[0] != lists[1]).any() and (qlists[0] != qlists[1]).any()   # each batch row its own lists
  assert lists[0, 0, 1, 1] == 2                      # rows 128-255 (document 1): key tiles 0-1 unmasked


def test_kernel_schedule_skips_foreign_tiles_exactly_on_cpu(monkeypatch):
  """Dropping other documents' tiles from the Mosaic kernels' per-batch lists (key tiles of the dQ /
  forward lists, query tiles of the dK/dV lists) changes no bit of the emulated schedule, and drops
  something."""
  spec, B, T, S, Hq, Hkv, D = AttentionSpec.full(), 1, 700, 700, 4, 2, 64
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, jnp.float32, seed=11)
  segments = (jnp.asarray(np.repeat([[1, 2, 3]], [250, 200, 250], axis=1)),) * 2
  out, lse, (rq, rk, rv) = _reference_grads(q, k, v, do, dlse, spec, 0, segments)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  got = {}
  for on in (True, False):
    monkeypatch.setattr(segment_skip, "ENABLED", on)
    got[on] = _emulate_backward(q, k, v, do, lse2, delta, spec, S, 0, segments=segments)
  for a, b in zip(got[True], got[False]):
    np.testing.assert_array_equal(a, b)
  assert rel_err(got[True][0], rq) < 1e-5 and rel_err(got[True][1], rk) < 1e-5
  monkeypatch.setattr(segment_skip, "ENABLED", True)
  qseg, kseg = pad_segment_ids(*segments, 768, 768)
  tab = kv_table(spec, 768, S, Hkv, 64, 0)
  lists = np.asarray(segment_skip.segment_lists(tab, qseg, kseg, 128, 64, T, S))
  assert lists[0, 0, -1, 0] == tab[0, -1, 0] - 450 // 64      # the last query tile drops documents 1-2
  assert lists[0, 0, 0, 0] == tab[0, 0, 0]
  qtab = mbwd.q_table(spec, 768, S, Hkv, 768 // 64, 0)
  qlists = np.asarray(segment_skip.segment_lists(qtab, kseg, qseg, 64, 64, S, T))
  assert qlists[0, 0, 0, 0] == -(-250 // 64) < qtab[0, 0, 0]   # key tile 0: document 1's query tiles


def test_kernel_schedule_empty_rows_give_zero_grads_on_cpu():
  spec = AttentionSpec.sink_window(0, 100)      # rows 300..399 see keys 201..299; rows 400.. none
  q, k, v, do, dlse = attention_grad_inputs(1, 256, 300, 2, 1, 64, jnp.float32, seed=3)
  out, lse, (rq, rk, rv) = _reference_grads(q, k, v, do, dlse, spec, 300)
  assert np.isinf(np.asarray(lse)).any()
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  dq, dk, dv = _emulate_backward(q, k, v, do, lse2, delta, spec, 300, 300)
  assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
  assert np.all(dq[:, 100:] == 0)
  assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5 and rel_err(dv, rv) < 1e-5


LOWER_CASES = [  # spec, Hq, Hkv, D, dtype, T, S, q_offset, tiles
    (AttentionSpec.full(), 4, 1, 128, jnp.bfloat16, 300, 300, 0, mbwd.MgpuBwdTiles(stages_dq=3)),
    (AttentionSpec.sink_window(64, 200), 8, 1, 64, jnp.float16, 300, 812, 512, mbwd.MgpuBwdTiles()),
    (AttentionSpec.block_sparse(64, 4, 8), 16, 2, 128, jnp.bfloat16, 1100, 1100, 0,
     mbwd.MgpuBwdTiles(block_k_dq=128)),
    (AttentionSpec.block_sparse(64, 4, 8, homo_head=True), 4, 4, 64, jnp.bfloat16, 500, 500, 0,
     mbwd.MgpuBwdTiles(stages_dkv=3)),
    (AttentionSpec.full(), 8, 2, 128, jnp.bfloat16, 1000, 1000, 0, mbwd.MgpuBwdTiles(dkv_keys=128, stages_dkv=3)),
    (AttentionSpec.sink_window(64, 200), 4, 4, 128, jnp.float16, 300, 812, 512, mbwd.MgpuBwdTiles(dkv_keys=128)),
]


@pytest.mark.parametrize("segments", [False, True], ids=["", "segments"])
@pytest.mark.parametrize("spec,Hq,Hkv,D,dtype,T,S,q_offset,tiles", LOWER_CASES)
def test_backward_lowers_to_mosaic_gpu_on_cpu(spec, Hq, Hkv, D, dtype, T, S, q_offset, tiles, segments):
  """Traces and lowers both kernels for CUDA without a GPU: catches API misuse, wgmma shape and
  layout-inference errors and SMEM over-subscription (not ptxas, registers, or the run)."""
  sd = jax.ShapeDtypeStruct
  args = (sd((1, T, Hq, D), dtype), sd((1, S, Hkv, D), dtype), sd((1, S, Hkv, D), dtype),
          sd((1, T, Hq, D), dtype), sd((1, Hq, T), jnp.float32), sd((1, Hq, T), jnp.float32))
  f = functools.partial(mbwd.mgpu_backward, spec=spec, S=S, q_offset=q_offset, tiles=tiles)
  if segments:
    args += (sd((1, T), jnp.int32), sd((1, S), jnp.int32))
    f = lambda *a, f=f: f(*a[:6], q_segment_ids=a[6], kv_segment_ids=a[7])
  try:
    text = jax.jit(lambda *a: f(*a)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except ImportError as e:   # a jaxlib without the Mosaic GPU bindings
    pytest.skip(f"Mosaic GPU lowering unavailable: {e}")
  assert text.count("custom_call @mosaic_gpu") == 2


def test_backward_smem_overflow_is_caught_on_cpu():
  sd = jax.ShapeDtypeStruct
  args = (sd((1, 256, 2, 128), jnp.bfloat16),) + (sd((1, 256, 1, 128), jnp.bfloat16),) * 2 + (
      sd((1, 256, 2, 128), jnp.bfloat16), sd((1, 2, 256), jnp.float32), sd((1, 2, 256), jnp.float32))
  f = functools.partial(mbwd.mgpu_backward, spec=AttentionSpec.full(), S=256,
                        tiles=mbwd.MgpuBwdTiles(stages_dkv=4))
  with pytest.raises(ValueError, match="shared memory"):
    jax.jit(lambda *a: f(*a)).trace(*args).lower(lowering_platforms=("cuda",))


# ----------------------------------------------------------------------------- backward on the GPU

BWD_GPU_CASES = [  # spec, B, T, S, Hq, Hkv, D, q_offset, dtype
    (AttentionSpec.full(), 1, 1000, 1000, 4, 1, 128, 0, jnp.bfloat16),             # GQA 4, edge tile
    (AttentionSpec.full(), 2, 640, 640, 8, 8, 64, 0, jnp.float16),                 # MHA, D 64, fp16
    (AttentionSpec.sink_window(64, 200), 1, 777, 777, 8, 1, 128, 0, jnp.bfloat16),  # GQA 8
    (AttentionSpec.sink_window(64, 1984), 1, 4096, 4096, 8, 2, 128, 0, jnp.bfloat16),
    (AttentionSpec.sink_window(64, 200), 1, 300, 812, 4, 4, 64, 512, jnp.bfloat16),  # q_offset
    (AttentionSpec.block_sparse(64, 4, 8), 1, 1100, 1100, 8, 2, 128, 0, jnp.bfloat16),
    (AttentionSpec.block_sparse(64, 4, 8), 1, 1000, 1000, 8, 1, 64, 0, jnp.float16),
    (AttentionSpec.block_sparse(64, 2, 4, homo_head=True), 1, 700, 700, 4, 4, 128, 0, jnp.bfloat16),
    (AttentionSpec.full(), 1, 300, 812, 4, 2, 128, 512, jnp.bfloat16),
]


@gpu_only
@hopper_only
@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,D,q_offset,dtype", BWD_GPU_CASES)
def test_mgpu_backward_matches_reference(spec, B, T, S, Hq, Hkv, D, q_offset, dtype):
  """The kernels alone, fed the reference's out and lse: dq/dk/dv vs the float32 vjp (with dlse);
  64-key dK/dV programs on every pattern (128: the test below)."""
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, dtype, seed=T + Hkv + D)
  out, lse, ref = _reference_grads(q, k, v, do, dlse, spec, q_offset)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  run = jax.jit(functools.partial(mbwd.mgpu_backward, spec=spec, S=S, q_offset=q_offset,
                                  tiles=mbwd.MgpuBwdTiles(dkv_keys=64)))
  got = run(q, k, v, do, lse2, delta)
  for name, a, b in zip("dq dk dv".split(), got, ref):
    assert a.dtype == dtype and a.shape == b.shape
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert rel_err(a, b) < 2e-2, name
  again = run(q, k, v, do, lse2, delta)                 # deterministic: bit for bit
  for a, b in zip(got, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@gpu_only
@hopper_only
@pytest.mark.parametrize("programs", [1, 3, 0])
@pytest.mark.parametrize("segments", [False, True], ids=["", "segments"])
@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,D,q_offset,dtype", [BWD_GPU_CASES[i] for i in (0, 1, 2, 4, 5, 8)])
def test_mgpu_persistent_dq_matches_reference(spec, B, T, S, Hq, Hkv, D, q_offset, dtype, segments, programs,
                                              monkeypatch):
  """The dQ kernel's persistent programs (1 and 3: many query tiles each; 0: one per SM) vs the
  float32 vjp, with and without segment ids, and deterministic."""
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, "1")
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, dtype, seed=T + Hkv + D + programs)
  qs, ks = _packed_segments(B, T, S, q_offset, seed=T) if segments else (None, None)
  out, lse, (ref_dq, _, _) = _reference_grads(q, k, v, do, dlse, spec, q_offset, (qs, ks) if segments else None)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  run = jax.jit(functools.partial(mbwd.mgpu_backward, spec=spec, S=S, q_offset=q_offset, kernels=frozenset({"dq"}),
                                  tiles=mbwd.MgpuBwdTiles(persistent_dq=True, programs=programs)))
  dq, _, _ = run(q, k, v, do, lse2, delta, q_segment_ids=qs, kv_segment_ids=ks)
  assert dq.dtype == dtype and np.isfinite(np.asarray(dq, np.float32)).all()
  assert rel_err(dq, ref_dq) < 2e-2
  again, _, _ = run(q, k, v, do, lse2, delta, q_segment_ids=qs, kv_segment_ids=ks)
  np.testing.assert_array_equal(np.asarray(dq), np.asarray(again))


@gpu_only
@hopper_only
@pytest.mark.parametrize("segments", [False, True], ids=["", "segments"])
@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,D,q_offset,dtype", [BWD_GPU_CASES[i] for i in (0, 1, 3, 4, 5, 8)])
def test_mgpu_backward_128_key_programs_match_reference(spec, B, T, S, Hq, Hkv, D, q_offset, dtype, segments,
                                                        monkeypatch):
  """dkv_keys=128 (the full pattern's default): dq/dk/dv vs the float32 vjp, bit-for-bit repeatable; with packed documents
  (the segment paths switched on) too."""
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, "1")
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, dtype, seed=T + Hkv + D + 2)
  seg = _packed_segments(B, T, S, q_offset, seed=T) if segments else None
  out, lse, ref = _reference_grads(q, k, v, do, dlse, spec, q_offset, seg)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  ids = dict(q_segment_ids=seg[0], kv_segment_ids=seg[1]) if segments else {}
  run = jax.jit(functools.partial(mbwd.mgpu_backward, spec=spec, S=S, q_offset=q_offset,
                                  tiles=mbwd.MgpuBwdTiles(dkv_keys=128), **ids))
  got = run(q, k, v, do, lse2, delta)
  for name, a, b in zip("dq dk dv".split(), got, ref):
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert rel_err(a, b) < 2e-2, name
  for a, b in zip(got, run(q, k, v, do, lse2, delta)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@gpu_only
@hopper_only
@pytest.mark.parametrize("spec,B,T,S,Hq,Hkv,D,q_offset,dtype", [BWD_GPU_CASES[i] for i in (0, 1, 4, 5)])
def test_mgpu_backward_with_segments_matches_reference(spec, B, T, S, Hq, Hkv, D, q_offset, dtype):
  """Packed documents (segment ids), the kernels alone: dq/dk/dv vs the float32 vjp."""
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, dtype, seed=T + Hkv + D + 1)
  qs, ks = _packed_segments(B, T, S, q_offset, seed=T)
  out, lse, ref = _reference_grads(q, k, v, do, dlse, spec, q_offset, (qs, ks))
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  run = jax.jit(functools.partial(mbwd.mgpu_backward, spec=spec, S=S, q_offset=q_offset))
  got = run(q, k, v, do, lse2, delta, q_segment_ids=qs, kv_segment_ids=ks)
  for name, a, b in zip("dq dk dv".split(), got, ref):
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert rel_err(a, b) < 2e-2, name


@gpu_only
@hopper_only
@pytest.mark.parametrize("dkv_keys", [64, 128])
@pytest.mark.parametrize("spec", [AttentionSpec.full(), AttentionSpec.sink_window(64, 256)], ids=str)
def test_mgpu_segments_one_document_tiles_unmasked_match_reference(spec, dkv_keys, monkeypatch):
  """Long packed documents (tile-aligned and not; the two rows with different boundaries), so the per-batch lists
  put one-document full tiles in the unmasked loops (checked on the lists): forward out/lse and the
  backward kernels' dq/dk/dv vs the float32 reference, GQA 4, bf16."""
  monkeypatch.setenv(pallas_mgpu.SEGMENTS_ENV, "1")
  B, T, Hq, Hkv, D = 2, 1000, 8, 2, 128
  ids = np.repeat([[1, 2, 3]], [384, 256, 360], axis=1)
  qs = ks = jnp.asarray(np.concatenate([ids, np.repeat([[3, 1, 2]], [128, 512, 360], axis=1)]), jnp.int32)
  qseg, kseg = pad_segment_ids(qs, ks, 1024, 1024)
  lists = segment_skip.segment_lists(kv_table(spec, 1024, T, Hkv, 128), qseg, kseg, 128, 128, T, T)
  q_lists = segment_skip.segment_lists(mbwd.q_table(spec, 1024, T, Hkv, 1024 // dkv_keys, block_k=dkv_keys),
                                       kseg, qseg, dkv_keys, 64, T, T)
  for tab in (np.asarray(lists), np.asarray(q_lists)):   # unmasked tiles, and each batch row its own lists
    assert tab[..., 1].sum() > 0 and (tab[0] != tab[1]).any()
  q, k, v, do, dlse = attention_grad_inputs(B, T, T, Hq, Hkv, D, jnp.bfloat16, seed=21)
  out, lse, ref = _reference_grads(q, k, v, do, dlse, spec, 0, (qs, ks))
  got_out, got_lse2 = jax.jit(lambda q, k, v: mgpu_forward(q, k, v, spec, T=T, S=T, q_segment_ids=qs,
                                                           kv_segment_ids=ks))(q, k, v)
  assert rel_err(got_out[:, :T], out) < 5e-3
  assert rel_err(got_lse2[:, :, :T] * np.log(2), lse) < 1e-5
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  run = jax.jit(functools.partial(mbwd.mgpu_backward, spec=spec, S=T, tiles=mbwd.MgpuBwdTiles(dkv_keys=dkv_keys),
                                  q_segment_ids=qs, kv_segment_ids=ks))
  got = run(q, k, v, do, lse2, delta)
  for name, a, b in zip("dq dk dv".split(), got, ref):
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert rel_err(a, b) < 2e-2, name


@gpu_only
@hopper_only
def test_mgpu_backward_empty_rows_zero_and_finite():
  spec = AttentionSpec.sink_window(0, 100)   # rows 300..399 see keys 201..299, rows 400.. none
  q, k, v, do, dlse = attention_grad_inputs(1, 256, 300, 4, 2, 128, jnp.bfloat16, seed=5)
  out, lse, ref = _reference_grads(q, k, v, do, dlse, spec, 300)
  lse2, delta = _kernel_inputs(out, lse, do, dlse)
  dq, dk, dv = jax.jit(functools.partial(mbwd.mgpu_backward, spec=spec, S=300, q_offset=300))(
      q, k, v, do, lse2, delta)
  for a, b in zip((dq, dk, dv), ref):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    assert rel_err(a, b) < 2e-2
  assert np.all(np.asarray(dq[:, 100:], np.float32) == 0)


@gpu_only
@hopper_only
@pytest.mark.parametrize("spec", BWD_SPECS, ids=str)
@pytest.mark.parametrize("Hkv,D", [(8, 128), (2, 64), (1, 128)])
def test_pallas_attention_grads_through_mgpu_backward(spec, Hkv, D):
  """The switch end to end: jax.grad of pallas_attention (out and lse) vs the reference and vs the
  Triton backward, on fresh inputs (GQA 1/4/8)."""
  from longgen_jax.attention.pallas_gpu import pallas_attention
  T, Hq = 700, 8
  q, k, v, do, dlse = attention_grad_inputs(1, T, T, Hq, Hkv, D, jnp.bfloat16, seed=11 + Hkv + D)

  def loss(q, k, v):
    out, lse = pallas_attention(q, k, v, spec, return_lse=True)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(lse * dlse)

  _, _, ref = _reference_grads(q, k, v, do, dlse, spec, 0)
  grads = {}
  for on in (True, False, "dq", "dkv"):   # both Mosaic kernels, none, and each beside the other's Triton one
    with mbwd.forced(on):
      grads[on] = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  for on in (True, "dq", "dkv"):
    for a, t, r in zip(grads[on], grads[False], ref):
      assert rel_err(a, r) < 2e-2 and rel_err(a, t) < 2e-2, on


def test_backward_mixes_mosaic_and_triton_kernels_per_gradient(monkeypatch):
  """With only dQ routed to Mosaic GPU (auto's choice for sparse patterns), dq comes from it and dk/dv
  from the Triton dK/dV kernel (CPU: a stand-in for the Mosaic call, the Triton kernels interpreted)."""
  from longgen_jax.attention import pallas_gpu
  spec = AttentionSpec.sink_window(4, 60)
  q, k, v = _inputs(1, 200, 200, 4, 2)
  loss = lambda q, k, v: jnp.sum(pallas_gpu.pallas_attention(q, k, v, spec, interpret=True).astype(jnp.float32))
  _, triton_dk, triton_dv = jax.grad(loss, (0, 1, 2))(q, k, v)
  with pytest.raises(ValueError, match="subset"):
    mbwd.mgpu_backward(q, k, v, q, jnp.zeros((1, 4, 200)), jnp.zeros((1, 4, 200)), spec, S=200, kernels={"dv"})
  calls = []

  def fake_mgpu_backward(q, k, v, *args, kernels, **kwargs):
    calls.append(kernels)
    return jnp.full_like(q, 7), None, None
  monkeypatch.setattr(pallas_gpu, "_mgpu_backward", lambda cfg, q: frozenset({"dq"}))
  monkeypatch.setattr(mbwd, "mgpu_backward", fake_mgpu_backward)
  dq, dk, dv = jax.grad(loss, (0, 1, 2))(q, k, v)
  assert calls == [frozenset({"dq"})]
  assert np.all(np.asarray(dq, np.float32) == 7)
  np.testing.assert_array_equal(np.asarray(dk), np.asarray(triton_dk))
  np.testing.assert_array_equal(np.asarray(dv), np.asarray(triton_dv))


@gpu_only
@hopper_only
@pytest.mark.parametrize("pattern,remat", [("full", "full"), ("full", "none"), ("sink_window(64,448)", "none")])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_train_step_runs_each_layer_forward_once(scan, pattern, remat):
  """remat="full" keeps each full layer's attention output ("none" every layer's), so the compiled gradient
  holds ONE Mosaic forward kernel per layer (per scan body when the layers are scanned) and none in the
  backward. Without the barrier in pallas_gpu's custom_vjp forward, XLA's dynamic-slice fusion cloned the
  forward into the write of the scan's stacked residuals: two forwards per scan body (seen on full layers
  with remat="full", where the 7B step at 128K lost 0.24 s per full layer; the scanned cases catch it)."""
  from flax import nnx
  from longgen_jax import Llama
  from longgen_jax.model.config import ModelConfig
  from tests.conftest import run_model
  cfg = ModelConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=128, layer_specs=(AttentionSpec.parse(pattern),) * 2)
  graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat=remat, scan_layers=scan))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (1, 1024)), jnp.int32)
  loss = lambda state: jnp.mean(run_model(nnx.merge(graphdef, state), tokens) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
  forwards = [line for line in hlo.splitlines()
              if 'custom_call_target="mosaic_gpu_v2"' in line and "longgen_flash_fwd_mgpu" in line]
  assert len(forwards) == (1 if scan else cfg.num_layers), forwards
