"""`python -m dualjax.analyze` as a user runs it: figures and summary from CSVs, bad input exits 2."""

import csv
import pathlib
import re
import subprocess
import sys

from PIL import Image
import pytest

import analysis_fixtures as fx
from dualjax.analysis import figures, inputs

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--restarts=0", "--samples=200", "--lam_points=33"]


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dualjax.analyze", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _size(path: pathlib.Path) -> tuple[int, int]:
  with Image.open(path) as im:
    return im.size


def test_sweep_and_paper_to_figures_and_summary(tmp_path):
  sweep = fx.write_csv(tmp_path / "sweep.csv", fx.sweep_rows())
  for lam in (1.0, 0.9375, 0.5, 0.125, 0.0):
    fx.write_run(tmp_path / "runs", 128, lam)
  fx.write_run(tmp_path / "runs", 4, 1.0)
  out = tmp_path / "out"
  p = _run(inputs.PAPER_CSV, sweep, f"--run_root={tmp_path / 'runs'}", f"--out={out}", *FAST)
  assert p.returncode == 0, p.stderr
  w, dpi = figures.PANEL_W, figures.DPI
  expected = {"figure1": (round(2 * w * dpi), round(figures.FIG1_H * dpi)),
              "figure4_sweep": (round(3 * w * dpi), round(figures.FIG4_H * dpi)),
              "figure4_paper_results": (round(w * dpi), round(figures.FIG4_H * dpi)),  # avg/pll only
              "figure5_sweep": (round(2 * w * dpi), round((figures.FIG1_H + 0.6) * dpi))}
  for stem, size in expected.items():
    assert _size(out / f"{stem}.png") == size, stem
    assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
  assert not (out / "figure5_paper_results.png").exists()  # the text lost the dual models' lambdas
  assert "Figure 5 skipped" in p.stderr
  md = (out / "summary.md").read_text()
  for source, targets, rs in (("sweep", ("avg/ar", "avg/pll", "avg/prefix"), fx.R_GRID),
                              ("paper_results", ("avg/pll",), (16, 32, 64, 128))):
    section = md.split(f"## Source `{source}`")[1].split("\n## ")[0]
    for target in targets:
      table = section.split(f"### Recommended λ per r: {target}")[1].split("###")[0]
      found = {float(m.group(1)): float(m.group(2))
               for m in re.finditer(r"^\| ([0-9.]+) \| ([0-9.]+) \| ", table, re.M)}
      assert sorted(found) == sorted(rs), (source, target)
      assert all(0 <= v <= 1 for v in found.values())
  rows = list(csv.DictReader(open(out / "optimal_lambda.csv")))
  assert len(rows) == 3 * 8 + 4
  assert "| r128_lam1_s42 | 128 | 1 | ar (250) |" in md.split("### Overfitted runs")[-1]


def test_paper_flag_without_run_root(tmp_path):
  out = tmp_path / "out"
  p = _run("--paper", f"--out={out}", *FAST)
  assert p.returncode == 0, p.stderr
  assert sorted(f.name for f in out.iterdir()) == [
      "figure4_paper_results.pdf", "figure4_paper_results.png", "optimal_lambda.csv", "summary.md"]
  assert "note: Figure 1 skipped: no --run_root" in p.stderr


def _bad(tmp_path: pathlib.Path, name: str, rows, cols=None) -> pathlib.Path:
  return fx.write_csv(tmp_path / name, rows, cols)


def _runs(d: pathlib.Path) -> pathlib.Path:
  return fx.write_run(d / "runs", 128, 1.0).parent


BAD = {
    "missing_lam": (lambda d: [_bad(d, "a.csv", fx.sweep_rows(), ["point", "r", "avg/ar"])],
                    r"a\.csv: missing column 'lam'"),
    "missing_target": (lambda d: [_bad(d, "a.csv", fx.sweep_rows(), ["point", "r", "lam", "seed"])],
                       r"a\.csv: missing target column: none of avg/ar, avg/pll, avg/prefix"),
    "explicit_target": (lambda d: [_bad(d, "a.csv", fx.sweep_rows()), "--targets=avg/mmlu"],
                        r"a\.csv: missing column 'avg/mmlu' \(named in --targets\)"),
    "too_few_points": (lambda d: [_bad(d, "a.csv", fx.sweep_rows(rs=(1, 128), lams=(0.5,))
                                       + fx.sweep_rows(rs=(4,), lams=(1.0,)))],
                       r"a\.csv: avg/ar: 3 points with r, lam and a value; the GP fits 4 hyper-parameters, "
                       r"so at least 4 are needed"),
    "single_lambda": (lambda d: [_bad(d, "a.csv", fx.sweep_rows(lams=(0.5,)))],
                      r"a\.csv: avg/ar: a single lam value \(0\.5\) among its 8 points"),
    "single_r": (lambda d: [_bad(d, "a.csv", fx.sweep_rows(rs=(32,)))],
                 r"a\.csv: avg/ar: a single r value \(32\) among its 5 points"),
    "second_file_bad": (lambda d: [_bad(d, "good.csv", fx.sweep_rows()),
                                   _bad(d, "b.csv", fx.sweep_rows(lams=(1.0,)))],
                        r"b\.csv: avg/ar: a single lam value \(1\)"),
    "no_such_file": (lambda d: [d / "nope.csv"], r"nope\.csv: no such file"),
    "bad_flag": (lambda d: [_bad(d, "a.csv", fx.sweep_rows()), "--nu=0"],
                 r"--nu=0: the Matérn smoothness must be > 0"),
    "bad_r_for_curves": (lambda d: [_bad(d, "a.csv", fx.sweep_rows()), f"--run_root={_runs(d)}",
                                    "--r_for_curves=64"],
                         r"--r_for_curves=64: no run under .* has that r \(runs have r = 128\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case):
  make, pattern = BAD[case]
  args = make(tmp_path)
  out = tmp_path / "out"
  p = _run(*args, f"--out={out}", *FAST)
  assert p.returncode == 2, (p.returncode, p.stderr)
  assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
  assert re.search(pattern, p.stderr), p.stderr
  assert not out.exists()
  assert p.stdout == ""


def test_existing_outputs_are_untouched_on_bad_input(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "summary.md").write_text("earlier analysis\n")
  p = _run(_bad(tmp_path, "a.csv", fx.sweep_rows(lams=(0.5,))), f"--out={out}", *FAST)
  assert p.returncode == 2
  assert [f.name for f in out.iterdir()] == ["summary.md"]
  assert (out / "summary.md").read_text() == "earlier analysis\n"


def test_help():
  p = _run("--help")
  assert p.returncode == 0
  assert all(f"--{f}" in p.stdout for f in ("run_root", "targets", "combine", "paper", "r_for_curves"))
