"""Splash-attention (TPU) path in interpret mode on CPU against reference_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib

from conftest import attention_grad_inputs, rel_err
from longgen_jax.attention import attention
from longgen_jax.attention import pallas_tpu as pt
from longgen_jax.attention.reference import reference_attention
from longgen_jax.attention.spec import AttentionSpec, allowed

FULL = AttentionSpec.full()
SINK = AttentionSpec.sink_window(8, 40)
BSPARSE = AttentionSpec.block_sparse(16, 2, 4)
BSPARSE_ODD = AttentionSpec.block_sparse(24, 1, 3)  # non power-of-two block and stride


# ----------------------------------------------------------------------------- host side


@pytest.mark.parametrize("spec", [FULL, SINK, BSPARSE, BSPARSE_ODD,
                                  AttentionSpec.block_sparse(16, 2, 4, homo_head=True)])
def test_pattern_mask_is_allowed(spec):
  """The in-kernel predicate (shifts for powers of two) equals spec.allowed."""
  q = np.arange(300)[:, None] + 37
  k = np.arange(330)[None, :]
  for h in range(3):
    fn = pt.PatternMask(spec, h, 3, kv_len=310)
    np.testing.assert_array_equal(fn(q, k), allowed(spec, q, k, h, 3) & (k < 310))


@pytest.mark.parametrize("spec,kv_head", [(FULL, 0), (SINK, 0), (BSPARSE, 1), (BSPARSE_ODD, 1)])
@pytest.mark.parametrize("q_len,kv_len,q_offset,blocks", [
    (512, 512, 0, (128, 128)), (512, 300, 0, (256, 128)), (256, 640, 300, (128, 256))])
def test_mask_info_matches_splash(spec, kv_head, q_len, kv_len, q_offset, blocks):
  """Our vectorised MaskInfo is exactly what splash's (quadratic) process_mask builds."""
  bq, bk = blocks
  kv_len_p = -(-kv_len // bk) * bk
  fn = pt.PatternMask(spec, kv_head, 2, kv_len if kv_len_p > kv_len else None)
  lazy = mask_lib.MultiHeadMask([pt.LongGenMask((q_len, kv_len_p), fn, q_offset)])
  for dkv, process in ((False, mask_info_lib.process_mask), (True, mask_info_lib.process_mask_dkv)):
    want, want_fn = process(lazy, (bq, bk))
    got = pt.mask_info(spec, q_len, kv_len, kv_len_p, 2, kv_head, bq, bk, q_offset, dkv=dkv)
    assert want_fn is fn and want.mask_next is None and want.partial_mask_blocks is None
    for name in ("block_mask", "data_next", "q_sequence"):
      a, b = getattr(got, name), getattr(want, name)
      assert a.dtype == b.dtype, name
      np.testing.assert_array_equal(a, b, err_msg=f"{name} dkv={dkv}")


def test_registered_for_tpu_only():
  q = jnp.zeros((1, 128, 2, 8))
  with pytest.raises(ValueError, match="tpu"):
    attention(q, q, q, FULL, impl="pallas_tpu")


def test_traced_q_offset_is_a_clear_error():
  q = jnp.zeros((1, 128, 1, 8))
  f = jax.jit(lambda off: pt.splash_attention(q, q, q, FULL, q_offset=off, interpret=True))
  with pytest.raises(ValueError, match="static"):
    f(3)


# ----------------------------------------------------------------------------- kernels


def _run(fn, q, k, v, do, dlse, spec, **kw):
  """Outputs and the vjp of (out, lse) under random cotangents (lse's included)."""
  (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, spec, return_lse=True, **kw), q, k, v)
  return out, lse, vjp((do, dlse))


