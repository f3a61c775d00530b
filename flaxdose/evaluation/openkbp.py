"""Score models like the OpenKBP challenge: predictions on its grid, tables, submission CSVs, figures, a report.

`predict_openkbp` predicts on the grid a model was trained on and brings the dose back to the
challenge's grid, masked by the possible-dose mask (the challenge's rules: a prediction is
multiplied by the mask before it is saved, `provided_code/network_functions.py`, and the dose
score averages over its voxels); `score_predictions` gives the challenge's scores per patient
and overall (`Scores`).

`evaluate_openkbp` predicts the reference cases with every model (anything with
``predict(cases) -> cases``: the network's `flaxdose.inference.Model`, the
`flaxdose.inference.baseline.DistanceBaseline`) on the grid it was trained on, brings the dose back to
the challenge's 128^3 grid, masks it with the possible-dose mask and writes into `out`:

- ``patients.csv``: model, case_id, dose score and DVH score of each patient (Gy);
- ``dvh_metrics.csv``: model, case_id, ROI, metric, reference, predicted, error (Gy);
- ``summary.json``: per model the dose score (mean over patients) and DVH score (mean
  absolute difference over every patient, ROI and metric), the mean absolute error of
  each ROI metric, and the figures;
- ``submission/<model>/pt_N.csv``: the predictions in the challenge's submission format;
- ``report.md``, ``dvh_errors.png`` (DVH-metric errors per structure and metric) and
  ``case_<id>.png`` (dose slices and DVHs of one patient, by default the one with the
  median dose score of the first model).

`write_score_tables` writes the two CSVs of any `Scores`; `subset_scores` reads them back and
gives the scores over a subset of the patients (e.g. those with a CT), the same way.

Definitions: `flaxdose.metrics.openkbp_scores` (the challenge's `dose_evaluation_class.py`).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from flaxdose.data.case import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_folder, check_writable
from flaxdose.metrics import OPENKBP_OAR_METRICS, OPENKBP_TARGET_METRICS, openkbp_case_scores
from flaxdose.openkbp import (
    OPENKBP_STRUCTURES,
    OPENKBP_TARGETS,
    crop_box,
    downsample_case,
    upsample_dose,
    write_submission,
)

# The names of the two models in tables, figures and submission folders.
NETWORK, DISTANCE_REFERENCE = "network", "distance-to-target"


def predict_openkbp(model, cases: Sequence[Case], factor: int = 1, progress: bool = False) -> list[Case]:
    """Each case's predicted dose on the challenge's grid, masked by its possible-dose mask.

    `model` is anything with ``predict(cases) -> cases`` (`flaxdose.inference.Model`, the
    `flaxdose.inference.baseline` reference); it sees each case on the grid `factor` times coarser it
    was trained on, cropped to `crop_box` (grown to the model's ``window``, if it has one:
    dose outside the possible-dose mask is never scored, so windows of empty air are
    skipped), and its dose is brought back with `upsample_dose`. Returns copies of `cases`
    whose `dose` is the prediction (float32 Gy).
    """
    out = []
    for case in tqdm(list(cases), desc="predicting", unit="patient", file=sys.stderr, disable=not progress):
        if case.possible_dose_mask is None:
            raise FlaxdoseError(f"case {case.case_id!r} has no possible-dose mask; convert it from OpenKBP CSVs")
        coarse = downsample_case(case, factor)
        box = crop_box(coarse, getattr(model, "window", None))
        origin = np.asarray(coarse.origin_mm) + np.asarray(coarse.spacing_mm) * [b.start for b in box]
        cropped = coarse.replace(masks=coarse.masks[(slice(None), *box)], possible_dose_mask=coarse.possible_dose_mask[box],
                                 dose=None if coarse.dose is None else coarse.dose[box],
                                 ct=None if coarse.ct is None else coarse.ct[box], origin_mm=tuple(origin))
        predicted = np.zeros(coarse.shape, np.float32)
        predicted[box] = model.predict([cropped])[0].dose
        dose = upsample_dose(predicted, factor, case.possible_dose_mask)
        out.append(case.replace(dose=dose, meta={**case.meta, "predicted_by": getattr(model, "name", "model")}))
    return out


class Scores(NamedTuple):
    """The challenge's scores of one model, with the tables they come from."""

    summary: dict  # dose_score (mean over patients), dvh_score (pooled), num_cases
    patients: list[dict]  # case_id, dose_score, dvh_score (that patient's metrics), num_metrics
    metrics: list[dict]  # case_id, roi, metric, reference_gy, predicted_gy, error_gy (predicted - reference)


