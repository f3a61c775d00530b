"""Score models like the OpenKBP challenge: tables, submission CSVs, figures, a short report.

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

Definitions: `flaxdose.metrics.openkbp_scores` (the challenge's `dose_evaluation_class.py`).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_folder, check_writable
from flaxdose.metrics import OPENKBP_OAR_METRICS, OPENKBP_TARGET_METRICS
from flaxdose.openkbp import (
    OPENKBP_STRUCTURES,
    OPENKBP_TARGETS,
    Scores,
    predict_openkbp,
    score_predictions,
    write_submission,
)

# The names of the two models in tables, figures and submission folders.
NETWORK, DISTANCE_REFERENCE = "network", "distance-to-target"


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


def _figures(scores: Mapping[str, Scores], references: Sequence[Case], predictions: Mapping[str, Sequence[Case]],
             folder: Path, example_case: str | None) -> list[str]:
    from flaxdose import plots

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
    check_writable(out, overwrite)  # before the long work
    with atomic_folder(out, overwrite) as tmp:
        scores, predictions = {}, {}
        for name, model in models.items():
            predicted = predict_openkbp(model, references, factor, progress=progress)
            scores[name] = score_predictions(predicted, references)
            write_submission(predicted, tmp / "submission" / _folder_name(name))
            predictions[name] = predicted
        _write_rows([{"model": n, **p} for n, s in scores.items() for p in s.patients], tmp / "patients.csv")
        _write_rows([{"model": n, **m} for n, s in scores.items() for m in s.metrics], tmp / "dvh_metrics.csv")
        summary = {**summarize(scores), "downsample": int(factor), "note": note}
        summary["figures"] = _figures(scores, references, predictions, tmp, example_case)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "report.md").write_text(_markdown(summary, note))
    return summary
