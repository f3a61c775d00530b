"""OpenKBP grids: the challenge's 128^3 grid made coarser for training, doses brought back, crop boxes.

A model trained on a coarser grid (`downsample_case`; the factor is the dataset's
`dataset_downsample` and the run's `training_downsample`) is scored on the challenge's own
128^3 grid against the original doses (`upsample_dose`); prediction crops each case to the
box around its possible-dose mask and structures (`crop_box`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from flaxdose.data.case import Case, Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.openkbp.format import OPENKBP_SHAPE


def dataset_downsample(dataset: Dataset) -> int:
    """The grid factor a converted OpenKBP dataset was written with (1: the challenge's grid)."""
    return int(dataset.manifest.get("grid", {}).get("downsample", 1))


def training_downsample(data_cfg) -> int:
    """The grid factor a run trained on: its config's ``data.downsample``.

    Checked against the manifest of the training dataset (``data.path``) when that is at
    hand: a model scored on another grid than it learned would give wrong scores, not an
    error. Raises FlaxdoseError when they disagree.
    """
    factor = int(data_cfg.get("downsample", 1))
    path = data_cfg.get("path") or ""
    if path and (Path(path) / "manifest.json").is_file():
        recorded = dataset_downsample(Dataset.open(path))
        if recorded != factor:
            raise FlaxdoseError(f"the run trained on {path}, a grid downsampled {recorded}x, but its config says "
                                f"data.downsample={factor}; retrain with --config.data.downsample={recorded}")
    check_factor(factor)
    return factor


def check_factor(factor: int) -> None:
    if not isinstance(factor, (int, np.integer)) or factor < 1 or OPENKBP_SHAPE[0] % factor:
        raise FlaxdoseError(f"the downsampling factor must be a whole divisor of 128 (1, 2, 4, ...), got {factor!r}")


def _blocks(volume: np.ndarray, factor: int) -> np.ndarray:
    """(X, Y, Z) -> (X/f, Y/f, Z/f, f^3): the fine voxels of every coarse voxel."""
    x, y, z = (n // factor for n in volume.shape)
    v = volume.reshape(x, factor, y, factor, z, factor).transpose(0, 2, 4, 1, 3, 5)
    return v.reshape(x, y, z, factor**3)


def downsample_case(case: Case, factor: int) -> Case:
    """`case` on the grid `factor` times coarser along every axis (128^3 -> 64^3 for 2).

    A coarse voxel covers f x f x f fine voxels. It belongs to a structure, and to the
    possible-dose mask, when any of its fine voxels does (small OARs never vanish). Its
    dose is the mean over its fine voxels inside the possible-dose mask (the reference dose
    is zero outside the mask, so a plain mean would dilute the dose at the skin); the CT is
    the plain mean. Spacing grows f-fold; the origin moves to the centre of the first coarse
    voxel. Factor 1 returns `case` itself. Raises FlaxdoseError unless f divides the grid.
    """
    if factor == 1:
        return case
    if any(n % factor for n in case.shape):
        raise FlaxdoseError(f"case {case.case_id!r}: grid {case.shape} is not divisible by the factor {factor}")
    inside = case.possible_dose_mask if case.possible_dose_mask is not None else np.ones(case.shape, bool)
    coarse_inside = _blocks(inside, factor).any(-1)
    dose = None
    if case.dose is not None:
        counts = _blocks(inside, factor).sum(-1)
        sums = _blocks(np.where(inside, case.dose, 0.0).astype(np.float64), factor).sum(-1)
        dose = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    spacing = np.asarray(case.spacing_mm)
    return case.replace(
        masks=np.stack([_blocks(m, factor).any(-1) for m in case.masks]),
        dose=dose,
        ct=None if case.ct is None else _blocks(case.ct, factor).mean(-1),
        possible_dose_mask=None if case.possible_dose_mask is None else coarse_inside,
        spacing_mm=tuple(spacing * factor),
        origin_mm=tuple(np.asarray(case.origin_mm) + (factor - 1) / 2 * spacing),
        meta={**case.meta, "downsample": int(factor)},
    )


def upsample_dose(coarse: np.ndarray, factor: int, possible_dose_mask: np.ndarray, order: int = 3) -> np.ndarray:
    """A coarse-grid dose (Gy) back on the fine grid of `possible_dose_mask`, zero outside the mask.

    The inverse of `downsample_case` for doses: spline interpolation of order `order`
    (scipy.ndimage.zoom, grid_mode: coarse voxel centres sit at the centres of their fine
    blocks) normalized by the interpolated coarse possible-dose mask, so coarse voxels
    outside the mask do not pull the dose at the skin towards zero. A fine voxel where that
    normalization is too weak gets its coarse voxel's value. Returns float32 (X, Y, Z).
    """
    fine = np.asarray(possible_dose_mask, bool)
    coarse = np.asarray(coarse, np.float64)
    if factor == 1:
        return (coarse * fine).astype(np.float32)
    if tuple(n * factor for n in coarse.shape) != fine.shape:
        raise FlaxdoseError(f"a {coarse.shape} dose upsampled {factor}x does not fit the grid {fine.shape}")
    weight = _blocks(fine, factor).any(-1)
    if not weight.any():
        return np.zeros(fine.shape, np.float32)
    # Outside the mask's bounding box (grown by one coarse voxel of zeros) both interpolated
    # volumes are zero, so interpolating inside it alone gives the same values, faster.
    points = np.argwhere(weight)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(points.min(0), points.max(0)))
    fine_box = tuple(slice(b.start * factor, min(b.stop, n) * factor) for b, n in zip(box, weight.shape))
    w, c = weight[box].astype(np.float64), coarse[box]
    zoom = lambda v: ndimage.zoom(v, factor, order=order, mode="nearest", grid_mode=True)
    numerator, denominator = zoom(c * w), zoom(w)
    nearest = c.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    dose = np.zeros(fine.shape, np.float32)
    dose[fine_box] = np.where(denominator > 0.25, numerator / np.maximum(denominator, 0.25), nearest).clip(0.0, None)
    return dose * fine


def crop_box(case: Case, minimum: Sequence[int] | None = None) -> tuple[slice, slice, slice]:
    """The box (x, y, z slices) around the possible-dose mask and every structure of `case`.

    Grown symmetrically (within the grid) to at least `minimum` voxels per axis, e.g. a
    model's window, so a network never sees a smaller input than it was trained on.
    """
    occupied = case.masks.any(axis=0)
    if case.possible_dose_mask is not None:
        occupied |= case.possible_dose_mask
    if not occupied.any():
        return tuple(slice(0, n) for n in case.shape)
    points = np.argwhere(occupied)
    box = []
    for lo, hi, n, want in zip(points.min(0), points.max(0) + 1, case.shape, minimum or (0, 0, 0)):
        size = min(max(hi - lo, int(want)), n)
        start = min(max(0, lo - (size - (hi - lo)) // 2), n - size)
        box.append(slice(int(start), int(start + size)))
    return tuple(box)
