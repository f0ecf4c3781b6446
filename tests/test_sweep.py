"""dualjax.sweep: the grid, the per-point checks, local runs, launch commands, the results CSV."""

import csv
import fractions
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time

import ml_collections
import pytest

from dualjax import mesh as mesh_lib
from dualjax.errors import ConfigError
from dualjax import results
from dualjax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "sweep_paper.py"


def _load(arg: str = "") -> ml_collections.ConfigDict:
  ns: dict = {}
  exec(compile(PAPER.read_text(), str(PAPER), "exec"), ns)  # pylint: disable=exec-used
  return ns["get_config"](arg)


def _env(devices: int = 1, **extra) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _sweep(args: list[str], devices: int = 1, timeout: float = 600, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dualjax.sweep", *args], cwd=REPO,
                        env=_env(devices, **env), capture_output=True, text=True, timeout=timeout,
                        check=False)


@pytest.mark.parametrize("r,lam,seed,name", [
    (32, 0.5, 42, "r32_lam0.5_s42"), (1, 15 / 16, 42, "r1_lam0.9375_s42"),
    (128, 1.0, 0, "r128_lam1_s0"), (4, 0.0, 3, "r4_lam0_s3"),
    (2, 1 / 256, 42, "r2_lam0.00390625_s42"), (8, 255 / 256, 1, "r8_lam0.99609375_s1")])
def test_point_names(r, lam, seed, name):
  p = sweep.Point(r, lam, seed)
  assert p.name == name
  # the override reproduces lam exactly
  assert float(p.overrides()[1].split("=", 1)[1]) == lam


def test_paper_grid():
  points = sweep.grid(_load())
  assert len(points) == 8 * 13
  assert sorted({p.r for p in points}) == [1, 2, 4, 8, 16, 32, 64, 128]
  lams = {fractions.Fraction(p.lam) for p in points}
  F = fractions.Fraction
  assert {F(0), F(1, 8), F(1, 2), F(7, 8), F(15, 16), F(63, 64), F(1)} <= lams
  assert len({p.name for p in points}) == len(points)


