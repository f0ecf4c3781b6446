"""The paper's rules of thumb for the AR share lambda given r repetitions (§5.3, DESIGN.md §8).

r <= 16 (regular data): most weight on AR, lambda in [7/8, 63/64].
r >= 32 (data-constrained): the AR share should see about 16 repetitions (lambda * r ~ 16); more
than 32 AR repetitions overfit and fewer than 8 underfit, so the band is [8/r, 32/r] (capped at 1).
Between 16 and 32 the paper states no rule.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rule:
  lo: float
  hi: float
  point: float | None  # the rule's single value where it has one (16 / r)
  text: str


def rule_of_thumb(r: float) -> Rule | None:
  """The band of lambda the paper recommends at r repetitions, or None where it gives none."""
  if r <= 16:
    return Rule(7 / 8, 63 / 64, None, "λ ≈ 7/8–63/64 (r ≤ 16)")
  if r >= 32:
    return Rule(min(1.0, 8 / r), min(1.0, 32 / r), min(1.0, 16 / r),
                f"λ·r ≈ 16 → λ ≈ {16 / r:.3g} (band 8/r–32/r)")
  return None


def agreement(rule: Rule | None, lam_best: float, ci: tuple[float, float], tol: float = 0.0) -> str:
  """How a fitted optimum compares with the rule: inside, CI overlaps, outside, or no rule."""
  if rule is None:
    return "no rule"
  if rule.lo - tol <= lam_best <= rule.hi + tol:
    return "inside"
  if ci[0] <= rule.hi + tol and ci[1] >= rule.lo - tol:
    return "CI overlaps"
  return "outside"
