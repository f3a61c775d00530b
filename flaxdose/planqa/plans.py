"""The plans to check: a dataset's cases, or DICOM plans read onto the ensemble's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import ALL_SPLITS, Case, Dataset, with_all_split
from flaxdose.data.grid import Grid
from flaxdose.dicom import ReadOptions, read_plan, resample
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.dicom_plans import missing_dose_reason, one_dicom_plan, read_dicom_case
from flaxdose.planqa.ensemble import Ensemble, EnsemblePrediction, case_metrics


# ---------------------------------------------------------------- plans in
def load_plans(data: str | Path, split: str = ALL_SPLITS) -> tuple[list[Case], list[str]]:
    """(plans with a dose, ids of those without) of a split of a dataset; split "all": every split.

    Raises FlaxdoseError for an empty split or a dataset whose plans all lack a dose.
    """
    dataset = with_all_split(Dataset.open(data), split)
    ids = dataset.split(split)
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
    entry = one_dicom_plan(patient_dir)
    if not entry.files.doses:
        raise FlaxdoseError(f"{missing_dose_reason(entry)}; plan QA compares the plan's dose with the prediction")
    case = read_dicom_case(ensemble.models, entry.folder, prescription_gy, read_dose=True, model_shape=model_shape,
                           model_spacing_mm=model_spacing_mm, aliases=aliases, plan=entry.files)
    own = read_plan(entry.files, ReadOptions(ensemble.structures, "dose", aliases=aliases,
                                             prescription_gy=case.prescription_gy), case.case_id)
    return case, own


def on_plan_grid(prediction: EnsemblePrediction, plan: Case) -> EnsemblePrediction:
    """`prediction` (made on the model grid) brought to `plan`'s grid (its own RTDOSE grid): every member's
    dose resampled trilinearly (0 outside the model grid), the metrics recomputed with `plan`'s masks, the
    mean dose as the prediction's case. Plan and prediction metrics are then both taken on the plan's
    grid, the numbers a planning system shows for the plan."""
    src = prediction.case
    src_grid, dst_grid = Grid(src.origin_mm, src.spacing_mm, src.shape), Grid(plan.origin_mm, plan.spacing_mm, plan.shape)
    doses = np.stack([resample(d, src_grid, dst_grid, order=1, cval=0.0) for d in prediction.member_doses])
    doses = doses.astype(np.float32)
    metrics = [case_metrics(plan, d) for d in doses]
    member_metrics = {k: np.array([m[k] for m in metrics], np.float64) for k in metrics[0]}
    mean = plan.replace(dose=doses.mean(axis=0), meta={**plan.meta, "predicted_by": src.meta.get("predicted_by", "")})
    return EnsemblePrediction(mean, doses, member_metrics)


