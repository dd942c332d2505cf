"""The jitted train step (gradient accumulation as a scan over micro-batches) and eval step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, schedule) -> Callable:
  """step(state, batch[A, b, T]) -> (state, metrics): token-weighted mean over all A micro-batches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params = state["params"]

    def micro(carry, mb):
      g_acc, l_acc, n_acc = carry
      (l, n), g = grad_fn(params, mb)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g)
      return (g_acc, l_acc + l, n_acc + n), None

    if jax.tree.leaves(batch)[0].shape[0] == 1:  # no accumulation: no extra fp32 gradient buffer
      (l, n), g = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
    else:
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (g, l, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
    n = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x, p: (x / n).astype(p.dtype), g, params)  # mean over counted tokens
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    metrics = {"loss": l / n, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "tokens": n}
    return new_state, metrics

  return step


def make_eval_step(loss_fn: Callable) -> Callable:
  def step(params, batch):
    def micro(carry, mb):
      l, n = loss_fn(params, mb)
      return (carry[0] + l, carry[1] + n), None
    (l, n), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
    return l, n
  return step
