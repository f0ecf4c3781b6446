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
  assert list(torus.devices.flat) == list(mesh.devices.flat)
  for idx, d in np.ndenumerate(torus.devices):
    assert tuple(d.coords) == idx
  # CPU devices have no torus coordinates: the mesh's own axes of size > 1, in the same order
  cpu = mesh_lib.make_mesh(4, 1, 2)
  assert dict(mesh_lib.torus_mesh(cpu).shape) == {"replica": 4, "tensor": 2}
  assert list(mesh_lib.torus_mesh(cpu).devices.flat) == list(cpu.devices.flat)
