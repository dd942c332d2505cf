"""Device mesh (data, fsdp, sequence, tensor), the shardings the train step is compiled with, and
the activation constraint the model applies under a mesh.

Runs use data parallelism over all devices (one device on CPU) with optional FSDP of parameters
and optimizer state; attention runs per shard (attention.sharding); the sequence axis is declared
for context parallelism. The axis names are attention.sharding's, so the dispatch understands them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longgen_jax.attention.sharding import BATCH_AXES, MESH_AXES as AXES, active_axes


def make_mesh(data: int = -1, fsdp: int = 1, sequence: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A 4-axis mesh over `devices` (all by default); one axis size may be -1 (the rest of the devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, sequence, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """[..., B, T] with B over (data, fsdp) and T over sequence; `leading_dims` unsharded dims first."""
  return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES, "sequence"))


def fsdp_shardings(tree, mesh: Mesh):
  """Per-leaf shardings: each array's largest dim divisible by the fsdp axis is split over it."""
  n = mesh.shape["fsdp"]

  def one(x):
    shape = getattr(x, "shape", ())
    if n == 1 or not shape:
      return replicated(mesh)
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
      if shape[d] % n == 0:
        spec = [None] * len(shape)
        spec[d] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(one, tree)


def host_to_global(local_tree, sharding: NamedSharding):
  """This host's numpy batch -> global jax arrays laid out by `sharding` (multi-host safe)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_tree)


def constrain_batch(x):
  """`x` [B, ...] sharded over the context mesh's batch axes (a no-op without a mesh context), so that
  XLA keeps activations per sequence instead of picking a gathered layout around opaque kernels."""
  batch = active_axes(BATCH_AXES)
  if not batch:
    return x
  return jax.lax.with_sharding_constraint(x, P(batch, *([None] * (x.ndim - 1))))
