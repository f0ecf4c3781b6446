"""The Markdown summary and the per-r optimum table (CSV) of an analysis."""

import csv
import io
import math
import pathlib
from typing import Sequence

import numpy as np

from dualjax.analysis import rules, study

LOO_GAP = 0.05  # in-sample minus leave-one-out R^2 above which the summary cautions
OPTIMUM_COLUMNS = ("source", "target", "r", "lam_best", "lam_mode", "ci_low", "ci_high",
                   "rule_low", "rule_high", "rule_point", "agreement")


def _lam(x: float) -> str:
  return f"{x:.3f}"


def _r(x: float) -> str:
  return f"{x:g}"


def optimum_rows(sources: Sequence[study.SourceResult]) -> list[dict[str, object]]:
  """One row per (source, target, r of the data): the recommended lambda and the rule."""
  rows = []
  for s in sources:
    for t in s.targets:
      o = t.at_r
      tol = 0.5 * (o.lam_grid[1] - o.lam_grid[0]) if len(o.lam_grid) > 1 else 0.0
      for i, r in enumerate(o.r):
        rule = rules.rule_of_thumb(r)
        rows.append({
            "source": s.table.source, "target": t.points.target, "r": float(r),
            "lam_best": float(o.lam_best[i]), "lam_mode": float(o.lam_mode[i]),
            "ci_low": float(o.ci_Rx2[i, 0]), "ci_high": float(o.ci_Rx2[i, 1]),
            "rule_low": rule.lo if rule else math.nan, "rule_high": rule.hi if rule else math.nan,
            "rule_point": rule.point if rule and rule.point is not None else math.nan,
            "agreement": rules.agreement(rule, o.lam_best[i], tuple(o.ci_Rx2[i]), tol),
        })
  return rows


def optimum_csv(sources: Sequence[study.SourceResult]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, OPTIMUM_COLUMNS, lineterminator="\n")
  w.writeheader()
  for row in optimum_rows(sources):
    w.writerow({k: _cell(v) for k, v in row.items()})
  return buf.getvalue()


def _cell(v: object) -> object:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.6g}"
  return v


