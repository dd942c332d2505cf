"""Flax NNX Llama whose layers each carry a LongGen AttentionSpec.

Weights follow Hugging Face's LlamaForCausalLM one to one (Linear kernels are the
transposed torch weights); RoPE uses the rotate-half convention, so conversion needs no
q/k permutation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longgen_jax.attention import AttentionSpec, attention
from longgen_jax.config import ModelConfig

_init = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * x32).astype(x.dtype)


def rope_cos_sin(positions_BT, head_dim: int, theta: float):
  """cos, sin [B, T, 1, head_dim] in float32 (Hugging Face layout: two halves repeated)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHD, cos, sin):
  half = x_BTHD.shape[-1] // 2
  x32 = x_BTHD.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_BTHD.dtype)


def _linear(n_in, n_out, rngs, dtype, param_dtype):
  return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_init, rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, spec: AttentionSpec, *, rngs, dtype, param_dtype,
               attn_impl: str):
    self.spec, self.attn_impl = spec, attn_impl
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.rope_theta = cfg.rope_theta
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = _linear(cfg.hidden_size, H * D, rngs, dtype, param_dtype)
    self.k_proj = _linear(cfg.hidden_size, K * D, rngs, dtype, param_dtype)
    self.v_proj = _linear(cfg.hidden_size, K * D, rngs, dtype, param_dtype)
    self.o_proj = _linear(H * D, cfg.hidden_size, rngs, dtype, param_dtype)

  def qkv(self, x_BTE, positions_BT):
    """Projected q [B,T,H,D], k and v [B,T,K,D]; q and k rotated at their absolute positions."""
    B, T, _ = x_BTE.shape
    q = self.q_proj(x_BTE).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x_BTE).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BTE).reshape(B, T, self.num_kv_heads, self.head_dim)
    cos, sin = rope_cos_sin(positions_BT, self.head_dim, self.rope_theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def out(self, attn_BTHD):
    B, T = attn_BTHD.shape[:2]
    return self.o_proj(attn_BTHD.reshape(B, T, self.num_heads * self.head_dim))

  def __call__(self, x_BTE, positions_BT, segment_ids=None):
    q, k, v = self.qkv(x_BTE, positions_BT)
    o = attention(q, k, v, self.spec, impl=self.attn_impl, segment_ids=segment_ids)
    return self.out(o)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
    self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, dtype, param_dtype)
    self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, dtype, param_dtype)
    self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, rngs, dtype, param_dtype)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, spec: AttentionSpec, *, rngs, dtype, param_dtype, attn_impl):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, spec, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                               attn_impl=attn_impl)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, positions, segment_ids=None):
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
    return x + self.mlp(self.post_attention_layernorm(x))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):
  """`model(tokens[B,T], positions=None, segment_ids=None) -> logits[B,T,V]` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attn_impl: str = "auto", remat: str = "none"):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    self.config, self.dtype, self.remat = cfg, dtype, remat
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, embedding_init=_init, rngs=rngs)
    self.layers = nnx.List([
        Block(cfg, spec, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl)
        for spec in cfg.layer_specs])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if cfg.tie_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, rngs,
                                                           dtype, param_dtype)

  def hidden_states(self, tokens_BT, positions_BT=None, segment_ids=None):
    """Final-norm hidden states [B, T, E] in the compute dtype."""
    if tokens_BT.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens_BT.shape}")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x = self.embed_tokens(tokens_BT)
    for block in self.layers:
      if self.remat == "none":
        x = block(x, positions_BT, segment_ids)
      else:
        x = nnx.remat(lambda blk, *a: blk(*a), policy=REMAT_POLICIES[self.remat])(
            block, x, positions_BT, segment_ids)
    return self.norm(x)

  def logits(self, hidden_BTE):
    if self.lm_head is None:
      out = self.embed_tokens.attend(hidden_BTE)
    else:
      out = self.lm_head(hidden_BTE)
    return out.astype(jnp.float32)

  def __call__(self, tokens_BT, positions=None, segment_ids=None):
    return self.logits(self.hidden_states(tokens_BT, positions, segment_ids))
