"""Image geometry of DICOM series: axial orientation checks, the LPS [x, y, z] layout, resampling.

A DICOM image volume is indexed [frame, row, column]; voxel (f, j, i) lies at
``ImagePositionPatient + i * dc * r + j * dr * c + f * df * n`` (PS3.3 C.7.6.2.1.1) with r, c
the row and column direction cosines of ImageOrientationPatient, n = r x c, dc and dr the
column and row spacings (PixelSpacing is row spacing \\ column spacing) and df the frame
spacing. flaxdose keeps only axis-aligned series and stores them as [x, y, z] in LPS.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from flaxdose.data.grid import Grid
from flaxdose.errors import FlaxdoseError

AXIS_TOL = 1e-3  # direction cosines closer than this to an axis count as axis-aligned
INSIDE_TOL = 1e-6  # voxel units: a point this far beyond the first/last voxel centre is still inside


def axial_directions(iop: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and normal unit vectors (each (3,), entries -1, 0, 1) of an axial ImageOrientationPatient.

    `what` names the series in error messages. Raises FlaxdoseError for values that are not two
    direction cosines, and for oblique, tilted or non-axial orientations.
    """
    v = np.asarray(iop, np.float64)
    r, c = v[:3], v[3:]
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if not (nr > 0.5 and nc > 0.5):
        raise FlaxdoseError(f"{what}: ImageOrientationPatient {list(v)} is not two direction cosines")
    r, c = r / nr, c / nc
    snap = lambda u: np.where(np.abs(u) > 1 - AXIS_TOL, np.sign(u), np.where(np.abs(u) < AXIS_TOL, 0.0, np.nan))
    rs, cs = snap(r), snap(c)
    if (
        np.isnan(rs).any() or np.isnan(cs).any() or abs(rs).sum() != 1 or abs(cs).sum() != 1
        or rs[2] != 0 or cs[2] != 0 or np.dot(rs, cs) != 0
    ):
        raise FlaxdoseError(
            f"{what}: ImageOrientationPatient {[round(float(x), 4) for x in v]} is oblique or not axial; "
            "flaxdose reads axial series only (HFS, FFS, HFP, FFP, decubitus): re-export the series "
            "reconstructed axially, without gantry tilt"
        )
    return rs, cs, np.cross(rs, cs)


def lps_layout(shape_fji, ipp0, r, c, n, d_col, d_row, d_frame) -> tuple[list[int], list[int], Grid]:
    """How a volume indexed [frame, row, column] maps onto an [x, y, z] LPS grid.

    shape_fji: (frames, rows, columns); ipp0: (3,) mm position of voxel (0, 0, 0); r, c, n: the
    axis-aligned row, column and normal vectors (`axial_directions`); d_col, d_row, d_frame: mm.
    Returns (perm, flips, grid): `to_lps(volume, perm, flips)` gives the [x, y, z] volume on `grid`.
    """
    steps = {0: n * d_frame, 1: c * d_row, 2: r * d_col}
    perm, flips, origin, spacing = [], [], [], []
    for k in range(3):
        a = next(a for a, s in steps.items() if s[k] != 0)
        step, count = steps[a][k], shape_fji[a]
        perm.append(a)
        if step < 0:
            flips.append(a)
            origin.append(float(ipp0[k] + (count - 1) * step))
        else:
            origin.append(float(ipp0[k]))
        spacing.append(float(abs(step)))
    grid = Grid(tuple(origin), tuple(spacing), tuple(int(shape_fji[a]) for a in perm))
    return perm, flips, grid


def to_lps(vol_fji: np.ndarray, perm: Sequence[int], flips: Sequence[int]) -> np.ndarray:
    """The [frame, row, column] volume re-ordered to [x, y, z] (see `lps_layout`), contiguous."""
    if flips:
        vol_fji = np.flip(vol_fji, axis=tuple(flips))
    return np.ascontiguousarray(np.transpose(vol_fji, perm))


def inside_source(src: Grid, coords: np.ndarray, axis: int, order: int = 1) -> np.ndarray:
    """bool like `coords`: which positions (mm) along `axis` `resample` takes from `src` (not cval).

    Linear interpolation (order 1) needs a voxel centre on each side: positions from the first
    to the last voxel centre (within `INSIDE_TOL` voxels). Nearest neighbour (order 0), and any
    axis of a single voxel, reach half a voxel beyond the outer centres.
    """
    idx = (np.asarray(coords, np.float64) - src.origin_mm[axis]) / src.spacing_mm[axis]
    n = src.shape[axis]
    if order == 0 or n == 1:
        return (idx >= -0.5) & (idx <= n - 0.5)
    return (idx >= -INSIDE_TOL) & (idx <= n - 1 + INSIDE_TOL)


def resample(volume: np.ndarray, src: Grid, dst: Grid, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample an [x, y, z] volume from grid `src` onto grid `dst` (both axis-aligned LPS).

    order=1: trilinear interpolation between the 8 surrounding voxel centres; order=0: nearest.
    Points of `dst` outside `src` (see `inside_source`) get `cval`. Returns float32 `dst.shape`.
    Raises FlaxdoseError for an order other than 0 or 1.
    Uses scipy.ndimage.affine_transform with a diagonal matrix (the grids differ by scale and
    shift per axis only); mode "nearest" holds the edge value for the points that
    `inside_source` keeps within INSIDE_TOL beyond the outer centres, and along single-voxel axes.
    """
    if order not in (0, 1):
        raise FlaxdoseError(f"resample order must be 0 (nearest) or 1 (trilinear), got {order}")
    volume = np.asarray(volume, np.float32)
    scale = [dst.spacing_mm[a] / src.spacing_mm[a] for a in range(3)]
    offset = [(dst.origin_mm[a] - src.origin_mm[a]) / src.spacing_mm[a] for a in range(3)]
    out = ndimage.affine_transform(volume, scale, offset, output_shape=dst.shape, output=np.float32,
                                   order=order, mode="nearest", prefilter=False)
    valid = [inside_source(src, dst.coords(a), a, order) for a in range(3)]
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return np.where(inside, out, np.float32(cval)).astype(np.float32)


# Writers round positions (ImagePositionPatient, GridFrameOffsetVector) to 0.01 mm, a few to
# 0.1 mm: slices within this of a uniform grid lie on it (1.25 mm slices written -29.38, -28.12).
POSITION_ROUNDING_MM = 0.05


def fit_uniform(positions: np.ndarray) -> tuple[float, float, np.ndarray, float]:
    """Sorted, distinct positions (mm, >= 2) on their uniform grid: (first, spacing, slice numbers, worst).

    Slice numbers step by round(gap / median gap), so a missing slice is a step of 2 or more;
    first + spacing x number is the least-squares grid (to 1e-6 mm), `worst` the largest distance
    (mm) of a position from it. Uniform (up to rounding) means worst <= POSITION_ROUNDING_MM.
    """
    s = np.asarray(positions, np.float64)
    step = float(np.median(np.diff(s)))
    numbers = np.concatenate([[0], np.cumsum(np.rint(np.diff(s) / step))]).astype(np.int64)
    spacing, first = np.polyfit(numbers, s, 1) if numbers[-1] > 0 else (step, s[0])
    first, spacing = round(float(first), 6), round(float(spacing), 6)  # no float noise of the fit in the grid
    worst = float(np.abs(s - (first + spacing * numbers)).max())
    return first, spacing, numbers, worst
