"""`python -m dualjax.main --config=configs/rep128.py:tiny --workdir=DIR [--config.a.b=v ...]`.

Trains, or resumes when the workdir holds a checkpoint. Bad input (unknown config key, bad
override, impossible shapes, unrepresentable lambda) is one line on stderr and exit code 2,
before anything is written.
"""

import logging
import sys

import jax
from absl import flags

from dualjax import checkpoint
from dualjax import cli
from dualjax import pipeline
from dualjax import train
from dualjax.errors import ConfigError

def main(argv: list[str]) -> int:
  config = cli.define_config(required=True)
  workdir = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
  coordinator = flags.DEFINE_string(
      "coordinator_address", None, "multi-process: host:port of process 0 (jax.distributed)")
  num_processes = flags.DEFINE_integer("num_processes", None, "multi-process: process count")
  process_id = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
  distributed = flags.DEFINE_bool(
      "distributed", False,
      "call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
  cfg = cli.parse(argv, __doc__, sys.modules[__name__], config)
  if cfg is None:
    cli.fail("--config is required, e.g. --config=configs/rep128.py:tiny")
  if not workdir.value:
    cli.fail("--workdir is required")
  if coordinator.value and (num_processes.value is None or process_id.value is None):
    cli.fail("--coordinator_address needs --num_processes and --process_id")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("dualjax").setLevel(logging.INFO)
  if coordinator.value:
    jax.distributed.initialize(coordinator.value, num_processes.value, process_id.value)
  elif distributed.value:
    jax.distributed.initialize()
  try:
    train.train(cfg, workdir.value)
  except train.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main, (ConfigError, checkpoint.CheckpointError, *pipeline.DATA_ERRORS))
