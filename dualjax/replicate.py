"""`python -m dualjax.replicate --out=DIR [--config=configs/replicate.py] [--config.heavy_r=16 ...]`.

The paper's §5 behaviours at small scale (issue 15 item 5), on the embedded corpus. Trains the
runs of the replication config (configs/replicate.py) one after another with
`python -m dualjax.main`, one workdir each under DIR/runs (named like the sweep's points,
`r32_lam0.5_s42`; finished runs are skipped), then writes from their validation curves:

  DIR/replication.png  held-out AR loss and MDM NELBO against step, one line per lambda, one row
                       of panels per r
  DIR/summary.json     per run the final and best held-out losses (with the step of the best),
                       and each behaviour's verdict, numbers and criterion
  DIR/summary.md       the same as Markdown
  DIR/timings.json     wall and CPU seconds of every run trained here (kept across calls)

Behaviours and their criteria (tolerances in the config's `criteria`; "final" is the last
validation, at the last step; a loss "turns up" when final > min over the run * (1 + turn_up_rel)):
  ar_overfits      heavy r, lam = 1: the held-out AR loss turns up.
  mdm_slow         heavy r, lam = 0: the held-out MDM NELBO does not turn up, and it learns slowly:
                   a dual lam (0 < lam < 1) reaches MDM-only's MDM NELBO at `slow_at` of training
                   (the validation at or after that fraction of the steps) at an earlier step,
                   although only 1 - lam of its rows are MDM rows.
  dual_best        heavy r: a dual lam has the lowest final held-out AR loss or MDM NELBO (or
                   both) among all lams at heavy r.
  plain_close_to_ar   r = plain_r: lam = criteria.plain_lam ends with an AR loss not above
                   AR-only's by more than noise_rel.
  plain_beats_mdm  r = plain_r: lam = criteria.plain_lam ends with a lower MDM NELBO than MDM-only.
A behaviour whose runs are missing or unfinished is "not evaluable". Exit code 0 when every run
finished (whatever the verdicts), 1 when a run failed; bad input is one line and exit code 2,
before anything is written.
"""

import dataclasses
import datetime
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import flags
import jax
from matplotlib import figure as mpl_figure
import ml_collections
import numpy as np

from dualjax import cli
from dualjax import results as results_lib
from dualjax import sweep
from dualjax.analysis import inputs
from dualjax.errors import ConfigError

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string("out", None, "output directory (runs/, replication.png, summary.*)",
                           flag_values=FLAGS)
_TRAIN = flags.DEFINE_bool("train", True, "train the unfinished runs (--notrain: only draw and "
                           "summarise the runs already in DIR/runs)", flag_values=FLAGS)

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "replicate.py"
FIGURE, SUMMARY_JSON, SUMMARY_MD, TIMINGS = ("replication.png", "summary.json", "summary.md",
                                             "timings.json")
KINDS = ("ar", "mdm")
KIND_NAME = {"ar": "held-out AR loss", "mdm": "held-out MDM NELBO"}


class ReplicationError(ValueError):
  """A replication config that cannot work (one line naming the field)."""


# ----------------------------------------------------------------------------- the runs


@dataclasses.dataclass
class Replication:
  """The checked replication: the sweep plan of all its runs and the config it came from."""
  plan: sweep.Plan
  config: ml_collections.ConfigDict

  @property
  def root(self) -> pathlib.Path:
    return self.plan.root


def _lams(rc: ml_collections.ConfigDict, field: str) -> tuple[float, ...]:
  lams = rc.get(field)
  if not isinstance(lams, (tuple, list)) or not lams:
    raise ReplicationError(f"replication config: '{field}' must be a non-empty tuple of lambdas")
  for need, what in ((1.0, "AR-only"), (0.0, "MDM-only")):
    if need not in [float(x) for x in lams]:
      raise ReplicationError(f"replication config: '{field}' must include {need:g} ({what})")
  return tuple(float(x) for x in lams)


