"""Device mesh and the AR / MDM split of its replica axis (DESIGN.md §4).

The global batch is cut into `replicas x microsteps` equal *cells*; a cell is one replica's share
of one gradient-accumulation microstep and runs exactly one objective. Cells are numbered
microstep-major (`cell = microstep * replicas + replica`) and the first `n_ar` are AR, so
lam = n_ar / (replicas * microsteps) and whole microsteps are single-objective where possible.
"""

import dataclasses
import fractions
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("replica", "fsdp", "tensor")


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Split:
  """How one optimizer step's batch is divided between the two objectives."""
  replicas: int
  microsteps: int
  n_ar: int

  @property
  def cells(self) -> int:
    return self.replicas * self.microsteps

  @property
  def lam(self) -> float:
    return self.n_ar / self.cells

  def is_ar(self, microstep: int, replica: int) -> bool:
    return microstep * self.replicas + replica < self.n_ar


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


def _nearest(lam: float, cells: int) -> str:
  lo = math.floor(lam * cells)
  opts = sorted({max(0, lo), min(cells, lo + 1)})
  return " or ".join(f"{n}/{cells} = {n / cells:.6g}" for n in opts)


def make_split(lam: float, global_batch: int, replicas: int, microsteps: int = 0,
               max_microsteps: int = 1024, max_cell_rows: int = 0,
               whole_microsteps: bool = False) -> Split:
  """Checks that `lam` is representable and returns the split.

  microsteps = 0 picks the fewest microsteps that represent lam exactly, divide the batch and,
  if `max_cell_rows` > 0, leave at most that many rows per cell (a memory bound). With
  `whole_microsteps` every microstep runs one objective on all devices (lam * microsteps is an
  integer): needed where replicas may not branch differently (tensor-parallel meshes).
  Errors name `objective.lam`, `mesh.microsteps` or `data.global_batch` and, for lam, the nearest
  representable values.
  """
  if not 0.0 <= lam <= 1.0:
    raise ConfigError(f"objective.lam must be in [0, 1], got {lam}")
  if global_batch % replicas:
    raise ConfigError(
        f"data.global_batch={global_batch} is not divisible by the {replicas} replicas")
  frac = fractions.Fraction(lam).limit_denominator(1 << 20)

  def fits(m: int) -> bool:
    return not max_cell_rows or global_batch // (replicas * m) <= max_cell_rows

  def whole(m: int) -> bool:  # every microstep one objective: lam * microsteps is an integer
    return not whole_microsteps or (frac * m).denominator == 1

  if microsteps == 0:
    for m in range(1, max_microsteps + 1):
      if global_batch % (replicas * m) == 0 and (frac * replicas * m).denominator == 1 \
          and abs(float(frac) - lam) < 1e-9 and fits(m) and whole(m):
        microsteps = m
        break
    else:
      # Report against the finest granularity the batch allows (microsteps only, when whole).
      cells = max(m * (1 if whole_microsteps else replicas) for m in range(1, max_microsteps + 1)
                  if global_batch % (replicas * m) == 0)
      bound = f" and at most {max_cell_rows} rows per cell" if max_cell_rows else ""
      if whole_microsteps:
        bound += " and one objective per microstep (mesh.tensor > 1)"
      raise ConfigError(
          f"objective.lam={lam} is not representable with {replicas} replicas and a batch of "
          f"{global_batch} rows{bound}; nearest: {_nearest(lam, cells)}")
  if microsteps < 1:
    raise ConfigError(f"mesh.microsteps must be >= 0, got {microsteps}")
  cells = replicas * microsteps
  if global_batch % cells:
    raise ConfigError(
        f"data.global_batch={global_batch} is not divisible by replicas*microsteps={cells}")
  if not fits(microsteps):
    raise ConfigError(
        f"mesh.microsteps={microsteps} leaves {global_batch // cells} rows per cell, more than "
        f"the {max_cell_rows} allowed by mesh.max_device_rows")
  n_ar = lam * cells
  if abs(n_ar - round(n_ar)) > 1e-9:
    raise ConfigError(
        f"objective.lam={lam} is not representable with {replicas} replicas x {microsteps} "
        f"microsteps; nearest: {_nearest(lam, cells)}")
  if whole_microsteps and not whole(microsteps):
    raise ConfigError(
        f"objective.lam={lam} x mesh.microsteps={microsteps} is not an integer: with mesh.tensor > 1 "
        f"each microstep must run one objective (set mesh.microsteps=0 to pick one)")
  return Split(replicas=replicas, microsteps=microsteps, n_ar=int(round(n_ar)))
