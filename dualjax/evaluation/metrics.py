"""Choice scoring, accuracies, random baselines, normalised scores and reports (DESIGN.md §7).

- per-character: ll(c | ctx) / len(c) (characters of the completion string, leading space included,
  as OLMES' `acc_per_char`); PMI: ll(c | ctx) − ll(c | "Answer:"); raw: ll(c | ctx).
- An item scores 1 if its gold choice is the unique best; a tie among m best choices that include
  the gold one scores 1/m (the expectation of a random tie-break; BLiMP has 7 identical pairs).
- Accuracy is the mean over items; BLiMP and MMLU macro-average over sub-tasks.
- Normalised score: 100·(acc − r)/(1 − r); the headline is the plain mean over the nine tasks.
- Standard errors as lm-eval computes them for `acc`: the sample standard deviation (ddof 1) of
  the per-item credits over √n (`mean_stderr`); a macro average of K sub-tasks
  √(Σ se_k²)/K (lm-eval's `unweighted_mean_stderr`); the score's is 100·se/(1 − r); the
  headline's √(Σ se_t²)/T. None where a mean has fewer than 2 items.
"""

import math
from typing import Any, Sequence

import numpy as np

from dualjax.evaluation.tasks import Example, TASKS, random_baseline

NORMALISATION = {
    "arc_easy": "per_char", "arc_challenge": "pmi", "blimp": "raw", "csqa": "pmi",
    "hellaswag": "per_char", "mmlu": "per_char", "openbookqa": "pmi", "piqa": "per_char",
    "siqa": "per_char",
}
MACRO_AVERAGED = ("blimp", "mmlu")
TASK_TITLES = {
    "arc_easy": "ARC-E", "arc_challenge": "ARC-C", "blimp": "BLiMP", "csqa": "CSQA",
    "hellaswag": "HSwag", "mmlu": "MMLU", "openbookqa": "OBQA", "piqa": "PIQA", "siqa": "SIQA",
}


def choice_scores(norm: str, ll_C: np.ndarray, completions: Sequence[str],
                  ll_uncond_C: np.ndarray | None = None) -> np.ndarray:
  """The score of each of C choices under normalisation `norm` ('raw', 'per_char' or 'pmi')."""
  ll_C = np.asarray(ll_C, np.float64)
  if norm == "raw":
    return ll_C
  if norm == "per_char":
    return ll_C / np.array([max(len(c), 1) for c in completions], np.float64)
  if norm == "pmi":
    if ll_uncond_C is None:
      raise ValueError("PMI needs the unconditional log-likelihoods")
    return ll_C - np.asarray(ll_uncond_C, np.float64)
  raise ValueError(f"unknown normalisation '{norm}'")


def item_accuracy(scores_C: np.ndarray, gold: int) -> float:
  """1 if gold is the unique best, 1/m for an m-way tie that includes gold, else 0."""
  best = np.flatnonzero(scores_C == np.max(scores_C))
  return 1.0 / len(best) if gold in best else 0.0


def task_accuracy(task: str, examples: Sequence[Example], acc_N: np.ndarray
                  ) -> tuple[float, dict[str, float]]:
  """(accuracy, per-sub-task accuracies); macro-averaged over sub-tasks for BLiMP and MMLU."""
  acc_N = np.asarray(acc_N, np.float64)
  subs = _by_subtask(examples, acc_N)
  sub_acc = {k: float(np.mean(v)) for k, v in subs.items()}
  if task in MACRO_AVERAGED:
    return float(np.mean(list(sub_acc.values()))), sub_acc
  return float(np.mean(acc_N)), ({} if list(sub_acc) == [""] else sub_acc)


def _by_subtask(examples: Sequence[Example], acc_N: np.ndarray) -> dict[str, np.ndarray]:
  subs: dict[str, list[float]] = {}
  for ex, a in zip(examples, acc_N):
    subs.setdefault(ex.subtask, []).append(float(a))
  return {k: np.array(v) for k, v in sorted(subs.items())}


def mean_stderr(x_N: np.ndarray) -> float | None:
  """The standard error of a mean (lm-eval's `mean_stderr`): sample std (ddof 1) / √n; None for
  fewer than 2 values."""
  x_N = np.asarray(x_N, np.float64)
  if len(x_N) < 2:
    return None
  return float(np.std(x_N, ddof=1) / math.sqrt(len(x_N)))


def task_stderr(task: str, examples: Sequence[Example], acc_N: np.ndarray) -> float | None:
  """The standard error of `task_accuracy`: of the item mean, or for BLiMP and MMLU of the mean
  of sub-task means, √(Σ se_k²)/K (None if a sub-task has fewer than 2 items)."""
  if task not in MACRO_AVERAGED:
    return mean_stderr(acc_N)
  se = [mean_stderr(v) for v in _by_subtask(examples, np.asarray(acc_N, np.float64)).values()]
  if not se or any(x is None for x in se):
    return None
  return float(math.sqrt(sum(x * x for x in se)) / len(se))


def normalised_score(acc: float, baseline: float) -> float:
  """100·(acc − r)/(1 − r): 0 at chance, 100 when perfect."""
  return 100.0 * (acc - baseline) / (1.0 - baseline)


