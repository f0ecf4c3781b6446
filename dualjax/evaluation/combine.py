"""Several evaluation results (the JSON `suite.write_results` writes) as one table.

`find_results` expands the inputs (a results JSON, or a directory: its eval/*.json, else its
*.json, in step order); `read_results` checks each file's layout; `rows` makes one long row per
(run, task, mode) — run, step, checkpoint, task, mode, n, acc, acc_stderr, score, score_stderr
— plus per (run, mode) an 'average' row (the headline: mean normalised score over the tasks
present, n = their count); `to_csv` and `to_markdown` render them.
"""

import csv
import io
import json
import math
import pathlib
import re
from typing import Any, Sequence

from dualjax.evaluation import metrics
from dualjax.evaluation.tasks import TASKS

COLUMNS = ("run", "step", "checkpoint", "task", "mode", "n", "acc", "acc_stderr", "score",
           "score_stderr")
AVERAGE = "average"


class CombineError(ValueError):
  """An input that is not a readable evaluation results file (one line, names the file)."""


def _step_key(p: pathlib.Path) -> tuple[int, str]:
  m = re.fullmatch(r"step_(\d+)", p.stem)
  return (int(m.group(1)) if m else -1, p.name)


def find_results(inputs: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
  """The results files of `inputs`, in the given order (a directory's files in step order)."""
  out = []
  for x in inputs:
    p = pathlib.Path(x)
    if p.is_dir():
      d = p / "eval" if (p / "eval").is_dir() else p
      files = sorted((f for f in d.glob("*.json") if f.is_file()), key=_step_key)
      if not files:
        raise CombineError(f"{p}: no results JSON (looked for {d}/*.json)")
      out += files
    elif p.is_file():
      out.append(p)
    else:
      raise CombineError(f"{p}: not found")
  return out


def _num(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_results(path: str | pathlib.Path) -> dict[str, Any]:
  """A results dict, its layout checked (CombineError naming the file and the field)."""
  path = pathlib.Path(path)
  try:
    res = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError) as e:
    raise CombineError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  except json.JSONDecodeError as e:
    raise CombineError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
  if not isinstance(res, dict) or not isinstance(res.get("tasks"), dict):
    raise CombineError(f"{path}: not an evaluation results file (no 'tasks' object)")
  if not isinstance(res.get("headline"), dict):
    raise CombineError(f"{path}: not an evaluation results file (no 'headline' object)")
  for task, t in res["tasks"].items():
    if task not in TASKS:
      raise CombineError(f"{path}: unknown task '{task}'")
    if not isinstance(t, dict) or not isinstance(t.get("modes"), dict):
      raise CombineError(f"{path}: tasks.{task} has no 'modes' object")
    for mode, s in t["modes"].items():
      if not isinstance(s, dict) or not (_num(s.get("acc")) and _num(s.get("score"))):
        raise CombineError(f"{path}: tasks.{task}.modes.{mode} needs numbers 'acc' and 'score'")
  for mode, h in res["headline"].items():
    if not isinstance(h, dict) or not _num(h.get("score")):
      raise CombineError(f"{path}: headline.{mode} needs a number 'score'")
  return res


def default_label(path: pathlib.Path) -> str:
  """`<workdir name>/step_N` for `<workdir>/eval/step_N.json`, else the path without .json."""
  path = pathlib.Path(path)
  if path.parent.name == "eval" and path.parent.parent.name:
    return f"{path.parent.parent.name}/{path.stem}"
  return str(path.with_suffix("")) if path.suffix == ".json" else str(path)


def _order(modes: Any) -> list[str]:
  known = [m for m in metrics.MODE_ORDER if m in modes]
  return known + sorted(m for m in modes if m not in known)


def rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
  """Long rows (COLUMNS) of labelled results: per run its tasks (TASKS order) and modes, then
  its average rows. Values a file lacks (e.g. a standard error of an older file) are None."""
  out = []
  for label, res in runs:
    base = {"run": label, "step": res.get("step"), "checkpoint": res.get("checkpoint")}
    for task in [t for t in TASKS if t in res["tasks"]]:
      modes = res["tasks"][task]["modes"]
      for mode in _order(modes):
        s = modes[mode]
        out.append(base | {"task": task, "mode": mode, "n": s.get("n"), "acc": s["acc"],
                           "acc_stderr": s.get("acc_stderr"), "score": s["score"],
                           "score_stderr": s.get("score_stderr")})
    for mode in _order(res["headline"]):
      h = res["headline"][mode]
      out.append(base | {"task": AVERAGE, "mode": mode, "n": h.get("num_tasks"), "acc": None,
                         "acc_stderr": None, "score": h["score"],
                         "score_stderr": h.get("score_stderr")})
  return out


def to_csv(rs: Sequence[dict[str, Any]]) -> str:
  """CSV with a header of COLUMNS; missing values are empty."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
  w.writeheader()
  for r in rs:
    w.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
  return buf.getvalue()


def _cell(value: float | None, se: float | None, spec: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return format(value, spec) + ("" if se is None else f" ± {format(se, spec)}")


def to_markdown(rs: Sequence[dict[str, Any]], metric: str = "score") -> str:
  """One row per (run, mode), one column per task present and the average: `metric` ('score':
  normalised, or 'acc') ± its standard error."""
  if metric not in ("score", "acc"):
    raise ValueError(f"metric must be 'score' or 'acc', got {metric!r}")
  tasks = [t for t in TASKS if any(r["task"] == t for r in rs)]
  table: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
  for r in rs:
    table.setdefault((r["run"], r["mode"]), {})[r["task"]] = r
  cols = tasks + ([AVERAGE] if metric == "score" else [])
  spec = ".1f" if metric == "score" else ".4f"
  lines = ["| run | step | mode | " + " | ".join(
               metrics.TASK_TITLES.get(t, "Average") for t in cols) + " |",
           "|---|--:|---|" + "--:|" * len(cols)]
  for (run, mode), cells in table.items():
    if metric == "acc" and not (set(cells) - {AVERAGE}):
      continue
    step = next(iter(cells.values()))["step"]
    lines.append(f"| {run} | {'–' if step is None else step} | {mode} | " + " | ".join(
        "–" if t not in cells else _cell(cells[t][metric], cells[t][f"{metric}_stderr"], spec)
        for t in cols) + " |")
  what = ("normalised score 100·(acc − chance)/(1 − chance)" if metric == "score"
          else "accuracy")
  return f"Zero-shot {what} ± standard error, per run and mode.\n\n" + "\n".join(lines) + "\n"
