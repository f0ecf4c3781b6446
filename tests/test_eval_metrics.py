"""Normalisation arithmetic on hand-computed cases."""

import numpy as np
import pytest

from dualjax.evaluation import metrics
from dualjax.evaluation.tasks import Example


def _ex(task, gold, n=2, sub=""):
  return Example(task, sub, "u", {}, tuple("c" * (i + 1) for i in range(n)), gold)


def test_per_char_can_flip_the_raw_choice():
  # " ab" (3 chars) ll -3.0 -> -1.0/char; " abcdefg" (8 chars) ll -4.0 -> -0.5/char.
  comps = [" ab", " abcdefg"]
  raw = metrics.choice_scores("raw", [-3.0, -4.0], comps)
  per_char = metrics.choice_scores("per_char", [-3.0, -4.0], comps)
  np.testing.assert_allclose(per_char, [-1.0, -0.5])
  assert metrics.item_accuracy(raw, 0) == 1.0 and metrics.item_accuracy(per_char, 0) == 0.0


def test_pmi():
  # log p(c|ctx) - log p(c|"Answer:"): [-5 - (-2), -6 - (-4)] = [-3, -2] -> choice 1 wins.
  s = metrics.choice_scores("pmi", [-5.0, -6.0], [" a", " b"], [-2.0, -4.0])
  np.testing.assert_allclose(s, [-3.0, -2.0])
  assert metrics.item_accuracy(s, 1) == 1.0
  with pytest.raises(ValueError, match="unconditional"):
    metrics.choice_scores("pmi", [-1.0], [" a"])


def test_ties_give_fractional_credit():
  assert metrics.item_accuracy(np.array([-1.0, -1.0]), 0) == 0.5
  assert metrics.item_accuracy(np.array([-1.0, -1.0, -1.0, -2.0]), 2) == pytest.approx(1 / 3)
  assert metrics.item_accuracy(np.array([-1.0, -1.0, -3.0]), 2) == 0.0


def test_normalised_score():
  assert metrics.normalised_score(0.25, 0.25) == 0.0
  assert metrics.normalised_score(1.0, 0.2) == 100.0
  assert metrics.normalised_score(0.6, 0.2) == pytest.approx(50.0)  # (0.6-0.2)/0.8
  assert metrics.normalised_score(0.5, 1 / 3) == pytest.approx(25.0)  # (1/6)/(2/3)


def test_macro_average_over_subtasks():
  # Sub-task "a" has 3 items (acc 1/3), "b" has 1 item (acc 1): micro 0.5, macro 2/3.
  exs = [_ex("mmlu", 0, 4, "a")] * 3 + [_ex("mmlu", 0, 4, "b")]
  acc, subs = metrics.task_accuracy("mmlu", exs, [1, 0, 0, 1])
  assert subs == {"a": pytest.approx(1 / 3), "b": 1.0}
  assert acc == pytest.approx(2 / 3)
  acc, subs = metrics.task_accuracy("piqa", [_ex("piqa", 0)] * 4, [1, 0, 0, 1])
  assert acc == 0.5 and subs == {}


def test_summarise_task_arc_baseline_and_per_char():
  # Two ARC-E items, 4 and 3 choices: r = (1/4 + 1/3)/2 = 7/24.
  exs = [Example("arc_easy", "", "1", {}, ("a", "bb", "c", "d"), 1),
         Example("arc_easy", "", "2", {}, ("xx", "y", "z"), 0)]
  comps = [[" a", " bb", " c", " d"], [" xx", " y", " z"]]
  # Item 1: per-char [-2/2, -2.4/3, -3/2, -4/2] -> best is " bb" (gold) -> 1.
  # Item 2: per-char [-3/3, -1.8/2, -5/2] -> best " y", gold " xx" -> 0.
  out = metrics.summarise_task("arc_easy", exs, comps,
                               [np.array([-2, -2.4, -3, -4.0]), np.array([-3.0, -1.8, -5])])
  assert out["acc"] == 0.5
  assert out["score"] == pytest.approx(100 * (0.5 - 7 / 24) / (1 - 7 / 24))


