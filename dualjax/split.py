"""The objective split: which cells of a step are AR and which MDM (DESIGN.md §4).

The global batch is cut into `replicas x microsteps` equal *cells*; a cell is one replica's share
of one gradient-accumulation microstep and runs exactly one objective. Cells are numbered
microstep-major (`cell = microstep * replicas + replica`) and the first `n_ar` are AR, so
lam = n_ar / cells, represented exactly, and whole microsteps are single-objective where possible.

Two programs compute these cells (`dualjax.step`):
  time split    every microstep is one objective on all devices (n_ar divisible by replicas;
                always for lam in {0, 1} and for one replica): plain SPMD on any mesh;
  device split  in the microstep where AR cells end, an AR sub-mesh of replicas runs AR while the
                rest run MDM (the paper's split of the device axis), inside a partial-manual
                shard_map over 'replica'.
"""

import dataclasses
import fractions
import math
from typing import Any, Literal, Mapping

from dualjax.errors import ConfigError

Program = Literal["time", "device"]


@dataclasses.dataclass(frozen=True)
class ObjectiveSplit:
  """How one optimizer step's batch is divided between the two objectives."""
  replicas: int
  microsteps: int
  n_ar: int

  @property
  def cells(self) -> int:
    return self.replicas * self.microsteps

  @property
  def n_mdm(self) -> int:
    return self.cells - self.n_ar

  @property
  def lam(self) -> float:
    return self.n_ar / self.cells

  @property
  def program(self) -> Program:
    """'time' when every microstep runs one objective on all replicas, else 'device'."""
    return "time" if self.n_ar % self.replicas == 0 else "device"

  @property
  def ar_microsteps(self) -> int:
    """Microsteps whose cells are all AR (they come first)."""
    return self.n_ar // self.replicas

  def is_ar(self, microstep: int, replica: int) -> bool:
    return microstep * self.replicas + replica < self.n_ar

  def describe(self) -> str:
    """One line for the start-up log."""
    R, M, A = self.replicas, self.microsteps, self.ar_microsteps
    frac = f"lam {self.lam:g} = {self.n_ar}/{self.cells} AR cells"
    if self.program == "time":
      return f"objective split: time ({A} AR, {M - A} MDM microsteps) x {R} replicas; {frac}"
    a = self.n_ar % R
    where = "" if M == 1 else f" in microstep {A}, after {A} AR and before {M - A - 1} MDM ones"
    return (f"objective split: device (AR sub-mesh {a} replicas, MDM {R - a}{where}) x {M} "
            f"microsteps; {frac}")


def _nearest(lam: float, cells: int) -> str:
  lo = math.floor(lam * cells)
  opts = sorted({max(0, lo), min(cells, lo + 1)})
  return " or ".join(f"{n}/{cells} = {n / cells:.6g}" for n in opts)


def make_split(lam: float, global_batch: int, replicas: int, microsteps: int = 0,
               max_microsteps: int = 1024, max_cell_rows: int = 0,
               whole_microsteps: bool = False) -> ObjectiveSplit:
  """Checks that `lam` is representable and returns the split.

  microsteps = 0 picks the fewest microsteps that represent lam exactly, divide the batch and,
  if `max_cell_rows` > 0, leave at most that many rows per cell (a memory bound). With
  `whole_microsteps` every microstep runs one objective on all devices (the time split: lam *
  microsteps is an integer): needed where replicas may not branch differently (tensor-parallel
  meshes). Errors name `objective.lam`, `mesh.microsteps` or `data.global_batch` and, for lam,
  the nearest representable values.
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
  return ObjectiveSplit(replicas=replicas, microsteps=microsteps, n_ar=int(round(n_ar)))


def split_from_config(cfg: Any, mesh_shape: Mapping[str, int]) -> ObjectiveSplit:
  """The split of a run config on a mesh of `mesh_shape` (ConfigError naming the field).

  Rows per device per microstep are bounded by `mesh.max_device_rows`; with tensor > 1 every
  microstep runs one objective (XLA cannot partition tensor-parallel collectives inside
  replica-dependent branches, jax 0.10).
  """
  m, d = cfg.mesh, cfg.data
  split = make_split(cfg.objective.lam, d.global_batch, mesh_shape["replica"], m.microsteps,
                     max_cell_rows=max(m.max_device_rows, 0) * mesh_shape["fsdp"],  # -1: fit later
                     whole_microsteps=mesh_shape["tensor"] > 1)
  if d.global_batch % (split.cells * mesh_shape["fsdp"]):
    raise ConfigError(
        f"data.global_batch={d.global_batch} must be divisible by replicas x microsteps x fsdp = "
        f"{split.cells * mesh_shape['fsdp']}")
  return split
