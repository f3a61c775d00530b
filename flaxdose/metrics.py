"""Dose-comparison metrics (pure numpy): isodose Dice and DVH metrics.

Conventions (voxel-based, every voxel of a structure has equal weight):
- A voxel belongs to a structure when its mask is true (masks are rasterized at voxel centres).
- ``Dx`` is the dose that at least x % of the structure's volume receives: with the n voxel
  doses sorted ascending d(1) <= ... <= d(n), ``Dx = d(k)`` with ``k = floor(n (1 - x/100)) + 1``.
  So D2 is the near-maximum, D95/D98 the near-minimum used for target coverage.
- ``Dmean`` is the mean voxel dose; ``volume_cc`` the voxel count times the voxel volume.
- Isodose volume at level L: voxels with dose >= L * prescription (restricted to the body when
  a body mask is given). Dice of two empty volumes is defined as 1.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from flaxdose.errors import FlaxdoseError

ISODOSE_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 10 %..100 % of prescription
TARGET_METRICS = ("Dmean", "D2", "D95", "D98")
OAR_METRICS = ("Dmean", "D2")


def _same_grid(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise FlaxdoseError(
            f"{what}: shapes {a.shape} and {b.shape} differ; predictions and references must share one grid"
        )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean volumes; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    _same_grid(a, b, "dice")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def isodose_dice(
    pred: np.ndarray,
    ref: np.ndarray,
    prescription_gy: float,
    levels: Iterable[float] = ISODOSE_LEVELS,
    body: np.ndarray | None = None,
) -> dict[str, float]:
    """Dice of the isodose volumes of `pred` and `ref` at fractions `levels` of the prescription.

    Returns ``{"dice_10": ..., ..., "dice_100": ..., "mean": ...}`` (keys in percent).
    """
    pred, ref = np.asarray(pred, np.float32), np.asarray(ref, np.float32)
    _same_grid(pred, ref, "isodose_dice")
    if not prescription_gy > 0:
        raise FlaxdoseError(f"isodose_dice needs a positive prescription, got {prescription_gy}")
    inside = np.ones(pred.shape, bool) if body is None else np.asarray(body, bool)
    _same_grid(pred, inside, "isodose_dice body mask")
    out = {}
    for level in levels:
        threshold = level * prescription_gy
        out[f"dice_{round(level * 100)}"] = dice((pred >= threshold) & inside, (ref >= threshold) & inside)
    out["mean"] = float(np.mean(list(out.values())))
    return out


def dose_at_volume(doses: np.ndarray, percent: float) -> float:
    """The dose that at least `percent` % of the voxels receive (see module docstring)."""
    d = np.sort(np.asarray(doses, np.float64).ravel())
    if d.size == 0:
        return float("nan")
    k = int(np.floor(d.size * (1.0 - percent / 100.0)))  # 0-based index of d(k+1)
    return float(d[min(max(k, 0), d.size - 1)])


def dvh_metrics(dose: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float]) -> dict[str, float]:
    """Dmean, D2, D95, D98, Dmax, Dmin (Gy) and volume_cc of the dose inside `mask`.

    An empty mask gives NaN doses and volume 0.
    """
    dose, mask = np.asarray(dose), np.asarray(mask, bool)
    _same_grid(dose, mask, "dvh_metrics")
    values = dose[mask].astype(np.float64)
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    empty = values.size == 0
    return {
        "Dmean": float("nan") if empty else float(values.mean()),
        "D2": dose_at_volume(values, 2),
        "D95": dose_at_volume(values, 95),
        "D98": dose_at_volume(values, 98),
        "Dmax": float("nan") if empty else float(values.max()),
        "Dmin": float("nan") if empty else float(values.min()),
        "volume_cc": values.size * voxel_cc,
    }


def plan_dvh_metrics(
    dose: np.ndarray,
    masks: np.ndarray,
    structures: Sequence[str],
    spacing_mm: Sequence[float],
    targets: Sequence[str] = ("PTV",),
    skip: Sequence[str] = ("Body",),
) -> dict[str, float]:
    """The paper's DVH metrics per structure: targets Dmean/D2/D95/D98, OARs Dmean/D2.

    Keys are ``"<structure> <metric>"``, e.g. ``"PTV D95"`` or ``"Rectum Dmean"``.
    """
    out = {}
    for name, mask in zip(structures, masks):
        if name in skip:
            continue
        m = dvh_metrics(dose, mask, spacing_mm)
        for metric in TARGET_METRICS if name in targets else OAR_METRICS:
            out[f"{name} {metric}"] = m[metric]
    return out


def dvh_errors(
    pred: Mapping[str, float], ref: Mapping[str, float], prescription_gy: float
) -> dict[str, float]:
    """Prediction minus reference for every DVH metric, in Gy and in % of the prescription."""
    out = {}
    for key in ref:
        diff = pred[key] - ref[key]
        out[f"{key} err_gy"] = diff
        out[f"{key} err_pct"] = 100.0 * diff / prescription_gy
    return out


def cumulative_dvh(dose: np.ndarray, mask: np.ndarray, dose_gy: Sequence[float] | np.ndarray) -> np.ndarray:
    """Cumulative DVH: % of the structure's voxels with dose >= each value of `dose_gy`.

    Consistent with ``Dx``: ``cumulative_dvh(dose, mask, [Dx]) >= x`` for every x. An empty
    mask gives NaN volumes.
    """
    dose, mask = np.asarray(dose), np.asarray(mask, bool)
    _same_grid(dose, mask, "cumulative_dvh")
    grid = np.asarray(dose_gy, np.float64)
    values = np.sort(dose[mask].astype(np.float64))
    if values.size == 0:
        return np.full(grid.shape, np.nan)
    below = np.searchsorted(values, grid, side="left")  # voxels with dose < d
    return 100.0 * (values.size - below) / values.size


# ------------------------------------------------------------------ clinical metric specs
# DVH metrics as physicists write them in constraint tables, "<structure> <metric>[<unit>]":
#   Dmean, Dmax, Dmin                 dose (Gy; "[%]": % of the prescription)
#   Dmax[0.03cc]                      near-maximum: the dose the hottest 0.03 cc receives (Gy)
#   D95, D95%, D95[%], D2cc[Gy]       dose received by at least 95 % (or 2 cc) of the volume; the
#                                     bracket is the unit of the result: Gy (default) or % of Rx
#   V70Gy, V70Gy[%], V65Gy[cc], V95%  volume receiving at least 70 Gy (or 95 % of Rx): % of the
#                                     structure (default) or cc
# D at a volume follows the Dx convention of the module docstring: the k-th hottest voxel's dose
# with k = ceil(volume / voxel volume) (at least 1, at most every voxel); V counts voxels with dose
# >= the level (a voxel's whole volume counts: voxel-centre rasterization).
PROSTATE_METRIC_SPECS = (
    "PTV Dmean", "PTV D98", "PTV D95", "PTV D95[%]", "PTV D2", "PTV Dmax[0.03cc]",
    "Rectum Dmean", "Rectum Dmax[0.03cc]", "Rectum V70Gy[%]", "Rectum V65Gy[%]", "Rectum V50Gy[%]",
    "Bladder Dmean", "Bladder Dmax[0.03cc]", "Bladder V70Gy[%]", "Bladder V65Gy[%]",
    "Femur_Head_L Dmax[0.03cc]", "Femur_Head_L V50Gy[%]", "Femur_Head_R Dmax[0.03cc]", "Femur_Head_R V50Gy[%]",
)
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One parsed metric spec (see the section comment): `kind` "Dmean", "Dmax", "Dmin", "D" (dose at a
    volume) or "V" (volume at a dose); `volume` + `volume_unit` ("%" or "cc") for D; `level` +
    `level_unit` ("Gy" or "%" of Rx) for V; `unit` of the value: "Gy" or "%Rx" (doses), "%" or "cc"
    (volumes). `text` is the spec as written."""

    text: str
    structure: str
    kind: str
    unit: str
    volume: float | None = None
    volume_unit: str = ""
    level: float | None = None
    level_unit: str = ""

    @property
    def metric(self) -> str:
        """The metric part of the spec (without the structure), as written."""
        return self.text[len(self.structure):].strip()


