"""Flax NNX Llama whose layers each carry a LongGen AttentionSpec: one forward pass for training,
prefill and decode.

Each block's attention core is injected: `attend(q, k, v) -> (out, aux)` receives the rotated
queries and keys and this chunk's values, and returns the attention output and anything the
caller wants back (a KV cache's new state when decoding; None when training). Training uses
`attention()` over the sequence itself; `inference` passes functions that write and read KV
caches. Under a mesh with a context axis the sequence attend is context-parallel attention
(parallel.context: ring / all-gather on the load-balanced layout). Positions are always explicit
(under that layout they are not contiguous).

Depth: consecutive layers with the same spec that receive the same attend function (a LongGen
model in training is three such runs: sparse, full, sparse) run as one `lax.scan` over their
stacked weights when `scan_layers` is on, so tracing, partitioning and kernel lowering happen
once per run instead of once per layer. The weights stay per layer (`layers.<i>`, the format
checkpoints, conversion and decoding use); the stack is a view built inside the traced
forward, with matrices cast to the compute dtype first, as the unrolled Linear layers do.

Weights follow Hugging Face's LlamaForCausalLM one to one (Linear kernels are the
transposed torch weights); RoPE uses the rotate-half convention, so conversion needs no
q/k permutation.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longgen_jax.attention import AttentionSpec, SegmentIds
from longgen_jax.model.config import LAYER_INPUT, REMAT_POLICIES, ModelConfig
from longgen_jax.parallel.context import ContextStrategy, context_attention
from longgen_jax.parallel.mesh import constrain_activation

# attend(q [B,T,H,D], k [B,T,K,D], v [B,T,K,D]) -> (out [B,T,H,D], aux)
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]

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

  def __init__(self, cfg: ModelConfig, spec: AttentionSpec, *, rngs, dtype, param_dtype):
    self.spec = spec
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.rope_theta = cfg.rope_theta
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = _linear(cfg.hidden_size, H * D, rngs, dtype, param_dtype)
    self.k_proj = _linear(cfg.hidden_size, K * D, rngs, dtype, param_dtype)
    self.v_proj = _linear(cfg.hidden_size, K * D, rngs, dtype, param_dtype)
    self.o_proj = _linear(H * D, cfg.hidden_size, rngs, dtype, param_dtype)

  def __call__(self, x_BTE, positions_BT, attend: Attend):
    B, T, _ = x_BTE.shape
    q = self.q_proj(x_BTE).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x_BTE).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BTE).reshape(B, T, self.num_kv_heads, self.head_dim)
    cos, sin = rope_cos_sin(positions_BT, self.head_dim, self.rope_theta)
    out_BTHD, aux = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    return self.o_proj(out_BTHD.reshape(B, T, self.num_heads * self.head_dim)), aux


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
    self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, dtype, param_dtype)
    self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, dtype, param_dtype)
    self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, rngs, dtype, param_dtype)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, spec: AttentionSpec, *, rngs, dtype, param_dtype):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, spec, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  @property
  def spec(self) -> AttentionSpec:
    return self.self_attn.spec

  def __call__(self, x_BTE, positions_BT, attend: Attend):
    """(x + attention + MLP, the attend function's aux)."""
    h, aux = self.self_attn(self.input_layernorm(x_BTE), positions_BT, attend)
    x_BTE = x_BTE + h
    return constrain_activation(x_BTE + self.mlp(self.post_attention_layernorm(x_BTE))), aux


def _ends(cfg: ModelConfig, rngs, dtype, param_dtype):
  """The modules around the layers: token embedding, final norm, LM head (None when tied)."""
  embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=_init, rngs=rngs)
  norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
  head = None if cfg.tie_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, rngs, dtype, param_dtype)
  return embed, norm, head


def random_params(cfg: ModelConfig, *, seed: int, param_dtype=jnp.float32, shardings=None) -> dict:
  """Random weights with the layout of `nnx.to_pure_dict(nnx.state(Llama(cfg, ...)))`, made piece by piece.

  One compiled initializer makes the embedding, norm and head, another every layer (all layers share it:
  a block's weights do not depend on its attention spec), so initialisation compiles in seconds at any
  depth; one jit over a whole 32-layer 7B model took minutes to compile on GPU. `shardings` (the same
  pytree, e.g. FSDP shardings) places each piece as it is made, so no device holds the whole model.
  Layer i draws from fold_in(key(seed), i), the rest from fold_in(key(seed), num_layers).
  """
  key = jax.random.key(seed)
  state = lambda module: nnx.to_pure_dict(nnx.state(module))

  def ends(k):
    modules = zip(("embed_tokens", "norm", "lm_head"), _ends(cfg, nnx.Rngs(k), param_dtype, param_dtype))
    return {name: state(m) for name, m in modules if m is not None}   # no lm_head when tied

  def block(k):
    return state(Block(cfg, cfg.layer_specs[0], rngs=nnx.Rngs(k), dtype=param_dtype, param_dtype=param_dtype))

  if shardings is None:
    ends_sharding, layer_sharding = None, None
  else:
    ends_sharding = {name: s for name, s in shardings.items() if name != "layers"}
    layer_sharding = shardings["layers"][0]
  params = jax.jit(ends, out_shardings=ends_sharding)(jax.random.fold_in(key, cfg.num_layers))
  make_block = jax.jit(block, out_shardings=layer_sharding)  # compiled once, called per layer
  params["layers"] = {i: make_block(jax.random.fold_in(key, i)) for i in range(cfg.num_layers)}
  return params


