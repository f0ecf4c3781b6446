"""`python -m dualjax.evaluate_combine`: several results JSONs -> one table / CSV (subprocess)."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dualjax.evaluation import combine, metrics, suite
from dualjax.evaluation.tasks import Example

REPO = pathlib.Path(__file__).resolve().parents[1]


def _results(seed, step):
  """A results dict as `suite.evaluate` builds it, from random per-item credits."""
  rng = np.random.default_rng(seed)
  res = {"step": step, "checkpoint": f"/runs/r{seed}", "tasks": {}}
  for task, n, k in (("piqa", 30, 2), ("arc_easy", 20, 4)):
    exs = [Example(task, "", str(i), {}, tuple("abcd"[:k]), 0) for i in range(n)]
    modes = {m: metrics.summarise(task, exs, (rng.random(n) < 0.6).astype(float))
             for m in ("ar", "pll1", "pll6")}
    res["tasks"][task] = {"modes": modes, "num_examples": n}
  metrics.add_pll_best(res)
  metrics.add_headline(res)
  return res


def _cli(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "dualjax.evaluate_combine", *args],
                        capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture()
def two_runs(tmp_path):
  paths = []
  for seed, step in ((1, 100), (2, 200)):
    p = tmp_path / f"run{seed}" / "eval" / f"step_{step}.json"
    suite.write_results(_results(seed, step), p)
    paths.append(p)
  return paths


def test_combine_csv_and_table(two_runs, tmp_path):
  out = tmp_path / "all" / "table.csv"
  r = _cli(str(two_runs[0].parent.parent), str(two_runs[1]), f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert r.stderr.strip() == f"wrote {out} and {out.with_suffix('.md')}"
  rows = list(csv.DictReader(out.open()))
  assert list(rows[0]) == list(combine.COLUMNS)
  for path, label in zip(two_runs, ("run1/step_100", "run2/step_200")):
    res = json.loads(path.read_text())
    mine = [x for x in rows if x["run"] == label]
    # 2 tasks x 4 modes (ar, pll, pll1, pll6) + 4 averages.
    assert len(mine) == 12
    for x in mine:
      if x["task"] == "average":
        h = res["headline"][x["mode"]]
        assert float(x["score"]) == pytest.approx(h["score"], rel=1e-12)
        assert float(x["score_stderr"]) == pytest.approx(h["score_stderr"], rel=1e-12)
        assert x["n"] == "2" and x["acc"] == ""
        continue
      s = res["tasks"][x["task"]]["modes"][x["mode"]]
      assert int(x["n"]) == s["n"] and x["step"] == str(res["step"])
      for k in ("acc", "acc_stderr", "score", "score_stderr"):
        assert float(x[k]) == pytest.approx(s[k], rel=1e-12)
  md = out.with_suffix(".md").read_text()
  assert md == r.stdout
  h = json.loads(two_runs[1].read_text())["headline"]["ar"]
  assert "| run2/step_200 | 200 | ar |" in md and f"{h['score']:.1f} ± {h['score_stderr']:.1f} |" in md
  assert "| run | step | mode | ARC-E | PIQA | Average |" in md
  r = _cli(str(two_runs[0]), str(two_runs[1]), "--labels=a,b", "--metric=acc")
  assert r.returncode == 0 and "| a | 100 | ar |" in r.stdout and "Average" not in r.stdout


def test_combine_bad_input_one_line_exit_2(two_runs, tmp_path):
  out = tmp_path / "keep.csv"
  out.write_text("keep me")
  broken = tmp_path / "broken.json"
  broken.write_text('{"tasks": ')
  other = tmp_path / "other.json"
  other.write_text('{"loss": 1}')
  bad_mode = tmp_path / "bad_mode.json"
  res = _results(3, 1)
  del res["tasks"]["piqa"]["modes"]["ar"]["acc"]
  bad_mode.write_text(json.dumps(res))
  empty = tmp_path / "empty"
  empty.mkdir()
  a, b = map(str, two_runs)
  cases = [
      ([], "give at least one results JSON or directory"),
      ([str(tmp_path / "nope.json")], f"{tmp_path / 'nope.json'}: not found"),
      ([str(broken)], f"{broken}: invalid JSON"),
      ([str(other)], f"{other}: not an evaluation results file (no 'tasks' object)"),
      ([str(bad_mode)], "tasks.piqa.modes.ar needs numbers 'acc' and 'score'"),
      ([str(empty)], f"{empty}: no results JSON"),
      ([a, b, "--labels=x"], "--labels names 1 runs but there are 2 results files"),
      ([a, a], "have the same label 'run1/step_100'; name them with --labels"),
      ([a, f"--out={tmp_path / 'x.txt'}"], "give a .csv file name"),
      ([a, "--metric=loss"], "--metric"),
  ]
  for args, msg in cases:
    r = _cli(*args, f"--out={out}" if not any(x.startswith("--out") for x in args) else "--labels=q")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], (args, r.stderr)
    assert r.stdout == ""
  assert out.read_text() == "keep me" and not out.with_suffix(".md").exists()
