"""Zero-shot evaluation on the nine tasks in four scoring modes (DESIGN.md §7).

  python -m dualjax.evaluate --workdir=W | --checkpoint=W/checkpoints/N
      [--config.eval.tasks=arc_easy,piqa] [--config.eval.modes=ar,prefix,pll,mc]
      [--config.eval.limit=N] [--config.eval.data_dir=DIR] [--out=FILE] [--log_samples]
  python -m dualjax.evaluate --random_init --config=configs/base.py:tiny \\
      --config.data.tokenizer=sp.model --out=FILE ...                    (smoke tests)

The `eval` fields mean what they mean in training (`--config.eval.*`, see
dualjax.evaluation.suite.EvalSettings); empty modes = those the trained model's lam supports.

Output: W/eval/step_N.json for the checkpoint of step N (the file periodic evaluation during
training writes; a new evaluation of the same step replaces it), or --out=FILE; beside it
step_N.md (or FILE with .md: a Table-2-like table of normalised scores, then per task and mode
the item count, accuracy, normalised score and their standard errors, as lm-eval computes them)
and with --log_samples step_N_samples.jsonl (one line per scored request: task, mode, context,
completion, log-likelihood, completion token ids and per-token log-probabilities, the choice's
normalised score, chosen, gold). The table goes to stdout, the absolute paths written to stderr.
Combine several runs' results with `python -m dualjax.evaluate_combine`.

HellaSwag: with DATA_DIR/hellaswag/hellaswag_val.jsonl (the original release) the prompts are
OLMES'. Without it, DATA_DIR/hellaswag/hellaswag_val_full.txt.bz2 (llama.cpp's preprocessed
text) is read as it is; how its prompts differ from OLMES' (measured on the 10,042 items):
{hellaswag_note}

Bad input (a missing workdir, checkpoint, data directory or task file, an unwritable output,
an unknown task or mode, an unreadable checkpoint) is one line on stderr, exit 2, before any
checkpoint is loaded or scoring starts and without touching an existing output.
"""

import os
import pathlib
import sys
import tempfile

import jax
from absl import flags

from dualjax import checkpoint
from dualjax import cli
from dualjax import config_lib
from dualjax import model as model_lib
from dualjax import tokenizer as tok_lib
from dualjax import trained
from dualjax import workdir as workdir_lib
from dualjax.errors import ConfigError
from dualjax.evaluation import metrics, suite, tasks as tasks_lib

__doc__ = __doc__.format(hellaswag_note=tasks_lib.HELLASWAG_TEXT_DIFFERENCES)

FLAGS = flags.FlagValues()
_F = {
    "workdir": flags.DEFINE_string("workdir", None, "a training workdir (its newest checkpoint)",
                                   flag_values=FLAGS),
    "checkpoint": flags.DEFINE_string("checkpoint", None, "a checkpoint: <workdir>/checkpoints/N",
                                      flag_values=FLAGS),
    "random_init": flags.DEFINE_bool(
        "random_init", False, "a freshly initialised model of --config's model section, with "
        "--config.data.tokenizer (smoke tests; needs --out)", flag_values=FLAGS),
    "init_seed": flags.DEFINE_integer("init_seed", 0, "with --random_init: the init seed",
                                      flag_values=FLAGS),
    "out": flags.DEFINE_string(
        "out", None, "the results JSON (.md and _samples.jsonl beside it); default "
        "<workdir>/eval/step_N.json", flag_values=FLAGS),
    "log_samples": flags.DEFINE_bool(
        "log_samples", False, "also write one JSONL line per scored request beside the results "
        "(<stem>_samples.jsonl)", flag_values=FLAGS),
}


class UsageError(ValueError):
  """Bad command-line input (reported in one line, exit code 2)."""


def _check_writable(path: pathlib.Path, what: str) -> None:
  """`path` (a file to be written) is not a directory and its nearest existing ancestor is a
  writable directory."""
  if path.is_dir():
    raise UsageError(f"{what}: {path} is a directory")
  ancestor = next(p for p in path.parents if p.exists())
  try:
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
      raise OSError
    with tempfile.TemporaryFile(dir=ancestor):  # unnamed (or removed at once): nothing is left
      pass
  except OSError:
    raise UsageError(f"{what}: cannot write under {ancestor}") from None


