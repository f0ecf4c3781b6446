"""Choice scoring, accuracies, random baselines, normalised scores and reports (DESIGN.md §7).

- per-character: ll(c | ctx) / len(c) (characters of the completion string, leading space included,
  as OLMES' `acc_per_char`); PMI: ll(c | ctx) − ll(c | "Answer:"); raw: ll(c | ctx).
- An item scores 1 if its gold choice is the unique best; a tie among m best choices that include
  the gold one scores 1/m (the expectation of a random tie-break; BLiMP has 7 identical pairs).
- Accuracy is the mean over items; BLiMP and MMLU macro-average over sub-tasks.
- Normalised score: 100·(acc − r)/(1 − r); the headline is the plain mean over the nine tasks.
"""

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
  subs: dict[str, list[float]] = {}
  for ex, a in zip(examples, acc_N):
    subs.setdefault(ex.subtask, []).append(float(a))
  sub_acc = {k: float(np.mean(v)) for k, v in sorted(subs.items())}
  if task in MACRO_AVERAGED:
    return float(np.mean(list(sub_acc.values()))), sub_acc
  return float(np.mean(acc_N)), ({} if list(sub_acc) == [""] else sub_acc)


def normalised_score(acc: float, baseline: float) -> float:
  """100·(acc − r)/(1 − r): 0 at chance, 100 when perfect."""
  return 100.0 * (acc - baseline) / (1.0 - baseline)


def summarise_task(task: str, examples: Sequence[Example], completions: Sequence[Sequence[str]],
                   ll: Sequence[np.ndarray], ll_uncond: Sequence[np.ndarray] | None = None
                   ) -> dict[str, Any]:
  """Accuracy, normalised score and sub-task accuracies of one task in one mode."""
  norm = NORMALISATION[task]
  acc_N = np.array([
      item_accuracy(choice_scores(norm, ll[i], completions[i],
                                  None if ll_uncond is None else ll_uncond[i]), ex.gold)
      for i, ex in enumerate(examples)])
  acc, subs = task_accuracy(task, examples, acc_N)
  out = {"acc": acc, "score": normalised_score(acc, random_baseline(task, list(examples)))}
  if subs:
    out["subtasks"] = subs
  return out


def add_pll_best(results: dict[str, Any]) -> None:
  """Adds mode 'pll' = per task the better of 'pll1' and 'pll6' (the paper's choice), in place."""
  for task, t in results["tasks"].items():
    modes = t["modes"]
    if "pll1" in modes and "pll6" in modes:
      best = "pll1" if modes["pll1"]["score"] >= modes["pll6"]["score"] else "pll6"
      modes["pll"] = dict(modes[best], source=best)


def add_headline(results: dict[str, Any]) -> None:
  """Adds `headline[mode]` = mean normalised score over the tasks (with `complete` = all nine)."""
  modes = sorted({m for t in results["tasks"].values() for m in t["modes"]})
  results["headline"] = {}
  for m in modes:
    scores = [t["modes"][m]["score"] for t in results["tasks"].values() if m in t["modes"]]
    results["headline"][m] = {
        "score": float(np.mean(scores)), "num_tasks": len(scores),
        "complete": len(scores) == len(TASKS)}


MODE_ORDER = ("ar", "prefix", "pll", "pll1", "pll6", "mc")


def to_markdown(results: dict[str, Any]) -> str:
  """A Table-2-like Markdown table: one row per mode, normalised scores per task and the mean."""
  tasks = [t for t in TASKS if t in results["tasks"]]
  modes = [m for m in MODE_ORDER if m in results.get("headline", {})]
  head = "| mode | " + " | ".join(TASK_TITLES[t] for t in tasks) + " | Average |"
  lines = [head, "|" + "---|" * (len(tasks) + 2)]
  for m in modes:
    cells = []
    for t in tasks:
      s = results["tasks"][t]["modes"].get(m)
      cells.append("–" if s is None else f"{s['score']:.1f}")
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {results['headline'][m]['score']:.1f} |")
  step = results.get("step")
  caption = (f"Normalised zero-shot scores, 100·(acc − chance)/(1 − chance)"
             + (f", checkpoint step {step}" if step is not None else "") + ".")
  return caption + "\n\n" + "\n".join(lines) + "\n"
