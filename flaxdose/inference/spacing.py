"""The voxel-spacing policy: a model predicts only cases on the spacing it was trained on.

A run stores the voxel spacing of its training cases with every checkpoint
(`flaxdose.run.SPACING_KEY`, see `flaxdose.run.spacing_record`); `Model.predict` refuses a case
whose spacing is more than `SPACING_TOLERANCE` off it on any axis (`check_spacing`; a range of
training spacings is first widened, see `accepted_spacing`): the network learned dose fall-offs
in voxels, so on another spacing its dose is wrong in scale, not merely noisy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from flaxdose.data.case import Case
from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM
from flaxdose.errors import FlaxdoseError
from flaxdose.synthetic.anatomy import grid_for_scale

log = logging.getLogger("flaxdose")


# ---------------------------------------------------------------- voxel spacing
SPACING_TOLERANCE = 0.05  # relative, per axis


def describe_spacing(record: Mapping | Sequence[float]) -> str:
    """``4x4x3`` (mm) for one spacing (x, y, z) or a record whose min equals its max, ``3.5-4x3.5-4x2.5``
    for a range (per axis)."""
    if not isinstance(record, Mapping):
        record = {"min": record, "max": record}
    return "x".join(f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}" for lo, hi in zip(record["min"], record["max"]))


def accepted_spacing(record: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) voxel size (x, y, z) mm a model trained on the range `record` (`spacing_record`)
    accepts, per axis: ``min / sqrt(max / min) x (1 - SPACING_TOLERANCE)`` to ``max x sqrt(max / min)
    x (1 + SPACING_TOLERANCE)``, i.e. +-5 % around one training spacing; a range of them is first
    widened by half its own width in ratio. A model trained across spacings cannot tell them
    apart (it sees masks, not millimetres), so its error at the range's ends is already of the
    order of the range: OpenKBP trains on 1.95-5.08 mm in x and validates up to 5.42 mm."""
    lo, hi = np.asarray(record["min"], np.float64), np.asarray(record["max"], np.float64)
    widen = np.sqrt(hi / lo)
    return lo / widen * (1 - SPACING_TOLERANCE), hi * widen * (1 + SPACING_TOLERANCE)


def spacing_fits(spacing_mm: Sequence[float], record: Mapping) -> bool:
    """Whether a voxel size (x, y, z) mm lies within `accepted_spacing(record)` on every axis."""
    spacing = np.asarray(spacing_mm, np.float64)
    lo, hi = accepted_spacing(record)
    return bool(np.all(spacing >= lo) and np.all(spacing <= hi))


def field_of_view_shape(spacing_mm: Sequence[float]) -> tuple[int, int, int]:
    """The model grid shape (x, y, z) voxels that keeps the default field of view (`MODEL_SHAPE` x
    `MODEL_SPACING_MM`, 480 x 480 x 192 mm) at the voxel size `spacing_mm` (x, y, z) mm, rounded to
    whole voxels (at least 1): 8 x 8 x 6 mm gives 60 x 60 x 32."""
    return tuple(max(1, int(round(n * d / float(s)))) for n, d, s in zip(MODEL_SHAPE, MODEL_SPACING_MM, spacing_mm))


def dicom_grid(records: Iterable[Mapping | None]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape (x, y, z) voxels, spacing (x, y, z) mm) of the model grid a DICOM-RT export is read onto for
    models trained on the spacings `records` (`spacing_record`; None: not known).

    `MODEL_SHAPE` x `MODEL_SPACING_MM` when that spacing `spacing_fits` every known record; else
    the smallest spacing of the first record that fits them all (of the first record when none
    does: `check_spacing` then names the model it does not fit), on `field_of_view_shape`, so the
    patient's field of view stays the default one. `predict_dicom` and plan QA's ``--dicom`` both
    read on it.
    """
    known = [r for r in records if r is not None]
    if all(spacing_fits(MODEL_SPACING_MM, r) for r in known):
        return tuple(MODEL_SHAPE), tuple(float(v) for v in MODEL_SPACING_MM)
    candidates = [tuple(float(v) for v in r["min"]) for r in known]
    spacing = next((c for c in candidates if all(spacing_fits(c, r) for r in known)), candidates[0])
    return field_of_view_shape(spacing), spacing


def synthetic_scale(spacing_mm: Sequence[float]) -> float | None:
    """The ``--scale`` of `flaxdose.synth` (and ``data.scale`` of the built-in data) whose grid has the
    voxel size `spacing_mm` (x, y, z) mm: `MODEL_SPACING_MM` / spacing when that is one valid scale
    on every axis (`flaxdose.synthetic.anatomy.grid_for_scale`), else None."""
    scales = [d / float(s) for d, s in zip(MODEL_SPACING_MM, spacing_mm)]
    if max(scales) - min(scales) > 1e-6 * max(scales):
        return None
    scale = round(scales[0], 6)
    try:
        grid_for_scale(scale)
    except FlaxdoseError:
        return None
    return scale


def spacing_fixes(case: Case, record: Mapping) -> str:
    """How to give a model trained on the spacing range `record` a case like `case` on its spacing: the
    command that makes such data (synthetic data: its ``--scale``; DICOM: ``import_dicom --grid model`` with
    the spacing and the shape that keeps the field of view; OpenKBP: the training ``--downsample``)."""
    spacing = [float(v) for v in record["min"]]
    if case.meta.get("generator") == "flaxdose.synthetic":  # flaxdose.synthetic.generator.GENERATOR
        scale = synthetic_scale(spacing)
        if scale is None:
            return ("no synthetic grid scale gives that spacing (scales give 4x4x3 mm / scale); use a model trained "
                    "on synthetic data")
        style = case.style or "STYLE"
        return (f"synthetic data: python -m flaxdose.synth --style {style} --n N --out DIR --scale {scale:g} "
                f"(a run's built-in data: --config.data.scale={scale:g})")
    shape = field_of_view_shape(spacing)
    return (f"DICOM: python -m flaxdose.import_dicom SRC --out DATASET --like <the model's workdir>, which is "
            f"--grid model --model_spacing_mm {','.join(f'{v:g}' for v in spacing)} --model_shape "
            f"{','.join(str(n) for n in shape)} (this shape keeps the default 480x480x192 mm field of view), or predict "
            "and qa straight from the export with --dicom; OpenKBP: python -m flaxdose.convert_openkbp with the "
            "--downsample of the training data")


def check_spacing(case: Case, record: Mapping | None, model_name: str = "the model", what: str | None = None) -> None:
    """Raise FlaxdoseError when `case.spacing_mm` does not `spacing_fits` the training range `record`;
    nothing to check for `record` None. The error names the case as `what` (default: its id; a case
    read from a DICOM export: that folder) and the fixes (`spacing_fixes`)."""
    if record is None or spacing_fits(case.spacing_mm, record):
        return
    lo, hi = accepted_spacing(record)
    accepted = describe_spacing({"min": [round(float(v), 3) for v in lo], "max": [round(float(v), 3) for v in hi]})
    raise FlaxdoseError(
        f"{what or f'case {case.case_id!r}'} has voxel spacing {describe_spacing(case.spacing_mm)} mm "
        f"(x, y, z), but {model_name} was trained on {describe_spacing(record)} mm (it accepts {accepted}): its "
        f"dose would be wrong in scale. Give it data on the model's spacing: {spacing_fixes(case, record)}; or "
        "use a model trained at this spacing")


