"""The one list of attention implementations: names, where they run, what they support.

An implementation is a function with the signature of `reference_attention`:
  fn(q, k, v, spec, *, q_segment_ids, kv_segment_ids, q_offset, return_lse)
Optionally it has a backward given statistics,
  bwd(q, k, v, out, lse, dout, dlse, spec, *, q_segment_ids, kv_segment_ids, q_offset) -> (dq, dk, dv)
where out and lse are those of a larger attention the call is part of (the same rows over more
keys): context-parallel ring steps use it instead of recomputing each step's forward for its vjp.
The built-in ones are declared below by module and function name and imported on first use,
so kernel modules import nothing from here (no cycle) and a backend's kernels load only there.
`register_impl` adds more at run time.

Names users pass (training config, `attention(impl=...)`, prefill, evaluation, benchmarks):
  auto           the first implementation in `PREFERENCE` that runs here and supports the call
  pallas         our block-sparse kernel for this backend (pallas_gpu or pallas_tpu)
  reference      dense masked XLA: the ground truth (materialises T x S scores)
  xla_blockwise  gathers the listed key tiles; any backend, O(T x budget) memory
  cudnn          cuDNN's fused attention (jax.nn.dot_product_attention) for the calls it
                 supports on a GPU (full causal layers, no segment ids, no q_offset); every
                 other call (and every call off GPU) gets the auto choice, so a LongGen model
                 with impl "cudnn" runs its sparse layers on our kernels.

Why "auto" prefers our kernel over cuDNN for full layers on a GPU (one H200, JAX 0.11.2, 2026-11-27,
B 1, 32 query / 8 kv heads, head_dim 128, bf16; BENCHMARKS.md "Attention, H200"): forward alone
(prefill, scoring) ours is faster, 231.9 vs 246.0 ms at 128K; forward + backward cuDNN is faster,
908.6 vs 976.1 ms (1.07x; 56.1 vs 60.7 at 32K; another run, "128-key dK/dV programs" in
BENCHMARKS.md), but its gradients are NOT repeatable: five runs of
the same fwd+bwd gave different bits at 32K and 128K, ours identical bits every time
(`benchmarks/cudnn_determinism.py`, an H200 of the first run's machine). Exact resume compares losses bit for bit, so
training defaults to ours; users who do not need that can set `attn_impl="cudnn"` (full layers on
cuDNN, sparse layers on ours). Packed documents (segment ids) are ours alone: cuDNN's public call
takes no segment ids, and our kernels skip the tiles of other documents (BENCHMARKS.md, "Packed").
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Callable, Iterable

import jax

from longgen_jax.attention.spec import AttentionSpec

# What a call needs beyond plain causal attention from position 0.
SEGMENT_IDS = "segment_ids"
Q_OFFSET = "q_offset"
LSE = "lse"
FEATURES = frozenset({SEGMENT_IDS, Q_OFFSET, LSE})

USER_NAMES = ("auto", "pallas", "reference", "xla_blockwise", "cudnn")
PREFERENCE = {"gpu": ("pallas_gpu", "xla_blockwise"), "tpu": ("pallas_tpu", "xla_blockwise"),
              "cpu": ("xla_blockwise",)}

Supports = Callable[[AttentionSpec, frozenset], bool]


def _everything(spec: AttentionSpec, features: frozenset) -> bool:
  return True


def _cudnn_supports(spec: AttentionSpec, features: frozenset) -> bool:
  return spec.is_full and features <= {LSE}


@dataclasses.dataclass
class Impl:
  name: str
  backends: tuple[str, ...] | None     # None: any backend
  supports: Supports
  module: str = ""                     # where `function` lives, imported on first use
  function: str = ""
  fn: Callable | None = None
  backward_function: str = ""          # the backward given statistics, in the same module (optional)
  backward: Callable | None = None

  def load(self) -> Callable | None:
    """The function, or None when its module cannot be imported here (e.g. no Pallas GPU support)."""
    if self.fn is None and self.module:
      try:
        module = importlib.import_module(self.module)
        self.fn = getattr(module, self.function)
        if self.backward_function:
          self.backward = getattr(module, self.backward_function)
      except ImportError:
        self.module = ""  # do not retry
    return self.fn


_IMPLS: dict[str, Impl] = {
    "reference": Impl("reference", None, _everything, "longgen_jax.attention.reference", "reference_attention"),
    "xla_blockwise": Impl("xla_blockwise", None, _everything, "longgen_jax.attention.xla_blockwise",
                          "blockwise_attention"),
    "pallas_gpu": Impl("pallas_gpu", ("gpu",), _everything, "longgen_jax.attention.pallas_gpu",
                       "pallas_attention", backward_function="pallas_attention_backward"),
    "pallas_tpu": Impl("pallas_tpu", ("tpu",), _everything, "longgen_jax.attention.pallas_tpu",
                       "pallas_tpu_attention"),
    "cudnn": Impl("cudnn", ("gpu",), _cudnn_supports, "longgen_jax.attention.cudnn", "cudnn_attention"),
}


def register_impl(name: str, fn: Callable, backends: tuple[str, ...] | None = None,
                  supports: Supports = _everything, backward: Callable | None = None) -> None:
  """Adds (or replaces) an implementation; `supports(spec, features)` says which calls it serves;
  `backward` is its optional backward given statistics (module docstring)."""
  _IMPLS[name] = Impl(name, backends, supports, fn=fn, backward=backward)


_TARGETS: list[str] = []


@contextlib.contextmanager
def compiling_for(backend: str):
  """Attention choices made inside are for `backend` ("gpu", "tpu") instead of JAX's default backend:
  ahead-of-time compiles for devices this machine does not have (e.g. a TPU topology, docs/scaling.md)."""
  _TARGETS.append(backend)
  try:
    yield
  finally:
    _TARGETS.pop()


def _backend(backend: str | None) -> str:
  return backend or (_TARGETS[-1] if _TARGETS else jax.default_backend())


def _runs_on(name: str, backend: str) -> bool:
  """Whether implementation `name` is registered, declared for `backend` and importable here."""
  i = _IMPLS.get(name)
  return i is not None and (i.backends is None or backend in i.backends) and i.load() is not None


def available_impls(backend: str | None = None) -> list[str]:
  """Implementation names that run on `backend` (default: JAX's default backend)."""
  backend = _backend(backend)
  return [n for n in _IMPLS if _runs_on(n, backend)]


def call_features(*, segment_ids: bool = False, q_offset: bool = False, lse: bool = False) -> frozenset[str]:
  return frozenset(n for n, on in ((SEGMENT_IDS, segment_ids), (Q_OFFSET, q_offset), (LSE, lse)) if on)


def supports(impl: str, spec: AttentionSpec, features: Iterable[str] = (), backend: str | None = None) -> bool:
  """Whether implementation `impl` (a registered name or "pallas") itself serves this call on `backend`."""
  backend = _backend(backend)
  name = _concrete(impl, backend)
  return _runs_on(name, backend) and _IMPLS[name].supports(spec, frozenset(features))


def choose(impl: str, spec: AttentionSpec, features: Iterable[str] = (), backend: str | None = None) -> str:
  """The registered name that runs this call: see the module docstring. Raises ValueError for a
  name that is unknown, not available on this backend, or (except cudnn) cannot serve the call."""
  backend = _backend(backend)
  features = frozenset(features)
  unknown = features - FEATURES
  if unknown:
    raise ValueError(f"unknown attention features {sorted(unknown)}; known: {sorted(FEATURES)}")
  if impl == "auto" or (impl == "cudnn" and not supports("cudnn", spec, features, backend)):
    return next(n for n in PREFERENCE.get(backend, ()) + ("reference",) if supports(n, spec, features, backend))
  if impl == "pallas" and backend not in ("gpu", "tpu"):
    raise ValueError(f"impl='pallas' needs a GPU or TPU backend, but JAX's default backend is "
                     f"{backend!r}; use impl='xla_blockwise' or 'reference' on CPU")
  name = _concrete(impl, backend)
  if name not in _IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; choose from {list(USER_NAMES)} "
                     f"(registered on {backend}: {available_impls(backend)})")
  if not _runs_on(name, backend):
    raise ValueError(f"attention impl {impl!r} does not run on the {backend!r} backend here "
                     f"(declared for {_IMPLS[name].backends})")
  if not _IMPLS[name].supports(spec, features):
    raise ValueError(f"attention impl {impl!r} does not support {spec} with {sorted(features) or 'no extras'}")
  return name


def resolve(impl: str, spec: AttentionSpec, features: Iterable[str] = (), backend: str | None = None) -> Callable:
  """The function `choose` names."""
  return _IMPLS[choose(impl, spec, features, backend)].load()


def resolve_with_backward(impl: str, spec: AttentionSpec, features: Iterable[str] = (),
                          backend: str | None = None) -> tuple[Callable, Callable | None]:
  """(function, its backward given statistics or None) of the implementation `choose` names."""
  entry = _IMPLS[choose(impl, spec, features, backend)]
  fn = entry.load()  # loading the module also finds its backward
  return fn, entry.backward


def _concrete(impl: str, backend: str) -> str:
  return f"pallas_{backend}" if impl == "pallas" else impl
