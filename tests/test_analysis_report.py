"""The Markdown summary and the optimum table (dualjax/analysis/report.py)."""

import csv
import io
import re

import numpy as np
import pytest

import analysis_fixtures as fx
from dualjax.analysis import inputs, report, study


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  return fx.small_study(tmp_path_factory.mktemp("sweep"))


def _lambda_tables(md: str) -> dict[str, dict[float, float]]:
  """target -> {r: lambda*} from the 'Recommended λ per r' tables."""
  out, target = {}, None
  for line in md.splitlines():
    m = re.match(r"### Recommended λ per r: (\S+)", line)
    if m:
      target = m.group(1)
      out[target] = {}
    elif target and re.match(r"\| [0-9.]+ \| ", line):
      cells = [c.strip() for c in line.strip("|").split("|")]
      out[target][float(cells[0])] = float(cells[1])
    elif line.startswith("#"):
      target = None
  return out


def test_summary_names_a_lambda_per_r(sweep):
  sources, opts = sweep
  md = report.summary(sources, opts)
  tables = _lambda_tables(md)
  assert set(tables) == {"avg/ar", "avg/pll", "avg/prefix"}
  for target, by_r in tables.items():
    assert sorted(by_r) == list(fx.R_GRID)
    t = next(t for t in sources[0].targets if t.points.target == target)
    np.testing.assert_allclose([by_r[r] for r in fx.R_GRID], t.at_r.lam_best, atol=5e-4)
  for target in ("avg/ar", "avg/pll", "avg/prefix"):  # R² (in-sample) > 0.99 on the smooth synthetic map
    assert re.search(rf"\| {re.escape(target)} \| 40 \| (0\.99\d\d|1\.0000) \| ", md), target
  assert "| avg/prefix − avg/ar | 40 | " in md
  assert "Rules of thumb: λ* lies inside" in md


def test_summary_lists_overfitted_runs(sweep):
  md = report.summary(*sweep)
  section = md.split("### Overfitted runs")[1].split("##")[0]
  flagged = re.findall(r"\| (r\d+_lam[0-9.]+_s42) \| (\d+) \| ([0-9.]+) \| ar \(250\) \|", section)
  expected = {(f"r{r}_lam{l:g}_s42") for r in fx.R_GRID for l in (0, 0.25, 0.5, 0.75, 1.0) if l * r > 40}
  assert {f[0] for f in flagged} == expected and len(expected) == 5


def test_optimum_csv_matches_the_fits(sweep):
  sources, _ = sweep
  rows = list(csv.DictReader(io.StringIO(report.optimum_csv(sources))))
  assert len(rows) == 3 * len(fx.R_GRID) and tuple(rows[0]) == report.OPTIMUM_COLUMNS
  ar = [r for r in rows if r["target"] == "avg/ar"]
  t = sources[0].targets[0]
  np.testing.assert_allclose([float(r["lam_best"]) for r in ar], t.at_r.lam_best, rtol=1e-5)
  assert ar[0]["rule_point"] == "" and float(ar[-1]["rule_point"]) == pytest.approx(0.125)
  assert {r["agreement"] for r in rows} <= {"inside", "CI overlaps", "outside", "no rule"}


def test_caution_and_notes_for_the_paper_numbers():
  opts = study.Options(**fx.FAST)
  sources = study.analyse(study.plan([inputs.read_table(inputs.PAPER_CSV)], opts), opts)
  md = report.summary(sources, opts, notes=["Figure 1 skipped: no --run_root"])
  assert "Caution, avg/pll: leave-one-out R²" in md
  assert sorted(_lambda_tables(md)["avg/pll"]) == [16, 32, 64, 128]
  assert "No overfitting columns in this source." in md
  assert "- Figure 1 skipped: no --run_root" in md and "avg/ar not fitted: 3 points" in md


def test_rule_sentence_flags_bands_outside_the_measured_range():
  rows = [{"r": 128.0, "agreement": "outside", "rule_low": 1 / 16, "rule_high": 1 / 4},
          {"r": 1.0, "agreement": "inside", "rule_low": 7 / 8, "rule_high": 63 / 64}]
  text = report._rule_sentence(rows, np.linspace(0.5, 1.0, 5))  # pylint: disable=protected-access
  assert "inside the rule's band at 1 of 2" in text and "1 disagrees" in text
  assert "At r = 128 the rule's band lies outside the measured λ range [0.500, 1.000]" in text
