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
  assert res["headline"]["ar"] == {"score": 37.5, "num_tasks": 2, "complete": False}
  assert res["headline"]["pll"]["score"] == pytest.approx(35.0)  # mean(40, 30)
  md = metrics.to_markdown(res)
  assert "| mode | CSQA | PIQA | Average |" in md
  assert "| ar | 25.0 | 50.0 | 37.5 |" in md
  assert "| pll | 30.0 | 40.0 | 35.0 |" in md
  assert "step 123" in md