class Llama(nnx.Module):
  """`model(tokens[B,T], positions[B,T], segment_ids=None) -> logits[B,T,V]` (float32).

  attn_impl names the attention implementation of every layer (see attention.registry);
  remat the activation policy per block in training (model.config.REMAT_POLICIES);
  scan_layers runs layer runs as scans (see the module docstring), False unrolls every layer;
  context how layers exchange K/V when a mesh splits sequences (a run setting, not a weight).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attn_impl: str = "auto", remat: str = "none",
               scan_layers: bool = True, context: ContextStrategy = ContextStrategy()):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    self.config, self.dtype, self.attn_impl, self.remat = cfg, dtype, attn_impl, remat
    self.scan_layers, self.context = scan_layers, context
    self.embed_tokens, self.norm, self.lm_head = _ends(cfg, rngs, dtype, param_dtype)
    self.layers = nnx.List([Block(cfg, spec, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for spec in cfg.layer_specs])

  def sequence_attend(self, spec: AttentionSpec, segment_ids: SegmentIds | jax.Array | None = None) -> Attend:
    """Attention of a whole sequence over itself (training, scoring): `attention()` with attn_impl, or
    its context-parallel form when the surrounding mesh splits sequences."""
    def attend(q, k, v):
      return context_attention(q, k, v, spec, impl=self.attn_impl, segment_ids=segment_ids,
                               strategy=self.context), None
    return attend

  def forward(self, tokens_BT, positions_BT, attends: Sequence[Attend]):
    """(final-norm hidden states [B, T, E] in the compute dtype, each layer's attend aux)."""
    if tokens_BT.ndim != 2 or positions_BT.shape != tokens_BT.shape:
      raise ValueError(f"tokens and positions must both be [B, T], got {tokens_BT.shape} and "
                       f"{getattr(positions_BT, 'shape', None)}")
    if len(attends) != len(self.layers):
      raise ValueError(f"{len(attends)} attend functions for {len(self.layers)} layers")
    x = constrain_activation(self.embed_tokens(tokens_BT))
    policy = REMAT_POLICIES[self.remat]
    auxes = []
    for start, stop in layer_runs(self.config.layer_specs, attends):
      if self.scan_layers and stop - start > 1:
        x, run_auxes = _scan_blocks(self.layers[start:stop], x, positions_BT, attends[start], policy,
                                    self.dtype)
        auxes += run_auxes
        continue
      for block, attend in zip(self.layers[start:stop], attends[start:stop]):
        run = _call_with(attend)
        if self.remat != "none":
          run = nnx.remat(run, policy=policy)
        x, aux = run(block, x, positions_BT)
        auxes.append(aux)
    return self.norm(x), auxes

  def hidden_states(self, tokens_BT, positions_BT, segment_ids=None):
    """Final-norm hidden states [B, T, E] of whole sequences (training and scoring)."""
    attends, by_spec = [], {}
    for spec in self.config.layer_specs:  # one attend per spec: runs of equal specs can scan
      if spec not in by_spec:
        by_spec[spec] = self.sequence_attend(spec, segment_ids)
      attends.append(by_spec[spec])
    return self.forward(tokens_BT, positions_BT, attends)[0]

  def logits(self, hidden_BTE):
    if self.lm_head is None:
      out = self.embed_tokens.attend(hidden_BTE)
    else:
      out = self.lm_head(hidden_BTE)
    return out.astype(jnp.float32)

  def __call__(self, tokens_BT, positions_BT, segment_ids=None):
    return self.logits(self.hidden_states(tokens_BT, positions_BT, segment_ids))


def layer_runs(specs: Sequence[AttentionSpec], attends: Sequence[Attend]) -> list[tuple[int, int]]:
  """[start, stop) of the maximal runs of consecutive layers with equal specs and the same attend."""
  runs = []
  for i, (spec, attend) in enumerate(zip(specs, attends)):
    if runs and specs[runs[-1][0]] == spec and attends[runs[-1][0]] is attend:
      runs[-1] = (runs[-1][0], i + 1)
    else:
      runs.append((i, i + 1))
  return runs


def _scan_blocks(blocks: Sequence[Block], x_BTE, positions_BT, attend: Attend, policy, compute_dtype):
  """The blocks one after another as a scan over their stacked weights; returns (x, auxes)."""
  graphdef, _ = nnx.split(blocks[0])

  def stack(*leaves):  # Linear casts its kernel to the compute dtype anyway: stack the cast copy
    cast = [w.astype(compute_dtype) if w.ndim >= 2 and jnp.issubdtype(w.dtype, jnp.floating) else w
            for w in leaves]
    return jnp.stack(cast)

  weights = jax.tree.map(stack, *[nnx.state(b) for b in blocks])

  def body(x, layer_weights):
    return nnx.merge(graphdef, layer_weights)(checkpoint_name(x, LAYER_INPUT), positions_BT, attend)

  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  x_BTE, auxes = jax.lax.scan(body, x_BTE, weights)
  return x_BTE, [jax.tree.map(lambda a, j=j: a[j], auxes) for j in range(len(blocks))]


def _call_with(attend: Attend):
  """block, x, positions -> block(x, positions, attend): the unit remat (and scan) wraps."""
  def run(block, x_BTE, positions_BT):
    # every use of the input goes through its name, so a policy that offloads it keeps no device copy
    return block(checkpoint_name(x_BTE, LAYER_INPUT), positions_BT, attend)
  return run


def sequence_positions(tokens_BT):
  """Positions 0..T-1 for every row: for callers whose sequences start at position 0."""
  return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
