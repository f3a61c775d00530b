"""The plan-QA report: rows CSV, clinical metrics CSV, summary JSON, Markdown and figures.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from flaxdose.inference.dicom_plans import grid_name
from flaxdose.io import atomic_folder
from flaxdose.metrics import PROSTATE_METRIC_SPECS, compare_specs
from flaxdose.planqa.calibration import MIN_CALIBRATION_PLANS, Calibration, few_plans
from flaxdose.planqa.check import ROW_COLUMNS, QAResult, coverage


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
    from flaxdose import plots  # matplotlib only when figures are drawn

    info = summary(result, calibration, note)
    with atomic_folder(out_dir, overwrite, "qa") as tmp:
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
