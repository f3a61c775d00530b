"""Scoring one prediction against its reference: isodose Dice and DVH errors per case and model.

The metrics and report files are described in `flaxdose.evaluation.report`; conventions are those of
flaxdose.metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from flaxdose.data.case import Case, Dataset, each_case
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import ISODOSE_LEVELS, dvh_errors, isodose_dice, plan_dvh_metrics

DICE_KEYS = tuple(f"dice_{round(level * 100)}" for level in ISODOSE_LEVELS) + ("dice_mean",)
ERROR_SUFFIXES = ("err_gy", "err_pct", "abs_err_gy", "abs_err_pct")
ID_COLUMNS = ("case_id", "model", "style", "prescription_gy")


class Evaluation(NamedTuple):
    rows: list[dict]  # one per case x model (columns: `flaxdose.evaluation.report`)
    references: list[Case]  # the evaluated cases (without failed ones)
    predictions: dict[str, list[Case]]  # model name -> predicted cases, in reference order
    failed: dict[str, str] = {}  # case id -> why it could not be predicted or scored (never mutated)


# ---------------------------------------------------------------- per case
def check_same_grid(pred: Case, ref: Case) -> None:
    """Raise unless `pred` is a dose for the reference case on the reference's voxel grid."""
    where = f"prediction for case {ref.case_id!r}"
    if pred.case_id != ref.case_id:
        raise FlaxdoseError(f"{where} is case {pred.case_id!r}; give predictions in the order of the reference cases")
    if pred.dose is None or ref.dose is None:
        raise FlaxdoseError(f"case {ref.case_id!r}: both the prediction and the reference need a dose")
    if pred.dose.shape != ref.dose.shape or not np.allclose(pred.spacing_mm, ref.spacing_mm) \
            or not np.allclose(pred.origin_mm, ref.origin_mm):
        raise FlaxdoseError(
            f"{where} is on grid {pred.dose.shape} spacing {pred.spacing_mm} origin {pred.origin_mm}, the reference on "
            f"{ref.dose.shape} spacing {ref.spacing_mm} origin {ref.origin_mm}; resample the prediction onto the reference grid"
        )
    if not ref.prescription_gy > 0:
        raise FlaxdoseError(f"reference case {ref.case_id!r} has no prescription; set prescription_gy to evaluate")


def evaluate_case(pred: Case, ref: Case, model: str) -> dict:
    """One row: Dice per isodose level and DVH-metric values and errors (columns: `flaxdose.evaluation.report`).

    Raises FlaxdoseError for another grid, or a reference dose that is zero everywhere (no plan:
    scored, it would enter the means as Dice 0 and +100 % errors; non-finite doses are refused
    when a case is made)."""
    check_same_grid(pred, ref)
    if not np.max(ref.dose, initial=0.0) > 0:
        raise FlaxdoseError(f"the reference dose of case {ref.case_id!r} is zero everywhere: it is no plan and "
                            "cannot be scored; fix or drop the case from the dataset")
    rx = ref.prescription_gy
    dice = isodose_dice(pred.dose, ref.dose, rx, body=ref.dose_region())
    row = {"case_id": ref.case_id, "model": model, "style": ref.style, "prescription_gy": rx,
           **{k: v for k, v in dice.items() if k != "mean"}, "dice_mean": dice["mean"]}
    targets = ref.targets
    ref_m = plan_dvh_metrics(ref.dose, ref.masks, ref.structures, ref.spacing_mm, targets=targets)
    pred_m = plan_dvh_metrics(pred.dose, ref.masks, ref.structures, ref.spacing_mm, targets=targets)
    errors = dvh_errors(pred_m, ref_m, rx)
    for key in ref_m:
        row[f"{key} ref_gy"], row[f"{key} pred_gy"] = ref_m[key], pred_m[key]
        row[f"{key} err_gy"], row[f"{key} err_pct"] = errors[f"{key} err_gy"], errors[f"{key} err_pct"]
        row[f"{key} abs_err_gy"], row[f"{key} abs_err_pct"] = abs(row[f"{key} err_gy"]), abs(row[f"{key} err_pct"])
    return row


