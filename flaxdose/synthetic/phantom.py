"""A fast analytic phantom: ellipsoid structures and a smooth dose fall-off around the PTV.

This is the tiny, instant data of the unit tests. The realistic built-in data (anatomy
variability, optimized VMAT dose in five planning styles) lives in `flaxdose.synthetic.generator`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flaxdose.data.case import PROSTATE_STRUCTURES, Case


def _ellipsoid(grid, centre, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def phantom_case(
    seed: int,
    index: int,
    shape=(32, 32, 16),
    spacing_mm=(4.0, 4.0, 5.0),
    prescription_gy: float = 70.0,
    falloff_mm: float = 15.0,
) -> Case:
    """One phantom patient; depends only on (seed, index). Geometry scales with `shape`.

    shape: (X, Y, Z) voxels; spacing_mm: (x, y, z) mm; origin (0, 0, 0). Structures are
    `PROSTATE_STRUCTURES`, laid out in LPS (bladder anterior-superior, rectum posterior,
    Femur_Head_L at +x). Dose (Gy) is `prescription_gy` inside the PTV and falls off as
    exp(-distance / `falloff_mm`) outside it, zero outside the body.
    """
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(n) for n in shape)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    c = np.array(shape, np.float32) / 2 + rng.uniform(-0.04, 0.04, 3) * np.array(shape)
    sx, sy, sz = shape
    body = _ellipsoid(grid, c, (0.45 * sx * rng.uniform(0.9, 1.05), 0.32 * sy * rng.uniform(0.9, 1.1), 2 * sz))
    ptv = _ellipsoid(grid, c, np.array([0.09 * sx, 0.08 * sy, 0.14 * sz]) * rng.uniform(0.8, 1.2, 3))
    bladder = _ellipsoid(grid, c + [0, -0.11 * sy, 0.12 * sz], np.array([0.12 * sx, 0.1 * sy, 0.15 * sz]) * rng.uniform(0.8, 1.3))
    rectum = _ellipsoid(grid, c + [0, 0.13 * sy, 0], (0.05 * sx, 0.05 * sy, 0.35 * sz)) & ~ptv
    femur_l = _ellipsoid(grid, c + [0.28 * sx, 0, -0.05 * sz], (0.07 * sx, 0.07 * sy, 0.12 * sz))
    femur_r = _ellipsoid(grid, c + [-0.28 * sx, 0, -0.05 * sz], (0.07 * sx, 0.07 * sy, 0.12 * sz))
    distance = ndimage.distance_transform_edt(~ptv, sampling=spacing_mm)
    dose = prescription_gy * np.exp(-distance / falloff_mm) * body
    masks = np.stack([ptv, bladder & ~ptv, rectum, femur_l, femur_r, body])
    return Case(
        case_id=f"phantom_{seed}_{index:03d}",
        structures=PROSTATE_STRUCTURES,
        masks=masks & body,
        dose=dose.astype(np.float32),
        spacing_mm=spacing_mm,
        prescription_gy=prescription_gy,
        style="phantom",
    )


def phantom_cases(seed: int, n: int, **kwargs) -> list[Case]:
    """Phantom patients 0..n-1 of `seed`; `kwargs` go to `phantom_case`."""
    return [phantom_case(seed, i, **kwargs) for i in range(n)]