def _representable(lam: float, batch: int, replicas: int, max_rows: int) -> bool:
  """Brute force, independent of mesh.make_split: some microstep count m splits the batch into
  replicas*m equal cells of at most max_rows rows, lam*cells of them AR (whole cells)."""
  for m in range(1, 1025):
    cells = replicas * m
    if batch % cells == 0 and (not max_rows or batch // cells <= max_rows):
      if abs(lam * cells - round(lam * cells)) < 1e-9:
        return True
  return False


@pytest.mark.parametrize("devices", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("lam", [0.0, 1 / 256, 1 / 64, 0.3, 0.5, 15 / 16, 0.99, 1.0])
def test_check_split_matches_brute_force(devices, lam):
  cfg = sweep.trainer_config([f"--config={REPO / 'configs' / 'base.py'}",
                              f"--config.objective.lam={lam!r}"])
  expect = _representable(lam, 2048, devices, 8)
  try:
    sweep.check_split(cfg, devices)
    ok = True
  except ConfigError as e:
    ok = False
    assert "objective.lam" in str(e) and "\n" not in str(e)
  assert ok == expect


def test_check_split_mesh_mismatch():
  cfg = sweep.trainer_config([f"--config={REPO / 'configs' / 'base.py'}",
                              "--config.mesh.replica=32"])
  with pytest.raises(ConfigError, match="replica\\*fsdp\\*tensor = 32 but there are 64"):
    sweep.check_split(cfg, 64)


@pytest.mark.parametrize("devices", [16, 64, 256])
def test_every_paper_point_fits_the_targets(devices, tmp_path):
  p = sweep.plan(_load(), tmp_path / "root")
  sweep.check_points(p, devices)  # 2x8 GPUs, v5p-128, v5e-256


def test_trainer_config_errors_are_one_line():
  with pytest.raises(sweep.SweepError, match="nosuch") as e:
    sweep.trainer_config([f"--config={REPO / 'configs' / 'base.py'}", "--config.train.nosuch=3"])
  assert "\n" not in str(e.value)
  with pytest.raises(sweep.SweepError, match="--config=FILE"):
    sweep.trainer_config(["--workdir=/x"])


def test_plan_arguments(tmp_path):
  p = sweep.plan(_load("tiny"), tmp_path / "root")
  assert [x.name for x in p.points] == ["r1_lam0.5_s42", "r1_lam0.75_s42", "r2_lam0.5_s42",
                                        "r2_lam0.75_s42"]
  x = p.points[3]
  args = p.args[x]
  assert args[:2] == ["--config=configs/base.py:tiny", f"--workdir={tmp_path / 'root' / x.name}"]
  cfg = p.cfgs[x]
  assert (cfg.data.repetitions, cfg.objective.lam, cfg.seed, cfg.train.steps) == (2, 0.75, 42, 4)
  assert cfg.data.prepared_dir == str(tmp_path / "root" / "prepared")
  assert not (tmp_path / "root").exists()  # planning writes nothing


def test_plan_rejects_bad_sweep_files(tmp_path):
  s = _load("tiny")
  s.overrides = ("train.nosuch=1",)
  with pytest.raises(sweep.SweepError, match="point r1_lam0.5_s42: .*nosuch"):
    sweep.plan(s, tmp_path)
  s = _load("tiny")
  s.lams = (0.5, 1.5)
  with pytest.raises(sweep.SweepError, match="lams must be numbers in \\[0, 1\\]"):
    sweep.plan(s, tmp_path)
  s = _load("tiny")
  s.lams = (0.5, 0.5)
  with pytest.raises(sweep.SweepError, match="appears twice"):
    sweep.plan(s, tmp_path)


def test_launch_commands_tpu_and_slurm(tmp_path):
  s = _load()
  root = tmp_path / "root"
  p = sweep.plan(s, root)
  lines = sweep.launch_commands(p)
  assert len(lines) == 104
  first = shlex.split(lines[0])
  assert first[:4] == ["python", "-m", "launch.tpu", "launch"]
  assert "--name=dualjax-r1-lam0-s42" in first and "--accelerator=v5p-128" in first
  run = shlex.split(next(a for a in first if a.startswith("--run=")).split("=", 1)[1])
  assert run == p.args[p.points[0]]
  # several points per slice, and a finished point is skipped
  (root / p.points[0].name / "checkpoints" / "8192").mkdir(parents=True)
  s.launch.points_per_slice = 4
  s.launch.backend = "slurm"
  lines = sweep.launch_commands(sweep.plan(s, root))
  assert lines[0] == f"# {p.points[0].name}: finished, skipped"
  cmds = [shlex.split(l) for l in lines[1:]]
  assert len(cmds) == 26 and sum(a.startswith("--run=") for c in cmds for a in c) == 103
  assert cmds[0][:3] == ["python", "-m", "launch.slurm"] and "--nodes=16" in cmds[0]
  assert "--job_name=dualjax-000" in cmds[0]


def test_cli_unrepresentable_lam_is_one_line(tmp_path):
  f = tmp_path / "sweep_bad.py"
  f.write_text(PAPER.read_text().replace("c.lams = (0.5, 0.75)", "c.lams = (0.5, 0.3)"))
  root = tmp_path / "root"
  r = _sweep([f"--config={f}:tiny", f"--root={root}"])
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().count("\n") == 0
  assert "r1_lam0.3_s42" in r.stderr and "objective.lam=0.3 is not representable" in r.stderr
  assert not root.exists()
  # launch mode checks against the target slice instead of this machine
  r = _sweep([f"--config={f}:tiny", f"--root={root}", "--mode=launch"])
  assert r.returncode == 2 and "on 8 devices" in r.stderr and r.stderr.strip().count("\n") == 0


def test_cli_failed_points_are_reported(tmp_path):
  root = tmp_path / "root"
  r = _sweep([f"--config={PAPER}:tiny", f"--root={root}", "--config.repetitions=(1,)",
              "--config.lams=(0.5,)", f"--config.prepared_dir={tmp_path}/none",
              "--config.overrides=('data.source=/nonexistent/corpus.txt',)"])
  assert r.returncode == 1, r.stderr
  assert "sweep: 0/1 points finished; failed: r1_lam0.5_s42 (exit 2)" in r.stderr


def _main(argv: list[str]) -> int:
  sweep.FLAGS.unparse_flags()
  return sweep.main(["dualjax.sweep", *argv])


def test_main_finished_and_help(tmp_path, capsys):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text('{"train": {"steps": 3}}')
  assert _main([f"--finished={wd}"]) == 1
  (wd / "checkpoints" / "3").mkdir(parents=True)
  assert _main([f"--finished={wd}"]) == 0
  assert _main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "--collect" in out and "--mode" in out and "--finished" in out


@pytest.mark.slow
def test_local_tiny_sweep_end_to_end(tmp_path, eval_data_dir):  # the tiny sweep evaluates ARC-E
  """2 x 2 tiny points train one after another; a second call skips them; --collect fills
  every column of the results CSV."""
  root = tmp_path / "root"
  cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  t0 = time.perf_counter()
  r = _sweep([f"--config={PAPER}:tiny", f"--root={root}"], **cache)
  first = time.perf_counter() - t0
  assert r.returncode == 0, r.stderr[-3000:]
  assert "sweep: 4/4 points finished" in r.stdout
  t0 = time.perf_counter()
  r = _sweep([f"--config={PAPER}:tiny", f"--root={root}"], **cache)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("finished, skipped") == 4 and "training" not in r.stdout
  assert time.perf_counter() - t0 < first / 2
  r = _sweep([f"--config={PAPER}:tiny", f"--root={root}", "--collect"])
  assert r.returncode == 0, r.stderr
  rows = list(csv.DictReader((root / "results.csv").open()))
  assert [x["point"] for x in rows] == ["r1_lam0.5_s42", "r1_lam0.75_s42", "r2_lam0.5_s42",
                                        "r2_lam0.75_s42"]
  for x in rows:
    assert list(x) == list(results.COLUMNS)
    for col, v in x.items():
      assert v != "", col
      if col != "point":
        assert math.isfinite(float(v)), (x["point"], col, v)
    assert (int(x["steps"]), int(x["tokens_seen"])) == (4, 4 * 16 * 128)
    assert int(x["best_val_ar_step"]) in (0, 2, 4) and int(x["ar_overfitting"]) in (0, 1)
    assert float(x["avg/ar"]) == pytest.approx(
        sum(float(x[f"score/{t}/ar"]) for t in results.TASKS) / 9)
