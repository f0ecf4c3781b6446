"""Results rows from synthetic workdirs: every column against hand-computed values."""

import csv
import json
import math
import pathlib

import pytest

from dualjax import results
from dualjax.evaluation.tasks import TASKS


def _workdir(tmp_path: pathlib.Path, name: str = "r32_lam0.5_s7", steps: int = 40) -> pathlib.Path:
  wd = tmp_path / name
  wd.mkdir()
  cfg = {"seed": 7, "data": {"repetitions": 32, "global_batch": 16, "seq_len": 128},
         "objective": {"lam": 0.5}, "train": {"steps": steps}}
  (wd / "config.json").write_text(json.dumps(cfg))
  recs = [
      {"step": 0, "kind": "val", "ar_loss": 7.0, "mdm_loss": 7.5},
      {"step": 10, "kind": "train", "loss": 9.0},
      {"step": 10, "kind": "val", "ar_loss": 5.0, "mdm_loss": 6.0, "ar_overfitting": False,
       "mdm_overfitting": False},
      {"step": 20, "kind": "train", "loss": 8.0},
      # written before a crash, then again after the resume: the later record counts
      {"step": 20, "kind": "val", "ar_loss": 99.0, "mdm_loss": 99.0},
      {"step": 20, "kind": "train", "loss": 8.0},
      {"step": 20, "kind": "val", "ar_loss": 4.5, "mdm_loss": 6.2, "ar_overfitting": False,
       "mdm_overfitting": True},
      {"step": 30, "kind": "train", "loss": 7.5},
      {"step": 30, "kind": "val", "ar_loss": 4.8, "mdm_loss": 5.9, "ar_overfitting": True,
       "mdm_overfitting": False},
      {"step": 40, "kind": "train", "loss": 7.4},
      {"step": 40, "kind": "val", "ar_loss": 5.2, "mdm_loss": 5.8, "ar_overfitting": True,
       "mdm_overfitting": False},
      {"step": 40, "kind": "eval", "arc_easy/ar/acc": 0.123},
  ]
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  return wd


def _eval_json(wd: pathlib.Path, step: int, offset: float) -> dict:
  res = {"step": step, "tasks": {}, "headline": {}}
  for i, t in enumerate(TASKS):
    res["tasks"][t] = {"modes": {m: {"acc": 0.25 + 0.01 * i + offset + j / 1000,
                                     "score": 10.0 * i + offset + j}
                                 for j, m in enumerate(("ar", "prefix", "pll1", "pll6", "pll", "mc"))}}
  for j, m in enumerate(("ar", "prefix", "pll1", "pll6", "pll", "mc")):
    res["headline"][m] = {"score": sum(10.0 * i + offset + j for i in range(9)) / 9}
  (wd / "eval").mkdir(exist_ok=True)
  (wd / "eval" / f"step_{step}.json").write_text(json.dumps(res))
  return res


def test_row_matches_hand_computed(tmp_path):
  wd = _workdir(tmp_path)
  _eval_json(wd, 8, offset=100.0)   # an earlier evaluation: not used
  ev = _eval_json(wd, 40, offset=0.0)
  r = results.row(wd)
  assert list(r) == list(results.COLUMNS)
  assert (r["point"], r["r"], r["lam"], r["seed"]) == ("r32_lam0.5_s7", 32, 0.5, 7)
  assert r["steps"] == 40 and r["tokens_seen"] == 40 * 16 * 128
  assert (r["final_val_ar_loss"], r["final_val_mdm_loss"]) == (5.2, 5.8)
  assert (r["best_val_ar_loss"], r["best_val_ar_step"]) == (4.5, 20)  # not the 99.0 overwritten
  assert (r["best_val_mdm_loss"], r["best_val_mdm_step"]) == (5.8, 40)
  assert (r["ar_overfitting"], r["ar_overfit_step"]) == (1, 30)
  assert (r["mdm_overfitting"], r["mdm_overfit_step"]) == (0, 20)  # on at 20, off at the end
  for t in TASKS:
    for m in results.MODES:
      assert r[f"score/{t}/{m}"] == ev["tasks"][t]["modes"][m]["score"]
      assert r[f"acc/{t}/{m}"] == ev["tasks"][t]["modes"][m]["acc"]
  # avg = plain mean of the nine per-task scores of the mode (here: 10*mean(i) + j)
  for j, m in ((0, "ar"), (1, "prefix"), (4, "pll"), (5, "mc")):
    assert r[f"avg/{m}"] == pytest.approx(40.0 + j)


