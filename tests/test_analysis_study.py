"""Which (source, target) pairs are fitted, and the fits themselves (dualjax/analysis/study.py)."""

import numpy as np
import pytest

import analysis_fixtures as fx
from dualjax.analysis import inputs, study


def _table(tmp_path, rows, name="sweep.csv", cols=None):
  return inputs.read_table(fx.write_csv(tmp_path / name, rows, cols))


def test_default_targets_and_figure5_points(tmp_path):
  jobs = study.plan([_table(tmp_path, fx.sweep_rows())], study.Options())
  (job,) = jobs
  assert [p.target for p in job.points] == ["avg/ar", "avg/pll", "avg/prefix"]
  assert job.diff.n == 40 and job.diff.target == study.DIFF_TARGET
  rows = fx.sweep_rows()
  np.testing.assert_allclose(job.diff.y, [r["avg/prefix"] - r["avg/ar"] for r in rows])


def test_explicit_targets_must_exist_in_every_file(tmp_path):
  t = _table(tmp_path, fx.sweep_rows())
  jobs = study.plan([t], study.Options(targets=("final_val_ar_loss",)))
  assert jobs[0].points[0].target == "final_val_ar_loss"
  with pytest.raises(inputs.InputError, match=r"sweep.csv: missing column 'avg/nope' \(named in --targets\)"):
    study.plan([t], study.Options(targets=("avg/ar", "avg/nope")))


def test_no_target_column(tmp_path):
  t = _table(tmp_path, fx.sweep_rows(), cols=["point", "r", "lam", "seed"])
  with pytest.raises(inputs.InputError, match="sweep.csv: missing target column: none of avg/ar, avg/pll"):
    study.plan([t], study.Options())


def test_unfittable_defaults_are_notes_unless_nothing_is_left(tmp_path):
  rows = fx.sweep_rows()
  for r in rows[:36]:
    r["avg/pll"] = ""  # avg/pll keeps 4 rows, all at r = 128
  cols = [c for c in fx.columns() if c != "avg/prefix"]
  (job,) = study.plan([_table(tmp_path, rows, cols=cols)], study.Options())
  assert [p.target for p in job.points] == ["avg/ar"]
  assert any("avg/pll not fitted: a single r value (128)" in n for n in job.notes)
  assert any("Figure 5 skipped: no avg/prefix column" in n for n in job.notes)
  few = _table(tmp_path, fx.sweep_rows(rs=(1,), lams=(0.5, 1.0)), name="few.csv")
  with pytest.raises(inputs.InputError, match=r"few.csv: avg/ar: 2 points .* at least 4 are needed"):
    study.plan([_table(tmp_path, fx.sweep_rows()), few], study.Options())


def test_per_source_or_combined(tmp_path):
  a = _table(tmp_path, fx.sweep_rows(rs=(1, 2, 4, 8)), name="a.csv")
  b = _table(tmp_path, fx.sweep_rows(rs=(16, 32, 64, 128)), name="b.csv")
  per = study.plan([a, b], study.Options())
  assert [j.table.source for j in per] == ["a", "b"] and per[0].points[0].n == 20
  (pooled,) = study.plan([a, b], study.Options(combine=True))
  assert pooled.table.source == "combined" and pooled.points[0].n == 40
  assert set(pooled.table.strings("source")) == {"a", "b"}


def test_lambda_grid():
  np.testing.assert_allclose(study.lambda_grid(0, 1, 129), np.arange(129) / 128)
  g = study.lambda_grid(0.5, 0.984375, 129)
  assert g[0] == 0.5 and g[-1] == 63 / 64 and 7 / 8 in g and 15 / 16 in g
  np.testing.assert_allclose(study.lambda_grid(0.5, 0.501, 5), np.linspace(0.5, 0.501, 5))


def test_analyse_recovers_the_optimum(tmp_path):
  """End to end at library level, paper-like grid: r = 1..128, lambda in steps of 1/8."""
  rows = fx.sweep_rows(lams=np.linspace(0, 1, 9), noise=0.05)
  opts = study.Options(restarts=1, samples=300)
  (s,) = study.analyse(study.plan([_table(tmp_path, rows)], opts), opts)
  for t in s.targets:
    assert t.fit.r2 > 0.99
    truth = fx.lam_opt(np.log2(fx.R_GRID), t.points.target.split("/")[1])
    if t.points.target != "avg/prefix":  # prefix adds a bump in lambda; its optimum moves
      assert np.all(np.abs(t.at_r.lam_best - truth) <= 1 / 8), (t.points.target, t.at_r.lam_best)
    np.testing.assert_array_equal(t.at_r.r, fx.R_GRID)
    assert t.fine.log2r[0] == 0 and t.fine.log2r[-1] == 7 and len(t.fine.log2r) == 57
  assert s.diff_fit is not None
  assert len(s.overfitted) == sum(1 for r in rows if r["ar_overfitting"])