def evaluate_predictions(predictions: Mapping[str, Sequence[Case]], references: Sequence[Case]) -> list[dict]:
    """Rows for every model x case; `predictions[model]` lists one Case per reference, same order."""
    if not references:
        raise FlaxdoseError("no reference cases to evaluate; the split is empty")
    rows = []
    for model, cases in predictions.items():
        if len(cases) != len(references):
            raise FlaxdoseError(f"model {model!r} has {len(cases)} predictions for {len(references)} reference cases")
        rows += [evaluate_case(p, r, model) for p, r in zip(cases, references)]
    return rows


# ---------------------------------------------------------------- models and datasets
def split_ids(dataset: Dataset, split: str) -> list[str]:
    """The case ids of a split; FlaxdoseError for an empty one."""
    ids = dataset.split(split)
    if not ids:
        raise FlaxdoseError(f"split {split!r} of {dataset.root} is empty; choose a split with cases (e.g. 'test')")
    return ids


def load_references(dataset: Dataset, split: str, ids: Sequence[str] | None = None) -> list[Case]:
    """The planned cases `ids` (default: the whole split) of `dataset`; FlaxdoseError for a case file that cannot be
    read, a case without a reference dose, or a dataset of predictions."""
    cases = [dataset.load(i) for i in (split_ids(dataset, split) if ids is None else ids)]
    missing = [c.case_id for c in cases if c.dose is None]
    if missing:
        raise FlaxdoseError(f"cases {missing[:5]} of {dataset.root} have no reference dose; evaluate only planned cases")
    predicted = [c for c in cases if c.meta.get("predicted_by")]
    if predicted:  # a prediction scored against itself (or another model's) reads as a perfect Dice
        raise FlaxdoseError(f"{dataset.root} holds predictions (case {predicted[0].case_id!r} was predicted by "
                            f"{predicted[0].meta['predicted_by']!r}), not reference plans; evaluate against the "
                            "dataset the plans came from")
    return cases


def unique_names(names: Sequence[str]) -> list[str]:
    """Make model names distinct ("w", "w" -> "w", "w (2)"): they key the tables and legends."""
    out = []
    for name in names:
        candidate, k = name, 2
        while candidate in out:
            candidate, k = f"{name} ({k})", k + 1
        out.append(candidate)
    return out


def evaluate_models(models: Mapping[str, object], dataset: Dataset, split: str, batch_size: int = 1,
                    keep_going: bool = False) -> Evaluation:
    """Predict the split with every model and evaluate against its doses.

    `models` maps names to objects with ``predict(cases, batch_size=, progress=) -> cases``
    (`flaxdose.inference.Model`, or any other predictor). `keep_going`: a case that some model
    cannot predict, or that cannot be scored (a FlaxdoseError), is logged and left out for every
    model (the tests pair cases), and `Evaluation.failed` says why; otherwise the first such case
    stops the evaluation. Raises FlaxdoseError for an empty split, cases without a reference
    dose, or (`keep_going`) when no case could be evaluated.
    """
    if not keep_going:
        references = load_references(dataset, split)
        predictions = {name: m.predict(references, batch_size=batch_size, progress=True) for name, m in models.items()}
        return Evaluation(evaluate_predictions(predictions, references), references, predictions)

    def predict_and_score(case_id: str) -> tuple[Case, dict[str, Case], list[dict]]:
        reference = load_references(dataset, split, [case_id])[0]  # a missing or damaged file fails this case only
        done = {name: m.predict([reference], batch_size=batch_size)[0] for name, m in models.items()}
        return reference, done, [evaluate_case(p, reference, name) for name, p in done.items()]

    results, failed = each_case(split_ids(dataset, split), predict_and_score, action="evaluated",
                                what=f"split {split!r} of {dataset.root}")
    kept = [reference for reference, _, _ in results.values()]
    predictions = {name: [done[name] for _, done, _ in results.values()] for name in models}
    rows = [row for _, _, case_rows in results.values() for row in case_rows]
    rows.sort(key=lambda r: list(models).index(r["model"]))  # model by model, as evaluate_predictions orders them
    return Evaluation(rows, kept, predictions, failed)