def check_config(rc: ml_collections.ConfigDict) -> None:
  """The replication-specific fields (the training configs are checked by `plan`)."""
  for field in ("plain_r", "heavy_r", "seed"):
    if not isinstance(rc.get(field), int) or (field != "seed" and rc[field] < 1):
      raise ReplicationError(f"replication config: '{field}' must be a positive integer")
  if rc.plain_r >= rc.heavy_r:
    raise ReplicationError(f"replication config: heavy_r={rc.heavy_r} must exceed "
                           f"plain_r={rc.plain_r}")
  plain, heavy = _lams(rc, "plain_lams"), _lams(rc, "heavy_lams")
  if not any(0.0 < x < 1.0 for x in heavy):
    raise ReplicationError("replication config: 'heavy_lams' needs a dual lambda (0 < lam < 1)")
  crit = rc.get("criteria")
  if crit is None:
    raise ReplicationError("replication config: no 'criteria' section")
  for field in ("turn_up_rel", "noise_rel", "slow_at"):
    v = crit.get(field)
    if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
      raise ReplicationError(f"replication config: criteria.{field} must be a fraction in [0, 1)")
  if float(crit.get("plain_lam", -1.0)) not in plain or not 0.0 < crit.plain_lam < 1.0:
    raise ReplicationError(f"replication config: criteria.plain_lam={crit.get('plain_lam')} "
                           f"must be a dual lambda of plain_lams {plain}")


def plan(rc: ml_collections.ConfigDict, out: str | os.PathLike) -> Replication:
  """Every run's training config built and checked (as `dualjax.sweep` does), nothing written."""
  check_config(rc)
  root = pathlib.Path(out) / "runs"
  plans = []
  for r, lams in ((rc.plain_r, rc.plain_lams), (rc.heavy_r, rc.heavy_lams)):
    grid = ml_collections.ConfigDict(dict(
        base=rc.base, repetitions=(r,), lams=tuple(lams), seeds=(rc.seed,),
        overrides=tuple(rc.get("overrides", ())), prepared_dir=rc.get("prepared_dir", "")))
    plans.append(sweep.plan(grid, root))
  merged = sweep.Plan(
      [x for p in plans for x in p.points], {k: v for p in plans for k, v in p.args.items()},
      {k: v for p in plans for k, v in p.cfgs.items()}, root, plans[0].launch)
  return Replication(merged, rc)


