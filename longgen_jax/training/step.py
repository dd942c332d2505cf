"""The train step (gradient accumulation as a scan over micro-batches) and eval step, and `ShardedStep`:
both jitted for a mesh with the abstract state and batch they compile against.

`sharded_step` is the one description of a run's compiled step: the training loop compiles it, and the
benchmarks (compile time, TPU ahead-of-time memory) and tests compile the same thing to read memory,
FLOPs or HLO without allocating a weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from longgen_jax.model.config import ModelConfig
from longgen_jax.parallel.context import ContextStrategy
from longgen_jax.parallel.mesh import batch_sharding, replicated
from longgen_jax.training.loss import make_loss_fn
from longgen_jax.training.state import abstract_model, new_train_state, state_shardings

# The fields of a batch (each [micro-batches, sequences, T]) and their dtypes.
BATCH_DTYPES = {"inputs": np.dtype(np.int32), "targets": np.dtype(np.int32), "positions": np.dtype(np.int32),
                "segment_ids": np.dtype(np.int32), "loss_mask": np.dtype(np.float32)}


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


def compiled_memory(compiled) -> dict:
  """Per-device bytes from XLA's compiled memory analysis: arguments (weights, optimizer state, batch),
  temporaries, new outputs (outputs not aliased to donated arguments) and their total; and, apart from the
  device total, the host temporaries (what model.remat="offload" keeps in pinned host memory)."""
  m = compiled.memory_analysis()
  args, out, temp, alias, host = (getattr(m, f"{k}_size_in_bytes", 0) or 0
                                  for k in ("argument", "output", "temp", "alias", "host_temp"))
  return {"arguments": args, "temporaries": temp, "new_outputs": out - alias, "total": args + temp + out - alias,
          "host_temporaries": host}


@dataclasses.dataclass(frozen=True)
class ShardedStep:
  """The train and eval steps jitted for `mesh`, and the abstract arrays (shapes, dtypes, shardings) they
  compile against: `state` is also the target a checkpoint restores into."""

  mesh: Any
  graphdef: Any
  loss_fn: Callable
  train: Callable             # (state, batch) -> (state, metrics); the state is donated
  eval: Callable              # (params, batch) -> (loss sum, tokens)
  state: dict                 # {"step", "params", "opt_state"} as ShapeDtypeStructs with shardings
  batch: dict                 # BATCH_DTYPES fields [A, B, T] as ShapeDtypeStructs with the batch sharding
  state_shardings: dict
  batch_sharding: Any

  def compile_train(self):
    """The train step compiled for the abstract state and batch (under the mesh: attention per shard)."""
    with jax.set_mesh(self.mesh):
      return self.train.lower(self.state, self.batch).compile()

  def compile_eval(self):
    with jax.set_mesh(self.mesh):
      return self.eval.lower(self.state["params"], self.batch).compile()


def sharded_step(mc: ModelConfig, mcfg, optimizer: optax.GradientTransformation, schedule, mesh, *,
                 batch_shape: tuple[int, int, int], loss_chunk: int, segment_attention: bool,
                 context: ContextStrategy = ContextStrategy()) -> ShardedStep:
  """The steps of a model (config.model-like `mcfg`: dtypes, attn_impl, remat, scan_layers) on `mesh`;
  batch_shape = (micro-batches, sequences per micro-batch, T) with T already padded for the context axis."""
  graphdef, params = abstract_model(mc, mcfg, context)
  shapes = jax.eval_shape(lambda p: new_train_state(p, optimizer), params)
  state_sh, batch_sh = state_shardings(shapes, mesh), batch_sharding(mesh, leading_dims=1)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sh)
  batch = {k: jax.ShapeDtypeStruct(batch_shape, dt, sharding=batch_sh) for k, dt in BATCH_DTYPES.items()}
  loss_fn = make_loss_fn(graphdef, loss_chunk=loss_chunk, segment_attention=segment_attention,
                         context=mesh.shape["context"])
  train = jax.jit(make_train_step(loss_fn, optimizer, schedule), in_shardings=(state_sh, batch_sh),
                  out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)
  evaluate = jax.jit(make_eval_step(loss_fn), in_shardings=(state_sh["params"], batch_sh),
                     out_shardings=replicated(mesh))
  return ShardedStep(mesh, graphdef, loss_fn, train, evaluate, state, batch, state_sh, batch_sh)
