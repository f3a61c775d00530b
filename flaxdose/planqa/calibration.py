"""Calibrated bands: residuals of the ensemble on held-out plans turn its spread into prediction
intervals (the formula is in `flaxdose.planqa`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import stats

from flaxdose.data.case import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_write_text
from flaxdose.planqa.ensemble import (
    Ensemble,
    EnsemblePrediction,
    case_metrics,
    check_same_anatomy,
)
from flaxdose.run import Run

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "flaxdose-qa-calibration"
# Fewer held-out plans: the residual SD rests on so few values that the band's real coverage is
# uncertain (the 95 % band is already +-2.78 sigma at n=5, 2.26 at 10, from the t quantile with n-1 d.o.f.).
MIN_CALIBRATION_PLANS = 10
# ---------------------------------------------------------------- calibration and bands
class Band(NamedTuple):
    centre: float
    lower: float
    upper: float
    sigma: float


@dataclasses.dataclass(frozen=True)
class MetricCalibration:
    """One metric's held-out residuals: n cases, bias b, residual SD s, RMS member SD (all Gy)."""

    n: int
    bias_gy: float
    residual_sd_gy: float
    member_sd_gy: float

    @property
    def spread_scale(self) -> float:
        """lambda = min(1, s^2 / mean member variance): shrinks a spread that overstates the error."""
        vbar = self.member_sd_gy**2
        return min(1.0, self.residual_sd_gy**2 / vbar) if vbar > 0 else 1.0

    @property
    def extra_variance(self) -> float:
        """e^2 = max(s^2 - mean member variance, 0): the error the members' spread does not show."""
        return max(self.residual_sd_gy**2 - self.member_sd_gy**2, 0.0)

    def band(self, mean: float, variance: float, level: float) -> Band:
        """The band of a case whose members give `mean` and `variance` (the formula: `flaxdose.planqa`)."""
        check_level(level)
        sigma = math.sqrt(self.spread_scale * variance + self.extra_variance + self.residual_sd_gy**2 / self.n)
        half = float(stats.t.ppf(0.5 + level / 2, self.n - 1)) * sigma
        centre = mean + self.bias_gy
        return Band(centre, centre - half, centre + half, sigma)


def check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise FlaxdoseError(f"the band level must be between 0 and 1 (e.g. 0.9 for 90 %), got {level}")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-metric held-out residual statistics of one ensemble (`calibrate`); JSON via save/load."""

    metrics: Mapping[str, MetricCalibration]
    members: tuple[str, ...]
    cases: tuple[str, ...]
    note: str = ""

    def band(self, key: str, prediction: EnsemblePrediction, level: float) -> Band | None:
        """The band of metric `key` for a case, or None when the calibration has no such metric."""
        cal = self.metrics.get(key)
        mean = prediction.mean(key)
        if cal is None or not math.isfinite(mean):
            return None
        return cal.band(mean, prediction.variance(key), level)

    def check_members(self, ensemble: Ensemble) -> None:
        if tuple(ensemble.members) != tuple(self.members):
            raise FlaxdoseError(
                f"the calibration was made for the members {list(self.members)}, the ensemble has "
                f"{list(ensemble.members)}; calibrate this ensemble (--calibration_data) or load its members"
            )

    def to_json(self) -> str:
        return json.dumps({"format": CALIBRATION_FORMAT, "version": 1, "members": list(self.members),
                           "cases": list(self.cases), "note": self.note,
                           "metrics": {k: dataclasses.asdict(v) for k, v in self.metrics.items()}}, indent=1) + "\n"

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            saved = json.loads(Path(path).read_text())
            if saved.get("format") != CALIBRATION_FORMAT:
                raise ValueError("not a calibration file")
            metrics = {k: MetricCalibration(**v) for k, v in saved["metrics"].items()}
            return cls(metrics, tuple(saved["members"]), tuple(saved["cases"]), saved.get("note", ""))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FlaxdoseError(f"cannot read the QA calibration {path} ({e}); write one with --calibration_data") from None


def calibrate_predictions(predictions: Sequence[EnsemblePrediction], references: Sequence[Case],
                          members: Sequence[str], note: str = "") -> Calibration:
    """Residual statistics of each metric over held-out reference plans (the formula: `flaxdose.planqa`).

    `predictions[i]` is the ensemble's prediction for `references[i]` (same anatomy). A
    metric enters with the cases where both the reference and the members give a finite value;
    metrics with fewer than 2 such cases are left out. Raises FlaxdoseError when no metric has 2.
    """
    if len(predictions) != len(references):
        raise FlaxdoseError(f"{len(predictions)} predictions for {len(references)} calibration plans")
    residuals: dict[str, list[float]] = {}
    variances: dict[str, list[float]] = {}
    for prediction, ref in zip(predictions, references):
        check_same_anatomy(prediction, ref)
        for key, value in case_metrics(ref).items():
            mean = prediction.mean(key)
            if math.isfinite(value) and math.isfinite(mean):
                residuals.setdefault(key, []).append(value - mean)
                variances.setdefault(key, []).append(prediction.variance(key))
    metrics = {key: MetricCalibration(len(r), float(np.mean(r)), float(np.std(r, ddof=1)),
                                      float(np.sqrt(np.mean(variances[key]))))
               for key, r in residuals.items() if len(r) >= 2}
    if not metrics:
        raise FlaxdoseError("calibration needs at least 2 held-out plans with a reference dose (better 10 or more)")
    if len(references) < MIN_CALIBRATION_PLANS:
        log.warning("%s: the bands are wide and their coverage uncertain", few_plans(len(references)))
    return Calibration(metrics, tuple(members), tuple(r.case_id for r in references), note)


def few_plans(n: int) -> str:
    """The warning for a calibration on fewer than `MIN_CALIBRATION_PLANS` plans."""
    return (f"calibrated on {n} held-out plans, fewer than {MIN_CALIBRATION_PLANS}; calibrate on "
            f"{MIN_CALIBRATION_PLANS} or more for bands to rely on")


def check_held_out(workdirs: Iterable[str | Path], references: Sequence[Case]) -> None:
    """Raise FlaxdoseError when a calibration plan is one a member trained on (same case id, same masks
    and dose in the member's training data): its residuals would be too small and the bands too narrow."""
    for workdir in workdirs:
        dataset, seen = Run.open(workdir).trained_cases()
        seen = set(seen)
        for ref in references:
            if ref.case_id in seen:
                trained = dataset.load(ref.case_id)
                if np.array_equal(trained.masks, ref.masks) and np.array_equal(trained.dose, ref.dose):
                    raise FlaxdoseError(
                        f"calibration plan {ref.case_id!r} is one member {workdir} trained on ({dataset.root}); "
                        "calibrate on plans no member saw, e.g. a split they did not train on")


def calibrate(ensemble: Ensemble, references: Sequence[Case], note: str = "", batch_size: int = 1,
              progress: bool = False) -> Calibration:
    """Predict held-out reference plans with the ensemble and calibrate on them (`calibrate_predictions`)."""
    predictions = ensemble.predict_cases(references, batch_size, progress)
    return calibrate_predictions(predictions, references, ensemble.members, note)


