"""Contours to masks: voxel-centre rasterization of closed planar contours (the DVH calculators' rule).

A voxel belongs to an ROI when its centre lies inside the polygon (even-odd rule) or on its
boundary (within `EDGE_EPS` voxel); several contours of one ROI on one plane combine by XOR
(inner contours are holes). A contour plane is a slab one slice thick: a voxel centre at
height z takes the plane within half a slice of z.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from flaxdose.data.grid import Grid
from flaxdose.errors import FlaxdoseError

EDGE_EPS = 1e-3  # voxel units: a centre this close to a contour edge lies on it


def fill_polygon(px: np.ndarray, py: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Voxel-centre rasterization of one closed polygon given in (fractional) voxel indices.

    Returns bool (nx, ny): True where the centre (i, j) lies inside the polygon (even-odd
    rule) or within `EDGE_EPS` voxels of its boundary.
    """
    px, py = np.asarray(px, np.float64), np.asarray(py, np.float64)
    mask = np.zeros((nx, ny), bool)
    if px.size < 3 or not (np.isfinite(px).all() and np.isfinite(py).all()):
        return mask
    x1, y1, x2, y2 = px, py, np.roll(px, -1), np.roll(py, -1)
    j_lo, j_hi = max(0, int(np.ceil(py.min()))), min(ny - 1, int(np.floor(py.max())))
    if j_hi >= j_lo and px.max() >= 0 and px.min() <= nx - 1:
        rows = np.arange(j_lo, j_hi + 1, dtype=np.float64)
        ya, yb = y1[:, None], y2[:, None]
        cross = ((ya <= rows) & (yb > rows)) | ((yb <= rows) & (ya > rows))
        e, r = np.nonzero(cross)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1[e] + (rows[r] - y1[e]) * (x2[e] - x1[e]) / (y2[e] - y1[e])
        toggle = np.clip(np.floor(xint).astype(np.int64) + 1, 0, nx)
        acc = np.zeros((rows.size, nx + 1), np.int32)
        np.add.at(acc, (r, toggle), 1)
        inside = (np.cumsum(acc[:, :nx], axis=1) % 2).astype(bool)  # (rows, nx)
        mask[:, j_lo : j_hi + 1] = inside.T
    # boundary: lattice points on the edges (a contour traced through voxel centres)
    dx, dy = x2 - x1, y2 - y1
    for flat in (True, False):
        sel = (np.abs(dx) >= np.abs(dy)) if flat else (np.abs(dx) < np.abs(dy))
        a1, b1, da, db = (x1, y1, dx, dy) if flat else (y1, x1, dy, dx)
        a1, b1, da, db = a1[sel], b1[sel], da[sel], db[sel]
        keep = da != 0
        a1, b1, da, db = a1[keep], b1[keep], da[keep], db[keep]
        if a1.size == 0:
            continue
        lo = np.ceil(np.minimum(a1, a1 + da) - EDGE_EPS).astype(np.int64)
        hi = np.floor(np.maximum(a1, a1 + da) + EDGE_EPS).astype(np.int64)
        counts = np.clip(hi - lo + 1, 0, None)
        total = int(counts.sum())
        if total == 0 or total > 50_000_000:
            continue
        edge = np.repeat(np.arange(a1.size), counts)
        a = lo[edge] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
        b = b1[edge] + (a - a1[edge]) * db[edge] / da[edge]
        bi = np.rint(b).astype(np.int64)
        ok = np.abs(b - bi) <= EDGE_EPS
        i, j = (a[ok], bi[ok]) if flat else (bi[ok], a[ok])
        ok = (i >= 0) & (i < nx) & (j >= 0) & (j < ny)
        mask[i[ok], j[ok]] = True
    return mask


@dataclasses.dataclass
class PlaneContours:
    """One ROI's closed contours grouped by plane index (an index into the planes' slab centres)."""

    by_plane: dict[int, list[np.ndarray]]  # plane -> list of (K, 2) x/y mm


def rasterize(contours: PlaneContours, planes_z: np.ndarray, plane_spacing: float, grid: Grid) -> np.ndarray:
    """bool (X, Y, Z) mask of one ROI on `grid` (voxel-centre inclusion, XOR per plane).

    planes_z: slab centres (mm) that the plane indices of `contours` index; plane_spacing: slab
    thickness (mm).
    """
    nx, ny, nz = grid.shape
    mask = np.zeros(grid.shape, bool)
    if not contours.by_plane:
        return mask
    zs = grid.coords(2)
    nearest = np.abs(zs[:, None] - planes_z[None, :]).argmin(axis=1)
    near_ok = np.abs(zs - planes_z[nearest]) <= plane_spacing / 2 + 1e-3
    cache: dict[int, np.ndarray] = {}
    for k in range(nz):
        p = int(nearest[k])
        if not near_ok[k] or p not in contours.by_plane:
            continue
        if p not in cache:
            plane = np.zeros((nx, ny), bool)
            for pts in contours.by_plane[p]:
                ix = (pts[:, 0] - grid.origin_mm[0]) / grid.spacing_mm[0]
                iy = (pts[:, 1] - grid.origin_mm[1]) / grid.spacing_mm[1]
                plane ^= fill_polygon(ix, iy, nx, ny)
            cache[p] = plane
        mask[:, :, k] = cache[p]
    return mask


def contour_planes(
    contours: dict[str, list[tuple[float, np.ndarray]]], slices_z: np.ndarray | None, slice_spacing: float, path
) -> tuple[np.ndarray, float, dict[str, PlaneContours]]:
    """Slab centres and thickness of the contour planes, and each ROI's contours by plane.

    contours: ROI name -> [(z mm, (K, 2) x/y mm)]; slices_z: the sorted CT slice positions (mm)
    or None without a CT; slice_spacing: mm. Returns (planes_z, plane_spacing, {name: PlaneContours}).
    With a CT every contour must lie on a slice (within a quarter slice), else FlaxdoseError.
    """
    if slices_z is not None:
        planes, spacing = slices_z, slice_spacing
        tol = 0.25 * spacing
    else:
        zs = np.unique(np.round([z for cs in contours.values() for z, _ in cs], 3))
        if zs.size == 0:
            return np.zeros(0), 1.0, {k: PlaneContours({}) for k in contours}
        spacing = float(np.median(np.diff(zs))) if zs.size > 1 else 1.0
        planes, tol = zs, 0.01
    out = {}
    for name, cs in contours.items():
        by_plane: dict[int, list[np.ndarray]] = defaultdict(list)
        for z, pts in cs:
            p = int(np.abs(planes - z).argmin())
            if abs(planes[p] - z) > tol:
                raise FlaxdoseError(
                    f"{path}: a contour of {name} lies at z = {z:.2f} mm, {abs(planes[p] - z):.2f} mm from the "
                    f"nearest CT slice; contours must lie on CT slices: check that the structure set belongs "
                    "to this CT"
                )
            by_plane[p].append(pts)
        out[name] = PlaneContours(dict(by_plane))
    return planes, spacing, out
