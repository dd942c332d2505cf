import jax
import numpy as np
import pytest


def rel_err(x, ref) -> float:
  """Relative-norm error ||x - ref|| / ||ref|| in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm((x - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def run_model(model, tokens_BT, **kw):
  """Logits of whole sequences at positions 0..T-1."""
  from longgen_jax.model.llama import sequence_positions
  tokens_BT = jax.numpy.asarray(tokens_BT)
  return model(tokens_BT, sequence_positions(tokens_BT), **kw)


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


gpu_only = pytest.mark.skipif(not on_gpu(), reason="needs an NVIDIA GPU (run on the device machine)")


# float32 comparisons mean float32: GPUs would otherwise run float32 matmuls in TF32.
jax.config.update("jax_default_matmul_precision", "highest")