def _read_timings(out: pathlib.Path) -> dict[str, Any]:
  try:
    data = json.loads((out / TIMINGS).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def _write_json(path: pathlib.Path, data: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def train(rep: Replication, out: pathlib.Path) -> list[str]:
  """Trains the unfinished runs one after another (wall and CPU time of each into timings.json);
  returns the names of the runs that failed."""
  p = rep.plan
  failed = []
  todo = [x for x in p.points if not results_lib.is_finished(p.root / x.name, p.cfgs[x].train.steps)]
  for x in p.points:
    if x not in todo:
      print(f"{x.name}: finished, skipped", flush=True)
  for i, x in enumerate(todo, 1):
    print(f"{x.name}: training ({i}/{len(todo)})", flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "dualjax.main", *p.args[x]], check=False).returncode
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    ok = rc == 0 and results_lib.is_finished(p.root / x.name, p.cfgs[x].train.steps)
    if not ok:
      failed.append(x.name)
      print(f"{x.name}: failed ({f'exit {rc}' if rc else 'stopped before train.steps'})",
            file=sys.stderr, flush=True)
    timings = _read_timings(out)
    timings[x.name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "finished": ok,
                       "date": datetime.date.today().isoformat()}
    _write_json(out / TIMINGS, timings)
  return failed


# ----------------------------------------------------------------------------- the verdicts


@dataclasses.dataclass
class RunStats:
  """Final and best held-out losses of one run (NaN / -1 where it has none)."""
  name: str
  r: int
  lam: float
  finished: bool
  last_step: int
  final: dict[str, float]
  best: dict[str, float]
  best_step: dict[str, int]
  steps: np.ndarray
  values: dict[str, np.ndarray]  # kind -> held-out loss at `steps` (NaN where not logged)

  def first_step_at_or_below(self, kind: str, level: float) -> int | None:
    hit = np.flatnonzero(self.values[kind] <= level)
    return int(self.steps[hit[0]]) if len(hit) else None

  def turned_up(self, kind: str, rel: float) -> bool:
    return self.final[kind] > self.best[kind] * (1.0 + rel)

  def rise(self, kind: str) -> float:
    """(final - best) / best."""
    return self.final[kind] / self.best[kind] - 1.0


def run_stats(curve: inputs.Curve, finished: bool) -> RunStats:
  final, best, best_step = {}, {}, {}
  for kind, v in zip(KINDS, (curve.ar_loss, curve.mdm_loss)):
    ok = np.isfinite(v)
    if ok.any():
      last = np.flatnonzero(ok)[-1]
      i = int(np.flatnonzero(ok)[np.argmin(v[ok])])  # the earliest step among equal minima
      final[kind], best[kind], best_step[kind] = float(v[last]), float(v[i]), int(curve.step[i])
    else:
      final[kind], best[kind], best_step[kind] = math.nan, math.nan, -1
  return RunStats(curve.name, int(curve.r), float(curve.lam), finished, int(curve.step[-1]),
                  final, best, best_step, np.asarray(curve.step),
                  {"ar": np.asarray(curve.ar_loss), "mdm": np.asarray(curve.mdm_loss)})


@dataclasses.dataclass
class Verdict:
  name: str
  claim: str
  criterion: str
  holds: bool | None  # None: not evaluable
  detail: str
  numbers: dict[str, Any]


def _f(x: float) -> float:
  return round(float(x), 4)


def _lam(lam: float) -> str:
  return sweep.format_lam(lam)


def verdicts(stats: dict[float, dict[float, RunStats]], rc: ml_collections.ConfigDict
             ) -> list[Verdict]:
  """The behaviours, from `stats[r][lam]` (finished runs only) and the config's criteria."""
  crit = rc.criteria
  up, noise, pl = float(crit.turn_up_rel), float(crit.noise_rel), float(crit.plain_lam)
  slow_at = float(crit.slow_at)
  heavy, plain = stats.get(rc.heavy_r, {}), stats.get(rc.plain_r, {})
  hr, pr = rc.heavy_r, rc.plain_r
  duals = sorted((lam for lam in rc.heavy_lams if 0.0 < lam < 1.0), reverse=True)
  out = []

  def missing(where: dict[float, RunStats], r: int, lams: Sequence[float]) -> str:
    gone = [lam for lam in lams if lam not in where]
    return "" if not gone else (f"not evaluable: run(s) {', '.join(f'r={r} lam={_lam(x)}' for x in gone)} "
                                f"missing or unfinished")

  # 1. AR-only overfits at heavy r.
  claim = f"r = {hr}: AR-only overfits (held-out AR loss turns up)"
  criterion = f"lam=1: final AR loss > min over the run x (1 + {up:g})"
  if (m := missing(heavy, hr, [1.0])):
    out.append(Verdict("ar_overfits", claim, criterion, None, m, {}))
  else:
    s = heavy[1.0]
    out.append(Verdict("ar_overfits", claim, criterion, s.turned_up("ar", up),
                       f"final {s.final['ar']:.3f}, min {s.best['ar']:.3f} at step "
                       f"{s.best_step['ar']} (+{100 * s.rise('ar'):.1f}%)",
                       {"final": _f(s.final["ar"]), "best": _f(s.best["ar"]),
                        "best_step": s.best_step["ar"], "rise": _f(s.rise("ar"))}))

  # 2. MDM-only learns slowly without turning up.
  claim = f"r = {hr}: MDM-only learns slowly without turning up"
  criterion = (f"lam=0: final MDM NELBO <= min over the run x (1 + {up:g}); and a dual lam reaches "
               f"lam=0's MDM NELBO at {slow_at:g} of training at an earlier step")
  if (m := missing(heavy, hr, [0.0, *duals])):
    out.append(Verdict("mdm_slow", claim, criterion, None, m, {}))
  else:
    s = heavy[0.0]
    ok = np.isfinite(s.values["mdm"])
    i = int(np.flatnonzero(ok & (s.steps >= slow_at * s.last_step))[0])
    level, t_mdm = float(s.values["mdm"][i]), int(s.steps[i])
    reach = {lam: heavy[lam].first_step_at_or_below("mdm", level) for lam in duals}
    faster = [lam for lam in duals if reach[lam] is not None and reach[lam] < t_mdm]
    no_up = not s.turned_up("mdm", up)
    reached = "; ".join(f"lam={_lam(lam)} at step {reach[lam]}" if reach[lam] is not None else
                        f"lam={_lam(lam)} never" for lam in duals)
    out.append(Verdict("mdm_slow", claim, criterion, no_up and bool(faster),
                       f"final {s.final['mdm']:.3f}, min {s.best['mdm']:.3f} at step "
                       f"{s.best_step['mdm']} (+{100 * s.rise('mdm'):.1f}%); its {level:.3f} at step "
                       f"{t_mdm} is reached by {reached}",
                       {"final": _f(s.final["mdm"]), "best": _f(s.best["mdm"]),
                        "best_step": s.best_step["mdm"], "rise": _f(s.rise("mdm")),
                        "turned_up": not no_up, "level": _f(level), "level_step": t_mdm,
                        "dual_steps_to_level": {_lam(lam): reach[lam] for lam in duals},
                        "faster_duals": faster}))

  # 3. A dual lam ends with the best held-out loss of either kind.
  claim = f"r = {hr}: a dual lam ends with the best held-out AR loss, MDM NELBO, or both"
  criterion = "argmin over all lams of the final loss, per kind, is a dual lam (0 < lam < 1)"
  if (m := missing(heavy, hr, rc.heavy_lams)):
    out.append(Verdict("dual_best", claim, criterion, None, m, {}))
  else:
    nums, parts = {}, []
    for kind in KINDS:
      lam_b = min(heavy, key=lambda lam: heavy[lam].final[kind])
      runner = min((lam for lam in heavy if lam != lam_b), key=lambda lam: heavy[lam].final[kind])
      nums[kind] = {"best_lam": lam_b, "final": _f(heavy[lam_b].final[kind]),
                    "runner_up_lam": runner, "runner_up_final": _f(heavy[runner].final[kind])}
      parts.append(f"{kind.upper()}: lam={_lam(lam_b)} {heavy[lam_b].final[kind]:.3f} "
                   f"(next lam={_lam(runner)} {heavy[runner].final[kind]:.3f})")
    kinds = [k for k in KINDS if 0.0 < nums[k]["best_lam"] < 1.0]
    nums["kinds"] = kinds
    out.append(Verdict("dual_best", claim, criterion, bool(kinds),
                       "; ".join(parts) + f" -> dual best on: {', '.join(kinds) or 'neither'}",
                       nums))

  # 4. Without repetition: plain_lam close to AR-only on AR loss, better than MDM-only on MDM.
  claim = f"r = {pr}: lam = {_lam(pl)} within noise of AR-only on held-out AR loss"
  criterion = f"final AR loss (lam={_lam(pl)}) <= final AR loss (lam=1) x (1 + {noise:g})"
  if (m := missing(plain, pr, [1.0, pl])):
    out.append(Verdict("plain_close_to_ar", claim, criterion, None, m, {}))
  else:
    a, b = plain[pl].final["ar"], plain[1.0].final["ar"]
    out.append(Verdict("plain_close_to_ar", claim, criterion, a <= b * (1.0 + noise),
                       f"lam={_lam(pl)} {a:.3f} vs AR-only {b:.3f} ({100 * (a / b - 1):+.1f}%)",
                       {"dual": _f(a), "ar_only": _f(b), "rel_diff": _f(a / b - 1)}))
  claim = f"r = {pr}: lam = {_lam(pl)} better than MDM-only on held-out MDM NELBO"
  criterion = f"final MDM NELBO (lam={_lam(pl)}) < final MDM NELBO (lam=0)"
  if (m := missing(plain, pr, [0.0, pl])):
    out.append(Verdict("plain_beats_mdm", claim, criterion, None, m, {}))
  else:
    a, b = plain[pl].final["mdm"], plain[0.0].final["mdm"]
    out.append(Verdict("plain_beats_mdm", claim, criterion, a < b,
                       f"lam={_lam(pl)} {a:.3f} vs MDM-only {b:.3f} ({100 * (a / b - 1):+.1f}%)",
                       {"dual": _f(a), "mdm_only": _f(b), "rel_diff": _f(a / b - 1)}))
  return out


def read_runs(rep: Replication) -> tuple[list[inputs.Curve], dict[str, RunStats], list[str]]:
  """The planned runs' curves (others under DIR/runs are ignored) and their statistics."""
  names = {x.name: x for x in rep.plan.points}
  curves, notes = ([], []) if not rep.root.is_dir() else inputs.read_curves(rep.root)
  curves = [c for c in curves if c.name in names]
  stats = {}
  for c in curves:
    x = names[c.name]
    stats[c.name] = run_stats(c, results_lib.is_finished(rep.root / c.name,
                                                         rep.plan.cfgs[x].train.steps))
  for name in names:
    if name not in stats:
      notes.append(f"run {name}: no validation curve under {rep.root}")
    elif not stats[name].finished:
      notes.append(f"run {name}: unfinished (last validation at step {stats[name].last_step}); "
                   "left out of the verdicts")
  return curves, stats, notes


def summary(rep: Replication, stats: dict[str, RunStats], notes: Sequence[str],
            timings: dict[str, Any], total_wall_s: float | None = None) -> dict[str, Any]:
  """The summary as a JSON-able dict: runs, behaviours, criteria, timings."""
  rc = rep.config
  by_r: dict[float, dict[float, RunStats]] = {}
  for s in stats.values():
    if s.finished:
      by_r.setdefault(s.r, {})[s.lam] = s
  vs = verdicts(by_r, rc)
  runs = []
  for x in rep.plan.points:
    s = stats.get(x.name)
    cfg = rep.plan.cfgs[x]
    row = {"run": x.name, "r": x.r, "lam": x.lam, "steps": cfg.train.steps,
           "finished": bool(s and s.finished)}
    if s:
      for kind in KINDS:
        row[f"final_{kind}"] = _f(s.final[kind])
        row[f"best_{kind}"] = _f(s.best[kind])
        row[f"best_{kind}_step"] = s.best_step[kind]
    t = timings.get(x.name)
    if isinstance(t, dict):
      row.update({k: t[k] for k in ("wall_s", "cpu_s") if k in t})
    runs.append(row)
  cfg0 = rep.plan.cfgs[rep.plan.points[0]]
  d = cfg0.data
  return {
      "config": {"base": rc.base, "overrides": list(rc.get("overrides", ())), "seed": rc.seed,
                 "plain_r": rc.plain_r, "plain_lams": list(rc.plain_lams),
                 "heavy_r": rc.heavy_r, "heavy_lams": list(rc.heavy_lams),
                 "steps": cfg0.train.steps, "global_batch": d.global_batch, "seq_len": d.seq_len,
                 "tokens_per_run": cfg0.train.steps * d.global_batch * (d.seq_len + 1),
                 "model": {k: cfg0.model[k] for k in ("vocab_size", "num_layers", "d_model",
                                                      "num_heads", "mlp_dim")},
                 "learning_rate": cfg0.optim.learning_rate,
                 "criteria": rc.criteria.to_dict()},
      "runs": runs,
      "behaviours": [dataclasses.asdict(v) for v in vs],
      "all_hold": all(v.holds for v in vs),
      "runs_wall_s": round(sum(r.get("wall_s", 0.0) for r in runs), 1),
      "runs_cpu_s": round(sum(r.get("cpu_s", 0.0) for r in runs), 1),
      "total_wall_s": None if total_wall_s is None else round(total_wall_s, 1),
      "notes": list(notes),
  }


def markdown(s: dict[str, Any]) -> str:
  c = s["config"]
  m = c["model"]
  lines = [
      "# Small-scale replication (paper §5)", "",
      f"Model {m['num_layers']} x {m['d_model']} (vocab {m['vocab_size']}), "
      f"{c['steps']} steps x {c['global_batch']} rows x {c['seq_len'] + 1} tokens = "
      f"{c['tokens_per_run']:,} tokens per run, learning rate {c['learning_rate']:g}, seed {c['seed']}; "
      f"r = {c['plain_r']} (lam {', '.join(_lam(x) for x in c['plain_lams'])}) and "
      f"r = {c['heavy_r']} (lam {', '.join(_lam(x) for x in c['heavy_lams'])}).", "",
      "## Behaviours", "",
      "| behaviour | verdict | numbers | criterion |", "|---|---|---|---|"]
  for b in s["behaviours"]:
    verdict = {True: "holds", False: "does not hold", None: "not evaluable"}[b["holds"]]
    lines.append(f"| {b['claim']} | **{verdict}** | {b['detail']} | {b['criterion']} |")
  lines += ["", "## Runs (held-out losses; best = minimum over the validations, with its step)", "",
            "| run | r | lam | final AR | best AR (step) | final MDM | best MDM (step) | wall s | CPU s |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in s["runs"]:
    if "final_ar" not in r:
      lines.append(f"| {r['run']} | {r['r']} | {_lam(r['lam'])} | (no curve) | | | | | |")
      continue
    fin = "" if r["finished"] else " (unfinished)"
    lines.append(
        f"| {r['run']}{fin} | {r['r']} | {_lam(r['lam'])} | {r['final_ar']:.3f} | "
        f"{r['best_ar']:.3f} ({r['best_ar_step']}) | {r['final_mdm']:.3f} | "
        f"{r['best_mdm']:.3f} ({r['best_mdm_step']}) | {r.get('wall_s', '')} | {r.get('cpu_s', '')} |")
  lines += ["", f"Training wall time (sum over the runs trained here): {s['runs_wall_s']:g} s; "
            f"CPU time {s['runs_cpu_s']:g} s."]
  if s["total_wall_s"] is not None:
    lines.append(f"This call: {s['total_wall_s']:g} s wall.")
  if s["notes"]:
    lines += ["", "Notes:", ""] + [f"- {n}" for n in s["notes"]]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the figure


DUAL_COLORS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def colors(lams: Sequence[float]) -> dict[float, str]:
  """AR-only red, MDM-only blue, the dual lams (largest first) in distinct colours."""
  duals = sorted({lam for lam in lams if 0.0 < lam < 1.0}, reverse=True)
  out = {1.0: "tab:red", 0.0: "tab:blue"}
  out.update({lam: DUAL_COLORS[i % len(DUAL_COLORS)] for i, lam in enumerate(duals)})
  return out


def figure(curves: Sequence[inputs.Curve], rs: Sequence[int], path: pathlib.Path) -> pathlib.Path:
  """Rows: r; columns: held-out AR loss, MDM NELBO; one line per lambda, its minimum marked.

  The y range of a panel covers the runs trained on its objective (lam > 0 for AR, lam < 1 for
  MDM) after the first tenth of training (and a margin above); the other single-objective run
  (dotted) may leave the frame.
  """
  fig = mpl_figure.Figure(figsize=(8.4, 2.9 * len(rs)), layout="constrained")
  axes = fig.subplots(len(rs), 2, squeeze=False)
  color = colors([c.lam for c in curves])
  for row, r in zip(axes, rs):
    sel = sorted((c for c in curves if c.r == r), key=lambda c: -c.lam)
    for j, (ax, kind) in enumerate(zip(row, KINDS)):
      shown = []
      for c in sel:
        v = c.ar_loss if kind == "ar" else c.mdm_loss
        ok = np.isfinite(v)
        if not ok.any():
          continue
        trained = c.lam > 0.0 if kind == "ar" else c.lam < 1.0
        ax.plot(c.step[ok], v[ok], color=color[c.lam], lw=1.6 if trained else 1.0,
                ls="-" if trained else ":", label=f"λ = {_lam(c.lam)}")
        i = np.flatnonzero(ok)[np.argmin(v[ok])]
        ax.plot(c.step[i], v[i], "o", mfc="none", mec=color[c.lam], ms=7)
        if trained:
          shown.append(v[ok][c.step[ok] >= 0.1 * c.step[ok].max()])
      if shown:
        vals = np.concatenate(shown)
        lo, hi = float(vals.min()), float(vals.max())
        pad = 0.06 * max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + 4 * pad)
      ax.set_title(f"{KIND_NAME[kind]}, r = {r}", fontsize=9)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      if j == 0:
        ax.legend(fontsize=7)
  fig.suptitle("validation curves (circle: minimum of each curve; dotted: the objective the run "
               "was not trained on)", fontsize=9)
  fig.savefig(path, dpi=90)
  return path


# ----------------------------------------------------------------------------- the CLI


def _check_out() -> pathlib.Path:
  return cli.output_dir(_OUT.value, "the replication's directory")


def main(argv: list[str]) -> int:
  t0 = time.perf_counter()
  argv = list(argv)
  if not any(a.startswith("--config=") for a in argv[1:]) and not any(
      a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    if not DEFAULT_CONFIG.is_file():
      cli.fail(f"--config is required ({DEFAULT_CONFIG} not found)")
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
  args = cli.parse(argv, __doc__, FLAGS, config="required",
                   config_help="replication config (default: configs/replicate.py)")
  if args is None:
    return 0
  out = _check_out()
  try:
    rep = plan(args.config, out)
    if _TRAIN.value:
      sweep.check_points(rep.plan, jax.device_count())
  except (ReplicationError, sweep.SweepError, ConfigError) as e:
    cli.fail(str(e))
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    cli.fail(f"--out={out}: cannot create ({e.strerror})")
  failed = train(rep, out) if _TRAIN.value else []
  curves, stats, notes = read_runs(rep)
  s = summary(rep, stats, notes, _read_timings(out), time.perf_counter() - t0)
  rs = [r for r in (rep.config.plain_r, rep.config.heavy_r) if any(c.r == r for c in curves)]
  written = [figure(curves, rs, out / FIGURE)] if rs else []
  _write_json(out / SUMMARY_JSON, s)
  (out / SUMMARY_MD).write_text(markdown(s), encoding="utf-8")
  written += [out / SUMMARY_JSON, out / SUMMARY_MD]
  for n in notes:
    print(f"note: {n}", file=sys.stderr)
  for b in s["behaviours"]:
    verdict = {True: "holds", False: "does NOT hold", None: "not evaluable"}[b["holds"]]
    print(f"{b['name']}: {verdict} ({b['detail']})")
  print("wrote " + ", ".join(str(p) for p in written))
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run(main)
