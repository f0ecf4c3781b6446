"""`python -m dualjax.sweep --config=configs/sweep_paper.py --root=DIR [--mode=local|launch] [--collect]`

A grid over repetitions r, AR share lam and seeds (DESIGN.md §8). One workdir per point, named by
its values (`ROOT/r32_lam0.5_s42`). Every point's training config is built and checked before
anything runs: a config error, or a lam that the point's mesh cannot represent, is one line and
exit code 2.

  --mode=local    runs `python -m dualjax.main` for each point, one after another; finished points
                  (workdir holds checkpoints/<train.steps>) are skipped, failed ones are reported at
                  the end (exit 1). The mesh is this machine's devices.
  --mode=launch   prints one launch command per slice/job (`python -m launch.tpu launch ...` or
                  `python -m launch.slurm ...`, see launch/README.md), `launch.points_per_slice`
                  points each, run in sequence there. The mesh is the target's device count.
  --collect       writes the results CSV (--out, default ROOT/results.csv) from the finished
                  points' workdirs (dualjax/results.py); runs nothing.
  --finished=DIR  exit 0 if the run in DIR is finished, 1 if not (used by the launch scripts).
  --dry_run       local mode: print the training commands instead of running them.

The sweep config (an ml_collections file, see configs/sweep_paper.py) has the fields
base, repetitions, lams, seeds, overrides, prepared_dir and launch; '{root}' in overrides and
prepared_dir stands for --root.
"""

import dataclasses
import os
import pathlib
import shlex
import subprocess
import sys
from typing import Sequence

from absl import flags
import jax
import ml_collections

from dualjax import accelerators
from dualjax import cli
from dualjax import mesh as mesh_lib
from dualjax import results as results_lib
from dualjax import split as split_lib
from dualjax.errors import ConfigError

# Own FlagValues: importing this module (launch/, tests) defines no global flags.
FLAGS = flags.FlagValues()
_ROOT = flags.DEFINE_string("root", None, "directory holding one workdir per point",
                            flag_values=FLAGS)
_MODE = flags.DEFINE_enum(
    "mode", "local", ["local", "launch"],
    "local: train here one point after another; launch: print launch commands", flag_values=FLAGS)
_COLLECT = flags.DEFINE_bool("collect", False, "write the results CSV of the finished points",
                             flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "--collect: CSV path (default ROOT/results.csv)",
                           flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "local mode: print the commands, run nothing",
                             flag_values=FLAGS)
_FINISHED = flags.DEFINE_string(
    "finished", None, "exit 0 if the run in this workdir is finished, else 1", flag_values=FLAGS)


class SweepError(ValueError):
  """A sweep that cannot start (one line, names the field, file or point)."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: repetitions, AR share and seed."""
  r: int
  lam: float
  seed: int

  @property
  def name(self) -> str:
    return f"r{self.r}_lam{format_lam(self.lam)}_s{self.seed}"

  def overrides(self) -> list[str]:
    return [f"--config.data.repetitions={self.r}", f"--config.objective.lam={self.lam!r}",
            f"--config.seed={self.seed}"]


def format_lam(lam: float) -> str:
  """Shortest exact decimal: 0.5, 0.9375, 0.00390625, 1 (no trailing '.0')."""
  s = repr(float(lam))
  return s[:-2] if s.endswith(".0") else s


def grid(sweep: ml_collections.ConfigDict) -> list[Point]:
  """The points of a sweep config (r-major, then lam, then seed); checks the value lists."""
  for field in ("repetitions", "lams", "seeds"):
    if not isinstance(sweep.get(field), (tuple, list)) or not sweep[field]:
      raise SweepError(f"sweep config: '{field}' must be a non-empty tuple")
  points = []
  for r in sweep.repetitions:
    if not isinstance(r, int) or r < 1:
      raise SweepError(f"sweep config: repetitions must be positive integers, got {r!r}")
    for lam in sweep.lams:
      if not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise SweepError(f"sweep config: lams must be numbers in [0, 1], got {lam!r}")
      for seed in sweep.seeds:
        if not isinstance(seed, int):
          raise SweepError(f"sweep config: seeds must be integers, got {seed!r}")
        points.append(Point(r, float(lam), seed))
  names = [p.name for p in points]
  dup = next((n for n in names if names.count(n) > 1), None)
  if dup:
    raise SweepError(f"sweep config: point {dup} appears twice")
  return points


