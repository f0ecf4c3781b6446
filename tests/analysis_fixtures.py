"""Synthetic sweep results (the schema of notes/results_csv.md) and run workdirs for the analysis tests."""

import csv
import json
import math
import pathlib
from typing import Sequence

import numpy as np

from dualjax.analysis import inputs, study

TASKS = ("arc_easy", "arc_challenge", "blimp", "csqa", "hellaswag", "mmlu", "openbookqa", "piqa", "siqa")
MODES = ("ar", "prefix", "pll", "mc")
R_GRID = (1, 2, 4, 8, 16, 32, 64, 128)


def lam_opt(log2r: np.ndarray | float, mode: str = "ar") -> np.ndarray | float:
  """The known optimum of the synthetic score: falls smoothly from 0.95 (r = 1) to 0.18 (r = 128)."""
  shift = {"ar": 0.0, "prefix": 0.0, "pll": -0.04, "mc": -0.06}[mode]
  return 0.95 + shift - 0.11 * np.asarray(log2r)


def score(log2r, lam, mode: str = "ar"):
  """A smooth synthetic average score of log2 r and lambda with its maximum at lam_opt."""
  x, l = np.asarray(log2r, float), np.asarray(lam, float)
  base = 30.0 - 1.2 * x - 40.0 * (l - lam_opt(x, mode)) ** 2
  return base + (1.0 + 2.0 * l * (1 - l) if mode == "prefix" else 0.0)


def columns() -> list[str]:
  cols = ["point", "r", "lam", "seed", "steps", "tokens_seen", "final_val_ar_loss", "final_val_mdm_loss",
          "best_val_ar_loss", "best_val_ar_step", "best_val_mdm_loss", "best_val_mdm_step",
          "ar_overfitting", "ar_overfit_step", "mdm_overfitting", "mdm_overfit_step"]
  for t in TASKS:
    for m in MODES:
      cols += [f"score/{t}/{m}", f"acc/{t}/{m}"]
  return cols + [f"avg/{m}" for m in MODES]


def sweep_rows(rs: Sequence[int] = R_GRID, lams: Sequence[float] = (0, 0.25, 0.5, 0.75, 1.0),
               noise: float = 0.05, seed: int = 0) -> list[dict[str, object]]:
  """One row per (r, lam), every column filled as the sweep writes it."""
  rng = np.random.default_rng(seed)
  rows = []
  for r in rs:
    for lam in lams:
      x = math.log2(r)
      over_ar = lam * r > 40  # the AR share saw more than ~40 repetitions
      row: dict[str, object] = {
          "point": f"r{r}_lam{lam:g}_s42", "r": r, "lam": lam, "seed": 42, "steps": 400,
          "tokens_seen": 400 * 16 * 128, "final_val_ar_loss": 4.0 + 0.01 * x,
          "final_val_mdm_loss": 5.0 + 0.01 * x, "best_val_ar_loss": 3.9, "best_val_ar_step": 300,
          "best_val_mdm_loss": 4.9, "best_val_mdm_step": 400, "ar_overfitting": int(over_ar),
          "ar_overfit_step": 250 if over_ar else -1, "mdm_overfitting": 0, "mdm_overfit_step": -1}
      for m in MODES:
        avg = float(score(x, lam, m) + rng.normal(0, noise))
        for t in TASKS:
          row[f"score/{t}/{m}"] = avg
          row[f"acc/{t}/{m}"] = 0.25 + 0.75 * avg / 100
        row[f"avg/{m}"] = avg
      rows.append(row)
  return rows


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, object]],
              cols: Sequence[str] | None = None) -> pathlib.Path:
  cols = list(cols or columns())
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
      w.writerow(row)
  return path


def write_run(root: pathlib.Path, r: int, lam: float, steps: int = 400, every: int = 50,
              seed: int = 42) -> pathlib.Path:
  """A run workdir as dualjax.train leaves it: config.json and metrics.jsonl (train + val records)."""
  d = root / f"r{r}_lam{lam:g}_s{seed}"
  d.mkdir(parents=True)
  cfg = {"seed": seed, "data": {"repetitions": r, "global_batch": 16, "seq_len": 128},
         "objective": {"lam": lam}}
  (d / "config.json").write_text(json.dumps(cfg))
  lines = []
  for s in range(0, steps + 1, every):
    t = s / steps
    ar = 6.0 - 2.5 * t + (1.5 * lam * t ** 2 if r >= 64 else 0.0)  # AR-heavy runs turn up at high r
    mdm = 6.5 - 1.5 * t * (1 - 0.3 * lam)
    if s:
      lines.append({"step": s, "kind": "train", "loss": ar, "ar_loss": ar - 0.3, "mdm_loss": mdm - 0.3})
    lines.append({"step": s, "kind": "val", "ar_loss": ar, "mdm_loss": mdm})
  (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return d


FAST = dict(restarts=0, samples=200, lam_points=33, fine_per_octave=2)


def small_study(tmp_path: pathlib.Path, **opts):
  """A sweep CSV written to tmp_path, planned and analysed with fast settings: (sources, options)."""
  p = write_csv(tmp_path / "sweep.csv", sweep_rows())
  options = study.Options(**{**FAST, **opts})
  jobs = study.plan([inputs.read_table(p)], options)
  return study.analyse(jobs, options), options
