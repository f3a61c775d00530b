"""Contours to masks: voxel-centre rasterization of closed planar contours (the DVH calculators' rule).

In plane: a voxel belongs to an ROI when its centre lies inside the polygon (even-odd rule)
or on its boundary (within `EDGE_EPS` voxel); several contours of one ROI on one plane
combine by XOR (inner contours are holes). A contour of one or two points encloses nothing
and keeps only the voxel centres it passes through.

Across planes: each of an ROI's contour planes is a slab centred on the plane, as thick as
the ROI's smallest distance between two of its planes (dicompyler-core's plane thickness),
never thinner than the slice spacing of the structure set (the CT's, or without a CT the
median distance between all contour planes); a single-plane ROI gets the slice spacing. A
voxel centre at height z takes the ROI's nearest plane when z lies within its slab. An ROI
contoured on every other slice therefore fills the slices between, and ROIs contoured on
different plane sets never hide each other.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from flaxdose.data.grid import Grid
from flaxdose.dicom.geometry import inside_source
from flaxdose.errors import FlaxdoseError

EDGE_EPS = 1e-3  # voxel units: a centre this close to a contour edge lies on it
SLAB_EPS_MM = 1e-3  # a voxel centre this far beyond a slab's face still belongs to it
PLANE_TOL_MM = 0.05  # contour heights closer than this are one plane (and a contour flatter than this is planar)
ON_SLICE_TOL = 0.25  # with a CT, contours must lie within this fraction of a slice spacing of a slice
MAX_WINDOW_VOXELS = 200_000_000  # an ROI larger than this on a case grid's lattice has damaged coordinates


def fill_polygon(px: np.ndarray, py: np.ndarray, nx: int, ny: int, x0: int = 0, y0: int = 0) -> np.ndarray:
    """Voxel-centre rasterization of one closed polygon given in (fractional) voxel indices.

    The lattice is the voxel centres i = x0 .. x0 + nx - 1, j = y0 .. y0 + ny - 1 (offsets let
    one fill a window that reaches beyond a grid). Returns bool (nx, ny): True where the
    centre (i, j) lies inside the polygon (even-odd rule) or within `EDGE_EPS` voxels of its
    boundary. A polygon of one or two points yields the centres it passes through.
    """
    px, py = np.asarray(px, np.float64), np.asarray(py, np.float64)
    mask = np.zeros((nx, ny), bool)
    if px.size == 0 or not (np.isfinite(px).all() and np.isfinite(py).all()):
        return mask
    x1, y1, x2, y2 = px, py, np.roll(px, -1), np.roll(py, -1)
    j_lo, j_hi = max(y0, int(np.ceil(py.min()))), min(y0 + ny - 1, int(np.floor(py.max())))
    if px.size >= 3 and j_hi >= j_lo and px.max() >= x0 and px.min() <= x0 + nx - 1:
        rows = np.arange(j_lo, j_hi + 1, dtype=np.float64)
        ya, yb = y1[:, None], y2[:, None]
        cross = ((ya <= rows) & (yb > rows)) | ((yb <= rows) & (ya > rows))
        e, r = np.nonzero(cross)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1[e] + (rows[r] - y1[e]) * (x2[e] - x1[e]) / (y2[e] - y1[e])
        toggle = np.clip(np.floor(xint).astype(np.int64) + 1 - x0, 0, nx)
        acc = np.zeros((rows.size, nx + 1), np.int32)
        np.add.at(acc, (r, toggle), 1)
        inside = (np.cumsum(acc[:, :nx], axis=1) % 2).astype(bool)  # (rows, nx)
        mask[:, j_lo - y0 : j_hi - y0 + 1] = inside.T

    def mark(i, j):
        ok = (i >= x0) & (i < x0 + nx) & (j >= y0) & (j < y0 + ny)
        mask[i[ok] - x0, j[ok] - y0] = True

    # boundary: lattice points on the edges (a contour traced through voxel centres)
    dx, dy = x2 - x1, y2 - y1
    for flat in (True, False):
        sel = (np.abs(dx) >= np.abs(dy)) if flat else (np.abs(dx) < np.abs(dy))
        a1, b1, da, db = (x1, y1, dx, dy) if flat else (y1, x1, dy, dx)
        a_min, a_max = (x0, x0 + nx - 1) if flat else (y0, y0 + ny - 1)
        a1, b1, da, db = a1[sel], b1[sel], da[sel], db[sel]
        keep = da != 0
        a1, b1, da, db = a1[keep], b1[keep], da[keep], db[keep]
        if a1.size == 0:
            continue
        lo = np.maximum(np.ceil(np.minimum(a1, a1 + da) - EDGE_EPS), a_min).astype(np.int64)
        hi = np.minimum(np.floor(np.maximum(a1, a1 + da) + EDGE_EPS), a_max).astype(np.int64)
        counts = np.clip(hi - lo + 1, 0, None)
        total = int(counts.sum())
        if total == 0 or total > 50_000_000:
            continue
        edge = np.repeat(np.arange(a1.size), counts)
        a = lo[edge] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
        b = b1[edge] + (a - a1[edge]) * db[edge] / da[edge]
        bi = np.rint(b).astype(np.int64)
        ok = np.abs(b - bi) <= EDGE_EPS
        mark(*((a[ok], bi[ok]) if flat else (bi[ok], a[ok])))
    # vertices (contours of one point, zero-length edges)
    vi, vj = np.rint(px), np.rint(py)
    on = (np.abs(px - vi) <= EDGE_EPS) & (np.abs(py - vj) <= EDGE_EPS)
    mark(vi[on].astype(np.int64), vj[on].astype(np.int64))
    return mask


@dataclasses.dataclass
class RoiContours:
    """One ROI's closed contours by plane, ready to rasterize.

    planes_z: (P,) sorted plane heights (mm); polygons[p]: the (K, 2) x/y (mm) polygons on
    plane p (combined by XOR); slab_mm: the thickness of every plane's slab (None: one slice
    of the grid it is rasterized on; only for a single plane without any slice spacing).
    """

    planes_z: np.ndarray
    polygons: list[list[np.ndarray]]
    slab_mm: float | None

    @property
    def contour_count(self) -> int:
        """Number of polygons over all planes."""
        return sum(len(p) for p in self.polygons)


def _cluster(zs: np.ndarray) -> np.ndarray:
    """Plane heights of sorted contour heights: runs closer than PLANE_TOL_MM merge (their mean)."""
    if zs.size == 0:
        return zs
    breaks = np.nonzero(np.diff(zs) > PLANE_TOL_MM)[0] + 1
    return np.array([run.mean() for run in np.split(zs, breaks)])


def contour_planes(
    contours: dict[str, list[tuple[float, np.ndarray]]], slices_z: np.ndarray | None, slice_spacing: float | None,
    path,
) -> dict[str, RoiContours]:
    """Each ROI's contours on its planes, with its slab thickness (see the module docstring).

    contours: ROI name -> [(z mm, (K, 2) x/y mm)]; slices_z: the sorted CT slice positions (mm)
    or None without a CT; slice_spacing: the CT's slice spacing (mm). With a CT every contour
    must lie on a slice (within a quarter slice), else FlaxdoseError: the structure set does
    not belong to that CT.
    """
    all_z = np.sort(np.array([z for cs in contours.values() for z, _ in cs], np.float64))
    if slices_z is not None:
        planes, spacing = np.asarray(slices_z, np.float64), float(slice_spacing)
    else:
        planes = _cluster(all_z)
        spacing = float(np.median(np.diff(planes))) if planes.size > 1 else None
    out = {}
    for name, cs in contours.items():
        by_plane: dict[int, list[np.ndarray]] = defaultdict(list)
        for z, pts in cs:
            p = int(np.abs(planes - z).argmin())
            if slices_z is not None and abs(planes[p] - z) > ON_SLICE_TOL * spacing:
                raise FlaxdoseError(
                    f"{path}: a contour of {name} lies at z = {z:.2f} mm, {abs(planes[p] - z):.2f} mm from the "
                    f"nearest CT slice; contours must lie on CT slices: check that the structure set belongs "
                    "to this CT"
                )
            by_plane[p].append(pts)
        order = sorted(by_plane)
        own = np.diff(planes[order])
        slab = float(own.min()) if own.size else spacing
        if slab is not None and spacing is not None:
            slab = max(slab, spacing)
        out[name] = RoiContours(planes[order], [by_plane[p] for p in order], slab)
    return out


def plane_of_slices(roi: RoiContours, zs: np.ndarray, slice_mm: float) -> np.ndarray:
    """int (len(zs),): the ROI's plane each height z takes, -1 where z lies in no slab.

    `slice_mm` (the grid's z spacing) stands in for a missing slab thickness.
    """
    zs = np.asarray(zs, np.float64)
    if roi.planes_z.size == 0:
        return np.full(zs.shape, -1)
    half = (roi.slab_mm if roi.slab_mm is not None else slice_mm) / 2 + SLAB_EPS_MM
    nearest = np.abs(zs[:, None] - roi.planes_z[None, :]).argmin(axis=1)
    return np.where(np.abs(zs - roi.planes_z[nearest]) <= half, nearest, -1)


def rasterize(roi: RoiContours, grid: Grid, lo=(0, 0, 0), hi=None) -> np.ndarray:
    """bool (hi - lo) mask of one ROI on the voxel centres of `grid` with indices lo <= (i, j, k) < hi.

    By default the whole grid, (X, Y, Z); indices outside the grid's shape extend its lattice
    (same origin and spacing), so a window can hold the parts of an ROI beyond the grid.
    """
    lo = [int(v) for v in lo]
    hi = [int(v) for v in (grid.shape if hi is None else hi)]
    nx, ny, nz = (h - l for l, h in zip(lo, hi))
    mask = np.zeros((nx, ny, nz), bool)
    zs = grid.origin_mm[2] + grid.spacing_mm[2] * np.arange(lo[2], hi[2], dtype=np.float64)
    planes = plane_of_slices(roi, zs, grid.spacing_mm[2])
    cache: dict[int, np.ndarray] = {}
    for k, p in enumerate(planes):
        if p < 0:
            continue
        if p not in cache:
            plane = np.zeros((nx, ny), bool)
            for pts in roi.polygons[p]:
                ix = (pts[:, 0] - grid.origin_mm[0]) / grid.spacing_mm[0]
                iy = (pts[:, 1] - grid.origin_mm[1]) / grid.spacing_mm[1]
                plane ^= fill_polygon(ix, iy, nx, ny, lo[0], lo[1])
            cache[p] = plane
        mask[:, :, k] = cache[p]
    return mask


def roi_window(roi: RoiContours, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) int (3,): a window of `grid`'s lattice (indices may lie beyond the grid) holding the whole ROI."""
    points = np.concatenate([pts for plane in roi.polygons for pts in plane]) if roi.contour_count else np.zeros((0, 2))
    half = (roi.slab_mm if roi.slab_mm is not None else grid.spacing_mm[2]) / 2
    finite = points[np.isfinite(points).all(axis=1)] if points.size else points
    if finite.size == 0:
        return np.zeros(3, np.int64), np.zeros(3, np.int64)
    low = [finite[:, 0].min(), finite[:, 1].min(), roi.planes_z.min() - half]
    high = [finite[:, 0].max(), finite[:, 1].max(), roi.planes_z.max() + half]
    lo = np.array([np.floor((v - o) / d) - 1 for v, o, d in zip(low, grid.origin_mm, grid.spacing_mm)])
    hi = np.array([np.ceil((v - o) / d) + 2 for v, o, d in zip(high, grid.origin_mm, grid.spacing_mm)])
    return lo.astype(np.int64), hi.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class RoiOnGrid:
    """An ROI rasterized on a case grid, and how much of it that grid and the dose hold.

    mask: bool (X, Y, Z) on the case grid; whole_voxels: voxels of the whole ROI on the case
    grid's lattice extended beyond it; in_grid: the fraction of those inside the case grid;
    coverage: the fraction inside the case grid where the dose grid has dose (== in_grid
    without a dose grid); planes_used: how many of the ROI's planes the case grid's slices take.
    """

    mask: np.ndarray
    whole_voxels: int
    in_grid: float
    coverage: float
    planes_used: int


def rasterize_roi(roi: RoiContours, grid: Grid, dose_grid: Grid | None = None, name: str = "an ROI") -> RoiOnGrid:
    """Rasterize `roi` on `grid` and measure its coverage by `grid` and by `dose_grid` (see RoiOnGrid).

    The whole ROI is rasterized once on `grid`'s lattice over a window holding it; the case
    mask is the part inside `grid`. A voxel has dose where `resample` (trilinear) takes it
    from `dose_grid` (between its outer voxel centres). An ROI spanning more than
    MAX_WINDOW_VOXELS of the lattice raises FlaxdoseError (damaged coordinates).
    """
    lo, hi = roi_window(roi, grid)
    if float(np.prod((hi - lo).astype(np.float64))) > MAX_WINDOW_VOXELS:
        size = (hi - lo) * np.array(grid.spacing_mm)
        raise FlaxdoseError(
            f"the contours of {name} span {' x '.join(f'{v:.0f}' for v in size)} mm; that is no patient: the "
            "RTSTRUCT's contour coordinates are damaged or not in mm"
        )
    whole = rasterize(roi, grid, lo, hi)
    mask = np.zeros(grid.shape, bool)
    a = np.maximum(lo, 0)
    b = np.minimum(hi, grid.shape)
    if (b > a).all():
        mask[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = whole[a[0] - lo[0]:b[0] - lo[0], a[1] - lo[1]:b[1] - lo[1],
                                                    a[2] - lo[2]:b[2] - lo[2]]
    total = int(whole.sum())
    in_grid = int(mask.sum())
    covered = in_grid
    if dose_grid is not None and in_grid:
        keep = [inside_source(dose_grid, grid.coords(axis), axis) for axis in range(3)]
        covered = int(mask[np.ix_(*keep)].sum())
    zs = grid.coords(2)
    planes = plane_of_slices(roi, zs, grid.spacing_mm[2])
    used = {int(p) for k, p in enumerate(planes) if p >= 0 and mask[:, :, k].any()}
    fraction = lambda n: float(n / total) if total else 0.0
    return RoiOnGrid(mask, total, fraction(in_grid), fraction(covered), len(used))
