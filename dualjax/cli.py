"""The command-line convention of every entry point (DESIGN.md §9).

Entry points define their flags inside `main` (they are importable libraries too, and absl
flags are process-global), parse with `parse` and run with `run`.

absl flags plus one ml_collections config: `--config=FILE[:variant]` and `--config.SECTION.FIELD=V`
overrides with the field names of the run config (`--config.eval.tasks` means the same in
training and in `python -m dualjax.evaluate`). `--help` lists the entry point's flags and the
config's fields. Bad input is one line on stderr, `error: ...`, and exit code 2.
"""

import pathlib
import sys
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import config_flags

# The library's default run config (a config file like configs/base.py; not imported here, so
# that entry points stay light where they need no model).
DEFAULT_CONFIG = str(pathlib.Path(__file__).with_name("config_lib.py"))


def define_config(required: bool = False) -> Any:
  """The `--config` flag (default: the library's default run config, unless `required`)."""
  return config_flags.DEFINE_config_file(
      "config", None if required else DEFAULT_CONFIG,
      "config file with an optional variant, e.g. configs/rep128.py:tiny"
      + ("" if required else " (default: the library's defaults, dualjax/config_lib.py)"))


def fail(message: str) -> None:
  """`error: message` on stderr, exit code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _describe_flag_error(e: BaseException, argv: Sequence[str]) -> str:
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


def parse(argv: Sequence[str], doc: str, module: Any, config_holder: Any) -> Any:
  """Parses `argv`; prints help and exits 0 on --help; returns the config (or None)."""
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + flags.FLAGS.module_help(module).rstrip() + "\n"
          + flags.FLAGS.module_help(__name__).split("\n", 1)[-1])
    try:
      flags.FLAGS(list(argv[:1]) + [a for a in argv[1:] if a.startswith("--config=")])
      cfg = config_holder.value
    except Exception:  # pylint: disable=broad-except
      cfg = None
    if cfg is not None:
      print("\nconfig fields (override any with --config.SECTION.FIELD=VALUE):")
      print("\n".join(_fields(cfg)))
    sys.exit(0)
  try:
    extra = flags.FLAGS(list(argv))[1:]
    cfg = config_holder.value
    if cfg is not None:
      cfg.keys()  # a config file that failed to load raises here
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    fail(_describe_flag_error(e, argv))
  if extra:
    fail(f"unexpected arguments: {' '.join(extra)} (flags take the form --name=value)")
  return cfg


def run(main: Callable[[list[str]], int], errors: tuple[type[BaseException], ...]) -> None:
  """Runs `main(sys.argv)`; an exception of `errors` is one line and exit code 2."""
  try:
    code = main(sys.argv)
  except errors as e:
    fail(str(e))
  sys.exit(code)
