"""The plan-QA ensemble: trained models predicting one case, and each DVH metric's member values.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxdose.data.case import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.scoring import unique_names
from flaxdose.inference.predictor import Model
from flaxdose.metrics import plan_dvh_metrics


def metric_key(structure: str, metric: str) -> str:
    """The key of `plan_dvh_metrics`: ``"<structure> <metric>"``."""
    return f"{structure} {metric}"


def split_key(key: str) -> tuple[str, str]:
    structure, metric = key.rsplit(" ", 1)
    return structure, metric


# ---------------------------------------------------------------- the ensemble
@dataclasses.dataclass(frozen=True, eq=False)
class EnsemblePrediction:
    """The members' predictions for one case.

    `case`: the input case with `dose` = the members' mean dose (Gy); `member_doses`: float32
    (M, X, Y, Z) Gy; `member_metrics`: metric key -> (M,) values (Gy) of `plan_dvh_metrics` on
    each member's dose with the case's masks.
    """

    case: Case
    member_doses: np.ndarray
    member_metrics: Mapping[str, np.ndarray]

    def mean(self, key: str) -> float:
        return float(np.mean(self.member_metrics[key]))

    def variance(self, key: str) -> float:
        """The members' variance (ddof=1), 0 for one member."""
        values = self.member_metrics[key]
        return float(np.var(values, ddof=1)) if len(values) > 1 else 0.0


def case_metrics(case: Case, dose: np.ndarray | None = None) -> dict[str, float]:
    """`plan_dvh_metrics` of `dose` (default: the case's own) with the case's masks and targets."""
    dose = case.dose if dose is None else dose
    return plan_dvh_metrics(dose, case.masks, case.structures, case.spacing_mm, targets=case.targets)


class Ensemble:
    """Several trained models predicting the same cases (see `flaxdose.planqa`).

    `predict` has `Model.predict`'s signature and returns the members' mean dose, so an
    Ensemble can stand wherever a model is evaluated (`flaxdose.evaluation.evaluate_models`).
    Raises FlaxdoseError for no models, or models that expect different structures.
    """

    def __init__(self, models: Sequence[Model]):
        self.models = list(models)
        if not self.models:
            raise FlaxdoseError("an ensemble needs at least one trained model; pass one or more workdirs")
        if len({m.structures for m in self.models}) > 1:
            raise FlaxdoseError("the ensemble's models expect different structures; combine models of one setting")
        self.members = tuple(unique_names([m.name for m in self.models]))
        self.name = f"ensemble of {len(self.models)}"

    @classmethod
    def load(cls, workdirs: Iterable[str | Path], which: str = "best") -> Ensemble:
        return cls([Model.load(w, which) for w in workdirs])

    @property
    def structures(self) -> tuple[str, ...]:
        return self.models[0].structures

    def predict_case(self, case: Case, batch_size: int = 1) -> EnsemblePrediction:
        doses = np.stack([m.predict([case], batch_size=batch_size)[0].dose for m in self.models])
        metrics = [case_metrics(case, d) for d in doses]
        member_metrics = {k: np.array([m[k] for m in metrics], np.float64) for k in metrics[0]}
        mean = case.replace(dose=doses.mean(axis=0), meta={**case.meta, "predicted_by": self.name})
        return EnsemblePrediction(mean, doses, member_metrics)

    def predict_cases(self, cases: Sequence[Case], batch_size: int = 1, progress: bool = False) -> list[EnsemblePrediction]:
        return [self.predict_case(c, batch_size) for c in tqdm(cases, desc=self.name, unit="case", disable=not progress)]

    def predict(self, cases: Sequence[Case], batch_size: int = 1, progress: bool = False) -> list[Case]:
        """The members' mean dose (Gy) for each case, as copies of the cases."""
        return [p.case for p in self.predict_cases(cases, batch_size, progress)]


def expand_workdirs(patterns: Iterable[str]) -> list[Path]:
    """Workdirs from paths or glob patterns (``SWEEP/runs/internal_a_n010_full_seed*``), in sorted order.

    Raises FlaxdoseError for a pattern that matches nothing.
    """
    out = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FlaxdoseError(f"no workdir matches {pattern!r}; give training workdirs or a glob of a sweep's runs")
        out += [Path(m) for m in matches]
    return out


# ---------------------------------------------------------------- checking plans
def check_same_anatomy(prediction: EnsemblePrediction, plan: Case) -> None:
    """Raise unless `prediction` was made for `plan`'s masks on `plan`'s grid (twins share anatomy)."""
    pred = prediction.case
    if plan.dose is None:
        raise FlaxdoseError(f"plan {plan.case_id!r} has no dose; QA compares a plan's dose with the prediction")
    same = (pred.structures == plan.structures and pred.shape == plan.shape
            and np.allclose(pred.spacing_mm, plan.spacing_mm) and np.allclose(pred.origin_mm, plan.origin_mm)
            and np.array_equal(pred.masks, plan.masks))
    if not same:
        raise FlaxdoseError(f"the prediction for {pred.case_id!r} is not of plan {plan.case_id!r}'s anatomy and grid; "
                            "predict the plan's own masks")


