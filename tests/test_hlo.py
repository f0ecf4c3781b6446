"""The collective counter (`dualjax.hlo`) on real compiled programs: CPU devices, and TPU slices
compiled ahead of time through libtpu, where a reduce-scatter may come as an all-reduce fused
with its slice."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import mesh_utils, topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualjax import hlo
from dualjax import mesh as mesh_lib

ROWS, COLS = 256, 512  # per device, fp32


def _scatter_gather(mesh: Mesh, per_axis: bool, cols: int = COLS):
  """psum_scatter of each device's [n*ROWS, COLS] fp32, then all_gather of the bf16 shard, over
  every device (in one collective each, or one per mesh axis); the compiled HLO text."""
  axes = tuple(mesh.axis_names)
  n = mesh.size

  def f(x):
    y = (mesh_lib.scatter_sum(x[0], axes, 0) if per_axis else
         jax.lax.psum_scatter(x[0], axes, scatter_dimension=0, tiled=True))
    y = (0.5 * y).astype(jnp.bfloat16)
    y = (mesh_lib.gather_all(y, axes, 0) if per_axis else
         jax.lax.all_gather(y, axes, axis=0, tiled=True))
    return y[None]

  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(axes), out_specs=P(axes)))
  x = jax.ShapeDtypeStruct((n, n * ROWS, cols), jnp.float32,
                           sharding=NamedSharding(mesh, P(axes)))
  return g.lower(x).compile().as_text()


def _ideal(n: int, cols: int = COLS) -> dict[str, float]:
  size = n * ROWS * cols
  return {"reduce-scatter": 4 * size * (n - 1) / n, "all-gather": 2 * size * (n - 1) / n}


def test_counts_on_cpu_devices():
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("d",))
  stats = hlo.collective_stats(_scatter_gather(mesh, per_axis=False))
  ideal = _ideal(8)
  # XLA:CPU widens the bf16 all-gather to fp32
  assert stats["reduce-scatter"]["count"] == 1 and stats["all-gather"]["count"] == 1, stats
  assert stats["reduce-scatter"]["wire_bytes"] == pytest.approx(ideal["reduce-scatter"])
  assert ideal["all-gather"] <= stats["all-gather"]["wire_bytes"] <= 2 * ideal["all-gather"]


def _tpu_mesh(name: str) -> Mesh:
  devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  return Mesh(mesh_utils.create_device_mesh((len(devices),), devices=devices), ("r",))


def test_tpu_reduce_scatter_as_fused_all_reduce_counts_as_a_reduce_scatter():
  """v5p:2x2x1: libtpu's reduce-scatter is an all-reduce-scatter fusion (an all-reduce of the
  padded input with the slice fused in); counted as a reduce-scatter of that input."""
  text = _scatter_gather(_tpu_mesh("v5p:2x2x1"), per_axis=False, cols=4096)
  assert re.search(r"fusion\(.*calls=%all-reduce-scatter", text)
  stats = hlo.collective_stats(text)
  assert "all-reduce" not in stats, stats
  ideal = _ideal(4, cols=4096)
  assert ideal["reduce-scatter"] <= stats["reduce-scatter"]["wire_bytes"] \
      <= 1.15 * ideal["reduce-scatter"], stats  # + the padding to the fusion's tiles
  assert stats["all-gather"]["wire_bytes"] == pytest.approx(ideal["all-gather"])


@pytest.mark.parametrize("name,torus_shape", [
    ("v5p:2x2x2", {"torus_x": 2, "torus_y": 2, "torus_z": 2}),  # a raster, x-major
    ("v5e:8x8", {"torus_x": 8, "torus_y": 8})])
def test_tpu_slice_scatters_and_gathers_per_torus_axis(name, torus_shape):
  """Over the whole slice at once libtpu lowers the reduce-scatter as an all-reduce; one torus
  axis at a time (`mesh.torus_mesh`), as the reduce-scatter and all-gather they are."""
  mesh = _tpu_mesh(name)
  flat = hlo.collective_stats(_scatter_gather(mesh, per_axis=False))
  assert "all-reduce" in flat and "reduce-scatter" not in flat, flat
  torus = mesh_lib.torus_mesh(mesh)
  assert dict(torus.shape) == torus_shape
  stats = hlo.collective_stats(_scatter_gather(torus, per_axis=True))
  assert "all-reduce" not in stats, stats
  ideal = _ideal(mesh.size)
  for kind in ("reduce-scatter", "all-gather"):
    assert stats[kind]["count"] == len(torus_shape)
    assert ideal[kind] <= stats[kind]["wire_bytes"] <= 1.15 * ideal[kind], stats
  flat_wire = sum(s["wire_bytes"] for s in flat.values())
  assert sum(s["wire_bytes"] for s in stats.values()) <= 0.7 * flat_wire  # 6 bytes against 9-10
