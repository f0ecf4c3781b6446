"""One results-table row per training workdir (the input of `python -m dualjax.analyze`).

Reads a workdir's `config.json`, `metrics.jsonl` and the last `eval/step_N.json` (schema:
notes/results_csv.md). Columns, in order: point, r, lam, seed, steps, tokens_seen, the final and
best validation losses of both objectives (with the step of the best), the overfitting flags at the
end of training and the first validation step where each held, then per task (TASKS order) and
mode (ar, prefix, pll, mc) `score/<task>/<mode>` and `acc/<task>/<mode>`, then `avg/<mode>`.
Booleans are 0/1; a step that never happened is -1; a value the workdir does not hold (e.g. the
`pll` scores of an AR-only model, which is evaluated in mode `ar` only) is NaN.
"""

import csv
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Mapping

from dualjax.evaluation.tasks import TASKS

MODES = ("ar", "prefix", "pll", "mc")
HEAD = ("point", "r", "lam", "seed", "steps", "tokens_seen",
        "final_val_ar_loss", "final_val_mdm_loss",
        "best_val_ar_loss", "best_val_ar_step", "best_val_mdm_loss", "best_val_mdm_step",
        "ar_overfitting", "ar_overfit_step", "mdm_overfitting", "mdm_overfit_step")
COLUMNS = HEAD + tuple(f"{kind}/{t}/{m}" for t in TASKS for m in MODES for kind in ("score", "acc")
                       ) + tuple(f"avg/{m}" for m in MODES)


class ResultsError(ValueError):
  """A workdir that cannot be read as a run (one line, names the file)."""


def read_records(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """metrics.jsonl records in file order; a step logged again after a resume replaces the earlier."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise ResultsError(f"{path}: not found")
  by_key: dict[tuple[str, int], dict[str, Any]] = {}
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      key = (rec["kind"], int(rec["step"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ResultsError(f"{path}:{n}: not a metrics record ({e})") from None
    by_key.pop(key, None)  # keep the position of the latest write
    by_key[key] = rec
  return sorted(by_key.values(), key=lambda r: int(r["step"]))


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(workdir) / "config.json"
  try:
    return json.loads(path.read_text())
  except OSError:
    raise ResultsError(f"{path}: not found") from None
  except json.JSONDecodeError as e:
    raise ResultsError(f"{path}: unreadable ({e.msg})") from None


def final_step(workdir: str | os.PathLike) -> int:
  """train.steps of the run in `workdir` (its config.json)."""
  try:
    return int(read_config(workdir)["train"]["steps"])
  except (KeyError, TypeError, ValueError):
    raise ResultsError(f"{pathlib.Path(workdir) / 'config.json'}: no train.steps") from None


def is_finished(workdir: str | os.PathLike, steps: int | None = None) -> bool:
  """True when the run's final checkpoint `checkpoints/<train.steps>` exists.

  The trainer writes that checkpoint last (after the final validation and evaluation), and Orbax
  renames a checkpoint into place only once it is complete, so its presence means the run is done.
  """
  workdir = pathlib.Path(workdir)
  if steps is None:
    try:
      steps = final_step(workdir)
    except ResultsError:
      return False
  return (workdir / "checkpoints" / str(steps)).is_dir()


def last_eval(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The results dict of the highest-step `eval/step_N.json`, or None."""
  files = [(int(m.group(1)), p) for p in (pathlib.Path(workdir) / "eval").glob("step_*.json")
           if (m := re.fullmatch(r"step_(\d+)\.json", p.name))]
  if not files:
    return None
  path = max(files)[1]
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ResultsError(f"{path}: unreadable ({e})") from None


def _best(vals: list[tuple[int, float]]) -> tuple[float, int]:
  finite = [(v, s) for s, v in vals if math.isfinite(v)]
  if not finite:
    return math.nan, -1
  v, s = min(finite, key=lambda x: (x[0], x[1]))  # the earliest step among equal losses
  return v, s


def _flag(val: list[dict[str, Any]], key: str) -> tuple[int, int]:
  """(flag in the last validation record that carries it, first step where it held or -1).

  The trainer records the step where the (sticky) flag first held as `<objective>_overfit_step`
  (dualjax.metrics.OverfitDetector); older runs without it: the first record flagged.
  """
  have = [r for r in val if key in r]
  step_key = key.replace("_overfitting", "_overfit_step")
  recorded = [r for r in have if step_key in r]
  if recorded:
    first = int(recorded[-1][step_key])
  else:
    on = [int(r["step"]) for r in have if r[key]]
    first = on[0] if on else -1
  return (int(bool(have[-1][key])) if have else 0), first


def row(workdir: str | os.PathLike, point: str | None = None) -> dict[str, Any]:
  """The results row of one run; `point` defaults to the workdir's name."""
  workdir = pathlib.Path(workdir)
  cfg = read_config(workdir)
  try:
    r, lam, seed = (int(cfg["data"]["repetitions"]), float(cfg["objective"]["lam"]),
                    int(cfg["seed"]))
    batch, seq = int(cfg["data"]["global_batch"]), int(cfg["data"]["seq_len"])
  except (KeyError, TypeError, ValueError) as e:
    raise ResultsError(f"{workdir / 'config.json'}: missing or bad field {e}") from None
  recs = read_records(workdir)
  train = [x for x in recs if x.get("kind") == "train"]
  val = [x for x in recs if x.get("kind") == "val"]
  steps = int(train[-1]["step"]) if train else 0
  out: dict[str, Any] = {"point": point or workdir.name, "r": r, "lam": lam, "seed": seed,
                         "steps": steps, "tokens_seen": steps * batch * seq}
  for obj in ("ar", "mdm"):
    series = [(int(x["step"]), float(x[f"{obj}_loss"])) for x in val if f"{obj}_loss" in x]
    out[f"final_val_{obj}_loss"] = series[-1][1] if series else math.nan
    out[f"best_val_{obj}_loss"], out[f"best_val_{obj}_step"] = _best(series)
    out[f"{obj}_overfitting"], out[f"{obj}_overfit_step"] = _flag(val, f"{obj}_overfitting")
  ev = last_eval(workdir)
  if ev is None:  # fall back to the last eval record of metrics.jsonl (same numbers, flat keys)
    flat = next((x for x in reversed(recs) if x.get("kind") == "eval"), {})
    get = lambda t, m, k: flat.get(f"{t}/{m}/{k}")  # noqa: E731
    avg = lambda m: flat.get(f"headline/{m}")  # noqa: E731
  else:
    get = lambda t, m, k: (  # noqa: E731
        ev.get("tasks", {}).get(t, {}).get("modes", {}).get(m, {}).get(k))
    avg = lambda m: ev.get("headline", {}).get(m, {}).get("score")  # noqa: E731
  for t in TASKS:
    for m in MODES:
      for kind in ("score", "acc"):
        v = get(t, m, kind)
        out[f"{kind}/{t}/{m}"] = math.nan if v is None else float(v)
  for m in MODES:
    v = avg(m)
    out[f"avg/{m}"] = math.nan if v is None else float(v)
  return {c: out[c] for c in COLUMNS}


def write_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> pathlib.Path:
  """Writes the rows (COLUMNS order) atomically; floats in full precision ('nan' when missing)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for r in rows:
      w.writerow([_cell(r[c]) for c in COLUMNS])
  os.replace(tmp, path)
  return path


def _cell(v: Any) -> str:
  if isinstance(v, bool):
    return str(int(v))
  if isinstance(v, float):
    return "nan" if math.isnan(v) else repr(v)
  return str(v)