def score_predictions(predictions: Sequence[Case], references: Sequence[Case]) -> Scores:
    """Dose score and DVH score as `flaxdose.metrics.openkbp_scores`, per patient and overall."""
    if len(predictions) != len(references) or not references:
        raise FlaxdoseError(f"need one prediction per reference case, got {len(predictions)} and {len(references)}")
    patients, metrics = [], []
    for pred, ref in zip(predictions, references):
        if pred.case_id != ref.case_id:
            raise FlaxdoseError(f"prediction {pred.case_id!r} is scored against {ref.case_id!r}; keep one order")
        dose_score, ref_m, new_m = openkbp_case_scores(pred.dose, ref)
        errors = [new_m[k] - ref_m[k] for k in ref_m]
        patients.append({"case_id": ref.case_id, "dose_score": dose_score,  # no ROI voxels: no DVH score (None)
                         "dvh_score": float(np.mean(np.abs(errors))) if errors else None,
                         "num_metrics": len(errors)})
        metrics += [{"case_id": ref.case_id, "roi": k.split(" ")[0], "metric": k.split(" ")[1],
                     "reference_gy": ref_m[k], "predicted_gy": new_m[k], "error_gy": e} for k, e in zip(ref_m, errors)]
    if not metrics:
        raise FlaxdoseError("no reference case has a voxel in an OAR or target; the OpenKBP DVH score is undefined")
    summary = {
        "dose_score": float(np.mean([p["dose_score"] for p in patients])),
        "dvh_score": float(np.mean([abs(m["error_gy"]) for m in metrics])),
        "num_cases": len(patients),
    }
    return Scores(summary, patients, metrics)


def _folder_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_") or "model"


def metric_order(keys: Sequence[str]) -> list[str]:
    """"ROI metric" keys in the challenge's ROI order, then its metric order."""
    rank = {m: i for i, m in enumerate(OPENKBP_OAR_METRICS + OPENKBP_TARGET_METRICS)}
    roi_rank = {s: i for i, s in enumerate(OPENKBP_STRUCTURES)}
    split = lambda k: k.split(" ", 1)
    return sorted(set(keys), key=lambda k: (roi_rank.get(split(k)[0], 99), split(k)[0], rank.get(split(k)[1], 99)))


def summarize(scores: Mapping[str, Scores]) -> dict:
    """Per model: the two scores and the mean absolute error of each ROI metric (Gy)."""
    out = {"models": list(scores), "scores": {}, "dvh_metric_mae_gy": {}}
    for name, s in scores.items():
        out["scores"][name] = dict(s.summary)
        errors: dict[str, list[float]] = {}
        for row in s.metrics:
            errors.setdefault(f"{row['roi']} {row['metric']}", []).append(abs(row["error_gy"]))
        out["dvh_metric_mae_gy"][name] = {k: float(np.mean(errors[k])) for k in metric_order(errors)}
    return out