def check_paths(f: dict[str, flags.FlagHolder], settings: suite.EvalSettings) -> pathlib.Path:
  """Every path check that needs no task file or checkpoint read; returns the directory the
  results go to (absolute). Raises UsageError."""
  sources = [x for x in (f["workdir"].value, f["checkpoint"].value) if x] + (
      ["random"] if f["random_init"].value else [])
  if len(sources) != 1:
    raise UsageError("give exactly one of --workdir=DIR, --checkpoint=PATH or --random_init")
  if f["workdir"].value or f["checkpoint"].value:
    flag = "--workdir" if f["workdir"].value else "--checkpoint"
    path = pathlib.Path(f["workdir"].value or f["checkpoint"].value)
    if not path.exists():
      raise UsageError(f"{flag}: not found: {path}")
    if not path.is_dir():
      raise UsageError(f"{flag}: not a directory: {path}")
    workdir, step = workdir_lib.split_run_path(path)
    if f["checkpoint"].value and step is None:
      raise UsageError(f"--checkpoint: {path} is not <workdir>/checkpoints/N (use --workdir=DIR "
                       "for a workdir's newest checkpoint)")
    if not (workdir / workdir_lib.CONFIG_FILE).is_file():
      raise UsageError(f"{flag}: {workdir} is not a training workdir (no "
                       f"{workdir_lib.CONFIG_FILE})")
  elif not f["out"].value:
    raise UsageError("--random_init needs --out=FILE (there is no workdir to write into)")
  data = str(settings.data_path())
  if data.startswith(tasks_lib.TFDS_PREFIX):
    if not pathlib.Path(data[len(tasks_lib.TFDS_PREFIX):]).is_dir():
      raise UsageError(f"--config.eval.data_dir: no such directory: "
                       f"{data[len(tasks_lib.TFDS_PREFIX):]}")
  elif not pathlib.Path(data).is_dir():
    raise UsageError(
        f"--config.eval.data_dir: no such directory: {data}" if settings.data_dir else
        f"evaluation data not found at {data}; give --config.eval.data_dir=DIR (see README)")
  if f["out"].value:
    out = pathlib.Path(f["out"].value).absolute()
    _check_writable(out, "--out")
    out_dir = out.parent
  else:
    out_dir = (workdir / workdir_lib.EVAL_DIR).absolute()
    _check_writable(out_dir / "step_0.json", f"{flag} (writes into {out_dir})")
  if f["log_samples"].value and f["out"].value:
    _check_writable(suite.samples_path(out), "--log_samples")
  return out_dir


def _model(cfg, f: dict[str, flags.FlagHolder]
           ) -> tuple[object, model_lib.ModelConfig, tok_lib.Tokenizer, int | None, str | None]:
  """(params, model_cfg, tokenizer, step, checkpoint path) from the flags."""
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
  path = pathlib.Path(f["workdir"].value or f["checkpoint"].value).absolute()
  t = trained.load(path)
  return t.params, t.model_cfg, t.tokenizer, t.step, str(path)


def main(argv: list[str]) -> int:
  f = _F
  args = cli.parse(argv, __doc__, FLAGS, config="optional")
  if args is None:
    return 0
  cfg = args.config
  checkpoint.quiet_orbax()  # Orbax's read-only warnings are no news to a user evaluating
  try:
    settings = config_lib.eval_settings(cfg)
    out_dir = check_paths(f, settings)
    lam = None if f["random_init"].value else workdir_lib.run_lam(
        f["workdir"].value or f["checkpoint"].value)
    suite.check_settings(settings, lam)  # validates the task files before any model is loaded
    params, mc, tok, step, ckpt = _model(cfg, f)
  except (UsageError, tasks_lib.TaskDataError, ValueError, checkpoint.CheckpointError) as e:
    cli.fail(str(e))
  out = (pathlib.Path(f["out"].value).absolute() if f["out"].value
         else out_dir / workdir_lib.eval_results_path("", step).name)
  samples = suite.SampleLog(suite.samples_path(out)) if f["log_samples"].value else None
  try:
    results = suite.evaluate_settings(params, mc, tok, settings, lam, step=step, checkpoint=ckpt,
                                      log=lambda s: print(s, file=sys.stderr), on_sample=samples)
  except BaseException:
    if samples is not None:
      samples.discard()
    raise
  out, md = suite.write_results(results, out)
  written = [out, md] + ([samples.commit()] if samples is not None else [])
  print(metrics.to_markdown(results))
  print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run(main, (ConfigError,))
