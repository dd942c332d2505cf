"""The NNX Llama: patterns, remat, tied head, packing with segment ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err, run_model, saved_residuals
from longgen_jax import AttentionSpec, Llama, preset


def _model(cfg, **kw):
  return Llama(cfg, rngs=nnx.Rngs(0), **kw)


def _tokens(B, T, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def test_logits_shape_and_dtype():
  cfg = preset("tiny")
  logits = run_model(_model(cfg, dtype=jnp.bfloat16), _tokens(2, 33, cfg.vocab_size))
  assert logits.shape == (2, 33, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_sparse_layers_equal_full_layers_inside_the_window():
  cfg = preset("tiny")  # sink_window(4, 28) on the outer layers
  tokens = _tokens(1, 28, cfg.vocab_size)
  sparse, full = _model(cfg), _model(cfg.all_full())
  assert rel_err(run_model(sparse, tokens), run_model(full, tokens)) < 1e-6
  longer = _tokens(1, 60, cfg.vocab_size)
  assert rel_err(run_model(sparse, longer), run_model(full, longer)) > 1e-3  # beyond the window they must differ


def test_remat_changes_nothing_but_memory():
  cfg = preset("tiny")
  tokens = _tokens(2, 40, cfg.vocab_size)
  def loss_and_grad(remat):
    m = _model(cfg, remat=remat)
    return nnx.value_and_grad(lambda m: jnp.mean(run_model(m, tokens) ** 2))(m)
  (l0, g0), (l1, g1) = loss_and_grad("none"), loss_and_grad("full")
  assert abs(float(l0 - l1)) < 1e-6
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("scan", [False, True])
def test_offload_remat_moves_layer_inputs_to_host_and_changes_nothing_else(scan):
  """remat="offload" is "full" with the saved layer inputs in pinned host memory: the same loss and
  gradients, and the gradient's program sends them to the host (CPU runs the transfers as copies; on a
  TPU topology the compiled memory analysis counts them as host temporaries, benchmarks/scaling.py)."""
  cfg = preset("tiny", num_layers=4)
  tokens = _tokens(2, 40, cfg.vocab_size)

  def loss_and_state(remat):  # a loss of the model's state, and that state
    graphdef, state = nnx.split(_model(cfg, remat=remat, scan_layers=scan))
    return (lambda state: jnp.mean(run_model(nnx.merge(graphdef, state), tokens) ** 2)), state

  (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(state) for loss, state in map(loss_and_state, ("full", "offload")))
  assert abs(float(l0 - l1)) <= 1e-6 * abs(float(l0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert rel_err(b, a) < 1e-6

  def host_residuals(remat):  # the residuals the backward keeps in host memory, as JAX describes them
    return [line for line in saved_residuals(*loss_and_state(remat)).splitlines() if "<host>" in line]

  hidden = f"2,40,{cfg.hidden_size}]"  # [B, T, E] per layer, or [layers, B, T, E] stacked by the scan
  offloaded = host_residuals("offload")
  assert offloaded and all(line.split(" ")[0].endswith(hidden) for line in offloaded), offloaded
  assert host_residuals("full") == []


def test_implementations_agree_inside_the_model():
  cfg = preset("tiny", sparse=AttentionSpec.block_sparse(4, 2, 3))
  tokens = _tokens(1, 50, cfg.vocab_size)
  ref = run_model(_model(cfg, attn_impl="reference"), tokens)
  assert rel_err(run_model(_model(cfg, attn_impl="xla_blockwise"), tokens), ref) < 1e-5


def test_packed_documents_do_not_see_each_other():
  cfg = preset("tiny")
  m = _model(cfg)
  a, b = _tokens(1, 10, cfg.vocab_size, 1), _tokens(1, 14, cfg.vocab_size, 2)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.asarray([[0] * 10 + [1] * 14])
  positions = jnp.asarray([list(range(10)) + list(range(14))])
  logits = m(packed, positions, segment_ids=segments)
  assert rel_err(logits[:, 10:], run_model(m, b)) < 1e-5
  assert rel_err(logits[:, :10], run_model(m, a)) < 1e-5


def test_tied_embeddings_have_no_head():
  cfg = preset("tiny", tie_embeddings=True)
  m = _model(cfg)
  assert m.lm_head is None
  tokens = _tokens(1, 5, cfg.vocab_size)
  hidden = m.hidden_states(tokens, jnp.arange(5)[None])
  np.testing.assert_allclose(m.logits(hidden), hidden @ m.embed_tokens.embedding[...].T, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
  cfg = preset("tiny")
  with pytest.raises(ValueError, match="tokens and positions must"):
    _model(cfg)(jnp.zeros((5,), jnp.int32), jnp.arange(5))
  with pytest.raises(ValueError, match="tokens and positions must"):
    _model(cfg)(jnp.zeros((1, 5), jnp.int32), jnp.arange(4)[None])
  with pytest.raises(ValueError, match="remat"):
    _model(cfg, remat="sometimes")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    preset("tiny", num_kv_heads=3)


@pytest.mark.parametrize("placement,remat", [("middle", "full"), ("interleaved", "dots")])
def test_scanned_layers_equal_unrolled_loss_and_gradients(placement, remat):
  """Runs of equal layers as one scan: the same function and the same gradients (float32)."""
  from longgen_jax.model.llama import layer_runs
  cfg = preset("tiny", num_layers=7).with_pattern(3, "sink_window(4,12)", placement)
  tokens = _tokens(2, 24, cfg.vocab_size)
  seg = jnp.asarray([[0] * 15 + [1] * 9, [0] * 24])
  pos = jnp.asarray([list(range(15)) + list(range(9)), list(range(24))])

  def loss_and_grad(scan):
    m = _model(cfg, remat=remat, scan_layers=scan)
    return nnx.value_and_grad(lambda m: jnp.mean(m(tokens, pos, segment_ids=seg) ** 2))(m)

  (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
  assert abs(float(l0 - l1)) <= 1e-6 * abs(float(l0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert rel_err(b, a) < 1e-5
  specs = cfg.layer_specs
  stand_in = {s: object() for s in specs}  # one attend per spec, as hidden_states builds them
  runs = layer_runs(specs, [stand_in[s] for s in specs])
  assert runs[0][0] == 0 and sum(b - a for a, b in runs) == 7 and all(len({specs[i] for i in range(a, b)}) == 1 for a, b in runs)
  if placement == "middle":
    assert [b - a for a, b in runs] == [2, 3, 2]  # sparse, full, sparse: three scans


def test_scan_keeps_the_per_layer_parameter_format():
  cfg = preset("tiny", num_layers=6)
  scanned, unrolled = _model(cfg, scan_layers=True), _model(cfg, scan_layers=False)
  a, b = nnx.to_pure_dict(nnx.state(scanned)), nnx.to_pure_dict(nnx.state(unrolled))
  assert jax.tree.structure(a) == jax.tree.structure(b) and sorted(a["layers"]) == list(range(6))
