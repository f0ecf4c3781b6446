"""`python -m dualjax.main --config=configs/rep128.py:tiny --workdir=DIR [--config.a.b=v ...]`.

Trains, or resumes when the workdir holds a checkpoint. Bad input (unknown config key, bad
override, impossible shapes, unrepresentable lambda) is one line on stderr and exit code 2,
before anything is written.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file with an optional variant, e.g. configs/rep128.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process: host:port of process 0 (jax.distributed)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _describe_flag_error(e: BaseException, argv: list[str]) -> str:
  """One line for an absl/ml_collections flag error (they wrap the cause in several lines)."""
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  key = lines[0].strip("\"'")
  for flag in (a.split("=")[0] for a in argv if a.startswith("--config.")):
    if key in flag.split(".")[1:]:  # a KeyError naming an unknown field
      hint = next((l for l in lines if l.startswith("Did you mean")), "")
      hint = hint.rstrip("\"'")
      return f"{flag}: unknown config key '{key}'" + (f" ({hint})" if hint else "")
  return lines[-1]


def main(argv: list[str]) -> int:
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + flags.FLAGS.module_help(sys.modules[__name__]))
    print("  --config.SECTION.FIELD=VALUE: override any config field (see configs/base.py)")
    return 0
  try:
    extra = flags.FLAGS(argv)[1:]
    cfg = _CONFIG.value
    if cfg is not None:
      cfg.keys()  # a config file that failed to load raises here
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    _fail(_describe_flag_error(e, argv))
  if extra:
    _fail(f"unexpected arguments: {' '.join(extra)} (flags take the form --name=value)")
  if cfg is None:
    _fail("--config is required, e.g. --config=configs/rep128.py:tiny")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  if _COORDINATOR.value and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
    _fail("--coordinator_address needs --num_processes and --process_id")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("dualjax").setLevel(logging.INFO)
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  from dualjax import checkpoint, pipeline, train  # pylint: disable=g-import-not-at-top
  try:
    train.train(cfg, _WORKDIR.value)
  except (train.ConfigError, checkpoint.CheckpointError, *pipeline.DATA_ERRORS) as e:
    _fail(str(e))
  except train.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
