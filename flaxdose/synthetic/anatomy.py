"""Seeded male-pelvis phantoms: analytic shapes rasterized on any grid of the synthetic data.

A patient is a small set of numbers (`Anatomy`) drawn from a numpy Generator seeded by
(seed, anatomy index) only, so the same patient can be planned in every style and
rasterized at every grid scale. Coordinates are patient millimetres (x right->left,
y anterior->posterior, z inferior->superior, as in `flaxdose.data.case`), with the grid
centre at (0, 0, 0). Shapes are evaluated at voxel centres.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from flaxdose.data.case import PROSTATE_STRUCTURES
from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM, Grid
from flaxdose.errors import FlaxdoseError

# x, y sizes must be multiples of 4 and z of 8 (UNet down-sampling / patch shapes); with the
# full grid above this allows scales 0.5, 1.0, 1.5, 2.0.
GRID_MULTIPLE = (4, 4, 8)
MAX_SCALE = 2.0

# Ranges of the anatomy parameters (mm unless stated). Sizes follow adult male pelvis CT:
# lateral width 32-42 cm, AP 20-28 cm, PTV (prostate +/- seminal vesicles + 5-8 mm margin)
# 50-160 cc, bladder 80-450 cc, rectum 22-34 mm across, femoral heads 44-52 mm across.
BODY_HALF_WIDTH = (160.0, 205.0)
BODY_HALF_DEPTH = (100.0, 140.0)
BODY_TAPER = (-0.06, 0.08)  # relative change of the semi-axes from z = 0 to the top slice
PTV_RADII = ((22.0, 31.0), (18.0, 26.0), (20.0, 30.0))
PTV_DEFORM = 0.2  # amplitude of the pear / tilt terms of the PTV's implicit surface
SV_PROBABILITY = 0.5  # chance the PTV includes a seminal-vesicle lobe
PROSTATE_TO_POSTERIOR_SKIN = (60.0, 85.0)
BLADDER_CC = (80.0, 450.0)
RECTUM_RADIUS = (11.0, 17.0)
FEMUR_RADIUS = (22.0, 26.0)
FEMUR_NECK_DEG = 40.0  # femoral neck runs lateral and inferior at this angle


def grid_for_scale(scale: float) -> Grid:
    """The synthetic grid at `scale`: 1.0 is the model grid (`flaxdose.data.grid.MODEL_SHAPE`, 120 x 120 x 64
    voxels of 4 x 4 x 3 mm), centred on (0, 0, 0); the field of view never changes. Raises
    FlaxdoseError for a scale that gives fractional sizes or sizes the UNet cannot take."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise FlaxdoseError(f"scale must be a number, got {scale!r}") from None
    sizes = [n * scale for n in MODEL_SHAPE]
    ok = (
        0 < scale <= MAX_SCALE
        and all(abs(s - round(s)) < 1e-9 for s in sizes)
        and all(round(s) % m == 0 and round(s) > 0 for s, m in zip(sizes, GRID_MULTIPLE))
    )
    if not ok:
        raise FlaxdoseError(
            f"scale {scale} gives a {'x'.join(f'{s:g}' for s in sizes)} grid; the grid must have whole sizes "
            f"that are multiples of {GRID_MULTIPLE} (x, y, z) and scale <= {MAX_SCALE}: use 0.5 (60x60x32), "
            "1.0 (120x120x64, the paper's grid), 1.5 or 2.0"
        )
    shape = tuple(int(round(s)) for s in sizes)
    return Grid.centred(shape, tuple(d / scale for d in MODEL_SPACING_MM))


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's shape parameters (mm). `iso` is the PTV centre, the plan's isocentre."""

    body_centre_y: float
    body_axes: tuple[float, float]  # lateral and AP semi-axes at z = 0
    body_taper: tuple[float, float]
    iso: tuple[float, float, float]
    ptv_radii: tuple[float, float, float]
    ptv_deform: tuple[float, float, float]  # pear (x^2+y^2) z, sagittal tilt y z, lateral tilt x z
    sv: tuple[float, ...]  # () or the seminal-vesicle lobe (dy, dz, rx, ry, rz) relative to iso
    bladder_centre: tuple[float, float, float]
    bladder_radii: tuple[float, float, float]
    rectum_x: float
    rectum_y0: float
    rectum_radii: tuple[float, float]
    rectum_curve: float  # posterior bend per mm^2 above the isocentre (towards the sacrum)
    rectum_z: tuple[float, float]
    femur_centres: tuple[tuple[float, float, float], tuple[float, float, float]]  # left (+x), right
    femur_radius: float

    def body_ellipse(self, z: np.ndarray) -> np.ndarray:
        """(len(z), 4) rows (cx, cy, a, b): the body's elliptic cross-section at each z."""
        z = np.asarray(z, np.float32)
        zeta = z / (MODEL_SHAPE[2] * MODEL_SPACING_MM[2] / 2)
        a = self.body_axes[0] * (1 + self.body_taper[0] * zeta)
        b = self.body_axes[1] * (1 + self.body_taper[1] * zeta)
        return np.stack([np.zeros_like(z), np.full_like(z, self.body_centre_y), a, b], axis=1).astype(np.float32)


