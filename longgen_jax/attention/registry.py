"""The one list of attention implementations: names, where they run, what they support.

An implementation is a function with the signature of `reference_attention`:
  fn(q, k, v, spec, *, q_segment_ids, kv_segment_ids, q_offset, return_lse)
registered under a name with the backends it runs on and a `supports(spec, features)`
predicate. Kernel modules register themselves on import (they import this module, never the
package facade); `load_kernels(backend)` imports the ones for a backend on first use.

Names users pass (training config, `attention(impl=...)`, prefill, evaluation, benchmarks):
  auto           the fastest registered implementation that supports the call (`PREFERENCE`)
  pallas         our block-sparse kernel for this backend (pallas_gpu or pallas_tpu)
  reference      dense masked XLA: the ground truth (materialises T x S scores)
  xla_blockwise  gathers the listed key tiles; any backend, O(T x budget) memory
  cudnn          cuDNN's fused attention (jax.nn.dot_product_attention) for the calls it
                 supports on a GPU (full causal layers, no segment ids, no q_offset); every
                 other call (and every call off GPU) gets the auto choice, so a LongGen model
                 with impl "cudnn" runs its sparse layers on our kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax

from longgen_jax.attention.spec import AttentionSpec

# What a call needs beyond plain causal attention from position 0.
SEGMENT_IDS = "segment_ids"
Q_OFFSET = "q_offset"
LSE = "lse"
FEATURES = frozenset({SEGMENT_IDS, Q_OFFSET, LSE})

USER_NAMES = ("auto", "pallas", "reference", "xla_blockwise", "cudnn")
# auto: the first name here that is available and supports the call.
PREFERENCE = {"gpu": ("pallas_gpu", "xla_blockwise"), "tpu": ("pallas_tpu", "xla_blockwise"),
              "cpu": ("xla_blockwise",)}


@dataclasses.dataclass(frozen=True)
class Impl:
  name: str
  fn: Callable
  backends: tuple[str, ...] | None  # None: any backend
  supports: Callable[[AttentionSpec, frozenset[str]], bool]


def _everything(spec: AttentionSpec, features: frozenset[str]) -> bool:
  return True


_IMPLS: dict[str, Impl] = {}


def register_impl(name: str, fn: Callable, backends: tuple[str, ...] | None = None,
                  supports: Callable[[AttentionSpec, frozenset[str]], bool] = _everything) -> None:
  """Adds (or replaces) an implementation; `supports(spec, features)` says which calls it serves."""
  _IMPLS[name] = Impl(name, fn, backends, supports)


def load_kernels(backend: str) -> None:
  """Imports the kernel modules for this backend (they register themselves); idempotent."""
  import importlib
  for module in {"gpu": ("cudnn", "pallas_gpu"), "tpu": ("pallas_tpu",)}.get(backend, ()):
    try:
      importlib.import_module(f"longgen_jax.attention.{module}")
    except ImportError:  # a jaxlib without this backend's Pallas support: the XLA impls remain
      pass


def available_impls(backend: str | None = None) -> list[str]:
  """Registered implementation names that run on `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  load_kernels(backend)
  return [n for n, i in _IMPLS.items() if i.backends is None or backend in i.backends]


def call_features(*, segment_ids: bool = False, q_offset: bool = False, lse: bool = False) -> frozenset[str]:
  return frozenset(n for n, on in ((SEGMENT_IDS, segment_ids), (Q_OFFSET, q_offset), (LSE, lse)) if on)


def supports(impl: str, spec: AttentionSpec, features: Iterable[str] = (), backend: str | None = None) -> bool:
  """Whether implementation `impl` (a registered name or "pallas") serves this call on `backend`."""
  backend = backend or jax.default_backend()
  name = _concrete(impl, backend)
  return name in available_impls(backend) and _IMPLS[name].supports(spec, frozenset(features))


def choose(impl: str, spec: AttentionSpec, features: Iterable[str] = (), backend: str | None = None) -> str:
  """The registered name that runs this call: see the module docstring. Raises ValueError for a
  name that is unknown, not available on this backend, or (except cudnn) cannot serve the call."""
  backend = backend or jax.default_backend()
  features = frozenset(features)
  unknown = features - FEATURES
  if unknown:
    raise ValueError(f"unknown attention features {sorted(unknown)}; known: {sorted(FEATURES)}")
  have = available_impls(backend)
  if impl == "auto":
    for name in PREFERENCE.get(backend, ("xla_blockwise",)):
      if name in have and _IMPLS[name].supports(spec, features):
        return name
    return "reference"
  if impl == "pallas" and backend not in ("gpu", "tpu"):
    raise ValueError(f"impl='pallas' needs a GPU or TPU backend, but JAX's default backend is "
                     f"{backend!r}; use impl='xla_blockwise' or 'reference' on CPU")
  name = _concrete(impl, backend)
  if name == "cudnn" and (name not in have or not _IMPLS[name].supports(spec, features)):
    return choose("auto", spec, features, backend)
  if name not in _IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; choose from {list(USER_NAMES)} "
                     f"(registered on {backend}: {have})")
  if name not in have:
    raise ValueError(f"attention impl {impl!r} runs on {_IMPLS[name].backends}, not on the {backend!r} backend")
  if _IMPLS[name].supports(spec, features):
    return name
  raise ValueError(f"attention impl {impl!r} does not support {spec} with {sorted(features) or 'no extras'}")


def resolve(impl: str, spec: AttentionSpec, features: Iterable[str] = (), backend: str | None = None) -> Callable:
  """The function `choose` names."""
  return _IMPLS[choose(impl, spec, features, backend)].fn


def _concrete(impl: str, backend: str) -> str:
  return f"pallas_{backend}" if impl == "pallas" else impl


def _register_xla() -> None:
  from longgen_jax.attention.reference import reference_attention
  from longgen_jax.attention.xla_blockwise import blockwise_attention
  register_impl("reference", reference_attention)
  register_impl("xla_blockwise", blockwise_attention)


_register_xla()
