"""How well the check tells worse plans from good ones: a per-plan flag score and its ROC curve.

The flag threshold of `check_plan` is the band's nominal level L (with a fixed tolerance): a
metric is flagged when it lies more than `tolerance_gy` beyond the edge of its level-L band.
With the band of `flaxdose.planqa` (centre c, sigma, Student t with n - 1 degrees of freedom,
n the metric's calibration plans) an OAR metric x is flagged at level L exactly when

    z = (x - c - tolerance) / sigma > t_{n-1}((1 + L) / 2)   <=>   2 sf_{n-1}(z) < 1 - L

(for a target coverage metric z = (c - x - tolerance) / sigma; sf is the t distribution's survival
function). A plan is flagged when any of its metrics is, so its *flag score*

    s = -log10(min over its flaggable metrics of 2 sf_{n-1}(z))

puts every level on one axis: the plan is flagged at level L exactly when s > -log10(1 - L)
(level 0.95: s > 1.30; 0.99: s > 2). Sweeping that threshold over every score gives the ROC curve
of the check (`roc_curve`: true-positive rate = worse plans flagged, false-positive rate = good
plans flagged) and its area (`roc_auc`), the probability that a random worse plan scores above a
random good one (Hanley & McNeil, Radiology 143:29, 1982).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from flaxdose.errors import FlaxdoseError
from flaxdose.planqa.calibration import Calibration, check_level
from flaxdose.planqa.check import DEFAULT_TOLERANCE_GY, flag_rule
from flaxdose.planqa.ensemble import metric_key


def level_threshold(level: float) -> float:
    """The flag-score threshold of band level `level` (0 < level < 1): -log10(1 - level)."""
    check_level(level)
    return -math.log10(1.0 - level)


def threshold_level(threshold: float) -> float:
    """The band level of a flag-score threshold: 1 - 10**-threshold (inverse of `level_threshold`)."""
    return 1.0 - 10.0 ** -threshold


def flag_scores(rows: Sequence[dict], calibration: Calibration,
                tolerance_gy: float = DEFAULT_TOLERANCE_GY) -> dict[str, float]:
    """Per case id, the plan's flag score s (formula above): flagged at level L exactly when s > -log10(1 - L).

    `rows` are `check_plan` rows of any level (centre and sigma do not depend on it); `calibration` is the
    one they were checked against (its per-metric n gives the t distribution). Rows without a band or
    that are never flagged (target Dmean/D2) do not count; a plan with none scores -inf (never
    flagged). A metric with sigma 0 scores +inf when beyond its centre by more than the tolerance.
    Raises FlaxdoseError when a row's metric is not in the calibration.
    """
    out: dict[str, float] = {}
    for row in rows:
        out.setdefault(row["case_id"], -math.inf)
        if row["position"] == "n/a":
            continue
        metric, target = row["metric"], row["role"] == "target"
        if not flag_rule(row["structure"], metric, (row["structure"],) if target else ()):
            continue
        key = metric_key(row["structure"], metric)
        cal = calibration.metrics.get(key)
        if cal is None:
            raise FlaxdoseError(f"the calibration has no metric {key!r}; score the rows against the calibration "
                                "they were checked with")
        beyond = (row["plan_gy"] - row["predicted_gy"] if not target else row["predicted_gy"] - row["plan_gy"])
        beyond -= tolerance_gy
        sigma = row["sigma_gy"]
        if sigma > 0:
            tail = 2.0 * float(stats.t.sf(beyond / sigma, cal.n - 1))
            score = -math.log10(tail) if tail > 0 else math.inf
        else:
            score = math.inf if beyond > 0 else -math.inf
        out[row["case_id"]] = max(out[row["case_id"]], score)
    return out


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, float).ravel(), np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise FlaxdoseError(f"{s.size} scores for {y.size} labels; give one label per score")
    if np.isnan(s).any():
        raise FlaxdoseError("a score is NaN; score every plan (a plan never flagged scores -inf)")
    if not np.isin(y, (0, 1)).all():
        raise FlaxdoseError("labels must be 0 (good plan) or 1 (worse plan)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise FlaxdoseError("an ROC curve needs both worse (label 1) and good (label 0) plans")
    return s, y


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score, as `sklearn.metrics.roc_curve` (without dropping
    collinear points): thresholds descending, a plan counted positive when its score >= the threshold; the
    first point (0, 0) has threshold +inf (nothing flagged), the last is (1, 1).

    scores: (N,) floats, higher = more suspect (-inf allowed, not NaN); labels: (N,) 0 = good, 1 = worse plan.
    E.g. scores [0.1, 0.4, 0.35, 0.8], labels [0, 0, 1, 1]: fpr [0, 0, 0.5, 0.5, 1], tpr [0, 0.5, 0.5, 1, 1],
    thresholds [inf, 0.8, 0.4, 0.35, 0.1] (sklearn's documentation example). Raises FlaxdoseError for
    mismatched lengths, NaN scores, labels other than 0/1, or only one class.
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # the last index of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    fpr = np.r_[0.0, fp / (~y).sum()]
    tpr = np.r_[0.0, tp / y.sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under `roc_curve` (trapezoids): P(a worse plan scores above a good one) + P(tie) / 2, the
    Mann-Whitney U / (n_worse n_good). Example of `roc_curve`: 0.75. Raises as `roc_curve`."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def operating_point(scores: Sequence[float], labels: Sequence[int], level: float) -> tuple[float, float]:
    """(fpr, tpr) of the check at band level `level`: the fractions of good and of worse plans with a score
    above `level_threshold(level)`, i.e. flagged by `check_plan` at that level. Raises as `roc_curve`."""
    s, y = _check(scores, labels)
    flagged = s > level_threshold(level)
    return float(flagged[~y].mean()), float(flagged[y].mean())
