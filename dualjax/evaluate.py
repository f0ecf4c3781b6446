"""Zero-shot evaluation on the nine tasks in four scoring modes (DESIGN.md §7).

  python -m dualjax.evaluate --workdir=DIR | --checkpoint=DIR/checkpoints/N
      [--config.eval.tasks=arc_easy,piqa] [--config.eval.modes=ar,prefix,pll,mc]
      [--config.eval.limit=N] [--config.eval.data_dir=DIR] [--out=FILE]
  python -m dualjax.evaluate --random_init --config=configs/base.py:tiny \
      --config.data.tokenizer=sp.model ...                                (smoke tests)

The `eval` fields mean what they mean in training (`--config.eval.*`, see
dualjax.evaluation.suite.EvalSettings); empty modes = those the trained model's lam supports.
Writes FILE (JSON: raw and normalised scores per task, mode and sub-task, with the config and the
checkpoint step) and FILE with a .md suffix (a Table-2-like Markdown table). Bad input (unknown
task or mode, missing or malformed task file, unreadable checkpoint) is one line on stderr, exit
2, before any scoring and without touching an existing output.
"""

import pathlib
import sys

import jax
from absl import flags

from dualjax import cli
from dualjax import config_lib
from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from dualjax import trained
from dualjax import workdir as workdir_lib
from dualjax.errors import ConfigError
from dualjax.evaluation import metrics, suite, tasks as tasks_lib

FLAGS = flags.FlagValues()
_F = {
    "workdir": flags.DEFINE_string("workdir", None, "a training workdir (its newest checkpoint)",
                                   flag_values=FLAGS),
    "checkpoint": flags.DEFINE_string("checkpoint", None, "a checkpoint: <workdir>/checkpoints/N",
                                      flag_values=FLAGS),
    "random_init": flags.DEFINE_bool(
        "random_init", False, "a freshly initialised model of --config's model section, with "
        "--config.data.tokenizer (smoke tests)", flag_values=FLAGS),
    "init_seed": flags.DEFINE_integer("init_seed", 0, "with --random_init: the init seed",
                                      flag_values=FLAGS),
    "out": flags.DEFINE_string("out", "eval_results.json", "the results JSON (and .md beside it)",
                               flag_values=FLAGS),
}


class UsageError(ValueError):
  """Bad command-line input (reported in one line, exit code 2)."""


def _model(cfg, f: dict[str, flags.FlagHolder]
           ) -> tuple[object, model_lib.ModelConfig, tok_lib.Tokenizer, int | None, str | None]:
  """(params, model_cfg, tokenizer, step, checkpoint path) from the flags."""
  sources = [x for x in (f["workdir"].value, f["checkpoint"].value) if x] + (
      ["random"] if f["random_init"].value else [])
  if len(sources) != 1:
    raise UsageError("give exactly one of --workdir=DIR, --checkpoint=PATH or --random_init")
  if f["random_init"].value:
    if not cfg.data.tokenizer:
      raise UsageError("--random_init needs --config.data.tokenizer=PATH (a SentencePiece model)")
    if not pathlib.Path(cfg.data.tokenizer).is_file():
      raise UsageError(f"--config.data.tokenizer: file not found: {cfg.data.tokenizer}")
    tok = tok_lib.load_tokenizer(cfg.data.tokenizer)
    mc = config_lib.model_config(cfg)
    if tok.vocab_size > mc.vocab_size:
      raise UsageError(f"--config.model.vocab_size={mc.vocab_size} is smaller than the "
                       f"tokenizer's {tok.vocab_size}")
    return model_lib.init(mc, jax.random.key(f["init_seed"].value)), mc, tok, None, None
  flag = "--workdir" if f["workdir"].value else "--checkpoint"
  path = f["workdir"].value or f["checkpoint"].value
  if not pathlib.Path(path).exists():
    raise UsageError(f"{flag}: not found: {path}")
  t = trained.load(path)
  return t.params, t.model_cfg, t.tokenizer, t.step, str(path)


def main(argv: list[str]) -> int:
  f = _F
  args = cli.parse(argv, __doc__, FLAGS, config="optional")
  if args is None:
    return 0
  cfg = args.config
  settings = config_lib.eval_settings(cfg)
  lam = None if f["random_init"].value else workdir_lib.run_lam(
      f["workdir"].value or f["checkpoint"].value or "")
  try:
    suite.check_settings(settings, lam)  # validates the task files before any model is loaded
    params, mc, tok, step, ckpt = _model(cfg, f)
  except (UsageError, tasks_lib.TaskDataError, ValueError) as e:
    cli.fail(str(e))
  results = suite.evaluate_settings(params, mc, tok, settings, lam, step=step, checkpoint=ckpt,
                                    log=lambda s: print(s, file=sys.stderr))
  out, md = suite.write_results(results, f["out"].value)
  print(metrics.to_markdown(results))
  print(f"wrote {out} and {md}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run(main, (ConfigError,))
