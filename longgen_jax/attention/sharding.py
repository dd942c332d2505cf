"""Attention per shard of a device mesh: batch over (data, fsdp), heads over tensor.

A Pallas kernel or a cuDNN call is opaque to XLA's SPMD partitioner: under a jit with
batch-sharded inputs XLA would gather the inputs and run the whole global batch's attention
on every device. So the dispatch runs every implementation inside `shard_map` over the mesh
of the surrounding `jax.set_mesh(...)` context (the training loop sets it): each device
attends its own sequences (and its own heads under tensor parallelism), which is exact
because attention never mixes sequences or kv-head groups. Without a mesh context, or when
the mesh axes are already manual (inside another shard_map), the call runs as it is.

The mesh axis names are defined here, at the bottom of the package, so that the parallel
room builds its meshes with the names the dispatch understands.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from longgen_jax.attention.spec import AttentionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"   # splits each sequence (context parallelism: longgen_jax.parallel.context)
HEAD_AXIS = "tensor"


def active_axes(names) -> tuple[str, ...]:
  """The axes among `names` of the context mesh that have size > 1 and are not already manual."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  manual = set(getattr(mesh, "manual_axes", ()))
  return tuple(a for a in names if mesh.shape.get(a, 1) > 1 and a not in manual)


def axes_size(axes) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def split_axes(batch_size: int, num_kv_heads: int, spec: AttentionSpec) -> tuple[tuple[str, ...], str | None]:
  """(batch axes, head axis or None) of the context mesh that split an attention call, after checking
  that the batch and the kv heads divide over them."""
  batch = active_axes(BATCH_AXES)
  heads = active_axes((HEAD_AXIS,))
  if batch and batch_size % axes_size(batch):
    raise ValueError(f"attention batch {batch_size} cannot be split over mesh axes {batch} "
                     f"({axes_size(batch)} devices); make the per-step batch a multiple of it")
  if heads:
    t = axes_size(heads)
    if num_kv_heads % t:
      raise ValueError(f"{num_kv_heads} kv heads cannot be split over the {HEAD_AXIS!r} axis of size {t}")
    if spec.head_dependent(num_kv_heads):
      raise ValueError(f"{spec} gives each kv head its own stride phase; with the {HEAD_AXIS!r} axis of size {t} "
                       "a shard would not know its heads' global index. Use homo_head=True or tensor=1")
  return batch, (heads[0] if heads else None)


def per_shard(fn: Callable, q, k, v, spec: AttentionSpec, *, q_segment_ids, kv_segment_ids, q_offset,
              return_lse: bool):
  """fn(q, k, v, spec, ...) for each shard of the context mesh (see the module docstring)."""
  if active_axes((CONTEXT_AXIS,)):
    raise ValueError(f"mesh axis {CONTEXT_AXIS!r} has size {axes_size((CONTEXT_AXIS,))}: attention() does not "
                     "split sequences; call longgen_jax.parallel.context.context_attention (ring / all-gather "
                     "over the context axis, on the load-balanced layout) instead")
  call = lambda q, k, v, qs, ks: fn(q, k, v, spec, q_segment_ids=qs, kv_segment_ids=ks, q_offset=q_offset,
                                    return_lse=return_lse)
  batch, h = split_axes(q.shape[0], k.shape[2], spec)
  if not batch and not h:
    return call(q, k, v, q_segment_ids, kv_segment_ids)
  b = batch or None
  heads_spec, seg_spec = P(b, None, h, None), P(b, None)
  args, specs = [q, k, v], [heads_spec] * 3
  has_seg = q_segment_ids is not None
  if has_seg:
    args += [q_segment_ids, kv_segment_ids]
    specs += [seg_spec, seg_spec]
  out_specs = (heads_spec, P(b, h, None)) if return_lse else heads_spec

  def local(q, k, v, *segs):
    return call(q, k, v, *(segs if has_seg else (None, None)))

  return jax.shard_map(local, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)(*args)