def test_pll_best_headline_and_markdown():
  res = {"tasks": {
      "piqa": {"modes": {"ar": {"acc": 0.75, "score": 50.0}, "pll1": {"acc": 0.6, "score": 20.0},
                         "pll6": {"acc": 0.7, "score": 40.0}}},
      "csqa": {"modes": {"ar": {"acc": 0.4, "score": 25.0}, "pll1": {"acc": 0.44, "score": 30.0},
                         "pll6": {"acc": 0.36, "score": 20.0}}}},
      "step": 123}
  metrics.add_pll_best(res)
  assert res["tasks"]["piqa"]["modes"]["pll"]["source"] == "pll6"
  assert res["tasks"]["csqa"]["modes"]["pll"]["source"] == "pll1"
  metrics.add_headline(res)
  # These hand-made rows carry no standard errors: the headline's is unknown.
  assert res["headline"]["ar"] == {"score": 37.5, "num_tasks": 2, "complete": False,
                                   "score_stderr": None}
  assert res["headline"]["pll"]["score"] == pytest.approx(35.0)  # mean(40, 30)
  md = metrics.to_markdown(res)
  assert "| mode | CSQA | PIQA | Average |" in md
  assert "| ar | 25.0 | 50.0 | 37.5 ± – |" in md
  assert "| pll | 30.0 | 40.0 | 35.0 ± – |" in md
  assert "| PIQA | pll (pll6) | – | 0.7000 | – | 40.0 | – |" in md
  assert "step 123" in md


# ----- standard errors: an independent derivation -----------------------------------------------
# For 0/1 credits with mean p over n items the sample variance (ddof 1) is n·p(1−p)/(n−1), so the
# standard error of the mean is √(p(1−p)/(n−1)).


def _binary_se(p, n):
  return np.sqrt(p * (1 - p) / (n - 1))


def test_mean_stderr_of_binary_credits():
  rng = np.random.default_rng(0)
  for n in (2, 7, 1000):
    x = (rng.random(n) < 0.3).astype(float)
    assert metrics.mean_stderr(x) == pytest.approx(_binary_se(x.mean(), n), rel=1e-12)
  assert metrics.mean_stderr([1.0]) is None and metrics.mean_stderr([]) is None
  # Tie credits (1/m) are ordinary values: float64 two-pass variance by hand.
  x = np.array([1, 0, 0.5, 1 / 3, 1, 0])
  mu = sum(x) / 6
  assert metrics.mean_stderr(x) == pytest.approx(
      (sum((v - mu) ** 2 for v in x) / 5) ** 0.5 / 6 ** 0.5, rel=1e-12)


def test_stderr_matches_lm_eval():
  lm = pytest.importorskip("lm_eval.api.metrics", reason="lm-eval is not installed")
  rng = np.random.default_rng(1)
  x = (rng.random(50) < 0.6).astype(float)
  assert metrics.mean_stderr(x) == pytest.approx(lm.mean_stderr(list(x)), rel=1e-12)
  exs, acc = [], []
  for k, (n, p) in enumerate([(10, 0.3), (4, 0.5), (25, 0.8)]):
    ones = round(n * p)
    exs += [_ex("mmlu", 0, 4, f"s{k}")] * n
    acc += [1.0] * ones + [0.0] * (n - ones)
  ses = [_binary_se(round(n * p) / n, n) for n, p in [(10, 0.3), (4, 0.5), (25, 0.8)]]
  want = np.sqrt(sum(s * s for s in ses)) / 3
  assert metrics.task_stderr("mmlu", exs, acc) == pytest.approx(want, rel=1e-12)
  assert metrics.task_stderr("mmlu", exs, acc) == pytest.approx(
      lm.unweighted_mean_stderr(ses), rel=1e-12)
  # A non-macro task: the plain item standard error over all 39 items.
  assert metrics.task_stderr("piqa", exs, acc) == pytest.approx(
      _binary_se(np.mean(acc), 39), rel=1e-12)
  # A sub-task with one item has no standard error, hence neither has the macro average.
  assert metrics.task_stderr("mmlu", exs + [_ex("mmlu", 0, 4, "lone")], acc + [1.0]) is None


def test_summarise_reports_n_and_score_stderr():
  exs = [Example("arc_easy", "", str(i), {}, ("a", "b", "c", "d"), 0) for i in range(8)]
  acc = np.array([1, 1, 1, 0, 0, 0, 0, 0.5])
  out = metrics.summarise("arc_easy", exs, acc)
  se = np.std(acc, ddof=1) / np.sqrt(8)
  assert out["n"] == 8 and out["acc"] == pytest.approx(3.5 / 8)
  assert out["acc_stderr"] == pytest.approx(se)
  assert out["score_stderr"] == pytest.approx(100 * se / 0.75)  # chance 1/4
  res = {"tasks": {"arc_easy": {"modes": {"ar": out}},
                   "piqa": {"modes": {"ar": {"acc": 0.5, "score": 0.0, "score_stderr": 3.0}}}}}
  metrics.add_headline(res)
  h = res["headline"]["ar"]
  assert h["score_stderr"] == pytest.approx(np.hypot(100 * se / 0.75, 3.0) / 2)
  md = metrics.to_markdown(res)
  assert f"| ARC-E | ar | 8 | 0.4375 | {se:.4f} | {out['score']:.1f} | {100 * se / 0.75:.1f} |" in md
