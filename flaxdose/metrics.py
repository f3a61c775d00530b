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
