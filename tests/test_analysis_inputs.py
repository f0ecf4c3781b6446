"""Reading results tables and run curves (dualjax/analysis/results.py)."""

import json
import math

import numpy as np
import pytest

import analysis_fixtures as fx
from dualjax.analysis import inputs


def _csv(tmp_path, text, name="res.csv"):
  p = tmp_path / name
  p.write_text(text)
  return p


def test_reads_the_sweep_schema(tmp_path):
  p = fx.write_csv(tmp_path / "sweep.csv", fx.sweep_rows(rs=(1, 64), lams=(0.5, 1.0)))
  t = inputs.read_table(p)
  assert t.source == "sweep" and t.n == 4 and t.columns == tuple(fx.columns())
  np.testing.assert_array_equal(t.numbers("r"), [1, 1, 64, 64])
  pts = inputs.select(t, "avg/ar")
  assert pts.n == 4 and pts.skipped == 0 and pts.names[0] == "r1_lam0.5_s42"
  np.testing.assert_allclose(pts.log2r, [0, 0, 6, 6])
  np.testing.assert_array_equal(pts.ar_overfitting, [False, False, False, True])  # lam * r = 64 > 40
  over = inputs.overfitted(t)
  assert [(o["point"], o["which"]) for o in over] == [("r64_lam1_s42", [("ar", 250.0)])]


def test_empty_cells_are_missing_values(tmp_path):
  p = _csv(tmp_path, "point,r,lam,avg/ar\na,1,0.5,20\nb,2,,21\nc,4,1,\n")
  t = inputs.read_table(p)
  pts = inputs.select(t, "avg/ar")
  assert pts.n == 1 and pts.skipped == 1  # b has a value but no lambda; c has no value
  assert math.isnan(t.numbers("absent")[0])


@pytest.mark.parametrize("text, expected", [
    ("point,lam,avg/ar\na,0.5,1\n", "missing column 'r'"),
    ("point,r,avg/ar\na,1,1\n", "missing column 'lam'"),
    ("", "empty file"),
    ("r,lam,avg/ar\n1,0.5,abc\n", ":2: column 'avg/ar' holds 'abc', not a number"),
    ("r,lam\n0,0.5\n", ":2: r = 0; repetitions must be > 0"),
    ("r,lam\n1,0.5\n2,1.5\n", ":3: lam = 1.5; the AR share must lie in [0, 1]"),
    ("r,lam\n1,0.5,7\n", ":2: 3 cells, the header has 2"),
    ("r,lam,r\n1,0.5,1\n", "column 'r' appears more than once"),
])
def test_bad_tables_name_file_and_fault(tmp_path, text, expected):
  p = _csv(tmp_path, text)
  with pytest.raises(inputs.InputError) as e:
    inputs.read_table(p)
  assert expected in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
  with pytest.raises(inputs.InputError, match="no such file"):
    inputs.read_table(tmp_path / "nope.csv")


def test_source_names_and_combine(tmp_path):
  assert inputs.source_names(["a/x.csv", "b/x.csv", "y z.csv"]) == ["x_1", "x_2", "y_z"]
  a = inputs.read_table(_csv(tmp_path, "r,lam,avg/ar\n1,0.5,20\n", "a.csv"))
  b = inputs.read_table(_csv(tmp_path, "r,lam,avg/pll,point\n2,1,21,p\n", "b.csv"))
  c = inputs.combine([a, b])
  assert c.n == 2 and c.strings("source") == ["a", "b"]
  np.testing.assert_array_equal(c.numbers("avg/ar"), [20, np.nan])
  assert c.names() == ["combined:row2", "p"]


def test_read_curves(tmp_path):
  fx.write_run(tmp_path, 128, 1.0)
  fx.write_run(tmp_path, 128, 0.5, steps=200)
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text("{}")
  (broken / "metrics.jsonl").write_text("")
  not_a_run = tmp_path / "notes"
  not_a_run.mkdir()
  # A resumed run logs step 200 twice (the last wins) and a kill left half a line.
  d = fx.write_run(tmp_path, 4, 0.5)
  with open(d / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 200, "kind": "val", "ar_loss": 1.0, "mdm_loss": 2.0}) + "\n")
    f.write('{"step": 450, "kind": "va')
  curves, notes = inputs.read_curves(tmp_path)
  by = {(c.r, c.lam): c for c in curves}
  assert set(by) == {(128, 1.0), (128, 0.5), (4, 0.5)}
  assert len(by[(128, 1.0)].step) == 9 and len(by[(128, 0.5)].step) == 5
  c4 = by[(4, 0.5)]
  assert c4.ar_loss[list(c4.step).index(200)] == 1.0 and c4.step.max() == 400
  assert by[(128, 1.0)].ar_loss[0] == 6.0 and by[(128, 1.0)].seed == 42
  assert len(notes) == 1 and "broken" in notes[0] and "KeyError" in notes[0]
  assert inputs.read_curves(tmp_path / "missing") == ([], [])