def check_split(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError (one line) unless the run's mesh and lam fit `num_devices` devices.

  The checks of train.plan() that need no data: replica x fsdp x tensor (one -1 resolved) equals
  the devices, lam = AR cells / cells is representable, the batch divides into cells x fsdp.
  """
  m = cfg.mesh
  shape = mesh_lib.mesh_shape(m.replica, m.fsdp, m.tensor, num_devices)
  split_lib.split_from_config(cfg, dict(zip(mesh_lib.AXES, shape)))


def trainer_config(args: Sequence[str]) -> ml_collections.ConfigDict:
  """The training config `python -m dualjax.main` would build from `--config=...` and overrides.

  Arguments other than --config / --config.* (e.g. --workdir) are ignored.
  """
  args = ["dualjax.main"] + [a for a in args if a.startswith(("--config=", "--config."))]
  if not any(a.startswith("--config=") for a in args):
    raise SweepError("no --config=FILE among the training arguments")
  try:
    return cli.load_config(args, required=True)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    raise SweepError(cli.describe_flag_error(e, args)) from None


@dataclasses.dataclass
class Plan:
  """A checked sweep: its points, each point's training arguments and config."""
  points: list[Point]
  args: dict[Point, list[str]]
  cfgs: dict[Point, ml_collections.ConfigDict]
  root: pathlib.Path
  launch: ml_collections.ConfigDict


def plan(sweep: ml_collections.ConfigDict, root: str | os.PathLike) -> Plan:
  """Builds and checks every point's training config (no mesh check: see check_points)."""
  root = pathlib.Path(root)
  if root.exists() and not root.is_dir():
    raise SweepError(f"--root {root} exists and is not a directory")
  base = sweep.get("base")
  if not isinstance(base, str) or not base:
    raise SweepError("sweep config: 'base' must name a training config file, e.g. configs/base.py")
  overrides = sweep.get("overrides", ())
  if not isinstance(overrides, (tuple, list)) or not all(
      isinstance(o, str) and "=" in o for o in overrides):
    raise SweepError("sweep config: 'overrides' must be a tuple of 'section.field=value' strings")
  extra = [f"--config.{o}".replace("{root}", str(root)) for o in overrides]
  if sweep.get("prepared_dir"):
    extra.append(f"--config.data.prepared_dir={sweep.prepared_dir}".replace("{root}", str(root)))
  points = grid(sweep)
  args, cfgs = {}, {}
  for p in points:
    args[p] = [f"--config={base}", f"--workdir={root / p.name}", *p.overrides(), *extra]
    try:
      cfgs[p] = trainer_config(args[p])
    except SweepError as e:
      raise SweepError(f"point {p.name}: {e}") from None
  return Plan(points, args, cfgs, root, sweep.get("launch", ml_collections.ConfigDict()))


def target_devices(launch: ml_collections.ConfigDict) -> int:
  """Devices of the launch target: the TPU slice's chips or nodes x GPUs."""
  backend = launch.get("backend", "tpu")
  try:
    if backend == "tpu":
      return accelerators.parse_tpu(str(launch.get("accelerator", ""))).devices
    if backend == "slurm":
      return accelerators.gpu_devices(int(launch.get("nodes", 1)),
                                      int(launch.get("gpus_per_node", 8)))
  except accelerators.AcceleratorError as e:
    raise SweepError(f"launch.{'accelerator' if backend == 'tpu' else 'nodes'}: {e}") from None
  raise SweepError(f"launch.backend must be 'tpu' or 'slurm', got {backend!r}")


def check_points(p: Plan, num_devices: int) -> None:
  for point in p.points:
    try:
      check_split(p.cfgs[point], num_devices)
    except ConfigError as e:
      raise SweepError(f"point {point.name}: {e} (on {num_devices} devices)") from None


def run_local(p: Plan, dry_run: bool = False) -> int:
  """Trains the unfinished points one after another; returns 1 if any failed."""
  todo = [x for x in p.points if not results_lib.is_finished(p.root / x.name,
                                                             p.cfgs[x].train.steps)]
  for x in p.points:
    if x not in todo:
      print(f"{x.name}: finished, skipped", flush=True)
  failed: list[tuple[str, int]] = []
  for i, x in enumerate(todo, 1):
    cmd = [sys.executable, "-m", "dualjax.main", *p.args[x]]
    if dry_run:
      print(shlex.join(cmd))
      continue
    print(f"{x.name}: training ({i}/{len(todo)})", flush=True)
    try:
      rc = subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
      print(f"interrupted during {x.name}", file=sys.stderr)
      return 130
    if rc != 0 or not results_lib.is_finished(p.root / x.name, p.cfgs[x].train.steps):
      failed.append((x.name, rc))
  if dry_run:
    return 0
  done = len(p.points) - len(failed)
  print(f"sweep: {done}/{len(p.points)} points finished" + (
      "; failed: " + ", ".join(f"{n} ({f'exit {rc}' if rc else 'stopped before train.steps'})"
                               for n, rc in failed) if failed else ""),
        file=sys.stderr if failed else sys.stdout)
  return 1 if failed else 0


def launch_commands(p: Plan) -> list[str]:
  """One launch command per slice (TPU) or job (SLURM) for the unfinished points."""
  launch = p.launch
  per = int(launch.get("points_per_slice", 1))
  if per < 1:
    raise SweepError(f"launch.points_per_slice must be >= 1, got {per}")
  prefix = str(launch.get("name_prefix", "dualjax"))
  todo = [x for x in p.points if not results_lib.is_finished(p.root / x.name,
                                                             p.cfgs[x].train.steps)]
  lines = [f"# {x.name}: finished, skipped" for x in p.points if x not in todo]
  backend = launch.get("backend", "tpu")
  for i in range(0, len(todo), per):
    group = todo[i:i + per]
    name = slug(f"{prefix}-{group[0].name}" if per == 1 else f"{prefix}-{i // per:03d}")
    runs = [f"--run={shlex.join(p.args[x])}" for x in group]
    if backend == "tpu":
      cmd = ["python", "-m", "launch.tpu", "launch", f"--name={name}",
             f"--accelerator={launch.accelerator}"]
      cmd += [f"--{k}={launch[k]}" for k in ("zone", "project") if launch.get(k)]
      cmd += [f"--{k}" for k in ("spot", "queued") if launch.get(k)]
    else:
      cmd = ["python", "-m", "launch.slurm", f"--job_name={name}", f"--nodes={launch.nodes}",
             f"--gpus_per_node={launch.get('gpus_per_node', 8)}"]
      cmd += [f"--{k}={launch[k]}" for k in ("partition", "time", "account") if launch.get(k)]
    lines.append(shlex.join(cmd + runs))
  return lines


def slug(name: str) -> str:
  """A TPU / SLURM job name: lower case letters, digits and '-' ('.' -> 'p', '_' -> '-')."""
  return name.lower().replace("_", "-").replace(".", "p")


def collect(p: Plan, out: str | os.PathLike) -> int:
  """Writes the CSV of the finished points; reports the others on stderr."""
  rows, missing, unfinished = [], [], []
  for x in p.points:
    wd = p.root / x.name
    if not (wd / "config.json").is_file():
      missing.append(x.name)
    elif not results_lib.is_finished(wd, p.cfgs[x].train.steps):
      unfinished.append(x.name)
    else:
      rows.append(results_lib.row(wd, x.name))
  path = results_lib.write_csv(rows, out)
  print(f"wrote {path}: {len(rows)} of {len(p.points)} points")
  for label, names in (("not started", missing), ("unfinished", unfinished)):
    if names:
      print(f"{label} ({len(names)}): {', '.join(names)}", file=sys.stderr)
  return 0


def main(argv: list[str]) -> int:
  argv = [a.replace("--dry-run", "--dry_run", 1) if a.startswith("--dry-run") else a for a in argv]
  args = cli.parse(argv, __doc__, FLAGS, config="required", config_help=(
      "sweep config file, e.g. configs/sweep_paper.py or configs/sweep_paper.py:tiny"))
  if args is None:
    return 0
  sweep = args.config
  if _FINISHED.value:
    return 0 if results_lib.is_finished(_FINISHED.value) else 1
  if sweep is None:
    cli.fail("--config is required, e.g. --config=configs/sweep_paper.py:tiny")
  if not _ROOT.value:
    cli.fail("--root is required")
  try:
    p = plan(sweep, _ROOT.value)
    if _COLLECT.value:
      return collect(p, _OUT.value or p.root / "results.csv")
    if _MODE.value == "local":
      check_points(p, jax.device_count())
      return run_local(p, _DRY_RUN.value)
    check_points(p, target_devices(p.launch))
    for line in launch_commands(p):
      print(line)
    return 0
  except (SweepError, results_lib.ResultsError, ConfigError) as e:
    cli.fail(str(e))
  return 0


if __name__ == "__main__":
  cli.run(main)
