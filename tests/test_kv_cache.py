"""KV caches: every allowed (query, key) pair is served exactly once from the stored slots,
rings wrap correctly, and allocated bytes equal kv_cache_bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longgen_jax.attention.decode import slot_mask
from longgen_jax.attention.spec import AttentionSpec, allowed
from longgen_jax.model.config import preset
from longgen_jax.model.kv_cache import CacheLayout, cache_layouts, init_cache, kv_cache_bytes

SPECS = [
    AttentionSpec.sink_window(3, 7),
    AttentionSpec.sink_window(0, 5),
    AttentionSpec.block_sparse(4, 2, 3),            # non-homo: heads see different strided blocks
    AttentionSpec.block_sparse(2, 3, 8),
    AttentionSpec.block_sparse(4, 2, 3, homo_head=True),
    AttentionSpec.full(),
]


def _served_pairs(layout, cache, last_B):
  """Per sequence: sorted list of (kv head, stored position) the query at last_B may use."""
  out = []
  q_pos = last_B[:, None]
  counts = [[] for _ in range(last_B.shape[0])]
  for sl in layout.view(cache, last_B):
    mask = np.asarray(slot_mask(layout.spec, q_pos, sl.pos, sl.ok, sl.only))[:, :, 0]  # [B,K|1,N]
    stored = np.asarray(sl.k[..., 0]).transpose(0, 2, 1)                             # [B,K,N]
    pos = np.broadcast_to(np.asarray(sl.pos), stored.shape)
    mask = np.broadcast_to(mask, stored.shape)
    for b in range(stored.shape[0]):
      h, n = np.nonzero(mask[b])
      assert np.array_equal(stored[b, h, n], pos[b, h, n]), "a slot holds another position than claimed"
      counts[b] += list(zip(h.tolist(), pos[b, h, n].astype(int).tolist()))
  for c in counts:
    out.append(sorted(c))
  return out


def _expected_pairs(spec, p, K):
  j = np.arange(p + 1)
  return sorted((h, int(x)) for h in range(K) for x in j[np.asarray(allowed(spec, p, j, h, K))])


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_allowed_pair_served_once_as_rings_wrap(spec):
  K, D, B, capacity = 4, 2, 2, 61
  layout = CacheLayout(spec, capacity, K, D)
  cache = init_cache([layout], B, jnp.float32)[0]
  write = jax.jit(layout.write)
  lengths = np.array([23, 9])
  # Prefill in chunks of 6 (padded tail positions must not be stored), then one token at a time.
  for c0 in range(0, 24, 6):
    pos = c0 + np.arange(6)
    val = np.broadcast_to(pos[None, :, None, None], (B, 6, K, D)).astype(np.float32)
    cache = write(cache, jnp.asarray(val), jnp.asarray(val), jnp.full((B,), c0), jnp.asarray(pos[None] < lengths[:, None]))
  cur = lengths.copy()
  for step in range(capacity - 24):
    val = np.broadcast_to(cur[:, None, None, None], (B, 1, K, D)).astype(np.float32)
    cache = write(cache, jnp.asarray(val), jnp.asarray(val), jnp.asarray(cur), jnp.ones((B, 1), bool))
    if step % 5 == 0 or step > capacity - 28:
      got = _served_pairs(layout, cache, jnp.asarray(cur))
      for b in range(B):
        assert got[b] == _expected_pairs(spec, int(cur[b]), K), (spec, int(cur[b]))
    cur = cur + 1


@pytest.mark.parametrize("kv_int8", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_allocated_bytes_equal_formula(dtype, kv_int8):
  specs = (AttentionSpec.sink_window(4, 28), AttentionSpec.full(), AttentionSpec.block_sparse(8, 2, 4),
           AttentionSpec.block_sparse(8, 2, 4, homo_head=True), AttentionSpec.sink_window(64, 1984))
  cfg = preset("tiny", num_layers=len(specs)).replace(layer_specs=specs)
  for context, batch in [(5, 1), (33, 3), (300, 2), (1000, 1)]:
    caches = init_cache(cache_layouts(cfg, context, kv_int8), batch, dtype)
    allocated = sum(x.nbytes for c in caches for x in c.values())
    report = kv_cache_bytes(cfg, context, batch, dtype=dtype, kv_int8=kv_int8)
    assert allocated == report["total"] == sum(report["by_kind"].values()) == sum(report["per_layer"])
    full = init_cache(cache_layouts(cfg.all_full(), context), batch, dtype)
    assert report["all_full"] == sum(x.nbytes for c in full for x in c.values())


def test_llama2_7b_longgen_saving_at_128k():
  cfg = preset("llama2_7b")
  r = kv_cache_bytes(cfg, 131072, 1)
  per_token_layer = 2 * 32 * 128 * 2  # k and v, 32 heads x 128 dims, bf16
  assert r["all_full"] == 32 * 131072 * per_token_layer  # 64 GiB
  assert r["by_kind"]["full"] == 12 * 131072 * per_token_layer
  assert r["by_kind"]["sink_window"] == 20 * 2048 * per_token_layer
  assert abs(r["saving"] - 0.6152) < 1e-3
  # Sparse layers do not grow with the context; block_sparse keeps only reachable strided blocks.
  assert kv_cache_bytes(cfg, 1 << 20, 1)["by_kind"]["sink_window"] == r["by_kind"]["sink_window"]
  bs = AttentionSpec.block_sparse(64, 16, 64)
  lay = CacheLayout(bs, 131072, 32, 128)
  assert lay.ring_len == 1024 and lay.strided_blocks == 32  # 2048 blocks: (2048 - 16) / 64 rounded up


def test_capacity_and_int8_errors():
  with pytest.raises(ValueError, match="capacity"):
    CacheLayout(AttentionSpec.full(), 0, 1, 2)
  assert CacheLayout(AttentionSpec.block_sparse(4, 2, 3), 5, 1, 2).ring_len == 5  # capped, not 8
  with pytest.raises(ValueError, match="full layers"):
    CacheLayout(AttentionSpec.sink_window(1, 2), 8, 1, 2, kv_int8=True)


def test_cached_attention_query_tiles_cover_any_length():
  from longgen_jax.attention.decode import CachePart, cached_attention
  rng = np.random.default_rng(7)
  B, T, Hq, K, D, N = 2, 37, 4, 2, 8, 50
  q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, N, K, D)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, N, K, D)), jnp.float32)
  mask = jnp.asarray(rng.random((B, K, T, N)) < 0.5).at[0, :, 3].set(False)  # one empty row
  whole = cached_attention(q, [CachePart(k, v, mask)], q_tile=64)
  tiled = cached_attention(q, [CachePart(k, v, mask)], q_tile=8)  # 37 = 4 x 8 + 5
  np.testing.assert_allclose(tiled, whole, atol=1e-6, rtol=0)
  assert np.all(np.asarray(tiled)[0, 3] == 0)


def test_kv_cache_bytes_rejects_degenerate_sizes():
  for kw in ({"batch": 0}, {"batch": -1}, {"context_len": 1.5}, {"context_len": 0}):
    args = {"context_len": 64, "batch": 1, **kw}
    with pytest.raises(ValueError, match="must be an int >= 1"):
      kv_cache_bytes(preset("tiny"), args["context_len"], args["batch"])


def test_describe_cache_says_larger_when_the_sparse_cache_is_larger():
  from longgen_jax.model.kv_cache import describe_cache
  cfg = preset("tiny", sparse=AttentionSpec.block_sparse(16, 3, 1))  # ring + every block strided, 70 = 4.4 blocks
  assert kv_cache_bytes(cfg, 70)["saving"] < 0
  text = describe_cache(cfg, 70)
  assert text.endswith("% larger)") and "-" not in text.split("(")[-1]
