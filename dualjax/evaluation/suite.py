"""The evaluation suite: nine tasks in four scoring modes -> a results dict (DESIGN.md §7).

`evaluate(params, model_cfg, tokenizer, tasks, modes, ...)` loads and validates every task,
builds the unique (context, completion) requests, scores them in each mode with a `Scorer`
(reusable across calls: its compiled functions are kept; `<s>` and `<mask>` are the tokenizer's
ids) and summarises per task, mode and sub-task (accuracy, normalised score, standard errors, item
count) with the headline means; `on_sample` receives one record per (item, choice) request
(`sample_records`; `SampleLog` writes them as JSONL). `write_results` writes the JSON and a
Markdown table. Settings (`EvalSettings`) are the `eval` section of a run config;
`--config.eval.X` means the same in training and in `python -m dualjax.evaluate`.
"""

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dualjax import typed_config
from dualjax import workdir as workdir_lib
from dualjax.evaluation import metrics, prompts, scoring, tasks as tasks_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "eval-data"
DEFAULT_MODES = ("ar", "prefix", "pll", "mc")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The `eval` config section (defaults here only). Empty tasks/modes/data_dir mean: all nine
  tasks, the modes the model's lam supports (`supported_modes`), `DEFAULT_DATA_DIR`."""
  every: int = 0          # training only: evaluate every `every` steps and at the end (0 = off)
  tasks: str = ""         # comma-separated
  modes: str = ""         # comma-separated: ar, prefix, pll (= pll1 + pll6), pll<k>, mc
  limit: int = 0          # items per task (fixed-seed subsample); 0 = all
  data_dir: str = ""      # the task files (eval-data layout), or tfds:DIR
  seed: int = 0           # subsample seed
  mc_grid: int = 32       # grid points of t for mode mc
  mc_seed: int = 0
  row_len: int = 512
  batch_tokens: int = 16384
  mmlu_header: str = prompts.MMLU_HEADER

  def task_list(self) -> list[str]:
    return _csv(self.tasks) or list(tasks_lib.TASKS)

  def mode_list(self, lam: float | None) -> list[str]:
    return expand_modes(_csv(self.modes) or supported_modes(lam))

  def data_path(self) -> str | pathlib.Path:
    return self.data_dir or DEFAULT_DATA_DIR


