import jax
import pytest

from dualjax import mesh as mesh_lib
from dualjax.mesh import ConfigError


def test_mesh_shape_resolves_minus_one():
  assert mesh_lib.mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
  assert mesh_lib.make_mesh(4, 2, 1).shape == {"replica": 4, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize("shape,msg", [((3, 1, 1), "replica\\*fsdp\\*tensor = 3"),
                                       ((-1, -1, 1), "at most one"),
                                       ((-1, 3, 1), "not divisible"),
                                       ((0, 1, 1), "mesh.replica")])
def test_mesh_shape_errors(shape, msg):
  with pytest.raises(mesh_lib.ConfigError, match=msg):
    mesh_lib.mesh_shape(*shape, 8)


def test_split_auto_microsteps():
  s = mesh_lib.make_split(0.125, global_batch=16, replicas=1)
  assert (s.microsteps, s.n_ar, s.lam) == (8, 1, 0.125)
  s = mesh_lib.make_split(0.5, global_batch=16, replicas=4)
  assert (s.microsteps, s.n_ar) == (1, 2)
  s = mesh_lib.make_split(15 / 16, global_batch=32, replicas=4)
  assert (s.microsteps, s.n_ar) == (4, 15)
  # Cells are microstep-major: the first n_ar cells are AR.
  assert [s.is_ar(m, r) for m in range(4) for r in range(4)] == [True] * 15 + [False]


def test_single_objective_needs_one_microstep():
  assert mesh_lib.make_split(1.0, 16, 4).microsteps == 1
  assert mesh_lib.make_split(0.0, 16, 4).n_ar == 0


def test_unrepresentable_lam_names_nearest():
  with pytest.raises(mesh_lib.ConfigError, match=r"objective.lam=0.3 .* nearest: 1/4 = 0.25 or 2/4 = 0.5"):
    mesh_lib.make_split(0.3, global_batch=16, replicas=4, microsteps=1)
  with pytest.raises(mesh_lib.ConfigError, match=r"objective.lam=0.3 is not representable.*nearest: 4/16"):
    mesh_lib.make_split(0.3, global_batch=16, replicas=1)
  with pytest.raises(mesh_lib.ConfigError, match="objective.lam must be in"):
    mesh_lib.make_split(1.5, 16, 1)
  with pytest.raises(mesh_lib.ConfigError, match="data.global_batch=10"):
    mesh_lib.make_split(0.5, 10, 4)


def test_max_cell_rows_adds_microsteps_for_memory():
  s = mesh_lib.make_split(0.5, global_batch=64, replicas=4, max_cell_rows=4)
  assert (s.microsteps, s.n_ar, s.cells) == (4, 8, 16)     # 64 / (4 * 4) = 4 rows per cell
  s = mesh_lib.make_split(15 / 16, global_batch=2048, replicas=8, max_cell_rows=8)
  assert s.microsteps == 32 and 2048 // s.cells == 8 and s.lam == 15 / 16
  with pytest.raises(ConfigError, match=r"mesh.microsteps=2 leaves 8 rows per cell, more than the 4"):
    mesh_lib.make_split(0.5, global_batch=64, replicas=4, microsteps=2, max_cell_rows=4)
  with pytest.raises(ConfigError, match=r"and at most 1 rows per cell; nearest"):
    mesh_lib.make_split(0.3, global_batch=16, replicas=4, max_cell_rows=1)


def test_whole_microsteps_for_tensor_parallel_meshes():
  s = mesh_lib.make_split(0.5, global_batch=16, replicas=2, whole_microsteps=True)
  assert (s.microsteps, s.n_ar) == (2, 2) and s.n_ar % s.replicas == 0
  assert mesh_lib.make_split(0.5, 16, 2).microsteps == 1       # the device split needs none
  with pytest.raises(ConfigError, match=r"one objective per microstep .*nearest: 7/8 = 0.875 or 8/8 = 1"):
    mesh_lib.make_split(15 / 16, global_batch=16, replicas=2, whole_microsteps=True)
  with pytest.raises(ConfigError, match=r"lam=0.5 x mesh.microsteps=1 is not an integer"):
    mesh_lib.make_split(0.5, 16, 2, microsteps=1, whole_microsteps=True)
