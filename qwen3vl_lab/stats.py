"""How sure is an accuracy measured on n questions? The Wilson score interval.

    wilson_interval(27, 30)   # -> (0.744, 0.965): 90% measured on 30 scenes is "somewhere in 74-97%"

66 questions give about +-7 points at 90%; every accuracy the toolkit prints or a notebook shows carries
this interval, so a 3-point difference on 30 scenes is not read as a result. Wilson, not the normal
approximation p +- 1.96 sqrt(p(1-p)/n): it stays inside [0, 1] and is honest at 0% and 100%.
"""

from __future__ import annotations

import math


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """(low, high) of the 95% (z=1.96) Wilson score interval for `correct` successes in `total` trials."""
    if total <= 0:
        raise ValueError(f"an interval needs at least one trial, got total={total}")
    if not 0 <= correct <= total:
        raise ValueError(f"correct={correct} must be between 0 and total={total}")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def format_accuracy(correct: int, total: int) -> str:
    """'90.0% (27/30, 95% CI 74-97%)'."""
    low, high = wilson_interval(correct, total)
    return f"{100 * correct / total:.1f}% ({correct}/{total}, 95% CI {100 * low:.0f}-{100 * high:.0f}%)"
