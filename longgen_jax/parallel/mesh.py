"""Device mesh (data, fsdp, context, tensor), the shardings the train step is compiled with, and
the activation constraint the model applies under a mesh. These are the logical-axis rules, in
one place:

  batch [B, T]          B over (data, fsdp), T over context (the load-balanced layout, parallel.layout)
  activations [B, T, E] the same; attention heads over tensor (attention.sharding, parallel.context)
  params, AdamW state   each array's largest dim divisible by fsdp x context split over both (MaxText's
                        choice: context parallelism does not replicate the weights)

The axis names are attention.sharding's, so the attention dispatch understands them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longgen_jax.attention.sharding import BATCH_AXES, CONTEXT_AXIS, MESH_AXES as AXES, active_axes

PARAM_AXES = ("fsdp", CONTEXT_AXIS)  # parameters and optimizer state are split over both


def make_mesh(data: int = -1, fsdp: int = 1, context: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A 4-axis mesh over `devices` (all by default); one axis size may be -1 (the rest of the devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, context, tensor]
  if any(s != -1 and s < 1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be >= 1 (or one of them -1), got {dict(zip(AXES, sizes))}")
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
  """[..., B, T] with B over (data, fsdp) and T over context; `leading_dims` unsharded dims first."""
  return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES, CONTEXT_AXIS))


def fsdp_shardings(tree, mesh: Mesh):
  """Per-leaf shardings: each array's largest dim divisible by fsdp x context is split over both axes;
  failing that, over fsdp alone, then context alone; replicated where no dim divides."""
  sizes = {axes: int(np.prod([mesh.shape[a] for a in axes])) for axes in (PARAM_AXES, ("fsdp",), (CONTEXT_AXIS,))}
  groups = [(axes, n) for axes, n in sizes.items() if n > 1]

  def one(x):
    shape = getattr(x, "shape", ())
    for axes, n in groups if shape else ():
      d = next((d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % n == 0), None)
      if d is not None:
        spec = [None] * len(shape)
        spec[d] = axes if len(axes) > 1 else axes[0]
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(one, tree)


def host_to_global(local_tree, sharding: NamedSharding):
  """This process's part of a batch (numpy) -> global jax arrays laid out by `sharding`: the part must
  be what this process's devices hold (its batch rows, whole sequences)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_tree)


def whole_to_global(global_tree, sharding: NamedSharding):
  """A batch (numpy) that every process holds whole -> global jax arrays laid out by `sharding`: each
  device takes its own slice, so any mesh over any number of processes gets the same global batch."""
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
                      global_tree)


def constrain_activation(x):
  """`x` [B, T, ...] with B over the context mesh's batch axes and T over its context axis (a no-op
  without a mesh context), so that XLA keeps activations per sequence chunk instead of picking a
  gathered layout around opaque kernels."""
  batch, context = active_axes(BATCH_AXES), active_axes((CONTEXT_AXIS,))
  if context and x.shape[1] % jax.sharding.get_abstract_mesh().shape[CONTEXT_AXIS]:
    context = ()  # a length the context axis does not divide (not a laid-out training batch)
  if not batch and not context:
    return x
  return jax.lax.with_sharding_constraint(x, P(batch or None, context or None, *([None] * (x.ndim - 2))))
