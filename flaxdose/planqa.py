"""Plan QA with predicted DVH bands: an ensemble of trained models, calibrated bands, flags, a report.

Knowledge-based plan QA compares a plan's DVH metrics with what models trained on good plans
predict for the same anatomy. The prediction is an `Ensemble` of trained models (workdirs: one
setting trained with different seeds, or a sweep's runs of one setting), and every DVH metric
of `flaxdose.metrics.plan_dvh_metrics` (PTV Dmean/D2/D95/D98, OAR Dmean/D2) gets a band.

The band of one metric of one case, and where each number comes from:

- the members: each member's metric on its own predicted dose, x_1..x_M; their mean mu and
  variance v (ddof=1; 0 with one member): the ensemble's spread, from this case alone;
- a `Calibration` from held-out plans of the model's style (a calibration split: neither the
  models' training plans nor the cases whose coverage is reported): over its n cases the
  residuals r_i = reference_i - mu_i, their mean b (the model's bias) and variance s^2 (ddof=1),
  and the members' mean variance vbar = mean_i v_i;
- centre = mu + b, sigma^2 = lambda v + e^2 + s^2 / n, band = centre -/+ t_{n-1}((1 + level) / 2) sigma,
  with lambda = min(1, s^2 / vbar) and e^2 = max(s^2 - vbar, 0): the members' spread, scaled
  down where it overstates the held-out error (lambda < 1) and widened by a constant where it
  understates it (e^2 > 0), so that lambda v + e^2 averages s^2 over the calibration cases.

On average the band is therefore the textbook normal prediction interval for one new
observation when the mean and the variance are estimated from n samples, mean +- t_{n-1} s
sqrt(1 + 1/n) (Student t with n - 1 degrees of freedom; e.g. Hahn & Meeker, *Statistical
Intervals*, 1991, ch. 4); per case it is wider where the members disagree more than usual. It
assumes roughly normal residuals and a plan exchangeable with the calibration plans, which is
why `coverage` exists: the fraction of reference plans inside their bands on separate
held-out cases. No band is calibrated without that number (docs/plan_qa.md).

Flags (`check_plan`): an OAR metric (Dmean, D2) above the band's upper edge by more than
`tolerance_gy` (the OAR receives clearly more than predicted: possible further sparing), or a
target coverage metric (D95, D98) below the lower edge by more than `tolerance_gy`.
``excess_gy`` is that distance (negative inside the band), ``excess_sigma`` the same in units of
sigma; plans are ranked by their largest ``excess_gy`` (`rank_plans`). Other target metrics
(Dmean, D2) are reported against their bands but never flagged.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from flaxdose.data.case import Case, Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation import unique_names
from flaxdose.inference import Model, read_dicom_case, trained_cases
from flaxdose.io import atomic_folder, atomic_write_text
from flaxdose.metrics import OAR_METRICS, plan_dvh_metrics

log = logging.getLogger(__name__)

DEFAULT_LEVEL = 0.95  # two-sided: about 2.5 % of good plans lie above an OAR band, per metric
DEFAULT_TOLERANCE_GY = 1.0
COVERAGE_METRICS = ("D95", "D98")  # target metrics whose shortfall is flagged
CALIBRATION_FORMAT = "flaxdose-qa-calibration"
ALL_SPLITS = "all"
# Fewer held-out plans: the residual SD rests on so few values that the band's real coverage is
# uncertain (the 95 % band is already +-2.78 sigma at n=5, 2.26 at 10, from the t quantile with n-1 d.o.f.).
MIN_CALIBRATION_PLANS = 10
ROW_COLUMNS = ("rank", "case_id", "structure", "metric", "role", "plan_gy", "predicted_gy", "lower_gy", "upper_gy",
               "sigma_gy", "members_gy", "position", "excess_gy", "excess_sigma", "flagged", "finding", "grid")
FINDINGS = {"oar": "OAR above the predicted band: possible further sparing",
            "coverage": "target coverage below the predicted band"}


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
    """Several trained models predicting the same cases (see the module docstring).

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
        """The band of a case whose members give `mean` and `variance` (module docstring)."""
        from scipy import stats

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
    """Residual statistics of each metric over held-out reference plans (module docstring).

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
        dataset, seen = trained_cases(workdir)
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


def flag_rule(structure: str, metric: str, targets: Sequence[str]) -> str:
    """"oar" (flag when above), "coverage" (flag when below), or "" (reported, never flagged)."""
    if structure in targets:
        return "coverage" if metric in COVERAGE_METRICS else ""
    return "oar" if metric in OAR_METRICS else ""


def check_plan(plan: Case, prediction: EnsemblePrediction, calibration: Calibration, level: float = DEFAULT_LEVEL,
               tolerance_gy: float = DEFAULT_TOLERANCE_GY) -> list[dict]:
    """One row per DVH metric of `plan`: its value against its band, and the flag (module docstring).

    Row keys: ROW_COLUMNS except ``rank``; ``grid`` names the grid the metrics were taken on (the plan's:
    its own RTDOSE grid for a DICOM export, `on_plan_grid`). ``position`` is "inside", "above", "below", or
    "n/a" (no band: the calibration lacks the metric, or the structure is empty).
    """
    from flaxdose.inference import grid_name

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


# ---------------------------------------------------------------- plans in
def load_plans(data: str | Path, split: str = ALL_SPLITS) -> tuple[list[Case], list[str]]:
    """(plans with a dose, ids of those without) of a split of a dataset; split "all": every split.

    Raises FlaxdoseError for an empty split or a dataset whose plans all lack a dose.
    """
    dataset = Dataset.open(data)
    ids = list(dict.fromkeys(i for ids in dataset.splits.values() for i in ids)) if split == ALL_SPLITS \
        else dataset.split(split)
    if not ids:
        raise FlaxdoseError(f"split {split!r} of {dataset.root} is empty; choose a split with plans (or 'all')")
    cases = [dataset.load(i) for i in ids]
    planned = [c for c in cases if c.dose is not None]
    if not planned:
        raise FlaxdoseError(f"no plan of split {split!r} of {dataset.root} has a dose; QA checks planned doses")
    return planned, [c.case_id for c in cases if c.dose is None]


def read_dicom_plan(patient_dir: str | Path, ensemble: Ensemble, prescription_gy: float | None = None,
                    model_shape: Sequence[int] | None = None, model_spacing_mm: Sequence[float] | None = None,
                    aliases=None) -> Case:
    """One patient's DICOM-RT export (CT, RTSTRUCT, RTDOSE, RTPLAN) on the model grid, with the plan's dose.

    The grid is the one `flaxdose.inference.predict_dicom` predicts on (`inference.read_dicom_case`:
    the members' training spacing when the default does not fit it), unless given. `aliases`: a
    `flaxdose.dicom.AliasTable`. Raises FlaxdoseError when the export cannot be read, has no RTDOSE
    of this plan (saying why: none, or one on another frame of reference), no prescription, or a
    member cannot predict it (naming the folder).
    """
    return read_dicom_plans(patient_dir, ensemble, prescription_gy, model_shape, model_spacing_mm, aliases)[0]


def read_dicom_plans(patient_dir: str | Path, ensemble: Ensemble, prescription_gy: float | None = None,
                     model_shape: Sequence[int] | None = None, model_spacing_mm: Sequence[float] | None = None,
                     aliases=None) -> tuple[Case, Case]:
    """(the plan on the model grid, the plan on its own RTDOSE grid) of one patient's export.

    The first is what the members predict (`read_dicom_plan`); the second holds the plan's dose as
    exported (Gy, [x, y, z], no resampling) and the structures rasterized on that grid, as the
    planning system computes its DVH: QA's plan metrics come from it (`on_plan_grid`). Both have the
    same case id. Raises FlaxdoseError as `read_dicom_plan`.
    """
    from flaxdose.dicom import read_plan
    from flaxdose.inference import missing_dose_reason, one_dicom_plan

    entry = one_dicom_plan(patient_dir)
    if not entry.files.doses:
        raise FlaxdoseError(f"{missing_dose_reason(entry)}; plan QA compares the plan's dose with the prediction")
    case = read_dicom_case(ensemble.models, entry.folder, prescription_gy, read_dose=True, model_shape=model_shape,
                           model_spacing_mm=model_spacing_mm, aliases=aliases, plan=entry.files)
    own = read_plan(entry.files, ensemble.structures, grid="dose", prescription_gy=case.prescription_gy,
                    aliases=aliases, case_id=case.case_id)
    return case, own


def on_plan_grid(prediction: EnsemblePrediction, plan: Case) -> EnsemblePrediction:
    """`prediction` (made on the model grid) brought to `plan`'s grid (its own RTDOSE grid): every member's
    dose resampled trilinearly (0 outside the model grid), the metrics recomputed with `plan`'s masks, the
    mean dose as the prediction's case. Plan and prediction metrics are then both taken on the plan's
    grid, the numbers a planning system shows for the plan."""
    from flaxdose.data.grid import Grid
    from flaxdose.dicom import resample

    src = prediction.case
    src_grid, dst_grid = Grid(src.origin_mm, src.spacing_mm, src.shape), Grid(plan.origin_mm, plan.spacing_mm, plan.shape)
    doses = np.stack([resample(d, src_grid, dst_grid, order=1, cval=0.0) for d in prediction.member_doses])
    doses = doses.astype(np.float32)
    metrics = [case_metrics(plan, d) for d in doses]
    member_metrics = {k: np.array([m[k] for m in metrics], np.float64) for k in metrics[0]}
    mean = plan.replace(dose=doses.mean(axis=0), meta={**plan.meta, "predicted_by": src.meta.get("predicted_by", "")})
    return EnsemblePrediction(mean, doses, member_metrics)


# ---------------------------------------------------------------- report
def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def write_rows_csv(rows: Sequence[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _fmt(v) for k, v in row.items()} for row in rows)
    return path


def summary(result: QAResult, calibration: Calibration, note: str = "") -> dict:
    flagged = [p for p in result.plans if p["flagged"]]
    return {"note": note, "level": result.level, "tolerance_gy": result.tolerance_gy,
            "members": list(calibration.members), "calibration_cases": len(calibration.cases),
            "calibration_note": calibration.note, "num_plans": len(result.plans), "num_flagged": len(flagged),
            "plans": [{**p, "score_gy": None if math.isnan(p["score_gy"]) else p["score_gy"]} for p in result.plans],
            "inside_band": coverage(result.rows)}


def markdown(info: dict, figures: Mapping[str, str], skipped: Sequence[str]) -> str:
    level = round(100 * info["level"])
    lines = ["# Plan QA against predicted DVH bands", "", info["note"], "",
             f"Bands: {level} % (two-sided) from an ensemble of {len(info['members'])} models "
             f"({', '.join(info['members'])}), calibrated on {info['calibration_cases']} held-out plans "
             f"({info['calibration_note'] or 'no note'}). Flag: an OAR Dmean/D2 above its band, or PTV D95/D98 below, "
             f"by more than {info['tolerance_gy']:g} Gy. Method: flaxdose/planqa.py, docs/plan_qa.md.", "",
             f"**{info['num_flagged']} of {info['num_plans']} plans flagged.**", ""]
    if info["calibration_cases"] < MIN_CALIBRATION_PLANS:
        lines += [f"**Warning: {few_plans(info['calibration_cases'])}.**", ""]
    if skipped:
        lines += [f"Not checked (no dose): {', '.join(skipped)}.", ""]
    if info["num_flagged"]:
        lines += ["| rank | plan | worst excess (Gy) | flags |", "|---|---|---|---|"]
        lines += [f"| {p['rank']} | {p['case_id']} | {p['score_gy']:.2f} | {', '.join(p['flags'])} |"
                  for p in info["plans"] if p["flagged"]]
        lines.append("")
    lines += ["Fraction of these plans inside their band per metric (the band's coverage when the plans are "
              f"held-out plans of the calibration plans' style; nominal {level} %):", "",
              "| metric | inside | above | below | n |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['coverage']:.2f} | {v['above']} | {v['below']} | {v['n']} |" for k, v in info["inside_band"].items()]
    lines.append("")
    for case_id, png in figures.items():
        lines += [f"## {case_id}", "", f"![{case_id}]({png})", ""]
    return "\n".join(lines)


CLINICAL_COLUMNS = ("case_id", "structure", "metric", "unit", "plan", "predicted", "difference", "grid")


def clinical_rows(result: QAResult, specs: Sequence[str] | None = None) -> list[dict]:
    """Per plan, the metric specs (`flaxdose.metrics.PROSTATE_METRIC_SPECS` by default, e.g. ``Rectum V70Gy[%]``)
    of the plan's dose and of the ensemble's mean predicted dose, both on the plan's grid with its masks
    (`CLINICAL_COLUMNS`; no bands: these are not calibrated)."""
    from flaxdose.inference import grid_name
    from flaxdose.metrics import PROSTATE_METRIC_SPECS, compare_specs

    rows = []
    for plan in result.plans:
        case = result.cases[plan["case_id"]]
        predicted = result.predictions[plan["case_id"]].case.dose
        for row in compare_specs(case.dose, predicted, case.masks, case.structures, case.spacing_mm,
                                 case.prescription_gy, PROSTATE_METRIC_SPECS if specs is None else specs):
            rows.append({"case_id": case.case_id, **row, "plan": row["reference"], "grid": grid_name(case)})
    return rows


def write_report(result: QAResult, calibration: Calibration, out_dir: str | Path, *, skipped: Sequence[str] = (),
                 note: str = "", overwrite: bool = False, max_figures: int = 50,
                 specs: Sequence[str] | None = None) -> dict:
    """Write qa.csv, clinical_metrics.csv, summary.json, calibration.json, report.md and plan_<id>.png per
    flagged plan, atomically.

    qa.csv: one row per plan x DVH metric in rank order (ROW_COLUMNS; Gy). clinical_metrics.csv:
    `clinical_rows` of the metric `specs`. Figures: the plan's DVH curves over the members' DVH range
    and the metric bands (`flaxdose.plots.plan_bands`), for the first `max_figures` flagged plans.
    Returns the summary dict.
    """
    from flaxdose import plots

    info = summary(result, calibration, note)
    with atomic_folder(out_dir, overwrite) as tmp:
        write_rows_csv(result.rows, tmp / "qa.csv")
        with open(tmp / "clinical_metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLINICAL_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: _fmt(v) for k, v in row.items()} for row in clinical_rows(result, specs))
        calibration.save(tmp / "calibration.json")
        figures = {}
        for plan in [p for p in result.plans if p["flagged"]][:max_figures]:
            case_id = plan["case_id"]
            rows = [r for r in result.rows if r["case_id"] == case_id]
            png = f"plan_{case_id}.png"
            plots.plan_bands(result.cases[case_id], result.predictions[case_id].member_doses, rows, tmp / png)
            figures[case_id] = png
        info["figures"], info["skipped"] = list(figures.values()), list(skipped)
        (tmp / "summary.json").write_text(json.dumps(info, indent=1, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(markdown(info, figures, skipped))
    return info
