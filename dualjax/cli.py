"""The command-line convention of every entry point (DESIGN.md §9).

absl flags in each entry point's own `flags.FlagValues` (entry points are importable libraries
too, and may be called in-process, more than once), plus one ml_collections config where the
entry point reads run settings: `--config=FILE[:variant]` and `--config.SECTION.FIELD=V` overrides with the
field names of the run config (`--config.eval.tasks` means the same in training and in
`python -m dualjax.evaluate`). `--help` lists the flags and the config's fields. Bad input is one
line on stderr, `error: ...`, and exit code 2.
"""

import glob
import os
import pathlib
import sys
import warnings
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import config_flags

# The library's default run config (a config file like configs/base.py; not imported here, so
# that entry points stay light where they need no model).
DEFAULT_CONFIG = str(pathlib.Path(__file__).with_name("config_lib.py"))


def fail(message: str) -> None:
  """`error: message` (its first line) on stderr, exit code 2."""
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(2)


def output_dir(value: str | None, what: str) -> pathlib.Path:
  """`--out=value` as a directory to write into (made later): fails in one line (exit 2) when it
  is missing (`what` says what it is for), is a file, or sits under an unwritable directory."""
  if not value:
    fail(f"--out is required ({what})")
  out = pathlib.Path(value)
  if out.exists() and not out.is_dir():
    fail(f"--out={out}: exists and is not a directory")
  ancestor = next(p for p in [out, *out.absolute().parents] if p.exists())
  if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
    fail(f"--out={out}: cannot write under {ancestor}")
  return out


def one_line(e: BaseException | str) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def describe_flag_error(e: BaseException, argv: Sequence[str]) -> str:
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


def _fields(cfg: Any, prefix: str = "config") -> list[str]:
  out = []
  for k, v in cfg.items():
    if hasattr(v, "items"):
      out += _fields(v, f"{prefix}.{k}")
    else:
      out.append(f"  --{prefix}.{k}={v!r}")
  return out


class Args:
  """What `parse` returns: the positional arguments and the loaded config (or None)."""

  def __init__(self, positional: list[str], config: Any):
    self.positional, self.config = positional, config


def _is_config_arg(a: str) -> bool:
  return a.startswith(("--config=", "--config."))


def load_config(argv: Sequence[str], *, required: bool = False, help_text: str = "") -> Any:
  """The config of `--config=FILE[:arg]` and its `--config.a.b=v` overrides among `argv`.

  A fresh flag for each call: ml_collections derives the override flags from the arguments.
  Raises the library's errors (see `parse`, which turns them into one line).
  """
  args = [argv[0]] + [a for a in argv[1:] if _is_config_arg(a)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None if required else DEFAULT_CONFIG,
      help_text or "config file with an optional variant, e.g. configs/rep128.py:tiny",
      flag_values=fv, sys_argv=args)
  with warnings.catch_warnings():  # ml_collections loads config files with load_module()
    warnings.simplefilter("ignore", DeprecationWarning)
    fv(args)
    cfg = fv["config"].value
    if cfg is not None:
      cfg.keys()  # a config file that failed to load raises here
  return cfg


def parse(argv: Sequence[str], doc: str, flag_values: flags.FlagValues, *,
          config: str | None = None, config_help: str = "", positional: bool = False
          ) -> Args | None:
  """Parses `argv`: the entry point's own `flag_values` and, if `config` is 'optional' (default:
  the library's run config) or 'required', `--config` with its overrides. Prints help and returns
  None on --help. Bad input is one line and exit code 2 (`fail`); positional arguments are an
  error unless `positional`.
  """
  argv = list(argv)
  own = [a for a in argv[1:] if config is None or not _is_config_arg(a)]
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + flag_values.get_help())
    if config is not None:
      print(f"  --config: {config_help or 'a config file, e.g. configs/rep128.py:tiny'}"
            + ("" if config == "required" else " (default: dualjax/config_lib.py)"))
      try:
        cfg = load_config(argv, required=config == "required")
      except Exception:  # pylint: disable=broad-except
        cfg = None
      if cfg is not None:
        print("\nconfig fields (override any with --config.SECTION.FIELD=VALUE):")
        print("\n".join(_fields(cfg)))
    return None
  try:
    flag_values.unparse_flags()
    extra = flag_values(argv[:1] + own)[1:]
    cfg = load_config(argv, required=config == "required",
                      help_text=config_help) if config is not None else None
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    fail(describe_flag_error(e, argv))
  if extra and not positional:
    fail(f"unexpected arguments: {' '.join(extra)} (flags take the form --name=value)")
  bad = [a for a in extra if a.startswith("-")]
  if bad:
    fail(f"unknown flag {bad[0]} (see --help)")
  return Args(extra, cfg)


def quiet_tpu_probe() -> None:
  """On a machine without TPU chips, give libtpu (installed for ahead-of-time TPU compiles) the
  worker settings it would otherwise look up and warn about at start-up. A no-op on a TPU VM
  (its chips appear as /dev/accel* or /dev/vfio devices) and where they are set already."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  for name, value in (("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_WORKER_ID", "0")):
    os.environ.setdefault(name, value)


def run(main: Callable[[list[str]], int], errors: tuple[type[BaseException], ...] = ()) -> None:
  """`sys.exit(main(sys.argv))`; an exception of `errors` is one line and exit code 2."""
  quiet_tpu_probe()
  try:
    code = main(sys.argv)
  except errors as e:
    fail(one_line(e))
  sys.exit(code)
