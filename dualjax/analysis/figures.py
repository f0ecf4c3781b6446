"""The paper's figures (matplotlib, Agg; each saved as PNG and PDF).

Figure 1: held-out AR loss and MDM NELBO against step, one line per lambda, at one r.
Figure 4: per target, the GP mean over (log2 r, lambda) with the runs as points (overfitted runs
marked) and, underneath, the density of the optimal lambda with the posterior-mean optimum and
the paper's rule of thumb.
Figure 5: the prefix evaluation over (r, lambda) and its difference to the AR evaluation.
"""

import dataclasses
import pathlib
from typing import Sequence

import matplotlib
from matplotlib import colors
from matplotlib import figure as mpl_figure
import numpy as np

from dualjax.analysis import gp, inputs, rules

DPI = 100
PANEL_W, FIG4_H, FIG1_H = 4.6, 7.0, 3.8


@dataclasses.dataclass
class Panel:
  """One target of one source: its points, its GP and the optimum on a fine r grid."""
  points: inputs.Points
  fit: gp.Fit | None
  fine: gp.Optimum | None


def save(fig: mpl_figure.Figure, out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
  paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
  for p in paths:
    fig.savefig(p, dpi=DPI)
  return paths


def _r_axis(ax, log2r: np.ndarray) -> None:
  lo, hi = int(np.floor(log2r.min())), int(np.ceil(log2r.max()))
  ticks = np.arange(lo, hi + 1)
  ax.set_xticks(ticks)
  ax.set_xticklabels([f"{2.0 ** t:g}" for t in ticks])
  ax.set_xlabel("repetitions r")


def _heat(fig, ax, opt: gp.Optimum, label: str, cmap: str = "viridis",
          norm: colors.Normalize | None = None):
  m = ax.pcolormesh(opt.log2r, opt.lam_grid, opt.mean_RxG.T, shading="nearest", cmap=cmap, norm=norm,
                    rasterized=True)
  if np.ptp(opt.mean_RxG) > 0:
    ax.contour(opt.log2r, opt.lam_grid, opt.mean_RxG.T, levels=8, colors="k", linewidths=0.4, alpha=0.5)
  fig.colorbar(m, ax=ax, label=label)
  return m


def _scatter(ax, pts: inputs.Points, cmap, norm) -> None:
  ax.scatter(pts.log2r, pts.lam, c=pts.y, cmap=cmap, norm=norm, edgecolors="k", linewidths=0.6,
             s=28, zorder=3, label="runs")
  if pts.ar_overfitting.any():
    ax.scatter(pts.log2r[pts.ar_overfitting], pts.lam[pts.ar_overfitting], marker="x", c="red",
               s=60, zorder=4, label="AR overfitted")
  if pts.mdm_overfitting.any():
    ax.scatter(pts.log2r[pts.mdm_overfitting], pts.lam[pts.mdm_overfitting], marker="+", c="orange",
               s=80, zorder=4, label="MDM overfitted")


def _rule_band(ax, log2r: np.ndarray) -> None:
  lo, hi = [], []
  for x in log2r:
    rule = rules.rule_of_thumb(2.0 ** x)
    lo.append(rule.lo if rule else np.nan)
    hi.append(rule.hi if rule else np.nan)
  ax.fill_between(log2r, lo, hi, color="tab:red", alpha=0.15, lw=0, label="rule of thumb")
  point = [rules.rule_of_thumb(2.0 ** x) for x in log2r]
  ax.plot(log2r, [p.point if p and p.point is not None else np.nan for p in point], "--",
          color="tab:red", lw=1, label="λ·r = 16")


def figure4(source: str, panels: Sequence[Panel], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Heat map + optimal-lambda density, one column per fitted target."""
  panels = [p for p in panels if p.fit is not None and p.fine is not None]
  fig = mpl_figure.Figure(figsize=(PANEL_W * len(panels), FIG4_H), layout="constrained")
  axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=[2, 1], sharex="col")
  for j, p in enumerate(panels):
    top, bottom = axes[0, j], axes[1, j]
    norm = colors.Normalize(min(p.fine.mean_RxG.min(), p.points.y.min()),
                            max(p.fine.mean_RxG.max(), p.points.y.max()))
    _heat(fig, top, p.fine, p.points.target, norm=norm)
    _scatter(top, p.points, "viridis", norm)
    top.set_ylabel("AR share λ")
    top.set_title(f"{p.points.target} ({source}); R² = {p.fit.r2:.3f} (LOO {p.fit.r2_loo:.2f})",
                  fontsize=9)
    top.legend(fontsize=6, loc="lower left")
    m = bottom.pcolormesh(p.fine.log2r, p.fine.lam_grid, p.fine.density_RxG.T, shading="nearest",
                          cmap="Blues", rasterized=True)
    fig.colorbar(m, ax=bottom, label="density of optimal λ")
    bottom.plot(p.fine.log2r, p.fine.lam_best, color="k", lw=1.2, label="argmax of GP mean")
    _rule_band(bottom, p.fine.log2r)
    bottom.set_ylim(p.fine.lam_grid[0], p.fine.lam_grid[-1])
    bottom.set_ylabel("optimal λ")
    bottom.legend(fontsize=6, loc="lower left")
    _r_axis(bottom, p.fine.log2r)
  return save(fig, out_dir, f"figure4_{source}")


def figure5(source: str, prefix: Panel | None, diff: Panel, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Left: prefix evaluation (GP mean, when fitted); right: prefix minus AR evaluation."""
  ncols = 2 if prefix is not None and prefix.fine is not None else 1
  fig = mpl_figure.Figure(figsize=(PANEL_W * ncols, FIG1_H + 0.6), layout="constrained")
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  if ncols == 2:
    norm = colors.Normalize(min(prefix.fine.mean_RxG.min(), prefix.points.y.min()),
                            max(prefix.fine.mean_RxG.max(), prefix.points.y.max()))
    _heat(fig, axes[0], prefix.fine, prefix.points.target, norm=norm)
    _scatter(axes[0], prefix.points, "viridis", norm)
    axes[0].set_title(f"prefix evaluation ({source})", fontsize=9)
    axes[0].set_ylabel("AR share λ")
    _r_axis(axes[0], prefix.fine.log2r)
  ax = axes[-1]
  values = diff.points.y if diff.fine is None else np.concatenate([diff.points.y, diff.fine.mean_RxG.ravel()])
  bound = max(float(np.abs(values).max()), 1e-9)
  norm = colors.TwoSlopeNorm(0.0, -bound, bound)
  if diff.fine is not None:
    _heat(fig, ax, diff.fine, "prefix − AR", cmap="RdBu", norm=norm)
  else:
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="RdBu"), ax=ax, label="prefix − AR")
  _scatter(ax, diff.points, "RdBu", norm)
  for x, l, v in zip(diff.points.log2r, diff.points.lam, diff.points.y) if diff.points.n <= 30 else ():
    ax.annotate(f"{v:+.1f}", (x, l), fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set_title(f"prefix minus AR evaluation ({source})", fontsize=9)
  ax.set_ylabel("AR share λ")
  _r_axis(ax, diff.points.log2r if diff.fine is None else diff.fine.log2r)
  return save(fig, out_dir, f"figure5_{source}")


def default_curve_r(curves: Sequence[inputs.Curve]) -> float | None:
  """The largest r with at least two lambdas (else the largest r), as the paper's r = 128."""
  by_r: dict[float, set[float]] = {}
  for c in curves:
    by_r.setdefault(c.r, set()).add(c.lam)
  multi = [r for r, lams in by_r.items() if len(lams) >= 2]
  return max(multi) if multi else (max(by_r) if by_r else None)


def figure1(curves: Sequence[inputs.Curve], r: float, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Held-out AR loss and MDM NELBO against step for every lambda at r."""
  sel = sorted((c for c in curves if c.r == r), key=lambda c: (-c.lam, c.seed or 0, c.name))
  fig = mpl_figure.Figure(figsize=(2 * PANEL_W, FIG1_H), layout="constrained")
  axes = fig.subplots(1, 2)
  cmap = matplotlib.colormaps["viridis"]
  seen: set[float] = set()
  for c in sel:
    label = None if c.lam in seen else f"λ = {c.lam:g}"
    seen.add(c.lam)
    for ax, v in zip(axes, (c.ar_loss, c.mdm_loss)):
      ok = np.isfinite(v)
      if ok.any():
        ax.plot(c.step[ok], v[ok], color=cmap(c.lam), lw=1.2, label=label, marker=".", ms=3)
  for ax, name in zip(axes, ("held-out AR loss", "held-out MDM NELBO")):
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(f"{name}, r = {r:g}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  return save(fig, out_dir, "figure1")