def parse_metric_spec(text: str) -> MetricSpec:
    """Parse ``"<structure> <metric>"`` (e.g. ``"Rectum V70Gy[%]"``, ``"PTV D95[%]"``, ``"Dmax[0.03cc]"``
    after a structure). Raises FlaxdoseError naming the forms accepted."""
    text = " ".join(str(text).split())
    structure, _, metric = text.rpartition(" ")
    forms = ("Dmean, Dmax, Dmin, Dmax[0.03cc], D95, D95%, D2cc, D95[%] (in % of Rx), V70Gy, V95% (of Rx), "
             "V65Gy[cc]")
    if not structure:
        raise FlaxdoseError(f"metric spec {text!r} needs a structure and a metric, e.g. 'Rectum V70Gy[%]' ({forms})")
    m = re.fullmatch(r"([A-Za-z]+?)(" + _NUMBER + r"?)(%|cc|Gy)?(?:\[([^\]]*)\])?", metric)
    bad = FlaxdoseError(f"metric spec {text!r}: cannot read {metric!r}; write one of {forms}")
    if m is None:
        raise bad
    head, number, unit_after, bracket = m.group(1), m.group(3), m.group(4) or "", (m.group(5) or "").strip()
    bracket_low = bracket.lower().replace(" ", "")
    out_unit = {"": "", "gy": "Gy", "%": "%", "cc": "cc"}.get(bracket_low)
    if head in ("Dmean", "Dmax", "Dmin") and not number and not unit_after:
        volume = re.fullmatch(_NUMBER + r"cc", bracket_low)
        if head == "Dmax" and volume:  # Dmax[0.03cc]: the hottest 0.03 cc
            return MetricSpec(text, structure, "D", "Gy", float(volume.group(1)), "cc")
        if out_unit not in ("", "Gy", "%"):
            raise bad
        return MetricSpec(text, structure, head, "%Rx" if out_unit == "%" else "Gy")
    if head == "D" and number:
        if unit_after == "Gy" or out_unit not in ("", "Gy", "%"):
            raise bad
        value = float(number)
        if unit_after != "cc" and not 0 <= value <= 100:
            raise FlaxdoseError(f"metric spec {text!r}: a volume in % lies in 0..100")
        return MetricSpec(text, structure, "D", "%Rx" if out_unit == "%" else "Gy", value, unit_after or "%")
    if head == "V" and number:
        if unit_after not in ("Gy", "%") or out_unit not in ("", "%", "cc"):
            raise bad
        return MetricSpec(text, structure, "V", out_unit or "%", level=float(number), level_unit=unit_after)
    raise bad


