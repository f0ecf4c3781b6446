"""Analysis inputs: results tables (one row per run, notes/results_csv.md) and validation curves.

A table is read whole and checked before any analysis: the columns `r` and `lam` must exist,
every filled cell of a numeric column must parse, r > 0 and 0 <= lam <= 1. Empty cells are NaN
(the paper's CSV leaves the numbers the text lost empty). Faults raise `InputError` with one line
naming the file (and line and column).
"""

import csv
import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Sequence

import numpy as np

DEFAULT_TARGETS = ("avg/ar", "avg/pll", "avg/prefix")
REQUIRED = ("r", "lam")
FLAGS = ("ar_overfitting", "mdm_overfitting")
TEXT_COLUMNS = ("point", "source", "paper_lines", "provenance")
PAPER_CSV = pathlib.Path(__file__).resolve().parent / "paper_results.csv"


class InputError(ValueError):
  """A fault in the user's input, reported as one line."""


@dataclasses.dataclass
class Table:
  """One results CSV, column-wise, tagged with its source name."""
  source: str
  path: pathlib.Path
  columns: tuple[str, ...]
  cells: dict[str, list[str]]  # column -> raw strings, one per row

  @property
  def n(self) -> int:
    return len(self.cells[self.columns[0]]) if self.columns else 0

  def has(self, column: str) -> bool:
    return column in self.cells

  def numbers(self, column: str) -> np.ndarray:
    """float64[n]; an empty cell (or an absent column) is NaN; a non-number is an InputError."""
    if column not in self.cells:
      return np.full(self.n, np.nan)
    out = np.empty(self.n)
    for i, s in enumerate(self.cells[column]):
      s = s.strip()
      try:
        out[i] = float(s) if s else math.nan
      except ValueError:
        raise InputError(f"{self.path}:{i + 2}: column '{column}' holds '{s}', not a number") from None
    return out

  def strings(self, column: str, default: str = "") -> list[str]:
    return list(self.cells.get(column, [default] * self.n))

  def names(self) -> list[str]:
    points = self.strings("point")
    return [p or f"{self.source}:row{i + 2}" for i, p in enumerate(points)]


def source_names(paths: Sequence[str | os.PathLike]) -> list[str]:
  """The file stems (made filename-safe), with a suffix where two files share a stem."""
  stems = [re.sub(r"[^A-Za-z0-9_.-]+", "_", pathlib.Path(p).stem) or "results" for p in paths]
  out = []
  for i, s in enumerate(stems):
    out.append(s if stems.count(s) == 1 else f"{s}_{stems[:i + 1].count(s)}")
  return out


def read_table(path: str | os.PathLike, source: str | None = None) -> Table:
  """Reads and checks one results CSV (see module docstring)."""
  path = pathlib.Path(path)
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      rows = list(reader)
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise InputError(f"{path}: cannot read as a CSV file ({e})") from None
  if not header or not any(h.strip() for h in header):
    raise InputError(f"{path}: empty file (expected a header row with at least 'r' and 'lam')")
  header = [h.strip() for h in header]
  dup = sorted({h for h in header if header.count(h) > 1})
  if dup:
    raise InputError(f"{path}: column '{dup[0]}' appears more than once in the header")
  for c in REQUIRED:
    if c not in header:
      raise InputError(f"{path}: missing column '{c}' (a results CSV needs 'r' and 'lam'; "
                       f"it has: {', '.join(header[:8])}{', ...' if len(header) > 8 else ''})")
  rows = [row for row in rows if any(c.strip() for c in row)]
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise InputError(f"{path}:{i + 2}: {len(row)} cells, the header has {len(header)}")
  cells = {h: [row[j] for row in rows] for j, h in enumerate(header)}
  table = Table(source or source_names([path])[0], path, tuple(header), cells)
  r, lam = table.numbers("r"), table.numbers("lam")
  for i in range(table.n):
    if not math.isnan(r[i]) and not (math.isfinite(r[i]) and r[i] > 0):
      raise InputError(f"{path}:{i + 2}: r = {r[i]:g}; repetitions must be > 0")
    if not 0.0 <= lam[i] <= 1.0 and not math.isnan(lam[i]):
      raise InputError(f"{path}:{i + 2}: lam = {lam[i]:g}; the AR share must lie in [0, 1]")
  for c in header:  # every other numeric column must parse too (fail before any work)
    if c not in TEXT_COLUMNS:
      table.numbers(c)
  return table


