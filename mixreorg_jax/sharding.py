"""Device mesh and shardings: batch over every device, parameters replicated or FSDP-sharded (pjit semantics)."""
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over both axes; fsdp additionally shards parameters.


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Mesh of shape (data, fsdp) from config.mesh; one entry may be -1 (all remaining devices)."""
  devices = jax.devices() if devices is None else devices
  sizes = [mesh_config.data, mesh_config.fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one of data/fsdp may be -1, got {mesh_config.to_dict()}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if len(devices) % known:
    raise ValueError(f"config.mesh={mesh_config.to_dict()} does not divide the {len(devices)} devices.")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh={mesh_config.to_dict()} uses {int(np.prod(sizes))} devices but "
                     f"{len(devices)} are present; set config.mesh.data=-1 to use them all.")
  # Auto axes: classic pjit semantics, XLA propagates shardings from the in/out shardings we give.
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices; other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_device_batch(mesh: Mesh, global_batch: int) -> int:
  if global_batch % mesh.size:
    raise ValueError(f"config.input.batch_size={global_batch} must be a multiple of the {mesh.size} devices of "
                     "the mesh.")
  return global_batch // mesh.size


FSDP_MIN_SIZE = 2 ** 14  # arrays with fewer elements stay replicated under FSDP.


def fsdp_spec(shape, fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Shards the largest axis divisible by the fsdp size; small arrays stay replicated."""
  if fsdp_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any, min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for a pytree of arrays (train state): FSDP over `fsdp` when that axis is > 1."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, min_size)), abstract_state)
