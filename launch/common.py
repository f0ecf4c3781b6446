"""What both launchers share: the training runs they start and the checks made before any command."""

import pathlib
import shlex
import sys
from typing import Sequence

from dualjax.errors import ConfigError
from dualjax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]


class LaunchError(ValueError):
  """Bad launcher input (one line, exit code 2, nothing run)."""


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def wants_help(argv: Sequence[str]) -> bool:
  """-h / --help / --helpfull among the launcher's own arguments (before a '--')."""
  own = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return any(a in ("-h", "--help", "--helpfull") for a in own)


def normalise_argv(argv: Sequence[str]) -> list[str]:
  """Accepts --dry-run for --dry_run (before a '--' separator)."""
  out, seen_sep = [], False
  for a in argv:
    if a == "--":
      seen_sep = True
    if not seen_sep and (a == "--dry-run" or a.startswith("--dry-run=")):
      a = a.replace("--dry-run", "--dry_run", 1)
    out.append(a)
  return out


def runs_from(run_flags: Sequence[str], positional: Sequence[str]) -> list[list[str]]:
  """Training runs: each --run='ARGS' (shell-split) and the arguments after '--' (one run)."""
  runs = [shlex.split(r) for r in run_flags]
  if positional:
    runs.append(list(positional))
  if not runs:
    raise LaunchError("no training run: pass the dualjax.main arguments after '--' "
                      "(e.g. -- --config=configs/base.py --workdir=/mnt/dualjax/run1) or --run='...'")
  return runs


def workdir_of(args: Sequence[str]) -> str:
  wd = [a.split("=", 1)[1] for a in args if a.startswith("--workdir=")]
  if not wd or not wd[-1]:
    raise LaunchError(f"run '{shlex.join(args)}': --workdir=DIR is required")
  return wd[-1]


def check_runs(runs: Sequence[Sequence[str]], num_devices: int, where: str) -> None:
  """Every run's config must build and fit `num_devices` devices (mesh and lam split)."""
  for args in runs:
    wd = workdir_of(args)
    if wd.startswith("gs://"):
      raise LaunchError(
          f"--workdir={wd}: dualjax writes its workdir through local file APIs (pathlib), not "
          "gs:// paths; mount the bucket (--gcsfuse_bucket) or an NFS share (--nfs) and pass "
          "the mounted path (launch/README.md, 'Storage')")
    bad = [a for a in args if a in ("--distributed",) or a.startswith(
        ("--coordinator_address", "--num_processes", "--process_id"))]
    if bad:
      raise LaunchError(f"run for {wd}: {bad[0]} is set by the launcher; drop it")
    try:
      cfg = sweep.trainer_config(args)
      sweep.check_split(cfg, num_devices)
    except sweep.SweepError as e:
      raise LaunchError(f"run for {wd}: {e}") from None
    except ConfigError as e:
      raise LaunchError(f"run for {wd} on {where} ({num_devices} devices): {e}") from None
