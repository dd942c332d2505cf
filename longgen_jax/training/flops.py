"""Model FLOPs per trained token (only attended query-key pairs count) and device peaks for MFU."""

from __future__ import annotations

import jax

from longgen_jax.attention.spec import attended_keys_per_query
from longgen_jax.model.config import ModelConfig


def train_flops_per_token(mc: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (fwd + bwd = 3x fwd), counting only attended query-key pairs."""
  E, H, K, D, I = mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.intermediate_size
  matmul = mc.num_layers * (2 * E * (H * D + 2 * K * D) + 2 * H * D * E + 3 * 2 * E * I) + 2 * E * mc.vocab_size
  attn = sum(4 * H * D * attended_keys_per_query(s, seq_len, K) for s in mc.layer_specs)
  return 3.0 * (matmul + attn)


_PEAK_TFLOPS = (("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("b200", 2250.0), ("a100", 312.0),
                ("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0))


def peak_tflops(device=None) -> float | None:
  """Dense bf16 peak TFLOP/s of one device, from its kind; None when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  return next((v for k, v in _PEAK_TFLOPS if k in kind), None)