def metric_value(spec: MetricSpec | str, dose: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float],
                 prescription_gy: float | None = None) -> float:
    """The value of one metric spec for `dose` (Gy, any axis order) inside `mask` (same shape) on voxels
    of `spacing_mm`; NaN for an empty mask. Raises FlaxdoseError when the spec needs a prescription
    (``[%]`` doses, ``V95%``) and none > 0 is given."""
    spec = parse_metric_spec(spec) if isinstance(spec, str) else spec
    dose, mask = np.asarray(dose), np.asarray(mask, bool)
    _same_grid(dose, mask, f"metric {spec.text!r}")
    needs_rx = spec.unit == "%Rx" or spec.level_unit == "%"
    if needs_rx and not (prescription_gy and prescription_gy > 0):
        raise FlaxdoseError(f"metric {spec.text!r} is in % of the prescription; give the prescription")
    values = np.sort(dose[mask].astype(np.float64))[::-1]  # hottest first
    n = values.size
    if n == 0:
        return float("nan")
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    if spec.kind == "V":
        level = spec.level * (prescription_gy / 100.0 if spec.level_unit == "%" else 1.0)
        count = int(np.count_nonzero(values >= level))
        return 100.0 * count / n if spec.unit == "%" else count * voxel_cc
    if spec.kind == "Dmean":
        gy = float(values.mean())
    elif spec.kind == "Dmax":
        gy = float(values[0])
    elif spec.kind == "Dmin":
        gy = float(values[-1])
    else:
        share = spec.volume / 100.0 * n if spec.volume_unit == "%" else spec.volume / voxel_cc
        k = int(np.ceil(share - 1e-9))
        gy = float(values[min(max(k, 1), n) - 1])
    return 100.0 * gy / prescription_gy if spec.unit == "%Rx" else gy


def spec_metrics(dose: np.ndarray, masks: np.ndarray, structures: Sequence[str], spacing_mm: Sequence[float],
                 prescription_gy: float | None, specs: Iterable[str | MetricSpec] = PROSTATE_METRIC_SPECS,
                 missing: str = "skip") -> dict[str, float]:
    """``{spec text: value}`` of every spec (`metric_value`) with `masks` (S, ...) in `structures` order.

    A spec of a structure not in `structures` is left out (`missing="skip"`) or refused
    (``"raise"``: FlaxdoseError naming the structures there are)."""
    out = {}
    for spec in specs:
        spec = parse_metric_spec(spec) if isinstance(spec, str) else spec
        if spec.structure not in structures:
            if missing == "raise":
                raise FlaxdoseError(f"metric {spec.text!r}: no structure {spec.structure!r} (there are "
                                    f"{list(structures)})")
            continue
        out[spec.text] = metric_value(spec, dose, masks[list(structures).index(spec.structure)], spacing_mm,
                                      prescription_gy)
    return out