def _write_rows(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


PATIENTS_CSV, METRICS_CSV = "patients.csv", "dvh_metrics.csv"


def write_score_tables(scores: Mapping[str, Scores], folder: str | Path) -> None:
    """``patients.csv`` and ``dvh_metrics.csv`` of `scores` (model name -> `Scores`) in `folder` (made if
    missing; files overwritten): one row per model and patient, one per model, patient, ROI and metric."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_rows([{"model": n, **p} for n, s in scores.items() for p in s.patients], folder / PATIENTS_CSV)
    _write_rows([{"model": n, **m} for n, s in scores.items() for m in s.metrics], folder / METRICS_CSV)


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise FlaxdoseError(f"{path} is missing; score the models first (python -m flaxdose.evaluate --openkbp, "
                            "or flaxdose.evaluation.openkbp.write_score_tables)") from None


def subset_scores(folder: str | Path, case_ids: Sequence[str] | None = None) -> dict[str, dict]:
    """The challenge's scores of every model over the patients `case_ids` (None: every patient), from the
    ``patients.csv`` and ``dvh_metrics.csv`` of an evaluation folder (`evaluate_openkbp`, `write_score_tables`).

    Per model (in the files' order): ``dose_score`` (mean of the patients' dose scores, Gy), ``dvh_score``
    (mean absolute error over every patient, ROI and metric of the subset, Gy; None without a metric),
    ``num_cases``, and per "ROI metric" key (challenge order) ``metric_mean_error_gy`` (signed mean of
    predicted - reference) and ``metric_mae_gy`` (mean absolute error). Over every patient these are the
    numbers of ``summary.json``. Raises FlaxdoseError for missing files, or `case_ids` a model did not score.
    """
    folder = Path(folder)
    patients, metrics = _read_rows(folder / PATIENTS_CSV), _read_rows(folder / METRICS_CSV)
    models = list(dict.fromkeys(row["model"] for row in patients))
    out = {}
    for model in models:
        scored = [row["case_id"] for row in patients if row["model"] == model]
        wanted = scored if case_ids is None else list(case_ids)
        missing = [i for i in wanted if i not in scored]
        if missing or not wanted:
            raise FlaxdoseError(f"{folder / PATIENTS_CSV}: model {model!r} scored {len(scored)} patients, not "
                                f"{missing[:5] or 'an empty subset'}; choose patients it scored")
        chosen = set(wanted)
        doses = [float(row["dose_score"]) for row in patients if row["model"] == model and row["case_id"] in chosen]
        errors: dict[str, list[float]] = {}
        for row in metrics:
            if row["model"] == model and row["case_id"] in chosen:
                errors.setdefault(f"{row['roi']} {row['metric']}", []).append(float(row["error_gy"]))
        pooled = [abs(e) for values in errors.values() for e in values]
        keys = metric_order(errors)
        out[model] = {
            "dose_score": float(np.mean(doses)),
            "dvh_score": float(np.mean(pooled)) if pooled else None,
            "num_cases": len(chosen),
            "metric_mean_error_gy": {k: float(np.mean(errors[k])) for k in keys},
            "metric_mae_gy": {k: float(np.mean(np.abs(errors[k]))) for k in keys},
        }
    return out


def _figures(scores: Mapping[str, Scores], references: Sequence[Case], predictions: Mapping[str, Sequence[Case]],
             folder: Path, example_case: str | None) -> list[str]:
    from flaxdose import plots  # matplotlib only when figures are drawn

    errors = {name: {} for name in scores}
    for name, s in scores.items():
        for row in s.metrics:
            errors[name].setdefault(f"{row['roi']} {row['metric']}", []).append(row["error_gy"])
    keys = metric_order([k for e in errors.values() for k in e])
    is_target = lambda k: k.split(" ")[0] in OPENKBP_TARGETS
    plots.dvh_error_violins(errors, [k for k in keys if is_target(k)], [k for k in keys if not is_target(k)],
                            folder / "dvh_errors.png", unit="Gy")
    ids = [c.case_id for c in references]
    if example_case is None:  # the first model's median patient: a typical case
        first = next(iter(scores.values())).patients
        example_case = first[int(np.argsort([p["dose_score"] for p in first])[(len(first) - 1) // 2])]["case_id"]
    if example_case not in ids:
        raise FlaxdoseError(f"example case {example_case!r} is not among the evaluated patients {ids[:10]}")
    i = ids.index(example_case)
    case_png = f"case_{example_case}.png"
    plots.case_figure(references[i], {name: p[i] for name, p in predictions.items()}, folder / case_png)
    return ["dvh_errors.png", case_png]


def _markdown(summary: dict, note: str) -> str:
    lines = ["# OpenKBP scores", "", note, "",
             "Dose score: mean absolute dose error inside the possible-dose mask, averaged over patients. "
             "DVH score: mean absolute error of the challenge's DVH metrics (OARs D_0.1_cc and mean, targets "
             "D_99, D_95, D_1) over every patient, ROI and metric. Both in Gy, lower is better.", "",
             "| model | patients | dose score (Gy) | DVH score (Gy) |", "|---|---|---|---|"]
    for name in summary["models"]:
        s = summary["scores"][name]
        lines.append(f"| {name} | {s['num_cases']} | {s['dose_score']:.3f} | {s['dvh_score']:.3f} |")
    keys = metric_order([k for m in summary["dvh_metric_mae_gy"].values() for k in m])
    lines += ["", "Mean absolute error of each DVH metric (Gy):", "",
              "| ROI metric | " + " | ".join(summary["models"]) + " |", "|---|" + "---|" * len(summary["models"])]
    for k in keys:
        cells = [f"{summary['dvh_metric_mae_gy'][m].get(k, float('nan')):.2f}" for m in summary["models"]]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_openkbp(models: Mapping[str, object], references: Sequence[Case], out: str | Path, factor: int = 1,
                     *, overwrite: bool = False, example_case: str | None = None, note: str = "",
                     progress: bool = True) -> dict:
    """Predict, score and report every model on `references` (challenge-grid cases); returns the summary.

    `factor` is the downsampling of the grid the models were trained on (1: the challenge's
    own 128^3 grid). Everything is written atomically into `out`.
    """
    if not models or not references:
        raise FlaxdoseError("evaluate_openkbp needs at least one model and one reference case")
    missing = [c.case_id for c in references if c.dose is None or c.possible_dose_mask is None]
    if missing:
        raise FlaxdoseError(f"cases {missing[:5]} lack a dose or a possible-dose mask; score planned OpenKBP cases")
    check_writable(out, overwrite, "evaluation")  # before the long work
    with atomic_folder(out, overwrite, "evaluation") as tmp:
        scores, predictions = {}, {}
        for name, model in models.items():
            predicted = predict_openkbp(model, references, factor, progress=progress)
            scores[name] = score_predictions(predicted, references)
            write_submission(predicted, tmp / "submission" / _folder_name(name))
            predictions[name] = predicted
        write_score_tables(scores, tmp)
        summary = {**summarize(scores), "downsample": int(factor), "note": note}
        summary["figures"] = _figures(scores, references, predictions, tmp, example_case)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "report.md").write_text(_markdown(summary, note))
    return summary
