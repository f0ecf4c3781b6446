"""`python -m dualjax.main --config=configs/rep128.py:tiny --workdir=DIR [--config.a.b=v ...]`.

Trains, or resumes when the workdir holds a checkpoint of the same run. Bad input (unknown
config key, bad override, impossible shapes, unrepresentable lambda, damaged or mismatched
prepared data, a workdir in use by another run or holding another run's checkpoints) is one line
on stderr and exit code 2, before anything is written. A failed checkpoint save (e.g. a full
disk) is one line and exit code 2, the last good checkpoint intact; a non-finite loss exit code 1.
SIGTERM saves at the next step (exit 0); before training starts it exits at once (exit 0).
`--config.train.stop_at=N` ends this start at step N with a checkpoint; run the same command
without it to continue.
"""

import errno
import logging
import os
import sys

import jax
from absl import flags

from dualjax import checkpoint
from dualjax import cli
from dualjax import lock
from dualjax import pipeline
from dualjax import train
from dualjax.errors import ConfigError

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)",
                               flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process: host:port of process 0 (jax.distributed)",
    flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: process count",
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index",
                                   flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)",
    flag_values=FLAGS)


def main(argv: list[str]) -> int:
  args = cli.parse(argv, __doc__, FLAGS, config="required")
  if args is None:
    return 0
  cfg = args.config
  if cfg is None:
    cli.fail("--config is required, e.g. --config=configs/rep128.py:tiny")
  if not _WORKDIR.value:
    cli.fail("--workdir is required")
  if _COORDINATOR.value and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
    cli.fail("--coordinator_address needs --num_processes and --process_id")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      force=True)
  logging.getLogger("dualjax").setLevel(logging.INFO)
  checkpoint.quiet_orbax()
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    train.train(cfg, _WORKDIR.value)
  except train.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except checkpoint.CheckpointError as e:
    # Orbax may still hold coroutines of the failed save; exiting now keeps their shutdown
    # noise ("Exception ignored in <coroutine ...>") off the terminal.
    print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)  # pylint: disable=protected-access
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      cli.fail(f"no space left on device writing {e.filename or _WORKDIR.value}")
    raise
  return 0


if __name__ == "__main__":
  cli.run(main, (ConfigError, lock.LockError, *pipeline.DATA_ERRORS))