def summary(sources: Sequence[study.SourceResult], opts: study.Options,
            figures: Sequence[pathlib.Path] = (), notes: Sequence[str] = ()) -> str:
  """The Markdown summary (see the section titles)."""
  level = int(round(100 * opts.level))
  out = ["# Optimal AR share λ: Gaussian-process analysis", ""]
  out.append("Inputs: " + "; ".join(f"`{s.table.path}` ({s.table.n} rows, source `{s.table.source}`)"
                                    for s in sources) + ".")
  out.append("")
  out.append(
      f"Method (paper §5.2): one GP per source and target over inputs log2 r and λ (standardised); "
      f"kernel Constant × anisotropic Matérn(ν = {opts.nu:g}) + White; L-BFGS-B with "
      f"{opts.restarts} restarts; normalised outputs. "
      + ("All input files are pooled into one source. " if opts.combine and len(sources) == 1
         and "source" in sources[0].table.columns else "Each input file is fitted on its own. ")
      + f"The optimal-λ density at each r comes from {opts.samples} joint posterior samples of the "
      f"noise-free function on {opts.lam_points} λ values spanning the measured λ range; λ* is the "
      f"argmax of the posterior mean (argmin for a loss), the interval is the central {level}% of the "
      "samples' optima. R² (in-sample) compares the posterior mean at the runs with their values, as "
      "the paper reports it; R² (LOO) is leave-one-out with the fitted hyper-parameters.")
  out.append("")
  rows = optimum_rows(sources)
  for s in sources:
    out += [f"## Source `{s.table.source}`", "", "### Models", "",
            "| target | points | R² (in-sample) | R² (LOO) | kernel |", "|---|---|---|---|---|"]
    for t in s.targets + ([s.diff_fit] if s.diff_fit else []):
      out.append(f"| {t.points.target} | {t.fit.n} | {t.fit.r2:.4f} | {t.fit.r2_loo:.4f} | "
                 f"`{t.fit.gp.kernel_}` |")
    out.append("")
    for t in s.targets + ([s.diff_fit] if s.diff_fit else []):
      if t.fit.r2 - t.fit.r2_loo > LOO_GAP:
        out += [f"Caution, {t.points.target}: leave-one-out R² ({t.fit.r2_loo:.2f}) is far below the "
                f"in-sample R² ({t.fit.r2:.2f}): with {t.fit.n} points the surface interpolates the runs "
                "rather than generalising between them; read its optimum and density as weak evidence.", ""]
    for t in s.targets:
      out += [f"### Recommended λ per r: {t.points.target}", "",
              f"| r | λ* | mode of density | {level}% interval | rule of thumb | λ* vs rule |",
              "|---|---|---|---|---|---|"]
      for row in rows:
        if row["source"] != s.table.source or row["target"] != t.points.target:
          continue
        rule = rules.rule_of_thumb(row["r"])
        out.append(f"| {_r(row['r'])} | {_lam(row['lam_best'])} | {_lam(row['lam_mode'])} | "
                   f"[{_lam(row['ci_low'])}, {_lam(row['ci_high'])}] | "
                   f"{_rule_text(rule)} | {row['agreement']} |")
      mine = [r for r in rows if r["source"] == s.table.source and r["target"] == t.points.target]
      out += ["", _rule_sentence(mine, t.at_r.lam_grid), ""]
    out += ["### Overfitted runs", ""]
    if not any(c in s.table.columns for c in ("ar_overfitting", "mdm_overfitting")):
      out.append("No overfitting columns in this source.")
    elif not s.overfitted:
      out.append("No run is flagged as overfitted.")
    else:
      out += ["| point | r | λ | flagged (first step) |", "|---|---|---|---|"]
      for o in s.overfitted:
        flags = ", ".join(f"{w} ({int(st)})" if np.isfinite(st) and st >= 0 else w for w, st in o["which"])
        out.append(f"| {o['point']} | {_r(o['r'])} | {o['lam']:g} | {flags} |")
    out.append("")
  if figures:
    out += ["## Figures", ""] + [f"- [{p.name}]({p.name})" for p in figures if p.suffix == ".png"] + [""]
  all_notes = [n for s in sources for n in s.notes] + list(notes)
  if all_notes:
    out += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
  return "\n".join(out).rstrip("\n") + "\n"


def _rule_text(rule: rules.Rule | None) -> str:
  if rule is None:
    return "none (16 < r < 32)"
  if rule.point is None:
    return f"[{_lam(rule.lo)}, {_lam(rule.hi)}]"
  return f"{_lam(rule.point)} (band [{_lam(rule.lo)}, {_lam(rule.hi)}])"


def _rule_sentence(rows: Sequence[dict[str, object]], lam_grid: np.ndarray) -> str:
  counts = {k: sum(1 for r in rows if r["agreement"] == k) for k in ("inside", "CI overlaps", "outside")}
  ruled = sum(counts.values())
  text = (f"Rules of thumb: λ* lies inside the rule's band at {counts['inside']} of {ruled} r values "
          f"with a rule; the interval overlaps the band at {counts['CI overlaps']} more; "
          f"{counts['outside']} {'disagrees' if counts['outside'] == 1 else 'disagree'}.")
  beyond = [r for r in rows if np.isfinite(r["rule_low"])
            and (r["rule_high"] < lam_grid[0] or r["rule_low"] > lam_grid[-1])]
  if beyond:
    text += (f" At r = {', '.join(_r(r['r']) for r in beyond)} the rule's band lies outside the "
             f"measured λ range [{_lam(lam_grid[0])}, {_lam(lam_grid[-1])}], so the data cannot test it.")
  return text
