"""dualjax.replicate: the verdicts from validation curves, the figure and summary, the CLI."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dualjax import replicate
from dualjax import results
from dualjax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "replicate.py"


def _config(arg: str = ""):
  ns: dict = {"__file__": str(CONFIG)}
  exec(compile(CONFIG.read_text(), str(CONFIG), "exec"), ns)  # pylint: disable=exec-used
  return ns["get_config"](arg)


def _write_run(root: pathlib.Path, r: int, lam: float, ar, mdm, *, every: int = 40,
               steps: int | None = None, seed: int = 42) -> pathlib.Path:
  """A workdir as the trainer leaves it: config.json, metrics.jsonl (val records at 0, every,
  ...), and checkpoints/<steps> when the run reached `steps` (default: the last val step)."""
  d = root / sweep.Point(r, lam, seed).name
  d.mkdir(parents=True)
  last = every * (len(ar) - 1)
  cfg = {"seed": seed, "data": {"repetitions": r, "global_batch": 32, "seq_len": 128},
         "objective": {"lam": lam}, "train": {"steps": steps or last}}
  (d / "config.json").write_text(json.dumps(cfg))
  lines = []
  for i, (a, m) in enumerate(zip(ar, mdm)):
    if i:
      lines.append({"step": i * every, "kind": "train", "loss": 1.0})
    lines.append({"step": i * every, "kind": "val", "ar_loss": a, "mdm_loss": m})
  (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  if last == (steps or last):
    (d / "checkpoints" / str(last)).mkdir(parents=True)
  return d


def _curve(start: float, end: float, n: int = 13, up: float = 0.0) -> list[float]:
  """Decreasing from start to end, then (up > 0) rising by `up` over the last third."""
  t = np.linspace(0, 1, n)
  v = end + (start - end) * np.exp(-5 * t)
  v = v + up * np.clip(3 * t - 2, 0, None)
  return [float(x) for x in v]


# The paper's picture: at heavy r AR-only turns up (+10%), MDM-only falls slowly, the dual ends
# best on both kinds; at r = 1 the dual is within 1% of AR-only on AR and beats MDM-only on MDM.
GOOD = {
    (32, 1.0): (_curve(6.2, 3.0, up=0.35), _curve(6.5, 6.0)),
    (32, 15 / 16): (_curve(6.2, 3.0, up=0.2), _curve(6.5, 4.2, up=0.1)),
    (32, 0.5): (_curve(6.2, 3.1), _curve(6.5, 4.0)),
    (32, 0.0): (_curve(6.2, 3.9), _curve(6.5, 4.3)),
    (1, 1.0): (_curve(6.2, 2.80), _curve(6.5, 5.5)),
    (1, 15 / 16): (_curve(6.2, 2.82), _curve(6.5, 3.7)),
    (1, 0.0): (_curve(6.2, 3.7), _curve(6.5, 3.9)),
}


def _write(root, runs, **kw):
  for (r, lam), (ar, mdm) in runs.items():
    _write_run(root, r, lam, ar, mdm, **kw)


def _verdicts(tmp_path, runs, **kw):
  rep = replicate.plan(_config(), tmp_path)
  _write(rep.root, runs, steps=480, **kw)
  curves, stats, notes = replicate.read_runs(rep)
  s = replicate.summary(rep, stats, notes, {})
  return {b["name"]: b for b in s["behaviours"]}, s


def test_all_behaviours_hold_on_the_papers_picture(tmp_path):
  v, s = _verdicts(tmp_path, GOOD)
  assert {k: b["holds"] for k, b in v.items()} == {
      "ar_overfits": True, "mdm_slow": True, "dual_best": True, "plain_close_to_ar": True,
      "plain_beats_mdm": True}
  assert s["all_hold"]
  # The numbers are the curves' own (independent re-derivation from the lists above).
  ar = GOOD[(32, 1.0)][0]
  assert v["ar_overfits"]["numbers"]["final"] == pytest.approx(ar[-1], abs=1e-4)
  assert v["ar_overfits"]["numbers"]["best"] == pytest.approx(min(ar), abs=1e-4)
  assert v["ar_overfits"]["numbers"]["best_step"] == 40 * int(np.argmin(ar))
  # MDM-only's level at half of training (step 240) and the first step each dual gets there.
  level = GOOD[(32, 0.0)][1][6]
  n = v["mdm_slow"]["numbers"]
  assert (n["level"], n["level_step"]) == (pytest.approx(level, abs=1e-4), 240)
  for lam in (15 / 16, 0.5):
    first = 40 * next(i for i, x in enumerate(GOOD[(32, lam)][1]) if x <= level)
    assert n["dual_steps_to_level"][sweep.format_lam(lam)] == first
  assert n["faster_duals"] == [0.5] and n["turned_up"] is False
  assert v["dual_best"]["numbers"]["ar"]["best_lam"] == 0.5
  assert v["dual_best"]["numbers"]["mdm"]["best_lam"] == 0.5
  assert v["dual_best"]["numbers"]["kinds"] == ["ar", "mdm"]
  assert v["plain_close_to_ar"]["numbers"]["rel_diff"] == pytest.approx(
      GOOD[(1, 15 / 16)][0][-1] / GOOD[(1, 1.0)][0][-1] - 1, abs=1e-4)
  runs = {r["run"]: r for r in s["runs"]}
  assert runs["r1_lam0_s42"]["final_mdm"] == pytest.approx(GOOD[(1, 0.0)][1][-1], abs=1e-4)
  assert all(r["finished"] for r in s["runs"]) and len(runs) == 7


def test_each_behaviour_can_fail(tmp_path):
  bad = dict(GOOD)
  bad[(32, 1.0)] = (_curve(6.2, 2.9), _curve(6.5, 6.0))                  # AR-only never turns up
  bad[(32, 0.0)] = (_curve(6.2, 3.9), _curve(6.5, 3.5, up=0.3))          # MDM-only turns up
  bad[(32, 15 / 16)] = (_curve(6.2, 3.0, up=0.3), _curve(6.5, 4.2, up=0.3))
  bad[(32, 0.5)] = (_curve(6.2, 3.1, up=0.3), _curve(6.5, 4.0, up=0.5))  # duals end worst
  bad[(1, 15 / 16)] = (_curve(6.2, 2.95), _curve(6.5, 4.0))              # 5% worse on AR, MDM worse
  v, s = _verdicts(tmp_path, bad)
  assert {k: b["holds"] for k, b in v.items()} == {
      "ar_overfits": False, "mdm_slow": False, "dual_best": False, "plain_close_to_ar": False,
      "plain_beats_mdm": False}
  assert v["dual_best"]["numbers"]["ar"]["best_lam"] == 1.0
  assert v["dual_best"]["numbers"]["mdm"]["best_lam"] == 0.0
  assert v["mdm_slow"]["numbers"]["turned_up"] is True and not s["all_hold"]


def test_mdm_only_that_is_not_slow(tmp_path):
  # MDM-only falls fast and never turns up; no dual reaches its half-time NELBO before step 240.
  runs = dict(GOOD)
  runs[(32, 0.0)] = (_curve(6.2, 3.9), _curve(6.5, 3.5))
  v, _ = _verdicts(tmp_path, runs)
  assert v["mdm_slow"]["holds"] is False
  n = v["mdm_slow"]["numbers"]
  assert n["turned_up"] is False and n["faster_duals"] == []
  assert n["dual_steps_to_level"] == {"0.9375": None, "0.5": None}
  assert "never" in v["mdm_slow"]["detail"]


def test_tolerances_come_from_the_config(tmp_path):
  # AR-only rises 10%: a turn-up at turn_up_rel 0.02, not at 0.2.
  rc = _config()
  rc.criteria.turn_up_rel = 0.2
  rep = replicate.plan(rc, tmp_path)
  _write(rep.root, GOOD, steps=480)
  _, stats, notes = replicate.read_runs(rep)
  v = {b["name"]: b for b in replicate.summary(rep, stats, notes, {})["behaviours"]}
  assert v["ar_overfits"]["holds"] is False and "0.2" in v["ar_overfits"]["criterion"]


def test_missing_and_unfinished_runs_are_not_evaluable(tmp_path):
  runs = {k: x for k, x in GOOD.items() if k != (32, 0.0)}
  rep = replicate.plan(_config(), tmp_path)
  _write(rep.root, runs, steps=480)
  # r = 1, lam = 1 without its final checkpoint (unfinished): drawn, left out of the verdicts.
  shutil.rmtree(rep.root / "r1_lam1_s42" / "checkpoints")
  _, stats, notes = replicate.read_runs(rep)
  s = replicate.summary(rep, stats, notes, {})
  v = {b["name"]: b for b in s["behaviours"]}
  assert v["ar_overfits"]["holds"] is True and v["dual_best"]["holds"] is None
  assert v["mdm_slow"]["holds"] is None and "r=32 lam=0 missing" in v["mdm_slow"]["detail"]
  assert v["plain_close_to_ar"]["holds"] is None and v["plain_beats_mdm"]["holds"] is True
  assert any("r32_lam0_s42: no validation curve" in n for n in notes)
  assert any("r1_lam1_s42: unfinished" in n for n in notes)
  assert not s["all_hold"]


def test_cli_draws_and_summarises_finished_runs_without_training(tmp_path, capsys):
  out = tmp_path / "out"
  rep = replicate.plan(_config(), out)
  _write(rep.root, GOOD, steps=480)
  (rep.root / "r64_lam1_s42").mkdir()  # a stray run directory is ignored
  assert replicate.main(["replicate", f"--out={out}"]) == 0  # all finished: nothing trains
  stdout = capsys.readouterr().out
  assert stdout.count("finished, skipped") == 7 and "training" not in stdout
  assert "ar_overfits: holds" in stdout
  with Image.open(out / "replication.png") as im:
    w, h = im.size
    assert (w, h) == (756, 522)  # 8.4 x 5.8 in at 90 dpi: two rows of panels
    assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 100
  assert (out / "replication.png").stat().st_size < 300_000
  s = json.loads((out / "summary.json").read_text())
  assert s["all_hold"] and [r["run"] for r in s["runs"]] == [
      "r1_lam1_s42", "r1_lam0.9375_s42", "r1_lam0_s42", "r32_lam1_s42", "r32_lam0.9375_s42",
      "r32_lam0.5_s42", "r32_lam0_s42"]
  assert s["config"]["tokens_per_run"] == 480 * 32 * 129
  md = (out / "summary.md").read_text()
  assert md.count("**holds**") == 5 and "r32_lam0.5_s42" in md


def _run_cli(args, timeout=60, **extra_env):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             **extra_env)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "dualjax.replicate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("args,message", [
    ([], "--out is required"),
    (["--config.heavy_lams=(0.5,0.0)"], "'heavy_lams' must include 1 (AR-only)"),
    (["--config.heavy_lams=(1.0,0.0)"], "'heavy_lams' needs a dual lambda"),
    (["--config.heavy_r=1"], "heavy_r=1 must exceed plain_r=1"),
    (["--config.criteria.plain_lam=0.25"], "criteria.plain_lam=0.25 must be a dual lambda"),
    (["--config.heavy_lams=(1.0,0.3,0.0)", "--config.overrides=('data.global_batch=16',)"],
     "objective.lam=0.3 is not representable"),
    (["--config.nope=1"], "unknown config key 'nope'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message, capsys):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    replicate.main(["replicate"] + ([f"--out={out}"] if message != "--out is required" else []) + args)
  assert e.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert not out.exists()


def test_out_is_a_file(tmp_path):
  """Through the real entry point (cli.run): exit code 2, the file untouched."""
  f = tmp_path / "file"
  f.write_text("x")
  r = _run_cli([f"--out={f}"])
  assert r.returncode == 2 and "exists and is not a directory" in r.stderr and f.read_text() == "x"


@pytest.mark.slow
def test_shortened_replication_end_to_end(tmp_path):
  """configs/replicate.py:test (4 steps per run, 6 runs) trains, draws and summarises; the
  summary's numbers are those of the runs' metrics.jsonl; a second call trains nothing."""
  out = tmp_path / "out"
  cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  r = _run_cli([f"--config={CONFIG}:test", f"--out={out}"], timeout=600, **cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("training (") == 6
  s = json.loads((out / "summary.json").read_text())
  assert len(s["runs"]) == 6 and all(x["finished"] for x in s["runs"])
  timings = json.loads((out / "timings.json").read_text())
  assert set(timings) == {x["run"] for x in s["runs"]}
  assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 for t in timings.values())
  for x in s["runs"]:  # independent reading of the workdir: the last and the lowest val records
    recs = [v for v in results.read_records(out / "runs" / x["run"]) if v["kind"] == "val"]
    assert [v["step"] for v in recs] == [0, 2, 4]
    for kind in ("ar", "mdm"):
      vals = [v[f"{kind}_loss"] for v in recs]
      assert x[f"final_{kind}"] == pytest.approx(vals[-1], abs=1e-4)
      assert x[f"best_{kind}"] == pytest.approx(min(vals), abs=1e-4)
      assert x[f"best_{kind}_step"] == recs[int(np.argmin(vals))]["step"]
  ar1 = next(x for x in s["runs"] if x["run"] == "r2_lam1_s42")
  v = {b["name"]: b for b in s["behaviours"]}
  assert v["ar_overfits"]["holds"] == (ar1["final_ar"] > ar1["best_ar"] * 1.02)
  assert all(b["holds"] in (True, False) for b in s["behaviours"])
  assert (out / "replication.png").stat().st_size > 10_000 and (out / "summary.md").is_file()
  r = _run_cli([f"--config={CONFIG}:test", f"--out={out}"], timeout=120, **cache)
  assert r.returncode == 0 and r.stdout.count("finished, skipped") == 6 and "training (" not in r.stdout
  assert math.isfinite(json.loads((out / "summary.json").read_text())["runs_wall_s"])
