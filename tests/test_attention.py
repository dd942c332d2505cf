"""attention(): reference against an independent float64 loop; xla_blockwise against reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longgen_jax import AttentionSpec, attention
from longgen_jax.attention import SegmentIds
from longgen_jax.attention.spec import allowed

SPECS = [AttentionSpec.full(), AttentionSpec.sink_window(3, 9), AttentionSpec.block_sparse(8, 2, 3),
         AttentionSpec.block_sparse(4, 1, 4, homo_head=True)]


def float64_attention(q, k, v, spec, q_offset=0, seg_q=None, seg_k=None):
  """Independent float64 numpy version: softmax over allowed keys, zeros for empty rows."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  out = np.zeros((B, T, Hq, D))
  lse = np.full((B, Hq, T), -np.inf)
  for b in range(B):
    for h in range(Hq):
      kh = h // (Hq // Hkv)
      for t in range(T):
        i = q_offset + t
        keys = [j for j in range(S) if allowed(spec, i, j, kh, Hkv)
                and (seg_q is None or seg_q[b, t] == seg_k[b, j])]
        if not keys:
          continue
        s = k[b, keys, kh] @ q[b, t, h] / np.sqrt(D)
        p = np.exp(s - s.max())
        out[b, t, h] = p @ v[b, keys, kh] / p.sum()
        lse[b, h, t] = s.max() + np.log(p.sum())
  return out, lse


def _inputs(rng, B, T, S, Hq, Hkv, D=16, dtype=jnp.float32):
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return mk(B, T, Hq, D), mk(B, S, Hkv, D), mk(B, S, Hkv, D)


@pytest.mark.parametrize("impl", ["reference", "xla_blockwise"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_matches_float64_loop(impl, spec):
  rng = np.random.default_rng(0)
  seg_self = np.sort(rng.integers(0, 3, (2, 21)), axis=1)
  seg_k = np.sort(rng.integers(0, 2, (2, 30)), axis=1)
  seg_q = seg_k[:, 23:].copy()
  seg_q[1, 2] = 9  # a query whose document has no key: an empty row
  for (T, S, off, Hq, Hkv, seg_q_, seg_k_) in [(21, 21, 0, 4, 2, seg_self, seg_self),
                                               (7, 30, 23, 4, 1, seg_q, seg_k),
                                               (7, 30, 23, 8, 8, None, None)]:
    q, k, v = _inputs(rng, 2, T, S, Hq, Hkv)
    seg_ids = None if seg_q_ is None else SegmentIds(jnp.asarray(seg_q_), jnp.asarray(seg_k_))
    out, lse = attention(q, k, v, spec, impl=impl, q_offset=off, return_lse=True, segment_ids=seg_ids)
    ref_out, ref_lse = float64_attention(q, k, v, spec, off, seg_q_, seg_k_)
    assert rel_err(out, ref_out) < 1e-5
    assert np.array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(ref_lse), ref_lse, 0),
                               atol=1e-5)
    if seg_q_ is seg_q:
      assert np.all(np.asarray(out)[1, 2] == 0) and np.isneginf(np.asarray(lse)[1, :, 2]).all()


def _loss_and_grads(impl, spec, q, k, v, **kw):
  def loss(q, k, v):
    o, lse = attention(q, k, v, spec, impl=impl, return_lse=True, **kw)
    return jnp.sum(o * jnp.sin(o)) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (o, lse)
  (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, lse, grads


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("B,T,S,Hq,Hkv,off,with_seg", [
    (2, 37, 37, 4, 4, 0, False),   # MHA, T not a tile multiple
    (1, 64, 64, 8, 2, 0, False),   # GQA 4, T a tile multiple
    (1, 20, 53, 8, 1, 33, False),  # GQA 8, q_offset > 0, S > T
    (2, 40, 40, 4, 2, 0, True),    # segment ids
])
def test_blockwise_matches_reference_outputs_and_gradients(spec, B, T, S, Hq, Hkv, off, with_seg):
  rng = np.random.default_rng(hash((str(spec), T, S)) % 2**32)
  q, k, v = _inputs(rng, B, T, S, Hq, Hkv)
  kw = dict(q_offset=off)
  if with_seg:
    kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1))
  ref = _loss_and_grads("reference", spec, q, k, v, **kw)
  got = _loss_and_grads("xla_blockwise", spec, q, k, v, **kw)
  assert rel_err(got[0], ref[0]) < 1e-5
  np.testing.assert_allclose(got[1], ref[1], atol=1e-5)
  for g, r in zip(got[2], ref[2]):
    assert rel_err(g, r) < 1e-5


