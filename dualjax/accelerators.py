"""Accelerator slices a run is launched on: TPU slice types (chips, hosts, runtime) and GPU nodes.

TPU accelerator types (the `--accelerator-type` of `gcloud compute tpus tpu-vm create`):
  v4-N, v5p-N   N counts TensorCores, 2 per chip (megacore: one JAX device per chip), 4 chips per
                host; v5p-128 = 64 chips on 16 hosts.
                https://cloud.google.com/tpu/docs/v5p (table: cores, chips, machines per shape)
                https://cloud.google.com/tpu/docs/v4
  v5litepod-N   (alias v5e-N) N counts chips, one TensorCore each; slices of up to 8 chips are one
                host, larger ones 8 chips per host: v5litepod-256 = 16x16 = 32 hosts.
                https://cloud.google.com/tpu/docs/v5e (table "Topology / chips / hosts"; the same
                page lists 1-, 4- and 8-chip VM types, so the host count is informational here:
                every command reaches all workers with --worker=all and JAX counts its processes)
  v6e-N         N counts chips, same layout as v5e (8 chips per host).
                https://cloud.google.com/tpu/docs/v6e

Runtime (software) versions for JAX, from https://cloud.google.com/tpu/docs/runtimes
("PyTorch and JAX" table): v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
v4 and older tpu-ubuntu2204-base.
"""

import dataclasses
import re


class AcceleratorError(ValueError):
  """An accelerator type this module does not know (one line, names the value)."""


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str
  type_prefix: str          # what gcloud calls it: 'v5p' in 'v5p-128', 'v5litepod' in 'v5litepod-256'
  counts_cores: bool        # N in '<prefix>-N' counts TensorCores (2 per chip) instead of chips
  chips_per_host: int
  runtime_version: str
  valid_chips: tuple[int, ...] | None  # None: any multiple of chips_per_host


GENERATIONS = {
    "v4": Generation("v4", "v4", True, 4, "tpu-ubuntu2204-base", None),
    "v5p": Generation("v5p", "v5p", True, 4, "v2-alpha-tpuv5", None),
    "v5e": Generation("v5e", "v5litepod", False, 8, "v2-alpha-tpuv5-lite",
                      (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": Generation("v6e", "v6e", False, 8, "v2-alpha-tpuv6e", (1, 4, 8, 16, 32, 64, 128, 256)),
}
_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU slice: its gcloud accelerator type and what it holds."""
  accelerator_type: str
  generation: str
  chips: int
  hosts: int
  runtime_version: str

  @property
  def devices(self) -> int:
    """JAX devices of the slice: one per chip on every generation here."""
    return self.chips


def parse_tpu(accelerator: str) -> TpuSlice:
  """'v5p-128' / 'v5e-256' / 'v5litepod-256' / 'v6e-8' / 'v4-32' -> TpuSlice; else AcceleratorError."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator.strip())
  if not m:
    raise AcceleratorError(
        f"accelerator '{accelerator}' is not of the form <generation>-<count>, e.g. v5p-128")
  prefix, count = m.group(1), int(m.group(2))
  if prefix not in _PREFIXES:
    raise AcceleratorError(
        f"accelerator '{accelerator}': unknown TPU generation '{prefix}' (known: v4, v5p, "
        "v5e = v5litepod, v6e)")
  g = GENERATIONS[_PREFIXES[prefix]]
  if g.counts_cores:
    if count < 8 or count % 8:
      raise AcceleratorError(
          f"accelerator '{accelerator}': {g.name}-N counts TensorCores (2 per chip, 4 chips per "
          "host); N must be a multiple of 8")
    chips = count // 2
  else:
    if count not in g.valid_chips:
      raise AcceleratorError(
          f"accelerator '{accelerator}': {g.name} slices have "
          f"{', '.join(map(str, g.valid_chips))} chips")
    chips = count
  hosts = max(1, chips // g.chips_per_host)
  return TpuSlice(f"{g.type_prefix}-{count}", g.name, chips, hosts, g.runtime_version)


def gpu_devices(nodes: int, gpus_per_node: int) -> int:
  """JAX devices of a GPU allocation (one process per GPU)."""
  if nodes < 1 or gpus_per_node < 1:
    raise AcceleratorError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must be >= 1")
  return nodes * gpus_per_node