def _csv(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def settings_from_config(section: Any) -> EvalSettings:
  """An `eval` config section (ConfigDict or dict) as EvalSettings; unknown fields raise."""
  return typed_config.from_section(EvalSettings, section, "eval")


def check_settings(s: EvalSettings, lam: float | None) -> None:
  """Every check that needs no model: fields, modes, and that each task's files load (1 item)."""
  for name in ("every", "limit"):
    if getattr(s, name) < 0:
      raise ValueError(f"eval.{name} must be >= 0, got {getattr(s, name)}")
  if s.mc_grid < 1:
    raise ValueError(f"eval.mc_grid must be >= 1, got {s.mc_grid}")
  if s.row_len < 2 or s.batch_tokens < 1:
    raise ValueError(f"eval.row_len ({s.row_len}) must be >= 2 and eval.batch_tokens "
                     f"({s.batch_tokens}) >= 1")
  s.mode_list(lam)
  load_examples(s.task_list(), s.data_path(), 1, 0)


def supported_modes(lam: float | None) -> tuple[str, ...]:
  """The scoring modes a model trained with AR share `lam` supports (None: unknown, all).

  An AR-only model (lam = 1) never saw bidirectional attention, so only 'ar'; an MDM-only model
  (lam = 0) never saw causal attention, so 'pll' and 'mc'; a dual model supports all four.
  """
  if lam is None or 0.0 < lam < 1.0:
    return DEFAULT_MODES
  return ("ar",) if lam >= 1.0 else ("pll", "mc")


def expand_modes(modes: Sequence[str]) -> list[str]:
  """'pll' means both 'pll1' and 'pll6' (the paper reports the better per task)."""
  out: list[str] = []
  for m in modes:
    for x in (("pll1", "pll6") if m == "pll" else (m,)):
      scoring.parse_mode(x)  # Raises on an unknown mode.
      if x not in out:
        out.append(x)
  return out


@dataclasses.dataclass
class _TaskRequests:
  examples: list[tasks_lib.Example]
  contexts: list[str]
  completions: list[list[str]]
  cond: list[np.ndarray]  # Request indices per example (one per choice).
  uncond: list[np.ndarray] | None  # PMI: request indices with the "Answer:" context.


def build_requests(examples: dict[str, list[tasks_lib.Example]], tokenizer: Any,
                   mmlu_header: str = prompts.MMLU_HEADER
                   ) -> tuple[list[scoring.Request], dict[str, _TaskRequests]]:
  """Unique (context, completion) requests over all tasks (identical pairs are scored once)."""
  index: dict[tuple[str, str], int] = {}
  requests: list[scoring.Request] = []

  def get(ctx: str, comp: str) -> int:
    key = (ctx, comp)
    if key not in index:
      index[key] = len(requests)
      requests.append(scoring.split_encode(tokenizer, ctx, comp))
    return index[key]

  per_task = {}
  for task, exs in examples.items():
    pmi = metrics.NORMALISATION[task] == "pmi"
    ctxs, comps, cond, uncond = [], [], [], []
    for ex in exs:
      ctx, cs = prompts.render(ex, mmlu_header)
      ctxs.append(ctx)
      comps.append(cs)
      cond.append(np.array([get(ctx, c) for c in cs]))
      if pmi:
        uncond.append(np.array([get(prompts.UNCONDITIONAL_CONTEXT, c) for c in cs]))
    per_task[task] = _TaskRequests(exs, ctxs, comps, cond, uncond if pmi else None)
  return requests, per_task


def load_examples(task_names: Sequence[str], data_dir: str | os.PathLike, limit: int | None,
                  seed: int) -> dict[str, list[tasks_lib.Example]]:
  """Loads (and validates) every task before any scoring."""
  for t in task_names:
    if t not in tasks_lib.LOADERS:
      raise tasks_lib.TaskDataError(
          f"unknown task '{t}'; known tasks: {', '.join(tasks_lib.TASKS)}")
  return {t: tasks_lib.load_task(t, data_dir, limit, seed) for t in task_names}


def evaluate(params: Any, model_cfg: Any, tokenizer: Any,
             tasks: Sequence[str] = tasks_lib.TASKS, modes: Sequence[str] = DEFAULT_MODES, *,
             data_dir: str | os.PathLike = DEFAULT_DATA_DIR, limit: int | None = None,
             seed: int = EvalSettings.seed, mc_grid: int = EvalSettings.mc_grid,
             mc_seed: int = EvalSettings.mc_seed, row_len: int = EvalSettings.row_len,
             batch_tokens: int = EvalSettings.batch_tokens, mesh: Any = None,
             step: int | None = None, checkpoint: str | None = None,
             mmlu_header: str = EvalSettings.mmlu_header,
             apply_fn: Callable[..., Any] | None = None, scorer: scoring.Scorer | None = None,
             log: Callable[[str], None] | None = None,
             on_sample: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  """Scores `tasks` in `modes` and returns the results dict (see module docstring).

  `scorer`: a Scorer to reuse (its mesh, row length and compiled functions; `params` replace its
  parameters); default a new one. `on_sample`: called with every `sample_records` record (the
  per-token log-probabilities are kept only then).
  """
  mode_list = expand_modes(modes)
  examples = load_examples(tasks, data_dir, limit, seed)
  requests, per_task = build_requests(examples, tokenizer, mmlu_header)
  bos_id, mask_id = scoring.special_ids(tokenizer)
  if scorer is None:
    scorer = scoring.Scorer(params, model_cfg, mesh=mesh, row_len=row_len,
                            batch_tokens=batch_tokens, apply_fn=apply_fn, bos_id=bos_id,
                            mask_id=mask_id)
  else:
    scorer.with_params(params).with_special_ids(bos_id, mask_id)
  cfg_dict = (dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg)
              else dict(vars(model_cfg)))
  results: dict[str, Any] = {
      "config": {
          "tasks": list(tasks), "modes": mode_list, "limit": limit, "seed": seed,
          "mc_grid": mc_grid, "mc_seed": mc_seed, "row_len": scorer.row_len,
          "batch_tokens": batch_tokens, "data_dir": str(data_dir), "mmlu_header": mmlu_header,
          "num_devices": scorer.n_dev, "model": {k: str(v) if not isinstance(
              v, (int, float, bool, str, type(None))) else v for k, v in cfg_dict.items()},
          "tokenizer_checksum": getattr(tokenizer, "checksum", None),
          "special_ids": {"bos": bos_id, "mask": mask_id},
          "num_requests": len(requests),
      },
      "step": step, "checkpoint": checkpoint, "timing": {},
      "tasks": {t: {"normalization": metrics.NORMALISATION[t],
                    "baseline": tasks_lib.random_baseline(t, examples[t]),
                    "num_examples": len(examples[t]), "modes": {}} for t in tasks},
  }
  if callable(results["config"]["tokenizer_checksum"]):
    results["config"]["tokenizer_checksum"] = results["config"]["tokenizer_checksum"]()
  for mode in mode_list:
    before = dict(scorer.stats)
    t0 = time.perf_counter()
    if on_sample is None:
      ll, tok_ll = scorer.score(requests, mode, mc_grid_size=mc_grid, mc_seed=mc_seed), None
    else:
      ll, tok_ll = scorer.score_tokens(requests, mode, mc_grid_size=mc_grid, mc_seed=mc_seed)
    secs = time.perf_counter() - t0
    results["timing"][mode] = {
        "seconds": secs, **{k: scorer.stats[k] - before[k] for k in scorer.stats}}
    for task, tr in per_task.items():
      ll_uncond = None if tr.uncond is None else [ll[i] for i in tr.uncond]
      choice_scores, acc_N = metrics.choice_table(task, tr.examples, tr.completions,
                                                  [ll[i] for i in tr.cond], ll_uncond)
      results["tasks"][task]["modes"][mode] = metrics.summarise(task, tr.examples, acc_N)
      if on_sample is not None:
        for rec in sample_records(task, mode, tr, requests, ll, tok_ll, choice_scores, acc_N):
          on_sample(rec)
    if log:
      log(f"{mode}: {len(requests)} requests, "
          f"{results['timing'][mode]['unit_tokens']} tokens in {secs:.1f}s")
  metrics.add_pll_best(results)
  metrics.add_headline(results)
  return results


def sample_records(task: str, mode: str, tr: _TaskRequests, requests: Sequence[scoring.Request],
                   ll: np.ndarray, tok_ll: list[np.ndarray], choice_scores: list[np.ndarray],
                   acc_N: np.ndarray) -> Iterator[dict[str, Any]]:
  """One record per (item, choice) request of `task` in `mode`: context, completion, its
  log-likelihood, the completion's token ids and per-token log-probabilities
  (`Scorer.score_tokens`; they sum to the log-likelihood; a completion longer than the model's
  window keeps its first tokens), the choice's score under the task's normalisation, `chosen`
  (among the best-scoring choices; ties choose all), `gold`, the item's credit `acc`; PMI tasks
  add the same for the unconditional context "Answer:"."""
  norm = metrics.NORMALISATION[task]
  for i, ex in enumerate(tr.examples):
    best = np.max(choice_scores[i])
    for j, comp in enumerate(tr.completions[i]):
      r = int(tr.cond[i][j])
      rec = {"task": task, "mode": mode, "doc_id": ex.uid, "subtask": ex.subtask, "choice": j,
             "context": tr.contexts[i], "completion": comp, "loglikelihood": float(ll[r]),
             "completion_ids": list(requests[r].comp[:len(tok_ll[r])]),
             "token_logprobs": tok_ll[r].tolist(), "normalization": norm,
             "choice_score": float(choice_scores[i][j]),
             "chosen": bool(choice_scores[i][j] == best), "gold": j == ex.gold,
             "acc": float(acc_N[i])}
      if tr.uncond is not None:
        u = int(tr.uncond[i][j])
        rec.update(context_uncond=prompts.UNCONDITIONAL_CONTEXT,
                   loglikelihood_uncond=float(ll[u]), token_logprobs_uncond=tok_ll[u].tolist())
      yield rec


def samples_path(out: str | os.PathLike) -> pathlib.Path:
  """Where `--log_samples` writes beside results `out`: <stem>_samples.jsonl."""
  out = pathlib.Path(out)
  return out.with_name(out.stem + "_samples.jsonl")


class SampleLog:
  """`on_sample` records as JSONL lines, written to `path`.tmp and renamed into place by
  `commit()` (an interrupted evaluation leaves an earlier file at `path` as it was); `discard()`
  removes the partial file."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.tmp = self.path.with_name(self.path.name + ".tmp")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._f = open(self.tmp, "w", encoding="utf-8")
    self.count = 0

  def __call__(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record, sort_keys=True) + "\n")
    self.count += 1

  def commit(self) -> pathlib.Path:
    self._f.close()
    os.replace(self.tmp, self.path)
    return self.path

  def discard(self) -> None:
    self._f.close()
    self.tmp.unlink(missing_ok=True)


def write_results(results: dict[str, Any], out: str | os.PathLike) -> tuple[pathlib.Path,
                                                                            pathlib.Path]:
  """Writes `out` (JSON) and `out` with suffix .md (Markdown), each atomically."""
  out = pathlib.Path(out)
  md = out.with_suffix(".md")
  out.parent.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_atomic(out, json.dumps(results, indent=2, sort_keys=True) + "\n")
  workdir_lib.write_atomic(md, metrics.to_markdown(results))
  return out, md


def evaluate_settings(params: Any, model_cfg: Any, tokenizer: Any, settings: EvalSettings,
                      lam: float | None, **kw: Any) -> dict[str, Any]:
  """`evaluate` with the tasks, modes and options of an `eval` config section."""
  s = settings
  return evaluate(params, model_cfg, tokenizer, s.task_list(), s.mode_list(lam),
                  data_dir=s.data_path(), limit=s.limit or None, seed=s.seed, mc_grid=s.mc_grid,
                  mc_seed=s.mc_seed, row_len=s.row_len, batch_tokens=s.batch_tokens,
                  mmlu_header=s.mmlu_header, **kw)


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
  """`<task>/<mode>/acc`, `<task>/<mode>/score` and `headline/<mode>` of a results dict."""
  flat = {}
  for task, r in results["tasks"].items():
    for mode, s in r["modes"].items():
      flat[f"{task}/{mode}/acc"] = float(s["acc"])
      flat[f"{task}/{mode}/score"] = float(s["score"])
  return flat | {f"headline/{mode}": float(h["score"]) for mode, h in results["headline"].items()}
