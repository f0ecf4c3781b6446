"""The paper's numbers (dualjax/analysis/paper_results.csv) re-read from the paper text, cell by cell."""

import pathlib

import numpy as np
import pytest

from dualjax.analysis import inputs, study

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER = REPO.parent / "shared" / "paper" / "dual-objective-language-models.txt"
TASKS = ("arc_easy", "arc_challenge", "blimp", "csqa", "hellaswag", "mmlu", "openbookqa", "piqa", "siqa")
SHORT = {"ARC-C": "arc_challenge", "ARC-E": "arc_easy", "BLiMP": "blimp", "CSQA": "csqa",
         "HSwag": "hellaswag", "MMLU": "mmlu", "OBQA": "openbookqa", "PIQA": "piqa", "SIQA": "siqa"}
LONG = {"ARC Easy": "arc_easy", "ARC-Easy": "arc_easy", "ARC Challenge": "arc_challenge", "BLiMP": "blimp",
        "Commonsense QA": "csqa", "HellaSwag": "hellaswag", "MMLU": "mmlu", "OpenBook QA": "openbookqa",
        "PIQA": "piqa", "SIQA": "siqa"}


@pytest.fixture(scope="module")
def text() -> list[str]:
  if not PAPER.is_file():
    pytest.skip(f"paper text not found at {PAPER}")
  return PAPER.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def table() -> inputs.Table:
  return inputs.read_table(inputs.PAPER_CSV)


def _cells(line: str) -> tuple[str, list[float]]:
  parts = [c.strip() for c in line.strip().strip("|").split("|")]
  return parts[0], [float(c) for c in parts[1:] if c]


def _header(text: list[str], start: int) -> list[str]:
  """The task columns of a wide table whose header starts at `start` (1-based), one per line."""
  cols = []
  for line in text[start:]:
    name = line.strip().rstrip("|").strip()
    if name == "Average":
      return cols
    cols.append(SHORT[name])
  raise AssertionError("no header end")


def _row(table: inputs.Table, point: str) -> dict[str, str]:
  i = table.strings("point").index(point)
  return {c: table.cells[c][i] for c in table.columns}


def test_every_cell_comes_from_the_cited_lines(text, table):
  checked: set[tuple[str, str]] = set()

  def expect(point, col, value):
    row = _row(table, point)
    assert float(row[col]) == value, (point, col, row[col], value)
    checked.add((point, col))

  wide = {101: 88, 102: 88, 104: 88, 105: 88, 107: 88, 108: 88, 375: 361, 378: 361, 381: 361,
          397: 384, 398: 384, 400: 384, 401: 384}
  dual, ar, mdm = "Dual ()", "Autoregressive ()", "Masked-Diffusion ()"
  kinds = {101: ("paper_table2_r1_dual", "ar", dual), 102: ("paper_table2_r1_ar", "ar", ar),
           104: ("paper_table2_r32_dual", "ar", dual), 105: ("paper_table2_r32_ar", "ar", ar),
           107: ("paper_table2_r128_dual", "ar", dual), 108: ("paper_table2_r128_ar", "ar", ar),
           375: ("paper_table2_r1_dual", "prefix", "Prefix"),
           378: ("paper_table2_r32_dual", "prefix", "Prefix"),
           381: ("paper_table2_r128_dual", "prefix", "Prefix"),
           397: ("paper_table11_r32_dual", "pll", dual), 398: ("paper_table11_r32_mdm", "pll", mdm),
           400: ("paper_table11_r128_dual", "pll", dual), 401: ("paper_table11_r128_mdm", "pll", mdm)}
  for line, (point, mode, label) in kinds.items():
    name, values = _cells(text[line - 1])
    assert name == label
    cols = _header(text, wide[line])
    for t, v in zip(cols, values[:9]):
      expect(point, f"score/{t}/{mode}", v)
    expect(point, f"avg/{mode}", values[9])
    assert str(line) in _row(table, point)["paper_lines"].split(";")
  # Table 10 repeats Table 2's dual rows as "Autoregressive" (how the prefix rows are attached).
  for t2, t10 in ((101, 374), (104, 377), (107, 380)):
    a, b = _cells(text[t2 - 1])[1], _cells(text[t10 - 1])[1]
    np.testing.assert_allclose(a, b, atol=0.05)

  t8 = {343: ("32 - 50%", 277, "paper_table3_r32_lam0.5"),
        344: ("32 - 87.5%", 290, "paper_table4_r32_lam0.875"),
        345: ("32 - 12.5%", 303, "paper_table5_r32_lam0.125"),
        346: ("16 - 50%", 316, "paper_table6_r16_lam0.5"),
        347: ("64 - 50%", 329, "paper_table7_r64_lam0.5")}
  for line, (label, start, point) in t8.items():
    name, combos = _cells(text[line - 1])
    assert name == label
    r, ratio = label.split(" - ")
    row = _row(table, point)
    assert float(row["r"]) == float(r) and float(row["lam"]) == float(ratio.rstrip("%")) / 100
    for k, v in zip(range(2, 6), combos):
      expect(point, f"avg/pll1+{k}", v)
    expect(point, "avg/pll", combos[4])
    for i in range(9):
      name, v = _cells(text[start - 1 + i])
      t = LONG[name]
      for k in range(6):
        expect(point, f"score/{t}/pll{k + 1}", v[k])
      expect(point, f"score/{t}/pll", max(v[0], v[5]))  # derived: the paper's better of 1 and 6 masks
    name, v = _cells(text[start - 1 + 9])
    assert name == "Average"
    for k in range(6):
      expect(point, f"avg/pll{k + 1}", v[k])
  for line in range(355, 360):
    name, (pll, mc) = _cells(text[line - 1])
    expect("paper_table3_r32_lam0.5", f"score/{LONG[name]}/mc", mc)
    assert float(_row(table, "paper_table3_r32_lam0.5")[f"score/{LONG[name]}/pll"]) == pll

  filled = {(table.cells["point"][i], c) for c in table.columns if c not in inputs.TEXT_COLUMNS + ("r", "lam")
            for i in range(table.n) if table.cells[c][i].strip()}
  assert filled == checked, sorted(filled ^ checked)[:5]


