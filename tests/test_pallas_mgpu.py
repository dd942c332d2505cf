"""Mosaic GPU forward: host-side tables and predicate on CPU; the kernel on a Hopper GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longgen_jax.attention import pallas_mgpu
from longgen_jax.attention.pallas_mgpu import MgpuTiles, kv_table, mgpu_forward
from longgen_jax.attention.reference import reference_attention
from longgen_jax.attention.spec import AttentionSpec, allowed, block_layout
from tests.conftest import gpu_only, rel_err

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


def test_supported_only_on_hopper_bf16_d128():
  on = pallas_mgpu.is_hopper()
  assert pallas_mgpu.supported(jnp.bfloat16, 128, False) == on
  assert not pallas_mgpu.supported(jnp.float32, 128, False)
  assert not pallas_mgpu.supported(jnp.bfloat16, 64, False)
  assert not pallas_mgpu.supported(jnp.bfloat16, 128, True)


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
  (_, (ref, ref_lse)), ref_g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(*f32, None, "ref")
  for tiles in (Tiles(), Tiles(forward="triton")):
    (_, (out, lse)), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                                 static_argnums=(3, 4))(q, k, v, tiles, "pallas")
    assert rel_err(out, ref) < 5e-3 and rel_err(lse, ref_lse) < 1e-4
    for a, b in zip(g, ref_g):
      assert rel_err(a, b) < 2e-2
