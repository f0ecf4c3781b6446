"""`python -m dualjax.analyze RESULTS.csv [MORE.csv ...] --out=DIR [--paper] [--run_root=DIR]`.

Fits the paper's Gaussian-process map (§5.2) of each target over (log2 r, lambda), one model per
input file and target (`--combine` pools the files), and writes into DIR: figure1 (validation
curves at one r, from the runs under --run_root), figure4_<source> (score map, overfitted runs,
optimal-lambda density), figure5_<source> (prefix minus AR evaluation), each as PNG and PDF;
summary.md (R^2 per model, recommended lambda per r with a credible interval, overfitted runs,
the paper's rules of thumb against the fit) and optimal_lambda.csv. A figure whose inputs are
missing is skipped with a note. `--paper` adds the paper's own numbers
(dualjax/analysis/paper_results.csv; see PAPER_RESULTS.md beside it) as a source.
Bad input (missing column, too few points for the GP, a single lambda or r) is one line on
stderr and exit code 2, before anything is written.
"""

import math
import pathlib
import sys

from absl import flags

from dualjax import cli
from dualjax.analysis import figures, inputs, report, study

FLAGS = flags.FlagValues()

_OUT = flags.DEFINE_string(
    "out", None, "output directory (created; existing files of the same name replaced)", flag_values=FLAGS)
_TARGETS = flags.DEFINE_list(
    "targets", None, "columns to model (default: those of avg/ar, avg/pll, avg/prefix present); "
    "a column whose name contains 'loss' is minimised", flag_values=FLAGS)
_PAPER = flags.DEFINE_bool("paper", False, "add the paper's numbers (dualjax/analysis/paper_results.csv)", flag_values=FLAGS)
_COMBINE = flags.DEFINE_bool(
    "combine", False, "pool all input files into one source (default: one fit per file)", flag_values=FLAGS)
