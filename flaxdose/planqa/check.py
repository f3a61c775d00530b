"""Checking plans against their bands: flags, ranking, and coverage on held-out plans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from flaxdose.data.case import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.dicom_plans import grid_name
from flaxdose.metrics import OAR_METRICS
from flaxdose.planqa.calibration import Calibration, check_level
from flaxdose.planqa.ensemble import (
    Ensemble,
    EnsemblePrediction,
    case_metrics,
    check_same_anatomy,
    metric_key,
    split_key,
)

DEFAULT_LEVEL = 0.95  # two-sided: about 2.5 % of good plans lie above an OAR band, per metric
DEFAULT_TOLERANCE_GY = 1.0
COVERAGE_METRICS = ("D95", "D98")  # target metrics whose shortfall is flagged
ROW_COLUMNS = ("rank", "case_id", "structure", "metric", "role", "plan_gy", "predicted_gy", "lower_gy", "upper_gy",
               "sigma_gy", "members_gy", "position", "excess_gy", "excess_sigma", "flagged", "finding", "grid")
FINDINGS = {"oar": "OAR above the predicted band: possible further sparing",
            "coverage": "target coverage below the predicted band"}


def flag_rule(structure: str, metric: str, targets: Sequence[str]) -> str:
    """"oar" (flag when above), "coverage" (flag when below), or "" (reported, never flagged)."""
    if structure in targets:
        return "coverage" if metric in COVERAGE_METRICS else ""
    return "oar" if metric in OAR_METRICS else ""


def check_plan(plan: Case, prediction: EnsemblePrediction, calibration: Calibration, level: float = DEFAULT_LEVEL,
               tolerance_gy: float = DEFAULT_TOLERANCE_GY) -> list[dict]:
    """One row per DVH metric of `plan`: its value against its band, and the flag (the rules: `flaxdose.planqa`).

    Row keys: ROW_COLUMNS except ``rank``; ``grid`` names the grid the metrics were taken on (the plan's:
    its own RTDOSE grid for a DICOM export, `on_plan_grid`). ``position`` is "inside", "above", "below", or
    "n/a" (no band: the calibration lacks the metric, or the structure is empty).
    """
    check_same_anatomy(prediction, plan)
    grid = grid_name(plan)
    rows = []
    for key, value in case_metrics(plan).items():
        structure, metric = split_key(key)
        rule = flag_rule(structure, metric, plan.targets)
        band = calibration.band(key, prediction, level) if math.isfinite(value) else None
        row = {"case_id": plan.case_id, "structure": structure, "metric": metric, "grid": grid,
               "role": "target" if structure in plan.targets else "OAR", "plan_gy": value,
               "members_gy": " ".join(f"{v:.2f}" for v in prediction.member_metrics.get(key, ())),
               "position": "n/a", "excess_gy": math.nan, "excess_sigma": math.nan, "flagged": False, "finding": ""}
        if band is not None:
            row.update(predicted_gy=band.centre, lower_gy=band.lower, upper_gy=band.upper, sigma_gy=band.sigma,
                       position="above" if value > band.upper else "below" if value < band.lower else "inside")
            if rule:
                excess = value - band.upper if rule == "oar" else band.lower - value
                flagged = excess > tolerance_gy
                row.update(excess_gy=excess, excess_sigma=excess / band.sigma if band.sigma > 0 else math.nan,
                           flagged=flagged, finding=FINDINGS[rule] if flagged else "")
        rows.append(row)
    return rows


def rank_plans(rows: Sequence[dict]) -> list[dict]:
    """Plans ranked: flagged first, each group by its largest ``excess_gy`` (descending).

    Returns one dict per plan: rank (1 = check first), case_id, flagged, flags (the flagged
    metric keys, worst first), score_gy (largest excess_gy; NaN when no metric has one).
    """
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], []).append(row)
    plans = []
    for case_id, case_rows in by_case.items():
        scored = sorted((r for r in case_rows if math.isfinite(r["excess_gy"])), key=lambda r: -r["excess_gy"])
        flags = [metric_key(r["structure"], r["metric"]) for r in scored if r["flagged"]]
        plans.append({"case_id": case_id, "flagged": bool(flags), "flags": flags,
                      "score_gy": scored[0]["excess_gy"] if scored else math.nan})
    plans.sort(key=lambda p: (not p["flagged"], -p["score_gy"] if math.isfinite(p["score_gy"]) else math.inf))
    return [{"rank": i + 1, **p} for i, p in enumerate(plans)]


def coverage(rows: Sequence[dict]) -> dict[str, dict]:
    """Per metric key: n plans with a band, how many inside/above/below, coverage = inside / n."""
    out: dict[str, dict] = {}
    for row in rows:
        if row["position"] == "n/a":
            continue
        entry = out.setdefault(metric_key(row["structure"], row["metric"]),
                               {"n": 0, "inside": 0, "above": 0, "below": 0})
        entry["n"] += 1
        entry[row["position"]] += 1
    for entry in out.values():
        entry["coverage"] = entry["inside"] / entry["n"]
    return out


class QAResult(NamedTuple):
    rows: list[dict]  # check_plan rows of every plan, with "rank", in rank order
    plans: list[dict]  # rank_plans
    cases: dict[str, Case]  # case_id -> the plan
    predictions: dict[str, EnsemblePrediction]  # case_id -> its prediction
    level: float
    tolerance_gy: float


def run_qa(ensemble: Ensemble, calibration: Calibration, plans: Sequence[Case], level: float = DEFAULT_LEVEL,
           tolerance_gy: float = DEFAULT_TOLERANCE_GY, predictions: Sequence[EnsemblePrediction] | None = None,
           batch_size: int = 1, progress: bool = False) -> QAResult:
    """Check every plan against its predicted bands; `predictions` (one per plan) skips predicting.

    Raises FlaxdoseError for no plans, a plan without dose, or a calibration of other members.
    """
    if not plans:
        raise FlaxdoseError("no plans to check; the dataset split is empty")
    calibration.check_members(ensemble)
    check_level(level)
    if len({p.case_id for p in plans}) != len(plans):
        raise FlaxdoseError("plan ids repeat; give every plan a unique case_id")
    if predictions is None:
        predictions = ensemble.predict_cases(plans, batch_size, progress)
    rows = [row for plan, pred in zip(plans, predictions) for row in check_plan(plan, pred, calibration, level, tolerance_gy)]
    ranked = rank_plans(rows)
    rank = {p["case_id"]: p["rank"] for p in ranked}
    rows = sorted(({"rank": rank[r["case_id"]], **r} for r in rows), key=lambda r: r["rank"])  # stable: metric order kept
    return QAResult(rows, ranked, {p.case_id: p for p in plans}, {p.case_id: q for p, q in zip(plans, predictions)},
                    level, tolerance_gy)


