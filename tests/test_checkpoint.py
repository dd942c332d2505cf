"""Checkpointer: state + grain iterator round trip, keep-N, half-written saves ignored."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from longgen_jax.training.checkpoint import Checkpointer


def _state(x):
  params = {"layers": {"0": {"w": jnp.full((4, 3), x, jnp.float32)}}, "norm": jnp.ones((3,))}
  return {"step": jnp.int32(x), "params": params, "opt_state": optax.adamw(1e-3).init(params)}


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).to_iter_dataset().batch(4))


def test_roundtrip_with_iterator_and_keep_n(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=2)
  it = _iterator()
  for step in (1, 2, 3):
    next(it)
    ck.save(step, _state(step), it, {"step": step})
  expected_next = next(it)
  ck.wait()
  assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
  abstract = jax.eval_shape(lambda: _state(0))
  it2 = _iterator()
  state = Checkpointer(str(tmp_path)).restore(3, abstract, it2)
  np.testing.assert_array_equal(state["params"]["layers"]["0"]["w"], np.full((4, 3), 3.0))
  assert int(state["step"]) == 3
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  np.testing.assert_array_equal(next(it2), expected_next)
  assert ck.restore_config(3) == {"step": 3}
  ck.close()


def test_half_written_checkpoint_is_ignored(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=3)
  ck.save(5, _state(5), _iterator(), {})
  ck.wait()
  ck.close()
  # what a process killed mid-save leaves behind: a temporary directory for the next step
  os.makedirs(tmp_path / "10.orbax-checkpoint-tmp-1234" / "state")
  ck = Checkpointer(str(tmp_path))
  assert ck.latest_step() == 5
  state = ck.restore(5, jax.eval_shape(lambda: _state(0)), _iterator())
  assert int(state["step"]) == 5
  ck.close()
