"""The paper's rules of thumb (dualjax/analysis/rules.py)."""

import pytest

from dualjax.analysis import rules


@pytest.mark.parametrize("r, lo, hi, point", [
    (1, 7 / 8, 63 / 64, None), (16, 7 / 8, 63 / 64, None),
    (32, 0.25, 1.0, 0.5), (64, 0.125, 0.5, 0.25), (128, 1 / 16, 1 / 4, 1 / 8)])
def test_rule_of_thumb(r, lo, hi, point):
  rule = rules.rule_of_thumb(r)
  assert (rule.lo, rule.hi) == pytest.approx((lo, hi))
  assert rule.point == (pytest.approx(point) if point else None)
  if point:
    assert rule.point * r == pytest.approx(16)


def test_no_rule_between_16_and_32():
  assert rules.rule_of_thumb(24) is None
  assert rules.agreement(None, 0.5, (0.4, 0.6)) == "no rule"


def test_agreement():
  rule = rules.rule_of_thumb(128)  # band [1/16, 1/4]
  assert rules.agreement(rule, 0.125, (0.1, 0.2)) == "inside"
  assert rules.agreement(rule, 0.4, (0.2, 0.6)) == "CI overlaps"
  assert rules.agreement(rule, 0.5, (0.4, 0.6)) == "outside"
  assert rules.agreement(rule, 0.26, (0.26, 0.3), tol=0.02) == "inside"