def choice_table(task: str, examples: Sequence[Example], completions: Sequence[Sequence[str]],
                 ll: Sequence[np.ndarray], ll_uncond: Sequence[np.ndarray] | None = None
                 ) -> tuple[list[np.ndarray], np.ndarray]:
  """(per item its choices' scores under the task's normalisation, per-item credit acc_N)."""
  norm = NORMALISATION[task]
  scores = [choice_scores(norm, ll[i], completions[i],
                          None if ll_uncond is None else ll_uncond[i])
            for i in range(len(examples))]
  acc_N = np.array([item_accuracy(s, ex.gold) for s, ex in zip(scores, examples)], np.float64)
  return scores, acc_N


def summarise(task: str, examples: Sequence[Example], acc_N: np.ndarray) -> dict[str, Any]:
  """Accuracy, normalised score, their standard errors, item count and sub-task accuracies."""
  acc, subs = task_accuracy(task, examples, acc_N)
  r = random_baseline(task, list(examples))
  se = task_stderr(task, examples, acc_N)
  out = {"acc": acc, "acc_stderr": se, "score": normalised_score(acc, r),
         "score_stderr": None if se is None else 100.0 * se / (1.0 - r), "n": len(examples)}
  if subs:
    out["subtasks"] = subs
  return out


def summarise_task(task: str, examples: Sequence[Example], completions: Sequence[Sequence[str]],
                   ll: Sequence[np.ndarray], ll_uncond: Sequence[np.ndarray] | None = None
                   ) -> dict[str, Any]:
  """`summarise` of one task in one mode from its choices' log-likelihoods."""
  return summarise(task, examples, choice_table(task, examples, completions, ll, ll_uncond)[1])


def add_pll_best(results: dict[str, Any]) -> None:
  """Adds mode 'pll' = per task the better of 'pll1' and 'pll6' (the paper's choice), in place."""
  for task, t in results["tasks"].items():
    modes = t["modes"]
    if "pll1" in modes and "pll6" in modes:
      best = "pll1" if modes["pll1"]["score"] >= modes["pll6"]["score"] else "pll6"
      modes["pll"] = dict(modes[best], source=best)


def add_headline(results: dict[str, Any]) -> None:
  """Adds `headline[mode]` = mean normalised score over the tasks, its standard error and
  `complete` (all nine tasks)."""
  modes = sorted({m for t in results["tasks"].values() for m in t["modes"]})
  results["headline"] = {}
  for m in modes:
    rows = [t["modes"][m] for t in results["tasks"].values() if m in t["modes"]]
    se = [r.get("score_stderr") for r in rows]
    results["headline"][m] = {
        "score": float(np.mean([r["score"] for r in rows])), "num_tasks": len(rows),
        "complete": len(rows) == len(TASKS),
        "score_stderr": None if any(x is None for x in se) else float(
            math.sqrt(sum(x * x for x in se)) / len(se))}


MODE_ORDER = ("ar", "prefix", "pll", "pll1", "pll6", "mc")


def fmt(x: float | None, spec: str) -> str:
  """`x` formatted, or "–" for a missing value."""
  return "–" if x is None else format(x, spec)


def to_markdown(results: dict[str, Any]) -> str:
  """A Table-2-like table (one row per mode, normalised scores per task and the mean), then one
  row per task and mode: item count, accuracy, normalised score and their standard errors."""
  tasks = [t for t in TASKS if t in results["tasks"]]
  modes = [m for m in MODE_ORDER if m in results.get("headline", {})]
  head = "| mode | " + " | ".join(TASK_TITLES[t] for t in tasks) + " | Average |"
  lines = [head, "|" + "---|" * (len(tasks) + 2)]
  for m in modes:
    cells = []
    for t in tasks:
      s = results["tasks"][t]["modes"].get(m)
      cells.append("–" if s is None else f"{s['score']:.1f}")
    h = results["headline"][m]
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {h['score']:.1f} "
                 f"± {fmt(h.get('score_stderr'), '.1f')} |")
  detail = ["| task | mode | n | acc | ± | score | ± |", "|---|---|--:|--:|--:|--:|--:|"]
  for t in tasks:
    for m in MODE_ORDER:
      s = results["tasks"][t]["modes"].get(m)
      if s is None:
        continue
      via = f" ({s['source']})" if "source" in s else ""
      detail.append(f"| {TASK_TITLES[t]} | {m}{via} | {s.get('n', '–')} | {s['acc']:.4f} | "
                    f"{fmt(s.get('acc_stderr'), '.4f')} | {s['score']:.1f} | "
                    f"{fmt(s.get('score_stderr'), '.1f')} |")
  step = results.get("step")
  caption = ("Normalised zero-shot scores, 100·(acc − chance)/(1 − chance)"
             + (f", checkpoint step {step}" if step is not None else "") + "; ± standard error.")
  return (caption + "\n\n" + "\n".join(lines) + "\n\nPer task and mode (n items; acc and its "
          "standard error as lm-eval's; score = normalised accuracy):\n\n" + "\n".join(detail)
          + "\n")
