"""`python -m dualjax.evaluate_combine RESULTS [MORE ...] [--out=FILE.csv] [--labels=a,b,...]`.

Combines the results of several evaluations (`python -m dualjax.evaluate`, or periodic
evaluation during training) into one table. Each input is a results JSON or a directory: a
training workdir (all its eval/step_N.json, in step order) or a directory of results JSONs.
Prints a Markdown table, one row per (run, mode) and one column per task and the average:
normalised scores ± standard error (`--metric=acc`: accuracies). With --out, also writes FILE
(CSV, one row per run, task and mode: run, step, checkpoint, task, mode, n, acc, acc_stderr,
score, score_stderr; task 'average' holds the headline, n = the number of tasks averaged) and
the Markdown table beside it (FILE with .md). A run is labelled <workdir>/step_N (or the file's
path) unless --labels names each results file in order.
Bad input (a missing or malformed results file, a wrong number of labels, two runs with one
label, an unwritable --out) is one line on stderr and exit code 2, before anything is written.
"""

import os
import pathlib
import sys

from absl import flags

from dualjax import cli
from dualjax import workdir as workdir_lib
from dualjax.evaluation import combine

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string("out", None, "the CSV to write (and its .md beside it)",
                           flag_values=FLAGS)
_LABELS = flags.DEFINE_list("labels", None, "one label per results file, in order",
                            flag_values=FLAGS)
_METRIC = flags.DEFINE_enum("metric", "score", ["score", "acc"],
                            "what the Markdown table shows", flag_values=FLAGS)


def _check_out(out: pathlib.Path) -> None:
  if out.suffix.lower() != ".csv":
    cli.fail(f"--out={out}: give a .csv file name")
  if out.is_dir():
    cli.fail(f"--out={out}: is a directory")
  ancestor = next(p for p in out.absolute().parents if p.exists())
  if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
    cli.fail(f"--out={out}: cannot write under {ancestor}")


def main(argv: list[str]) -> int:
  args = cli.parse(argv, __doc__, FLAGS, positional=True)
  if args is None:
    return 0
  if not args.positional:
    cli.fail("give at least one results JSON or directory (see --help)")
  out = pathlib.Path(_OUT.value) if _OUT.value else None
  if out is not None:
    _check_out(out)
  try:
    files = combine.find_results(args.positional)
    runs = [combine.read_results(f) for f in files]
  except combine.CombineError as e:
    cli.fail(str(e))
  if _LABELS.value is not None and len(_LABELS.value) != len(files):
    cli.fail(f"--labels names {len(_LABELS.value)} runs but there are {len(files)} results "
             f"files: {', '.join(map(str, files))}")
  labels = _LABELS.value or [combine.default_label(f) for f in files]
  seen: dict[str, pathlib.Path] = {}
  for label, f in zip(labels, files):
    if label in seen:
      cli.fail(f"{seen[label]} and {f} have the same label '{label}'; name them with --labels")
    seen[label] = f
  rs = combine.rows(list(zip(labels, runs)))
  table = combine.to_markdown(rs, _METRIC.value)
  print(table, end="")
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_atomic(out, combine.to_csv(rs))
    workdir_lib.write_atomic(out.with_suffix(".md"), table)
    print(f"wrote {out.absolute()} and {out.with_suffix('.md').absolute()}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run(main)
