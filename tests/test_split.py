"""The objective split: lam represented exactly over replicas x microsteps, its errors, its program."""

import pytest

from dualjax import split as split_lib
from dualjax.errors import ConfigError


def test_split_auto_microsteps():
  s = split_lib.make_split(0.125, global_batch=16, replicas=1)
  assert (s.microsteps, s.n_ar, s.lam) == (8, 1, 0.125)
  s = split_lib.make_split(0.5, global_batch=16, replicas=4)
  assert (s.microsteps, s.n_ar) == (1, 2)
  s = split_lib.make_split(15 / 16, global_batch=32, replicas=4)
  assert (s.microsteps, s.n_ar) == (4, 15)
  # Cells are microstep-major: the first n_ar cells are AR.
  assert [s.is_ar(m, r) for m in range(4) for r in range(4)] == [True] * 15 + [False]


def test_single_objective_needs_one_microstep():
  assert split_lib.make_split(1.0, 16, 4).microsteps == 1
  assert split_lib.make_split(0.0, 16, 4).n_ar == 0


def test_unrepresentable_lam_names_nearest():
  with pytest.raises(ConfigError, match=r"objective.lam=0.3 .* nearest: 1/4 = 0.25 or 2/4 = 0.5"):
    split_lib.make_split(0.3, global_batch=16, replicas=4, microsteps=1)
  with pytest.raises(ConfigError, match=r"objective.lam=0.3 is not representable.*nearest: 4/16"):
    split_lib.make_split(0.3, global_batch=16, replicas=1)
  with pytest.raises(ConfigError, match="objective.lam must be in"):
    split_lib.make_split(1.5, 16, 1)
  with pytest.raises(ConfigError, match="data.global_batch=10"):
    split_lib.make_split(0.5, 10, 4)


def test_max_cell_rows_adds_microsteps_for_memory():
  s = split_lib.make_split(0.5, global_batch=64, replicas=4, max_cell_rows=4)
  assert (s.microsteps, s.n_ar, s.cells) == (4, 8, 16)     # 64 / (4 * 4) = 4 rows per cell
  s = split_lib.make_split(15 / 16, global_batch=2048, replicas=8, max_cell_rows=8)
  assert s.microsteps == 32 and 2048 // s.cells == 8 and s.lam == 15 / 16
  with pytest.raises(ConfigError, match=r"mesh.microsteps=2 leaves 8 rows per cell, more than the 4"):
    split_lib.make_split(0.5, global_batch=64, replicas=4, microsteps=2, max_cell_rows=4)
  with pytest.raises(ConfigError, match=r"and at most 1 rows per cell; nearest"):
    split_lib.make_split(0.3, global_batch=16, replicas=4, max_cell_rows=1)


def test_whole_microsteps_for_tensor_parallel_meshes():
  s = split_lib.make_split(0.5, global_batch=16, replicas=2, whole_microsteps=True)
  assert (s.microsteps, s.n_ar) == (2, 2) and s.n_ar % s.replicas == 0
  assert split_lib.make_split(0.5, 16, 2).microsteps == 1       # the device split needs none
  with pytest.raises(ConfigError, match=r"one objective per microstep .*nearest: 7/8 = 0.875 or 8/8 = 1"):
    split_lib.make_split(15 / 16, global_batch=16, replicas=2, whole_microsteps=True)
  with pytest.raises(ConfigError, match=r"lam=0.5 x mesh.microsteps=1 is not an integer"):
    split_lib.make_split(0.5, 16, 2, microsteps=1, whole_microsteps=True)


def test_program_and_description():
  s = split_lib.make_split(15 / 16, global_batch=2048, replicas=8, max_cell_rows=8)
  assert s.program == "time" and s.ar_microsteps == 30
  assert s.describe() == ("objective split: time (30 AR, 2 MDM microsteps) x 8 replicas; "
                          "lam 0.9375 = 240/256 AR cells")
  s = split_lib.make_split(15 / 16, global_batch=2048, replicas=256, max_cell_rows=8)
  assert (s.program, s.microsteps, s.n_ar) == ("device", 1, 240)
  assert s.describe() == ("objective split: device (AR sub-mesh 240 replicas, MDM 16) x 1 "
                          "microsteps; lam 0.9375 = 240/256 AR cells")
  s = split_lib.make_split(0.375, global_batch=16, replicas=4)  # 3 of 8 cells: 2 microsteps
  assert s.describe() == ("objective split: device (AR sub-mesh 3 replicas, MDM 1 in microstep 0, "
                          "after 0 AR and before 1 MDM ones) x 2 microsteps; lam 0.375 = 3/8 AR "
                          "cells")