def combine(tables: Sequence[Table], source: str = "combined") -> Table:
  """All rows of `tables` in one table (column union; a `source` column tags each row's file)."""
  columns: list[str] = []
  for t in tables:
    columns += [c for c in t.columns if c not in columns and c != "source"]
  columns.append("source")
  cells: dict[str, list[str]] = {c: [] for c in columns}
  for t in tables:
    for c in columns:
      cells[c] += t.strings(c) if c != "source" else [t.source] * t.n
  path = pathlib.Path(" + ".join(str(t.path) for t in tables))
  return Table(source, path, tuple(columns), cells)


@dataclasses.dataclass
class Points:
  """The rows of one table usable for one target: r, lam and the target all filled."""
  source: str
  path: pathlib.Path
  target: str
  r: np.ndarray
  lam: np.ndarray
  y: np.ndarray
  names: list[str]
  ar_overfitting: np.ndarray  # bool
  mdm_overfitting: np.ndarray  # bool
  skipped: int  # rows with the target filled but r or lam empty

  @property
  def log2r(self) -> np.ndarray:
    return np.log2(self.r)

  @property
  def n(self) -> int:
    return len(self.y)


def select(table: Table, target: str, y: np.ndarray | None = None) -> Points:
  """Points of `target` (or of the given per-row values `y`, e.g. a difference of two columns)."""
  r, lam = table.numbers("r"), table.numbers("lam")
  y = table.numbers(target) if y is None else y
  has_y = np.isfinite(y)
  keep = has_y & np.isfinite(r) & np.isfinite(lam)
  flags = [np.nan_to_num(table.numbers(c), nan=0.0) > 0.5 for c in FLAGS]
  names = [n for n, k in zip(table.names(), keep) if k]
  return Points(table.source, table.path, target, r[keep], lam[keep], y[keep], names,
                flags[0][keep], flags[1][keep], int((has_y & ~keep).sum()))


def overfitted(table: Table) -> list[dict[str, object]]:
  """Rows flagged as overfitted: point, r, lam, and which objective(s) with the first step."""
  r, lam = table.numbers("r"), table.numbers("lam")
  out = []
  flags = {c: table.numbers(c) for c in FLAGS}
  steps = {c: table.numbers(c.replace("overfitting", "overfit_step")) for c in FLAGS}
  for i, name in enumerate(table.names()):
    which = [(c.split("_")[0], steps[c][i]) for c in FLAGS if flags[c][i] > 0.5]
    if which:
      out.append({"point": name, "r": r[i], "lam": lam[i], "which": which})
  return out


@dataclasses.dataclass
class Curve:
  """Validation curves of one run (val records of its metrics.jsonl)."""
  name: str
  r: float
  lam: float
  seed: int | None
  step: np.ndarray
  ar_loss: np.ndarray  # NaN where a record lacks it
  mdm_loss: np.ndarray


def read_curves(run_root: str | os.PathLike) -> tuple[list[Curve], list[str]]:
  """Curves of every run workdir directly under `run_root` (or `run_root` itself).

  A run is a directory with `config.json` (data.repetitions, objective.lam, seed) and
  `metrics.jsonl`. Unreadable runs are skipped with a note; returns (curves, notes).
  """
  root = pathlib.Path(run_root)
  dirs = [root] + sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
  curves, notes = [], []
  for d in dirs:
    if not (d / "config.json").is_file() or not (d / "metrics.jsonl").is_file():
      continue
    try:
      cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
      r, lam = float(cfg["data"]["repetitions"]), float(cfg["objective"]["lam"])
      seed = cfg.get("seed")
      records = _val_records(d / "metrics.jsonl")
      steps = sorted(records)
      ar, mdm = ([_float(records[s].get(k)) for s in steps] for k in ("ar_loss", "mdm_loss"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      notes.append(f"run {d}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
      continue
    if not steps:
      notes.append(f"run {d}: no validation records")
      continue
    curves.append(Curve(d.name, r, lam, seed if isinstance(seed, int) else None,
                        np.array(steps), np.array(ar), np.array(mdm)))
  return curves, notes


def _float(v: object) -> float:
  return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _val_records(path: pathlib.Path) -> dict[int, dict[str, object]]:
  """Val records by step; a step logged twice (a re-run after a resume) keeps the last.

  The same reading as dualjax.metrics.read_metrics, without importing TensorBoard; a line that
  is not JSON (a run killed mid-write) is skipped.
  """
  out: dict[int, dict[str, object]] = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      rec = json.loads(line)
    except ValueError:
      continue
    if isinstance(rec, dict) and rec.get("kind") == "val" and isinstance(rec.get("step"), int):
      out[rec["step"]] = rec
  return out
