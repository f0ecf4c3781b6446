"""From results tables to fitted maps: which (source, target) pairs to fit, the fits, the optima.

Every input file is its own source and gets its own GP per target (the paper's numbers and a
small-scale sweep live on different score scales, so one surface over both would mix them);
`combine=True` pools all files into one source named 'combined' (e.g. a sweep split over files).
`plan` checks everything the analysis needs and raises `inputs.InputError` (one line) before
any fitting: explicit targets must exist and be fittable in every file; default targets (those
of avg/ar, avg/pll, avg/prefix present) that cannot be fitted are skipped with a note, but each
file must leave at least one.
"""

import dataclasses
from typing import Sequence

import numpy as np

from dualjax.analysis import gp, inputs

DIFF_TARGET = "avg/prefix − avg/ar"


@dataclasses.dataclass
class Options:
  targets: tuple[str, ...] | None = None  # None: the default targets present in each file
  nu: float = 2.5
  restarts: int = 5
  samples: int = 1000
  seed: int = 0
  lam_points: int = 129
  combine: bool = False
  level: float = 0.9  # credible interval of the optimal lambda
  fine_per_octave: int = 8  # r grid of the figures: points per doubling of r


@dataclasses.dataclass
class Job:
  table: inputs.Table
  points: list[inputs.Points]  # fittable targets
  diff: inputs.Points | None  # prefix minus AR per run (Figure 5), None if unavailable
  notes: list[str]


@dataclasses.dataclass
class TargetResult:
  points: inputs.Points
  fit: gp.Fit
  at_r: gp.Optimum  # at the r values of the data
  fine: gp.Optimum  # on a fine r grid (figures)


@dataclasses.dataclass
class SourceResult:
  table: inputs.Table
  targets: list[TargetResult]
  diff: inputs.Points | None
  diff_fit: TargetResult | None
  overfitted: list[dict[str, object]]
  notes: list[str]


def plan(tables: Sequence[inputs.Table], opts: Options) -> list[Job]:
  """The fittable targets of each source; raises InputError for what the analysis cannot use."""
  if opts.combine and len(tables) > 1:
    tables = [inputs.combine(tables)]
  jobs = []
  for t in tables:
    notes: list[str] = []
    if opts.targets:
      for c in opts.targets:
        if not t.has(c):
          raise inputs.InputError(f"{t.path}: missing column '{c}' (named in --targets)")
      targets = list(opts.targets)
    else:
      targets = [c for c in inputs.DEFAULT_TARGETS if t.has(c)]
      if not targets:
        raise inputs.InputError(
            f"{t.path}: missing target column: none of {', '.join(inputs.DEFAULT_TARGETS)} "
            "(name other columns with --targets)")
    fittable, reasons = [], []
    for c in targets:
      pts = inputs.select(t, c)
      reason = gp.unfittable_reason(pts.r, pts.lam, opts.nu)
      if pts.skipped:
        notes.append(f"{t.source}: {c}: {pts.skipped} row(s) with a value but no r or λ are not fitted")
      if reason:
        line = f"{t.path}: {c}: {reason}"
        if opts.targets:
          raise inputs.InputError(line)
        reasons.append(line)
        notes.append(f"{t.source}: {c} not fitted: {reason}")
      else:
        fittable.append(pts)
    if not fittable:
      raise inputs.InputError(reasons[0])
    jobs.append(Job(t, fittable, _diff_points(t, notes), notes))
  return jobs


def _diff_points(t: inputs.Table, notes: list[str]) -> inputs.Points | None:
  if not (t.has("avg/prefix") and t.has("avg/ar")):
    notes.append(f"{t.source}: Figure 5 skipped: no "
                 f"{'avg/prefix' if not t.has('avg/prefix') else 'avg/ar'} column")
    return None
  pts = inputs.select(t, DIFF_TARGET, t.numbers("avg/prefix") - t.numbers("avg/ar"))
  if pts.n == 0:
    notes.append(f"{t.source}: Figure 5 skipped: no row has avg/prefix, avg/ar, r and λ all filled")
    return None
  return pts


def lambda_grid(lo: float, hi: float, points: int) -> np.ndarray:
  """The grid k / (points - 1) over [0, 1] restricted to [lo, hi] (so 1/2, 7/8, 63/64 lie on it
  with the default 129 points); a range narrower than two grid steps gets `points` values of its own."""
  grid = np.arange(points) / (points - 1)
  eps = 1e-9
  grid = grid[(grid >= lo - eps) & (grid <= hi + eps)]
  return grid if len(grid) >= 3 else np.linspace(lo, hi, points)


def analyse_points(pts: inputs.Points, opts: Options) -> TargetResult:
  """GP fit of one target and its optimal-lambda statistics (data r values and a fine grid)."""
  fit = gp.fit(pts.log2r, pts.lam, pts.y, target=pts.target, nu=opts.nu, restarts=opts.restarts,
               seed=opts.seed)
  lam_grid = lambda_grid(pts.lam.min(), pts.lam.max(), opts.lam_points)
  lo, hi = pts.log2r.min(), pts.log2r.max()
  fine_r = np.linspace(lo, hi, max(2, int(round((hi - lo) * opts.fine_per_octave)) + 1))
  kw = dict(samples=opts.samples, seed=opts.seed, level=opts.level)
  return TargetResult(pts, fit, gp.optimum(fit, np.unique(pts.log2r), lam_grid, **kw),
                      gp.optimum(fit, fine_r, lam_grid, **kw))


def analyse(jobs: Sequence[Job], opts: Options) -> list[SourceResult]:
  out = []
  for job in jobs:
    targets = [analyse_points(p, opts) for p in job.points]
    notes = list(job.notes)
    for t in targets:
      notes += [f"{job.table.source}: {n}" for n in t.fit.notes]
    diff_fit = None
    if job.diff is not None:
      reason = gp.unfittable_reason(job.diff.r, job.diff.lam, opts.nu)
      if reason:
        notes.append(f"{job.table.source}: Figure 5 shows the runs only ({DIFF_TARGET}: {reason})")
      else:
        diff_fit = analyse_points(job.diff, opts)
    out.append(SourceResult(job.table, targets, job.diff, diff_fit,
                            inputs.overfitted(job.table), notes))
  return out
