"""The paper's figures (dualjax/analysis/figures.py): files, sizes, and that they are not blank."""

import numpy as np
from PIL import Image

import analysis_fixtures as fx
from dualjax.analysis import figures, inputs


def _check(paths, width, height):
  png, pdf = paths
  assert png.suffix == ".png" and pdf.suffix == ".pdf"
  with Image.open(png) as im:
    assert im.size == (width, height)
    pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
  assert len(np.unique(pixels, axis=0)) > 100  # a drawn figure, not an empty canvas
  assert pdf.read_bytes().startswith(b"%PDF")


def test_figure4_and_figure5(tmp_path):
  (s,), _ = fx.small_study(tmp_path)
  panels = [figures.Panel(t.points, t.fit, t.fine) for t in s.targets]
  assert [p.points.target for p in panels] == ["avg/ar", "avg/pll", "avg/prefix"]
  paths = figures.figure4("sweep", panels, tmp_path)
  _check(paths, round(3 * figures.PANEL_W * figures.DPI), round(figures.FIG4_H * figures.DPI))
  assert paths[0].name == "figure4_sweep.png"
  diff = figures.Panel(s.diff, s.diff_fit.fit, s.diff_fit.fine)
  _check(figures.figure5("sweep", panels[2], diff, tmp_path), round(2 * figures.PANEL_W * figures.DPI),
         round((figures.FIG1_H + 0.6) * figures.DPI))
  # Without a fitted difference (too few runs) the runs alone are drawn, in one panel.
  few = figures.Panel(s.diff, None, None)
  _check(figures.figure5("few", None, few, tmp_path), round(figures.PANEL_W * figures.DPI),
         round((figures.FIG1_H + 0.6) * figures.DPI))


def test_figure1(tmp_path):
  for lam in (1.0, 0.5, 0.0):
    fx.write_run(tmp_path / "runs", 128, lam)
  fx.write_run(tmp_path / "runs", 4, 1.0)
  curves, notes = inputs.read_curves(tmp_path / "runs")
  assert not notes and figures.default_curve_r(curves) == 128
  _check(figures.figure1(curves, 128, tmp_path), round(2 * figures.PANEL_W * figures.DPI),
         round(figures.FIG1_H * figures.DPI))


def test_default_curve_r():
  def c(r, lam):
    return inputs.Curve("x", r, lam, None, np.arange(2), np.ones(2), np.ones(2))
  assert figures.default_curve_r([c(128, 1.0), c(4, 1.0), c(4, 0.5)]) == 4
  assert figures.default_curve_r([c(128, 1.0), c(4, 1.0)]) == 128
  assert figures.default_curve_r([]) is None