def test_table_assignment_is_unique(text):
  """Tables 3-7 <-> Table 8 rows and Table 9 <-> Table 3: each match holds for exactly one table."""
  starts = (277, 290, 303, 316, 329)
  maxima = []
  for s in starts:
    v = np.array([_cells(text[s - 1 + i])[1] for i in range(9)])
    maxima.append(v)
  for j, line in enumerate(range(343, 348)):
    combos = np.array(_cells(text[line - 1])[1])
    recomputed = [np.array([np.maximum(v[:, 0], v[:, k]).mean() for k in range(1, 6)]) for v in maxima]
    matches = [i for i, c in enumerate(recomputed) if np.abs(c - combos).max() <= 0.06]
    assert matches == [j]
  t9 = {LONG[_cells(text[l - 1])[0]]: _cells(text[l - 1])[1][0] for l in range(355, 360)}
  hits = [i for i, v in enumerate(maxima)
          if all(max(v[TASKS.index(t), 0], v[TASKS.index(t), 5]) == p for t, p in t9.items())]
  assert hits == [0]


def test_lost_lambdas_stay_empty(table):
  lam = dict(zip(table.strings("point"), table.strings("lam")))
  assert all(lam[p] == "" for p in lam if p.endswith("_dual"))
  assert {lam[p] for p in lam if p.endswith("_ar")} == {"1"}
  assert {lam[p] for p in lam if p.endswith("_mdm")} == {"0"}


def test_columns_follow_the_results_schema(table):
  for c in table.columns:
    if c.startswith(("score/", "avg/")):
      parts = c.split("/")
      assert (len(parts) == 3 and parts[1] in TASKS) or (len(parts) == 2 and c.startswith("avg/")), c


def test_analysis_plan_of_the_paper_numbers(table):
  """avg/pll has 7 placed points and is fitted; avg/ar (one lambda) and avg/prefix (none) are skipped."""
  jobs = study.plan([table], study.Options())
  assert [p.target for p in jobs[0].points] == ["avg/pll"] and jobs[0].points[0].n == 7
  notes = " ".join(jobs[0].notes)
  assert "avg/ar not fitted: 3 points" in notes and "avg/prefix not fitted: 0 points" in notes
  assert jobs[0].diff is None and "Figure 5 skipped" in notes
  with pytest.raises(inputs.InputError, match="avg/ar: 3 points"):
    study.plan([table], study.Options(targets=("avg/ar",)))
