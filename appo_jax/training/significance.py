"""Is a change in held-out accuracy more than noise? Binomial intervals for the run summary.

An accuracy ``p = k / n`` over ``n`` answers (questions x runs) gets the Wilson score interval

    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),      z = 1.96 (95%)

and the change ``d = p2 - p1`` between two evaluations Newcombe's interval built from the two Wilson intervals
(l_i, u_i) (method 10 of Newcombe 1998, for independent samples; conservative for the same questions asked twice):

    [d - sqrt((p2 - l2)^2 + (u1 - p1)^2),  d + sqrt((u2 - p2)^2 + (p1 - l1)^2)]

A change is *beyond noise* when that interval excludes 0.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed over ``n`` trials ((0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(p1: float, n1: int, p2: float, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's interval of ``p2 - p1`` (module doc)."""
    l1, u1 = wilson_interval(p1, n1, z)
    l2, u2 = wilson_interval(p2, n2, z)
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def accuracy_change(before: float, after: float, n: int) -> dict:
    """``{"before", "after", "n", "before_ci95", "after_ci95", "change", "change_ci95", "verdict"}`` for two
    accuracies over ``n`` answers each; verdict ``rose`` / ``fell`` (beyond noise) or ``within noise``."""
    lo, hi = difference_interval(before, n, after, n)
    verdict = "rose" if lo > 0 else "fell" if hi < 0 else "within noise"
    return {"before": before, "after": after, "n": n, "before_ci95": wilson_interval(before, n),
            "after_ci95": wilson_interval(after, n), "change": after - before, "change_ci95": (lo, hi),
            "verdict": verdict}