def test_bf16_inputs_accumulate_in_float32():
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, 1, 300, 300, 4, 2, D=32, dtype=jnp.bfloat16)
  spec = AttentionSpec.sink_window(4, 64)
  out = attention(q, k, v, spec, impl="xla_blockwise")
  assert out.dtype == jnp.bfloat16
  ref = attention(*(a.astype(jnp.float32) for a in (q, k, v)), spec, impl="reference")
  assert rel_err(out, ref) < 1e-2


def test_blockwise_memory_is_not_quadratic():
  T, spec = 4096, AttentionSpec.sink_window(16, 112)
  q = jax.ShapeDtypeStruct((1, T, 2, 32), jnp.float32)
  def peak(impl):
    f = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v, spec, impl=impl).sum(), argnums=(0, 1, 2)))
    return f.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
  dense = 2 * T * T * 4  # one float32 score matrix per head
  assert peak("xla_blockwise") < dense / 8 < peak("reference")


def test_dispatch_errors_are_clear():
  q = jnp.zeros((1, 8, 4, 16))
  k = jnp.zeros((1, 8, 3, 16))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attention(q, k, k, AttentionSpec.full())
  k = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    attention(q, k, k, AttentionSpec.full(), impl="flash")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
      attention(q, k, k, AttentionSpec.full(), impl="pallas")
  with pytest.raises(ValueError, match="segment ids must be"):
    attention(q, k, k, AttentionSpec.full(), segment_ids=SegmentIds(jnp.zeros((1, 7), jnp.int32), jnp.zeros((1, 7), jnp.int32)))
  with pytest.raises(TypeError, match="SegmentIds"):  # one typed form for separate ids
    attention(q, k, k, AttentionSpec.full(), segment_ids=(q[..., 0, 0], k[..., 0, 0]))


@pytest.mark.parametrize("impl", ["reference", "xla_blockwise"])
def test_empty_rows_have_finite_gradients(impl):
  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng, 1, 5, 12, 2, 1)
  seg_k = jnp.zeros((1, 12), jnp.int32)
  seg_q = jnp.asarray([[0, 1, 0, 1, 0]])  # queries 1 and 3 have no key in their segment
  _, lse, grads = _loss_and_grads(impl, AttentionSpec.sink_window(2, 4), q, k, v,
                                  q_offset=7, segment_ids=SegmentIds(seg_q, seg_k))
  assert np.isneginf(np.asarray(lse)[0, :, [1, 3]]).all()
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  assert np.all(np.asarray(grads[0])[0, [1, 3]] == 0)


def test_registry_choices():
  """One registry answers for training, prefill, evaluation and benchmarks (backends simulated)."""
  from longgen_jax.attention import registry
  full, sink = AttentionSpec.full(), AttentionSpec.sink_window(4, 28)
  seg = [registry.SEGMENT_IDS]
  assert registry.choose("auto", sink, backend="cpu") == "xla_blockwise"
  assert registry.choose("cudnn", full, backend="cpu") == "xla_blockwise"  # no cuDNN off GPU
  assert registry.choose("cudnn", full, backend="gpu") == "cudnn"
  assert registry.choose("cudnn", full, seg, backend="gpu") == "pallas_gpu"  # cuDNN has no segment ids
  assert registry.choose("cudnn", sink, backend="gpu") == "pallas_gpu"       # nor sinks
  assert registry.choose("pallas", sink, backend="tpu") == "pallas_tpu"
  assert registry.supports("cudnn", full, [registry.LSE], backend="gpu")
  assert not registry.supports("cudnn", full, [registry.Q_OFFSET], backend="gpu")
  assert "pallas_gpu" not in registry.available_impls("cpu")
  with pytest.raises(ValueError, match="does not run on the 'cpu' backend"):
    registry.choose("pallas_gpu", full, backend="cpu")
  with pytest.raises(ValueError, match="unknown attention features"):
    registry.choose("auto", full, ["sliding"], backend="cpu")


def test_bad_call_arguments_are_clear():
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(TypeError, match="floating-point"):
    attention(q.astype(jnp.int32), q.astype(jnp.int32), q.astype(jnp.int32), AttentionSpec.full())
  for off, exc in [(-5, ValueError), (2.5, TypeError)]:
    for impl in ("reference", "xla_blockwise"):
      with pytest.raises(exc, match="q_offset"):
        attention(q, q, q, AttentionSpec.full(), impl=impl, q_offset=off)
  with pytest.raises(ValueError, match="at least one query"):
    attention(q[:, :0], q, q, AttentionSpec.full())
