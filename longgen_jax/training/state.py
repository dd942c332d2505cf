"""The train state {step, params, opt_state}: abstract shapes, shardings, fresh or pretrained init."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from longgen_jax.model.config import DTYPES, ModelConfig
from longgen_jax.model.llama import Llama, random_params
from longgen_jax.parallel import mesh as sharding
from longgen_jax.parallel.context import ContextStrategy


def abstract_model(mc: ModelConfig, mcfg, context: ContextStrategy = ContextStrategy()) -> tuple[Any, Any]:
  """(graphdef, abstract params) without allocating anything."""
  model = nnx.eval_shape(lambda: new_model(mc, mcfg, seed=0, context=context))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def new_model(mc: ModelConfig, mcfg, seed: int, context: ContextStrategy = ContextStrategy()) -> Llama:
  """A randomly initialised model as config.model (dtypes, attn_impl, remat, scan_layers) and the
  context-parallel strategy ask."""
  return Llama(mc, rngs=nnx.Rngs(seed), dtype=DTYPES[mcfg.compute_dtype],
               param_dtype=DTYPES[mcfg.param_dtype], attn_impl=mcfg.attn_impl, remat=mcfg.remat,
               scan_layers=mcfg.scan_layers, context=context)


def state_shardings(abstract_state, mesh):
  return {"step": sharding.replicated(mesh),
          "params": sharding.fsdp_shardings(abstract_state["params"], mesh),
          "opt_state": sharding.fsdp_shardings(abstract_state["opt_state"], mesh)}


def new_train_state(params, optimizer: optax.GradientTransformation) -> dict:
  """{"step": 0, "params", "opt_state"}: the pytree the train step updates and checkpoints hold."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def random_state(mc: ModelConfig, mcfg, optimizer, shardings, seed: int) -> dict:
  """A train state with random weights (`model.llama.random_params`), laid out by `shardings`."""
  params = random_params(mc, seed=seed, param_dtype=DTYPES[mcfg.param_dtype], shardings=shardings["params"])
  return jax.jit(lambda p: new_train_state(p, optimizer), out_shardings=shardings, donate_argnums=0)(params)


def init_state(cfg, mc: ModelConfig, optimizer, shardings) -> dict:
  """Fresh train state laid out by `shardings`: random init, or weights from cfg.init_from."""
  with_opt = lambda params: new_train_state(params, optimizer)
  if not cfg.init_from:
    return random_state(mc, cfg.model, optimizer, shardings, cfg.seed)
  from longgen_jax.weights import load_pretrained
  model = load_pretrained(cfg.init_from, dtype=DTYPES[cfg.model.compute_dtype],
                          param_dtype=DTYPES[cfg.model.param_dtype], attn_impl=cfg.model.attn_impl,
                          remat=cfg.model.remat, layer_specs=mc.layer_specs, rope_theta=mc.rope_theta,
                          max_seq_len=mc.max_seq_len)
  params = jax.device_put(nnx.to_pure_dict(nnx.state(model)), shardings["params"])
  del model
  return jax.jit(with_opt, out_shardings=shardings)(params)
