"""The device mesh: ('replica', 'fsdp', 'tensor') with Auto axis types (DESIGN.md §4)."""

import functools
import itertools
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dualjax.errors import ConfigError

AXES = ("replica", "fsdp", "tensor")


def mesh_shape(replica: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to the remaining devices; checks the product."""
  shape = [replica, fsdp, tensor]
  for name, v in zip(AXES, shape):
    if v == 0 or v < -1:
      raise ConfigError(f"mesh.{name} must be a positive size or -1, got {v}")
  if shape.count(-1) > 1:
    raise ConfigError("mesh: at most one of replica/fsdp/tensor may be -1")
  known = math.prod(v for v in shape if v != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes ({known})")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(
        f"mesh: replica*fsdp*tensor = {math.prod(shape)} but there are {num_devices} devices")
  return tuple(shape)


def make_mesh(replica: int, fsdp: int, tensor: int,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('replica', 'fsdp', 'tensor') mesh over `devices` (default: all), Auto-typed axes.

  Auto axes: shardings are annotations the compiler propagates (jax >= 0.7's `make_mesh`
  defaults to Explicit sharding-in-types, which the model code does not use).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(replica, fsdp, tensor, len(devices))
  auto = (AxisType.Auto,) * len(AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def mesh_from_config(m: Any) -> Mesh:
  """The mesh of a `mesh` config section over all devices (ConfigError naming the field)."""
  if m.max_device_rows < 0:
    raise ConfigError(f"mesh.max_device_rows must be >= 0 (or -1 to fit it at start-up), got "
                      f"{m.max_device_rows}")
  return make_mesh(m.replica, m.fsdp, m.tensor)


def params_whole(mesh: Mesh) -> bool:
  """Whether every device holds the parameters whole (fsdp = tensor = 1): a data-parallel mesh,
  where Muon is ZeRO-1 divided and one all-reduce of the gradients is the step's minimum."""
  return mesh.shape.get("fsdp", 1) == mesh.shape.get("tensor", 1) == 1


def _torus_axes(devices: list[Any]) -> list[tuple[str, int]] | None:
  """[(name, size)] of the physical axes (major to minor) whose raster is the order of
  `devices`, or None: no coordinates, several slices or cores per chip, not a full box, not a
  raster."""
  coords = [getattr(d, "coords", None) for d in devices]
  if (any(c is None for c in coords) or len({getattr(d, "slice_index", 0) for d in devices}) > 1
      or len({tuple(c) for c in coords}) < len(devices)):
    return None
  c_NxA = np.asarray(coords) - np.min(coords, axis=0)
  sizes = c_NxA.max(axis=0) + 1
  if math.prod(sizes) != len(devices):
    return None
  for perm in itertools.permutations(range(c_NxA.shape[1])):
    dims = [int(sizes[a]) for a in perm]
    if (np.ravel_multi_index(tuple(c_NxA[:, a] for a in perm), dims)
        == np.arange(len(devices))).all():
      return [(f"torus_{'xyzw'[a]}", n) for a, n in zip(perm, dims)]
  # Not a raster (v5e/v6e 4x4 meshes are a snake ring): a factoring of the order would group
  # devices that are not on one torus line; the collectives stay whole.
  return None


@functools.lru_cache(maxsize=None)
def torus_mesh(mesh: Mesh) -> Mesh:
  """`mesh`'s devices in the same order, as a mesh over the physical torus axes whose raster
  that order is ('torus_x', ... major to minor), or else over `mesh`'s own axes; axes of size 1
  dropped. Same order, so a sharding over all its axes is the same as one over all of `mesh`'s.

  For collectives over every device, one torus axis at a time (`scatter_sum`, `gather_all`):
  libtpu (0.0.42) lowers a reduce-scatter or all-gather over a whole 2-D or 3-D slice as an
  all-reduce (twice the wire bytes), and one per torus axis as what it is. `create_device_mesh`
  orders a data-parallel TPU mesh x-major, z-minor, which is such a raster."""
  flat = list(mesh.devices.flat)
  if len(flat) < 2:
    return mesh
  axes = [(a, n) for a, n in (_torus_axes(flat) or mesh.shape.items()) if n > 1]
  return Mesh(np.asarray(flat, dtype=object).reshape([n for _, n in axes]),
              tuple(a for a, _ in axes), axis_types=(AxisType.Auto,) * len(axes))


def scatter_sum(x: jax.Array, axes: Sequence[str], dim: int) -> jax.Array:
  """Inside a shard_map: psum_scatter over `axes` (tiled, major to minor, as P(..., axes) lays
  out `dim`), one axis at a time."""
  for a in axes:
    x = lax.psum_scatter(x, a, scatter_dimension=dim, tiled=True)
  return x


def gather_all(x: jax.Array, axes: Sequence[str], dim: int) -> jax.Array:
  """Inside a shard_map: the tiled all_gather over `axes` of `dim`, one axis at a time."""
  for a in reversed(tuple(axes)):
    x = lax.all_gather(x, a, axis=dim, tiled=True)
  return x


BATCH_AXES = ("replica", "fsdp")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over ('replica', 'fsdp'): each replica's rows are contiguous, as the step expects."""
  return NamedSharding(mesh, P(BATCH_AXES))


def to_global(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes ('replica', 'fsdp').

  The pipeline gives process i the contiguous rows i*B/P ..., which is what
  `make_array_from_process_local_data` expects.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