def compare_specs(reference: np.ndarray, predicted: np.ndarray, masks: np.ndarray, structures: Sequence[str],
                  spacing_mm: Sequence[float], prescription_gy: float | None,
                  specs: Iterable[str | MetricSpec] = PROSTATE_METRIC_SPECS) -> list[dict]:
    """One row per spec (of a structure present): ``structure``, ``metric``, ``unit``, ``reference``,
    ``predicted``, ``difference`` (predicted - reference, in the spec's unit), both doses (Gy, same
    grid as `masks` (S, ...)) taken with the same masks."""
    ref = spec_metrics(reference, masks, structures, spacing_mm, prescription_gy, specs)
    pred = spec_metrics(predicted, masks, structures, spacing_mm, prescription_gy, specs)
    rows = []
    for text, value in ref.items():
        structure, _, metric = text.rpartition(" ")
        rows.append({"structure": structure, "metric": metric, "unit": spec_unit(text), "reference": value,
                     "predicted": pred[text], "difference": pred[text] - value})
    return rows


def spec_unit(spec: str | MetricSpec) -> str:
    """The unit of a spec's value: "Gy", "%Rx", "%" (of the structure) or "cc"."""
    return (parse_metric_spec(spec) if isinstance(spec, str) else spec).unit


# ------------------------------------------------------------------ OpenKBP scores
# The OpenKBP challenge's scores, computed as its `provided_code/dose_evaluation_class.py`
# (ababier/open-kbp) does. They use np.percentile (linear interpolation between voxel doses),
# not the Dx convention of the module docstring:
# - OARs: D_0.1_cc = np.percentile(doses, 100 - v / n * 100) with v = max(1, round(100 / voxel
#   volume in mm^3)) voxels in 0.1 cc and n the ROI's voxel count; mean = mean voxel dose.
#   An OAR of fewer than v voxels (under 0.1 cc) makes that percentile negative, which the
#   challenge code cannot evaluate (np.percentile raises); its maximum dose is used instead,
#   the dose that its hottest 0.1 cc (all of it) reaches.
# - Targets: D_99 = np.percentile(doses, 1), D_95 = np.percentile(doses, 5),
#   D_1 = np.percentile(doses, 99).
# - Only ROIs with at least one voxel are evaluated.
# - Dose score of one patient: sum |reference - prediction| / (number of possible-dose-mask
#   voxels), the prediction masked by the possible-dose mask first (the challenge's prediction
#   code saves it masked); the dataset's dose score is the mean over patients.
# - DVH score: the mean absolute difference over every (patient, ROI, metric) pooled together
#   (the mean over the whole table), not a mean of per-patient means. A NaN or infinite voxel in a
#   scored dose is refused (FlaxdoseError), never averaged away.
OPENKBP_OAR_NAMES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
OPENKBP_TARGET_NAMES = ("PTV56", "PTV63", "PTV70")
OPENKBP_OAR_METRICS = ("D_0.1_cc", "mean")
OPENKBP_TARGET_METRICS = ("D_99", "D_95", "D_1")
_OPENKBP_TARGET_PERCENTILES = {"D_99": 1.0, "D_95": 5.0, "D_1": 99.0}


def _finite(volume: np.ndarray, what: str) -> None:
    """Refuse NaN or inf in a dose that is scored: a NaN voxel would drop out of a mean (a better
    score) or poison it, and nanmean would drop a whole structure."""
    bad = ~np.isfinite(volume)
    if bad.any():
        raise FlaxdoseError(f"{what} holds {int(bad.sum())} NaN or infinite voxel(s) (first at index "
                            f"{tuple(int(i) for i in np.argwhere(bad)[0])}); a dose is scored only when every voxel "
                            "is a number: fix or rerun the prediction that wrote it")


