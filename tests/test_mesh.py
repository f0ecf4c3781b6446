import jax
import numpy as np
import pytest

from dualjax import mesh as mesh_lib
from dualjax.errors import ConfigError


def test_mesh_shape_resolves_minus_one():
  assert mesh_lib.mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
  assert mesh_lib.make_mesh(4, 2, 1).shape == {"replica": 4, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize("shape,msg", [((3, 1, 1), "replica\\*fsdp\\*tensor = 3"),
                                       ((-1, -1, 1), "at most one"),
                                       ((-1, 3, 1), "not divisible"),
                                       ((0, 1, 1), "mesh.replica")])
def test_mesh_shape_errors(shape, msg):
  with pytest.raises(ConfigError, match=msg):
    mesh_lib.mesh_shape(*shape, 8)


@pytest.mark.parametrize("shape,whole", [((8, 1, 1), True), ((1, 1, 1), True), ((4, 2, 1), False),
                                         ((4, 1, 2), False), ((1, 8, 1), False)])
def test_params_whole(shape, whole):
  devices = jax.devices()[:shape[0] * shape[1] * shape[2]]
  assert mesh_lib.params_whole(mesh_lib.make_mesh(*shape, devices=devices)) is whole


def test_torus_mesh_factors_a_tpu_slice_in_the_same_device_order():
  from jax.experimental import mesh_utils, topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:4x4x8").devices
  mesh = jax.sharding.Mesh(mesh_utils.create_device_mesh((128, 1, 1), devices=devices),
                           mesh_lib.AXES)
  torus = mesh_lib.torus_mesh(mesh)
  assert dict(torus.shape) == {"torus_x": 4, "torus_y": 4, "torus_z": 8}
  for idx, d in np.ndenumerate(torus.devices):
    assert tuple(d.coords) == idx
  # CPU devices have no torus coordinates: the mesh's own axes of size > 1, in the same order
  cpu = mesh_lib.make_mesh(4, 1, 2)
  assert dict(mesh_lib.torus_mesh(cpu).shape) == {"replica": 4, "tensor": 2}
  # create_device_mesh's snake ring on a v6e:4x4 is no raster: its own axes
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v6e:4x4").devices
  snake = jax.sharding.Mesh(mesh_utils.create_device_mesh((16, 1, 1), devices=devices),
                            mesh_lib.AXES)
  assert dict(mesh_lib.torus_mesh(snake).shape) == {"replica": 16}


@pytest.fixture
def two_axis_torus(monkeypatch):
  """The 8 CPU devices, in their order, as a 2 x 4 'torus' (major axis 2, minor 4)."""
  monkeypatch.setattr(mesh_lib, "_torus_axes", lambda devices: [("t0", 2), ("t1", 4)])
  mesh_lib.torus_mesh.cache_clear()
  yield mesh_lib.make_mesh(8, 1, 1)
  mesh_lib.torus_mesh.cache_clear()


def test_per_axis_collectives_equal_the_flat_ones(two_axis_torus):
  """ZeRO-1's reduce-scatter and Newton-Schulz gathers, one axis of a 2 x 4 torus at a time:
  the same values in the same shardings as over all devices at once (a wrong axis order puts
  each device's block in another's place)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from dualjax import optim, step
  mesh = two_axis_torus
  assert dict(mesh_lib.torus_mesh(mesh).shape) == {"t0": 2, "t1": 4}
  rng = np.random.default_rng(0)
  g_RxKxM = rng.normal(size=(8, 3, 16, 64)).astype(np.float32)
  sharding = NamedSharding(mesh, P(None, None, mesh_lib.AXES))
  g = jax.device_put(g_RxKxM, NamedSharding(mesh, P(mesh_lib.AXES)))
  summed = jax.jit(lambda g: step.reduce_replicas(g, mesh, sharding))(g)
  assert summed.sharding.is_equivalent_to(sharding, 3)
  np.testing.assert_allclose(np.asarray(summed), g_RxKxM.astype(np.float64).sum(0), rtol=1e-5,
                             atol=1e-5)
  stack = jax.device_put(g_RxKxM[0], NamedSharding(mesh, P()))  # 3 wide [16, 64] matrices
  want = np.asarray(optim.newton_schulz(stack))
  np.testing.assert_array_equal(np.asarray(jax.jit(optim.sharded_ns(mesh))(stack)), want)
  shards = optim.MuonShards(mesh)
  got = jax.jit(shards.ns)(jax.device_put(stack, shards.sharding(stack.shape)))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-2)  # bf16 normaliser order