_NU = flags.DEFINE_float("nu", 2.5, "Matérn smoothness ν (0.5, 1.5, 2.5 are cheap; inf = RBF)", flag_values=FLAGS)
_RESTARTS = flags.DEFINE_integer("restarts", 5, "L-BFGS-B restarts of the hyper-parameter fit", flag_values=FLAGS)
_SAMPLES = flags.DEFINE_integer("samples", 1000, "joint posterior samples per r for the optimal-λ density", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the restarts and the posterior samples", flag_values=FLAGS)
_LAM_POINTS = flags.DEFINE_integer(
    "lam_points", 129, "λ grid k/(N-1) over [0, 1] (129: steps of 1/128), kept within the measured λ range", flag_values=FLAGS)
_LEVEL = flags.DEFINE_float("level", 0.9, "credible level of the optimal-λ interval", flag_values=FLAGS)
_RUN_ROOT = flags.DEFINE_string(
    "run_root", None, "directory holding the runs' workdirs (config.json + metrics.jsonl) for Figure 1", flag_values=FLAGS)
_R_FOR_CURVES = flags.DEFINE_float(
    "r_for_curves", None, "r of Figure 1 (default: the largest r with at least two λ)", flag_values=FLAGS)


def _note(message: str) -> None:
  print(f"note: {message}", file=sys.stderr)


def _check_flags() -> study.Options:
  cli.output_dir(_OUT.value, "the output directory")
  if not (_NU.value > 0):
    cli.fail(f"--nu={_NU.value:g}: the Matérn smoothness must be > 0")
  if _RESTARTS.value < 0:
    cli.fail(f"--restarts={_RESTARTS.value}: must be >= 0")
  if _SAMPLES.value < 1:
    cli.fail(f"--samples={_SAMPLES.value}: must be >= 1")
  if _LAM_POINTS.value < 2:
    cli.fail(f"--lam_points={_LAM_POINTS.value}: must be >= 2")
  if not 0 < _LEVEL.value < 1:
    cli.fail(f"--level={_LEVEL.value:g}: must lie in (0, 1)")
  if _RUN_ROOT.value and not pathlib.Path(_RUN_ROOT.value).is_dir():
    cli.fail(f"--run_root={_RUN_ROOT.value}: no such directory")
  if _R_FOR_CURVES.value is not None and not (_R_FOR_CURVES.value > 0 and math.isfinite(_R_FOR_CURVES.value)):
    cli.fail(f"--r_for_curves={_R_FOR_CURVES.value:g}: must be > 0")
  if _TARGETS.value is not None and not [t for t in _TARGETS.value if t.strip()]:
    cli.fail("--targets is empty")
  targets = tuple(t.strip() for t in _TARGETS.value if t.strip()) if _TARGETS.value else None
  return study.Options(targets=targets, nu=_NU.value, restarts=_RESTARTS.value, samples=_SAMPLES.value,
                       seed=_SEED.value, lam_points=_LAM_POINTS.value, combine=_COMBINE.value,
                       level=_LEVEL.value)


def _curves() -> tuple[list[inputs.Curve], float | None, list[str]]:
  if not _RUN_ROOT.value:
    return [], None, ["Figure 1 skipped: no --run_root (the directory holding the runs' workdirs)"]
  curves, notes = inputs.read_curves(_RUN_ROOT.value)
  if not curves:
    return [], None, notes + [f"Figure 1 skipped: no run with config.json and validation records "
                              f"under {_RUN_ROOT.value}"]
  rs = sorted({c.r for c in curves})
  r = _R_FOR_CURVES.value if _R_FOR_CURVES.value is not None else figures.default_curve_r(curves)
  if r not in rs:
    cli.fail(f"--r_for_curves={r:g}: no run under {_RUN_ROOT.value} has that r (runs have r = "
          f"{', '.join(f'{x:g}' for x in rs)})")
  return curves, r, notes


def _write(out: pathlib.Path, sources: list[study.SourceResult], curves: list[inputs.Curve],
           curve_r: float | None, curve_notes: list[str], opts: study.Options) -> list[pathlib.Path]:
  """Figures, optimal_lambda.csv and summary.md; returns the paths written."""
  written: list[pathlib.Path] = []
  if curves:
    written += figures.figure1(curves, curve_r, out)
  for s in sources:
    panels = {t.points.target: figures.Panel(t.points, t.fit, t.fine) for t in s.targets}
    written += figures.figure4(s.table.source, list(panels.values()), out)
    if s.diff is not None:
      diff = figures.Panel(s.diff, s.diff_fit.fit if s.diff_fit else None,
                           s.diff_fit.fine if s.diff_fit else None)
      written += figures.figure5(s.table.source, panels.get("avg/prefix"), diff, out)
  for n in [n for s in sources for n in s.notes] + curve_notes:
    _note(n)
  (out / "optimal_lambda.csv").write_text(report.optimum_csv(sources), encoding="utf-8")
  (out / "summary.md").write_text(report.summary(sources, opts, written, curve_notes), encoding="utf-8")
  return written + [out / "summary.md", out / "optimal_lambda.csv"]


def main(argv: list[str]) -> int:
  args = cli.parse(argv, __doc__, FLAGS, positional=True)
  if args is None:
    return 0
  paths = args.positional
  opts = _check_flags()
  if _PAPER.value:
    paths = [str(inputs.PAPER_CSV)] + paths
  if not paths:
    cli.fail("no results CSV given (python -m dualjax.analyze RESULTS.csv [MORE.csv ...] --out=DIR)")
  try:
    names = inputs.source_names(paths)
    tables = [inputs.read_table(p, n) for p, n in zip(paths, names)]
    jobs = study.plan(tables, opts)
  except inputs.InputError as e:
    cli.fail(str(e))
  curves, curve_r, curve_notes = _curves()
  sources = study.analyse(jobs, opts)

  out = pathlib.Path(_OUT.value)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    cli.fail(f"--out={out}: cannot create ({e.strerror})")
  try:
    written = _write(out, sources, curves, curve_r, curve_notes, opts)
  except OSError as e:
    cli.fail(f"--out={out}: writing failed ({e})")
  print("wrote " + ", ".join(str(p) for p in written))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