def sample_anatomy(seed: int, index: int) -> Anatomy:
    """The patient of (seed, index); independent of style and grid."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5A4E]))
    u = lambda lo_hi: float(rng.uniform(*lo_hi))
    body_axes = (u(BODY_HALF_WIDTH), u(BODY_HALF_DEPTH))
    body_cy = float(rng.normal(0.0, 8.0))
    ptv_radii = tuple(u(r) for r in PTV_RADII)
    # Prostate sits behind the pubic symphysis, a fixed-ish distance in front of the sacrum skin.
    iso = (
        float(rng.normal(0.0, 3.0)),
        body_cy + body_axes[1] - u(PROSTATE_TO_POSTERIOR_SKIN) - ptv_radii[1],
        u((-30.0, 0.0)),
    )
    deform = tuple(float(v) for v in rng.uniform(-PTV_DEFORM, PTV_DEFORM, 3))
    sv = ()
    if rng.uniform() < SV_PROBABILITY:
        sv = (0.5 * ptv_radii[1], 0.8 * ptv_radii[2] + u((4, 12)), 0.7 * ptv_radii[0], u((7, 10)), u((9, 14)))
    # Bladder: volume-preserving random aspect, resting on the PTV's superior-anterior side.
    r_eq = (3 * u(BLADDER_CC) * 1000 / (4 * math.pi)) ** (1 / 3)
    aspect = np.array([1.25, 0.95, 0.85]) * rng.uniform(0.85, 1.15, 3)
    radii = r_eq * aspect / np.prod(aspect) ** (1 / 3)
    bladder_centre = (
        iso[0] + u((-5, 5)),
        iso[1] - 0.45 * ptv_radii[1] - 0.55 * radii[1],
        iso[2] + 0.55 * ptv_radii[2] + 0.7 * radii[2],
    )
    # Rectum: a tube behind the PTV, touching it (a few mm of overlap), bending posteriorly.
    r_rect = u(RECTUM_RADIUS)
    rectum_radii = (r_rect * u((1.1, 1.4)), r_rect)
    rectum_y0 = iso[1] + ptv_radii[1] + r_rect * u((0.3, 0.6))
    rectum_z = (iso[2] - ptv_radii[2] - u((5, 15)), iso[2] + ptv_radii[2] + u((15, 30)))
    fr = u(FEMUR_RADIUS)
    half_sep = float(np.clip(0.5 * body_axes[0] + rng.uniform(-5, 5), 82.0, 102.0))
    fy, fz = iso[1] + u((-15, 5)), iso[2] + u((0, 20))
    femurs = tuple((side * half_sep + float(rng.normal(0, 2)), fy + float(rng.normal(0, 2)), fz) for side in (1, -1))
    return Anatomy(
        body_centre_y=body_cy,
        body_axes=body_axes,
        body_taper=(u(BODY_TAPER), u(BODY_TAPER)),
        iso=iso,
        ptv_radii=ptv_radii,
        ptv_deform=deform,
        sv=sv,
        bladder_centre=bladder_centre,
        bladder_radii=tuple(float(r) for r in radii),
        rectum_x=iso[0] + u((-4, 4)),
        rectum_y0=rectum_y0,
        rectum_radii=rectum_radii,
        rectum_curve=u((0.002, 0.006)),
        rectum_z=rectum_z,
        femur_centres=femurs,
        femur_radius=fr,
    )


def _capsule(x, y, z, p0, p1, radius):
    """Points within `radius` of the segment p0-p1."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / float(d @ d), 0, 1)
    return (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2 <= radius**2


def _body_and_ptv(anatomy: Anatomy, grid: Grid):
    """Voxel-centre coordinates (broadcastable x, y, z), the body and the PTV (not yet clipped to the body)."""
    ax, ay, az = grid.axes()
    x, y, z = ax[:, None, None], ay[None, :, None], az[None, None, :]
    ell = anatomy.body_ellipse(az)
    body = ((x - ell[:, 0]) / ell[:, 2]) ** 2 + ((y - ell[:, 1]) / ell[:, 3]) ** 2 <= 1.0

    ix, iy, iz = anatomy.iso
    qx, qy, qz = (x - ix) / anatomy.ptv_radii[0], (y - iy) / anatomy.ptv_radii[1], (z - iz) / anatomy.ptv_radii[2]
    pear, tilt_y, tilt_x = anatomy.ptv_deform
    ptv = qx**2 + qy**2 + qz**2 + pear * (qx**2 + qy**2) * qz + tilt_y * qy * qz + tilt_x * qx * qz <= 1.0
    if anatomy.sv:
        dy, dz, rx, ry, rz = anatomy.sv
        ptv = ptv | (((x - ix) / rx) ** 2 + ((y - iy - dy) / ry) ** 2 + ((z - iz - dz) / rz) ** 2 <= 1.0)
    return x, y, z, body, ptv


def ptv_mask(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """(X, Y, Z) bool: the PTV clipped to the body, equal to `structure_masks(anatomy, grid)[0]` (without
    the other organs: the optimizer's full-grid PTV costs a fraction of all six masks)."""
    _, _, _, body, ptv = _body_and_ptv(anatomy, grid)
    return ptv & body


def structure_masks(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Masks (S, X, Y, Z) bool in `PROSTATE_STRUCTURES` order on `grid`; organs are clipped to the body.

    Shapes are evaluated at the voxel centres (mm), so the same anatomy gives consistent masks
    at every grid scale.
    """
    x, y, z, body, ptv = _body_and_ptv(anatomy, grid)
    ix, iy, iz = anatomy.iso

    (bx, by, bz), (brx, bry, brz) = anatomy.bladder_centre, anatomy.bladder_radii
    bladder = ((x - bx) / brx) ** 2 + ((y - by) / bry) ** 2 + ((z - bz) / brz) ** 2 <= 1.0

    z_lo, z_hi = anatomy.rectum_z
    centre_y = anatomy.rectum_y0 + anatomy.rectum_curve * np.maximum(z - iz, 0) ** 2
    rectum = (((x - anatomy.rectum_x) / anatomy.rectum_radii[0]) ** 2 + ((y - centre_y) / anatomy.rectum_radii[1]) ** 2 <= 1.0) & (
        (z >= z_lo) & (z <= z_hi)
    )

    femurs = []
    for side, centre in zip((1, -1), anatomy.femur_centres):
        r = anatomy.femur_radius
        head = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= r**2
        angle = math.radians(FEMUR_NECK_DEG)
        neck_end = (centre[0] + side * 1.8 * r * math.cos(angle), centre[1], centre[2] - 1.8 * r * math.sin(angle))
        femurs.append(head | _capsule(x, y, z, centre, neck_end, 0.65 * r))

    masks = np.stack(np.broadcast_arrays(ptv, bladder, rectum, femurs[0], femurs[1], body))
    assert len(masks) == len(PROSTATE_STRUCTURES)
    return masks & body