def test_missing_values_are_nan_and_minus_one(tmp_path):
  wd = _workdir(tmp_path)
  (wd / "metrics.jsonl").write_text(
      json.dumps({"step": 0, "kind": "val", "ar_loss": 7.0, "mdm_loss": 7.5}) + "\n"
      + json.dumps({"step": 5, "kind": "train", "loss": 9.0}) + "\n")
  r = results.row(wd, point="p")
  assert r["point"] == "p" and r["steps"] == 5
  assert (r["ar_overfitting"], r["ar_overfit_step"]) == (0, -1)
  assert (r["best_val_ar_loss"], r["best_val_ar_step"]) == (7.0, 0)
  assert all(math.isnan(r[c]) for c in results.COLUMNS if c.startswith(("score/", "acc/", "avg/")))


def test_eval_from_metrics_when_json_missing(tmp_path):
  r = results.row(_workdir(tmp_path))
  assert r["acc/arc_easy/ar"] == 0.123 and math.isnan(r["score/arc_easy/ar"])


def test_write_csv_roundtrip(tmp_path):
  wd = _workdir(tmp_path)
  _eval_json(wd, 40, 0.0)
  path = results.write_csv([results.row(wd)], tmp_path / "out" / "results.csv")
  rows = list(csv.DictReader(path.open()))
  assert list(rows[0]) == list(results.COLUMNS)
  assert rows[0]["ar_overfitting"] == "1" and rows[0]["mdm_overfit_step"] == "20"
  assert float(rows[0]["lam"]) == 0.5 and float(rows[0]["final_val_ar_loss"]) == 5.2


def test_is_finished(tmp_path):
  wd = _workdir(tmp_path, steps=40)
  assert not results.is_finished(wd)
  (wd / "checkpoints" / "30").mkdir(parents=True)
  assert not results.is_finished(wd)
  (wd / "checkpoints" / "40").mkdir()
  assert results.is_finished(wd) and results.is_finished(wd, 40) and not results.is_finished(wd, 50)
  assert not results.is_finished(tmp_path / "nothing")


def test_bad_metrics_line_names_file(tmp_path):
  wd = _workdir(tmp_path)
  with (wd / "metrics.jsonl").open("a") as f:
    f.write("{not json\n")
  with pytest.raises(results.ResultsError, match=r"metrics.jsonl:13"):
    results.row(wd)


def test_overfit_step_comes_from_the_trainers_record(tmp_path):
  """Runs that record `<objective>_overfit_step` (the sticky §5.3 flag): that step is the column."""
  wd = _workdir(tmp_path, name="recorded")
  recs = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  for rec in recs:
    if rec["kind"] == "val" and rec["step"] >= 10:
      on = rec["step"] >= 30
      rec.update(ar_overfitting=on, ar_overfit_step=30 if on else -1, mdm_overfitting=False,
                 mdm_overfit_step=-1)
  recs[-2]["ar_overfit_step"] = 25  # the detector's own first step (e.g. a validation not kept)
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  r = results.row(wd)
  assert (r["ar_overfitting"], r["ar_overfit_step"]) == (1, 25)
  assert (r["mdm_overfitting"], r["mdm_overfit_step"]) == (0, -1)
  assert list(r) == list(results.COLUMNS)