def _check(spec, *, B=1, T, S=None, Hq, Hkv, D=32, dtype=jnp.float32, q_offset=0, segments=None,
           block_sizes=None, tol=None):
  S = T if S is None else S
  q, k, v, do, dlse = attention_grad_inputs(B, T, S, Hq, Hkv, D, dtype)
  kw = dict(q_offset=q_offset)
  if segments is not None:
    kw.update(q_segment_ids=segments[0], kv_segment_ids=segments[1])
  out, lse, grads = _run(lambda *a, **k: pt.splash_attention(*a, interpret=True,
                                                             block_sizes=block_sizes, **k),
                         q, k, v, do, dlse, spec, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  r_out, r_lse, r_grads = _run(reference_attention, f32(q), f32(k), f32(v), f32(do), dlse, spec, **kw)
  tol = tol or (2e-5 if dtype == jnp.float32 else 2e-2)
  assert out.dtype == dtype and out.shape == (B, T, Hq, D) and lse.shape == (B, Hq, T)
  assert not np.isnan(np.asarray(out, np.float32)).any()
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))  # same empty rows
  finite = np.isfinite(r_lse)
  assert rel_err(out, r_out) < tol
  assert rel_err(np.where(finite, lse, 0), np.where(finite, r_lse, 0)) < tol
  for name, g, r in zip("qkv", grads, r_grads):
    assert g.dtype == dtype
    assert rel_err(g, r) < 2 * tol, f"d{name}: {rel_err(g, r)}"
  return lse


# (spec, T, Hq, Hkv): GQA groups 1, 4 and 8; T a multiple of 128 and not.
CASES = [
    (FULL, 256, 2, 2), (FULL, 200, 4, 1),
    (SINK, 200, 2, 2), (SINK, 256, 8, 2), (SINK, 150, 8, 1),
    (BSPARSE, 200, 2, 2), (BSPARSE, 256, 8, 2), (BSPARSE_ODD, 200, 4, 2),
    (AttentionSpec.block_sparse(16, 1, 2), 200, 4, 4),  # kv heads {0,2} and {1,3} share a phase
]


@pytest.mark.parametrize("spec,T,Hq,Hkv", CASES, ids=lambda x: str(x))
def test_matches_reference(spec, T, Hq, Hkv):
  _check(spec, T=T, Hq=Hq, Hkv=Hkv)


@pytest.mark.parametrize("spec", [SINK, BSPARSE], ids=str)
def test_q_offset(spec):
  """Queries at absolute positions 160.. against 300 keys (a prefill chunk after a cache)."""
  _check(spec, T=140, S=300, q_offset=160, Hq=4, Hkv=2)


def test_queries_past_the_keys_are_empty_rows():
  """sink 0: queries more than `window` past the last key have no key: zeros and lse -inf.

  The second query tile (positions 328..455) has no key at all, so splash skips it entirely.
  """
  lse = _check(AttentionSpec.sink_window(0, 64), T=256, S=200, q_offset=200, Hq=2, Hkv=1)
  assert np.isneginf(lse[..., 64:]).all() and np.isfinite(lse[..., :63]).all()


@pytest.mark.parametrize("spec", [FULL, BSPARSE], ids=str)
def test_segment_ids_with_an_empty_row(spec):
  """Two packed documents per row; query 5 of batch 1 has a segment no key has."""
  T = 200
  seg = np.where(np.arange(T) < 70, 1, 2)[None].repeat(2, 0)
  q_seg = seg.copy()
  q_seg[1, 5] = 9
  lse = _check(spec, B=2, T=T, Hq=4, Hkv=2, segments=(jnp.asarray(q_seg), jnp.asarray(seg)))
  assert np.isneginf(lse[1, :, 5]).all()


def test_bf16():
  _check(SINK, T=200, Hq=4, Hkv=1, dtype=jnp.bfloat16)


def test_other_block_sizes():
  """Unequal q/kv tiles, padding to their lcm, separate dq/dkv tiles."""
  bs = sk.BlockSizes(block_q=256, block_kv=128, block_kv_compute=128, block_q_dkv=128,
                     block_kv_dkv=256, block_kv_dkv_compute=128, block_q_dq=256, block_kv_dq=128)
  _check(BSPARSE, T=300, Hq=4, Hkv=2, block_sizes=bs)