def openkbp_dvh_metrics(
    dose: np.ndarray,
    masks: np.ndarray,
    structures: Sequence[str],
    voxel_dimensions_mm: Sequence[float],
    oars: Sequence[str],
    targets: Sequence[str],
) -> dict[str, float]:
    """OpenKBP DVH metrics (Gy), keys ``"<ROI> <metric>"`` (e.g. ``"PTV70 D_99"``).

    `dose` is (X, Y, Z) in Gy, `masks` (S, X, Y, Z) in `structures` order, any common axis
    order. ROIs not in `oars` or `targets`, and empty ROIs, are skipped. An OAR smaller than
    0.1 cc (where the challenge code would fail) gets its maximum dose as D_0.1_cc.
    """
    dose, masks = np.asarray(dose, np.float64), np.asarray(masks, bool)
    if masks.ndim != 4 or masks.shape[0] != len(structures):
        raise FlaxdoseError(f"masks must be (S, X, Y, Z) with S = {len(structures)}, got {masks.shape}")
    _same_grid(dose, masks[0], "openkbp_dvh_metrics")
    _finite(dose, "the dose for the OpenKBP DVH metrics")
    voxel_mm3 = float(np.prod(voxel_dimensions_mm))
    if not voxel_mm3 > 0:
        raise FlaxdoseError(f"voxel dimensions must be positive, got {list(voxel_dimensions_mm)}")
    voxels_in_tenth_cc = max(1.0, float(np.round(100.0 / voxel_mm3)))
    out = {}
    for name, mask in zip(structures, masks):
        if name not in oars and name not in targets:
            continue
        roi_dose = dose[mask]
        if roi_dose.size == 0:
            continue
        if name in oars:
            fraction = 100.0 - voxels_in_tenth_cc / roi_dose.size * 100.0
            hottest = roi_dose.max() if fraction < 0 else np.percentile(roi_dose, fraction)
            out[f"{name} D_0.1_cc"] = float(hottest)
            out[f"{name} mean"] = float(roi_dose.mean())
        else:
            for metric in OPENKBP_TARGET_METRICS:
                out[f"{name} {metric}"] = float(np.percentile(roi_dose, _OPENKBP_TARGET_PERCENTILES[metric]))
    return out


def openkbp_dose_score(pred: np.ndarray, ref: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """One patient's OpenKBP dose score (Gy): mean absolute error over the possible-dose mask."""
    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    mask = np.asarray(possible_dose_mask, bool)
    _same_grid(pred, ref, "openkbp_dose_score")
    _same_grid(pred, mask, "openkbp_dose_score possible-dose mask")
    _finite(pred, "the predicted dose")
    _finite(ref, "the reference dose")
    count = int(mask.sum())
    if count == 0:
        raise FlaxdoseError("the possible-dose mask is empty; the OpenKBP dose score is undefined")
    return float(np.sum(np.abs(ref - pred * mask)) / count)


def openkbp_case_scores(
    pred: np.ndarray,
    ref,
    oars: Sequence[str] = OPENKBP_OAR_NAMES,
    targets: Sequence[str] = OPENKBP_TARGET_NAMES,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """(dose score, reference DVH metrics, predicted DVH metrics) of one patient.

    `pred` is the predicted dose (X, Y, Z) in Gy on the reference's grid; `ref` is Case-like
    (``dose``, ``masks``, ``structures``, ``spacing_mm``, ``possible_dose_mask``). The
    prediction is masked by the possible-dose mask before its DVH metrics are taken.
    """
    if ref.dose is None or ref.possible_dose_mask is None:
        raise FlaxdoseError(
            f"reference case {getattr(ref, 'case_id', '?')!r} needs a dose and a possible-dose mask "
            "(OpenKBP cases from flaxdose.openkbp have both)"
        )
    dose_score = openkbp_dose_score(pred, ref.dose, ref.possible_dose_mask)
    masked = np.asarray(pred, np.float64) * np.asarray(ref.possible_dose_mask, bool)
    ref_m = openkbp_dvh_metrics(ref.dose, ref.masks, ref.structures, ref.spacing_mm, oars, targets)
    new_m = openkbp_dvh_metrics(masked, ref.masks, ref.structures, ref.spacing_mm, oars, targets)
    return dose_score, ref_m, new_m


def openkbp_scores(
    predictions: Sequence[np.ndarray],
    references: Sequence,
    oars: Sequence[str] = OPENKBP_OAR_NAMES,
    targets: Sequence[str] = OPENKBP_TARGET_NAMES,
) -> dict[str, float]:
    """The challenge's dose score and DVH score of predicted doses against reference cases.

    `references` are Case-like (see `openkbp_case_scores`), one per prediction. Returns
    ``{"dose_score": ..., "dvh_score": ..., "num_cases": ...}``.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references) or not references:
        raise FlaxdoseError(
            f"openkbp_scores needs one prediction per reference case, got {len(predictions)} and {len(references)}"
        )
    dose_scores, differences = [], []
    for pred, ref in zip(predictions, references):
        dose_score, ref_m, new_m = openkbp_case_scores(pred, ref, oars, targets)
        dose_scores.append(dose_score)
        differences += [abs(new_m[k] - ref_m[k]) for k in ref_m]
    if not differences:
        raise FlaxdoseError("no reference case has a voxel in an OAR or target; the OpenKBP DVH score is undefined")
    return {"dose_score": float(np.mean(dose_scores)), "dvh_score": float(np.mean(differences)),
            "num_cases": len(references)}
