"""`attention(q, k, v, spec, impl=...)`: one entry point, several implementations.

impl names: "reference" (dense masked XLA, ground truth), "xla_blockwise" (gathers listed
key tiles; any backend), "pallas" (block-sparse kernels on GPU/TPU), "auto" (pallas on
GPU/TPU, xla_blockwise on CPU). New kernels register with `register_impl`.
"""

from __future__ import annotations

from typing import Callable

import jax

from longgen_jax.attention.reference import reference_attention
from longgen_jax.attention.spec import AttentionSpec, BlockLayout, allowed, block_layout, dense_mask
from longgen_jax.attention.xla_blockwise import blockwise_attention

__all__ = ["AttentionSpec", "BlockLayout", "allowed", "attention", "block_layout", "dense_mask",
           "register_impl", "available_impls"]

# name -> (function, backends it runs on or None for any)
_IMPLS: dict[str, tuple[Callable, tuple[str, ...] | None]] = {
    "reference": (reference_attention, None),
    "xla_blockwise": (blockwise_attention, None),
}


def register_impl(name: str, fn: Callable, backends: tuple[str, ...] | None = None) -> None:
  """Adds an implementation with the signature of `reference_attention`."""
  _IMPLS[name] = (fn, backends)


def _load_kernels(backend: str) -> None:
  """Imports the kernel modules for this backend; they register themselves."""
  if backend == "gpu" and "pallas_gpu" not in _IMPLS:
    from longgen_jax.attention import pallas_gpu  # noqa: F401  (registers "pallas_gpu")
  if backend == "tpu" and "pallas_tpu" not in _IMPLS:
    from longgen_jax.attention import pallas_tpu  # noqa: F401  (registers "pallas_tpu")


def available_impls(backend: str | None = None) -> list[str]:
  backend = backend or jax.default_backend()
  try:
    _load_kernels(backend)
  except ImportError:
    pass
  return [n for n, (_, b) in _IMPLS.items() if b is None or backend in b]


def _resolve(impl: str, backend: str) -> Callable:
  if impl == "auto":
    impl = "pallas" if backend in ("gpu", "tpu") else "xla_blockwise"
  if impl == "pallas":
    if backend not in ("gpu", "tpu"):
      raise ValueError(f"impl='pallas' needs a GPU or TPU backend, but JAX's default backend is "
                       f"{backend!r}; use impl='xla_blockwise' or 'reference' on CPU")
    _load_kernels(backend)
    impl = f"pallas_{backend}"
    if impl not in _IMPLS:  # kernel module present but not registered: fall back clearly
      raise ValueError(f"no Pallas kernel is registered for backend {backend!r}")
  if impl not in _IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; available on {backend}: {available_impls(backend)}")
  fn, backends = _IMPLS[impl]
  if backends is not None and backend not in backends:
    raise ValueError(f"attention impl {impl!r} runs on {backends}, not on the {backend!r} backend")
  return fn


def attention(q, k, v, spec: AttentionSpec, *, impl: str = "auto", segment_ids=None,
              q_offset: int = 0, return_lse: bool = False):
  """Causal attention under a LongGen pattern.

  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv. Keys sit at absolute
  positions 0..S-1 and queries at q_offset..q_offset+T-1. segment_ids: int[B, T] when T == S,
  or a pair (q_segment_ids[B, T], kv_segment_ids[B, S]); pairs in different segments are
  masked. Rows with no allowed key return zeros. Softmax scale 1/sqrt(D), float32 accumulation.
  Returns out [B, T, Hq, D], and lse [B, Hq, T] (natural log, -inf for empty rows) if asked.
  """
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B,T,Hq,D] and k, v [B,S,Hkv,D]; got q {q.shape}, k {k.shape}, v {v.shape}")
  B, T, Hq, D = q.shape
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
  if Hq % k.shape[2]:
    raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({k.shape[2]})")
  if not isinstance(spec, AttentionSpec):
    raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, kv_seg = segment_ids
    else:
      if T != k.shape[1]:
        raise ValueError("a single segment_ids array needs T == S; pass (q_segment_ids, kv_segment_ids)")
      q_seg = kv_seg = segment_ids
    if q_seg.shape != (B, T) or kv_seg.shape != (B, k.shape[1]):
      raise ValueError(f"segment ids must be [B,T]={B, T} and [B,S]={B, k.shape[1]}; "
                       f"got {q_seg.shape} and {kv_seg.shape}")
  fn = _resolve(impl, jax.default_backend())
  return fn(q, k, v, spec, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=q_offset,
            return_lse=return_lse)
