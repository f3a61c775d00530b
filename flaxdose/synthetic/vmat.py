"""A simplified, physical photon-beam model and a fluence optimizer in JAX.

Beams are coplanar, all aimed at the isocentre (the PTV centre). Each beam carries a fluence
map of beamlets across its beam's-eye view (u, in the axial plane) and along z. The dose of
a beam at a point is

    fluence(u, z) blurred by a penumbra + scatter kernel
    x exp(-mu * depth) x build-up(depth) x inverse square,

with the depth measured from where the ray enters the (elliptic) body; the dose is the sum
over beams and is zero outside the body. Tissue is water-equivalent (no bone heterogeneity)
and the z profile ignores beam divergence: a simplified model, but dose falls off with depth
and across field edges as a 6 MV beam does, so optimized plans show the real trade-offs.

Fluence is optimized (Adam, projected onto fluence >= 0) on the fixed coarse optimization grid
(the scale-0.5 grid, 8 x 8 x 6 mm, body columns only) against the objectives of a
`flaxdose.synthetic.styles.Style`; the final dose is computed from the optimized fluence on the
requested grid. Shapes are static per (number of beams, grid), so every case of a style and
grid reuses one compilation; the style's weights are traced arguments.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from flaxdose.data.grid import Grid
from flaxdose.synthetic import anatomy as anat

# Beam physics (10 MV-like, a common prostate energy).
SAD_MM = 1000.0  # source-axis distance: inverse square and divergence
MU_PER_MM = 0.0042  # effective attenuation of the primary beam in water
BUILDUP = (0.65, 8.0)  # surface dose deficit and its decay length (mm): dose maximum at ~20 mm
PENUMBRA_SIGMA_MM = 3.0  # 80-20 % penumbra of about 5 mm
SCATTER_SIGMA_MM = 25.0  # phantom scatter: a broad, low tail around every field
SCATTER_FRACTION = 0.08

# Beamlets (MLC-like): 5 mm x 5 mm, covering +/- 70 mm around the isocentre in u and z.
BEAMLET_MM = 5.0
BEAMLETS_U = 28
BEAMLETS_Z = 28
FINE_U_MM = 3.0  # the blurred fluence is tabulated this finely along u ...
FINE_U_HALF_MM = 150.0  # ... out to here (aperture + 3 scatter sigmas)
APERTURE_MARGIN_BEAMLETS = 0  # extra beamlets open around the PTV's projection (the PTV has its margin)

# Optimization.
OPT_SCALE = 0.5  # optimization grid: 60 x 60 x 32 (8 x 8 x 6 mm)
OPT_COLUMNS = 1856  # static number of (x, y) columns: > body columns of the largest possible body
PTV_FILL = 0.25
PTV_BOX = (28, 28, 40)  # full-grid voxels (112 x 112 x 120 mm) around the isocentre
# Static number of the box's (x, y) columns that hold PTV, where the PTV dose is computed (the
# other columns' dose only ever meets a zero PTV weight): 79-157 over 1200 sampled patients.
PTV_COLUMNS = 256
ITERATIONS = 60  # Adam converges in ~50 (objective within 0.5 % of 300 iterations)
LEARNING_RATE = 0.05

N_FINE = int(round(2 * FINE_U_HALF_MM / FINE_U_MM)) + 1
_U_BINS = (np.arange(BEAMLETS_U) - (BEAMLETS_U - 1) / 2) * BEAMLET_MM
_Z_BINS = (np.arange(BEAMLETS_Z) - (BEAMLETS_Z - 1) / 2) * BEAMLET_MM
_U_FINE = np.linspace(-FINE_U_HALF_MM, FINE_U_HALF_MM, N_FINE)


def _box_blur(x, centres, sigma):
    """(len(x), len(centres)): a beamlet of width BEAMLET_MM convolved with a Gaussian."""
    x = x[:, None] - centres[None, :]
    h, s = BEAMLET_MM / 2, sigma * math.sqrt(2.0)
    return 0.5 * (jax.scipy.special.erf((x + h) / s) - jax.scipy.special.erf((x - h) / s))


def fine_fluence(fluence, z_rel):
    """Blurred fluence (B, N_FINE, len(z_rel)) tabulated at `_U_FINE` and the slices' z."""
    u = jnp.asarray(_U_FINE, jnp.float32)
    out = 0.0
    for sigma, weight in ((PENUMBRA_SIGMA_MM, 1 - SCATTER_FRACTION), (SCATTER_SIGMA_MM, SCATTER_FRACTION)):
        ku, kz = _box_blur(u, jnp.asarray(_U_BINS), sigma), _box_blur(z_rel, jnp.asarray(_Z_BINS), sigma)
        out = out + weight * jnp.einsum("fu,buz,sz->bfs", ku, fluence, kz)
    return out


def beam_geometry(theta, cols, iso_xy, ellipse):
    """Per-column fine-u index (P,) and the two interpolation-weighted depth factors (P, S)."""
    d = jnp.stack([-jnp.sin(theta), jnp.cos(theta)])  # direction of travel; 0 deg: anterior -> posterior
    uhat = jnp.stack([jnp.cos(theta), jnp.sin(theta)])
    q = cols - iso_xy
    s = q @ d  # downstream distance from the isocentre plane
    mag = SAD_MM / (SAD_MM + s)
    t = (q @ uhat * mag + FINE_U_HALF_MM) / FINE_U_MM
    valid = (t >= 0) & (t <= N_FINE - 1)
    i0 = jnp.clip(jnp.floor(t), 0, N_FINE - 2).astype(jnp.int32)
    frac = jnp.clip(t - i0, 0.0, 1.0)
    # Depth: distance back along the ray to the body's elliptic surface, per slice.
    cx, cy, a, b = (ellipse[None, :, k] for k in range(4))
    e0, f0 = (cols[:, 0:1] - cx) / a, (cols[:, 1:2] - cy) / b
    alpha, beta = d[0] / a, d[1] / b
    qa = alpha**2 + beta**2
    qb = e0 * alpha + f0 * beta
    qc = e0**2 + f0**2 - 1.0
    inside = qc <= 0.0
    depth = jnp.where(inside, (qb + jnp.sqrt(jnp.maximum(qb**2 - qa * qc, 0.0))) / qa, 0.0)
    att = jnp.exp(-MU_PER_MM * depth) * (1.0 - BUILDUP[0] * jnp.exp(-depth / BUILDUP[1]))
    att = jnp.where(inside & valid[:, None], att * (mag**2)[:, None], 0.0)
    return i0, att * (1.0 - frac)[:, None], att * frac[:, None]


def _beam_dose(ffine_b, i0, a0, a1):
    return a0 * ffine_b[i0] + a1 * ffine_b[i0 + 1]


def _dose(fluence, z_rel, geometry):
    """Dose (P, S) of all beams: a scan adding one beam's dose at a time, in beam order.

    The same sum as `jnp.sum` over the stacked (B, P, S) beam doses (the generator before
    issue 24), without materializing the stack: XLA:CPU's reduction over the beam axis and the
    fusions around it took ~70 % of an optimization step; the scan makes a plan ~4x faster
    (docs/performance.md, "Lever: the synthetic generator").
    Not bit for bit: XLA fuses a beam's a0 * f0 + a1 * f1 into a multiply-add here, so optimized
    doses differ from the stacked form's by a few float32 roundings (<= 1e-4 Gy on 70 Gy plans;
    tests/test_synth_vmat.py checks it against the stacked form kept in tests/synthetic_reference.py).
    """
    i0, a0, a1 = geometry

    def add_beam(dose, beam):
        return dose + _beam_dose(*beam), None

    return jax.lax.scan(add_beam, jnp.zeros(a0.shape[1:], a0.dtype), (fine_fluence(fluence, z_rel), i0, a0, a1))[0]


def _box_dose(fluence, data, geometry):
    """Dose on the PTV box (box columns, z): computed on the PTV's columns only (`data["box_index"]`),
    zero on the others, which only ever meet a zero PTV weight; the same numbers where it counts
    as computing all 784 columns, and the same sums."""
    compact = _dose(fluence, data["box_z_rel"], geometry)
    full = jnp.zeros(data["box_ptv"].shape, compact.dtype)
    return full.at[data["box_index"]].set(compact, mode="drop", unique_indices=True)


def _objective(theta, w, data, geometry, scale):
    aperture = data["aperture"]
    fluence = scale * theta * aperture
    dose = _dose(fluence, data["z_rel"], geometry["coarse"])
    m = data["weights"]  # per-structure voxel weights summing to 1: means
    # Coverage and homogeneity on the full-grid PTV (a box around it): the coarse grid
    # misses the PTV boundary's penumbra and fluence ripples finer than 8 mm.
    ptv_dose = _box_dose(fluence, data, geometry["box"])
    # Coverage toward a dome: 1 at the PTV surface rising by `ptv_boost` over `ptv_boost_mm`
    # inside it (a planner's hot core; ptv_boost 0 = a flat 100 % target).
    dome = 1.0 + w["ptv_boost"] * jnp.minimum(data["box_depth_mm"] / w["ptv_boost_mm"], 1.0)
    under = jnp.sum(data["box_ptv"] * jnp.maximum(dome - ptv_dose, 0.0) ** 2)
    over = jnp.sum(data["box_ptv"] * jnp.maximum(ptv_dose - w["ptv_hot"], 0.0) ** 2)
    sq = dose**2
    limit = jnp.maximum(w["nto_end"], w["nto_start"] * jnp.exp(-w["nto_falloff_per_mm"] * data["distance_mm"]))
    nto = jnp.sum(m["normal"] * jnp.maximum(dose - limit, 0.0) ** 2)
    both_u = aperture[:, 1:, :] * aperture[:, :-1, :]
    both_z = aperture[:, :, 1:] * aperture[:, :, :-1]
    n_open = jnp.maximum(jnp.sum(aperture), 1.0)
    smooth = (
        jnp.sum(both_u * (theta[:, 1:, :] - theta[:, :-1, :]) ** 2)
        + jnp.sum(both_z * (theta[:, :, 1:] - theta[:, :, :-1]) ** 2)
    ) / n_open
    beam_mean = jnp.sum(aperture * theta, axis=(1, 2)) / jnp.maximum(jnp.sum(aperture, axis=(1, 2)), 1.0)
    relative_mu = beam_mean / data["beam_profile"]
    terms = {
        "ptv_under": w["ptv_under"] * under,
        "ptv_over": w["ptv_over"] * over,
        "bladder": w["bladder"] * jnp.sum(m["bladder"] * sq),
        "rectum": w["rectum"] * jnp.sum(m["rectum"] * sq),
        "femoral": w["femoral"] * (jnp.sum(m["femur_l"] * sq) + jnp.sum(m["femur_r"] * sq)),
        "nto": w["nto"] * nto,
        "integral": w["integral"] * jnp.sum(m["normal"] * dose),
        "smooth": w["smooth"] * smooth,
        # VMAT deliverability: leaves and dose rate change little between control points.
        "arc_smooth": w["arc_smooth"] * jnp.sum(aperture * (theta - jnp.roll(theta, 1, axis=0)) ** 2) / n_open,
        # ... and MU per degree follows the style's beam profile (uniform for arcs: limited
        # dose-rate / gantry-speed modulation; fixed strong directions for the external style).
        "beam_uniformity": w["beam_uniformity"] * jnp.var(relative_mu) / jnp.maximum(jnp.mean(relative_mu) ** 2, 1e-6),
    }
    return sum(terms.values()), terms


@functools.partial(jax.jit, static_argnames=("iterations",))
def optimize_fluence(angles, data, w, iterations=ITERATIONS):
    """Optimized fluence (B, BEAMLETS_U, BEAMLETS_Z), in units where the PTV mean dose is ~1, and the
    objective's terms at the end."""
    geo = jax.vmap(beam_geometry, in_axes=(0, None, None, None))
    geometry = {
        "coarse": geo(angles, data["cols"], data["iso_xy"], data["ellipse"]),
        "box": geo(angles, data["box_cols"], data["iso_xy"], data["box_ellipse"]),
    }
    aperture = data["aperture"]
    # Start from open apertures carrying the beam profile, scaled so the PTV mean dose is 1
    # (the model is linear); Adam moves a beamlet only ~LEARNING_RATE per iteration.
    start = aperture * data["beam_profile"][:, None, None]
    dose0 = _box_dose(start, data, geometry["box"])
    scale = 1.0 / jnp.maximum(jnp.sum(data["box_ptv"] * dose0), 1e-6)
    opt = optax.adam(LEARNING_RATE)
    grad_fn = jax.grad(lambda t: _objective(t, w, data, geometry, scale)[0])

    def step(_, carry):
        theta, state = carry
        updates, state = opt.update(grad_fn(theta), state, theta)
        return jnp.maximum(optax.apply_updates(theta, updates), 0.0), state  # fluence >= 0

    theta, _ = jax.lax.fori_loop(0, iterations, step, (start, opt.init(start)))
    return scale * theta * aperture, _objective(theta, w, data, geometry, scale)[1]


@jax.jit
def dose_on_grid(angles, fluence, iso, ellipse, x, y, z):
    """Dose (X, Y, Z) of the fluence on the grid with axes x, y, z (mm); zero outside the body."""
    cols = jnp.stack(jnp.meshgrid(x, y, indexing="ij"), axis=-1).reshape(-1, 2)
    ffine = fine_fluence(fluence, z - iso[2])

    def add_beam(dose, beam):
        theta, ffine_b = beam
        return dose + _beam_dose(ffine_b, *beam_geometry(theta, cols, iso[:2], ellipse)), None

    dose, _ = jax.lax.scan(add_beam, jnp.zeros((cols.shape[0], z.shape[0]), jnp.float32), (angles, ffine))
    return dose.reshape(x.shape[0], y.shape[0], z.shape[0])


def optimization_data(anatomy: anat.Anatomy, angles: np.ndarray, beam_profile: np.ndarray | None = None) -> dict:
    """Everything the optimizer needs about one patient, padded to static shapes (numpy).

    `beam_profile` (B,): the relative MU each beam should carry (default: all equal).
    """
    grid = anat.grid_for_scale(OPT_SCALE)
    masks = anat.structure_masks(anatomy, grid)
    _, bladder, rectum, fl, fr, body = masks
    # Coarse voxels at least PTV_FILL full of full-grid PTV count as PTV, not normal tissue
    # or OAR, for the coarse objectives (the PTV objectives use the full-grid PTV box below).
    fine = anat.grid_for_scale(1.0)
    ptv_fine = anat.ptv_mask(anatomy, fine)
    f = [n // c for n, c in zip(fine.shape, grid.shape)]
    ptv = ptv_fine.reshape(grid.shape[0], f[0], grid.shape[1], f[1], grid.shape[2], f[2]).mean(axis=(1, 3, 5)) >= PTV_FILL
    ptv &= body
    ax, ay, az = grid.axes()
    columns = np.argwhere(body.any(axis=2))
    if len(columns) > OPT_COLUMNS:  # guarded by the anatomy ranges; a bug if it fires
        raise AssertionError(f"{len(columns)} body columns exceed OPT_COLUMNS={OPT_COLUMNS}")
    pad = OPT_COLUMNS - len(columns)
    cols = np.concatenate([np.stack([ax[columns[:, 0]], ay[columns[:, 1]]], 1), np.full((pad, 2), 1e4, np.float32)])

    def col_weights(mask):
        v = mask[columns[:, 0], columns[:, 1]].astype(np.float32)
        v = np.concatenate([v, np.zeros((pad, mask.shape[2]), np.float32)])
        return v / max(v.sum(), 1.0)

    distance = ndimage.distance_transform_edt(~ptv, sampling=grid.spacing_mm).astype(np.float32)
    distance_cols = np.concatenate([distance[columns[:, 0], columns[:, 1]], np.zeros((pad, len(az)), np.float32)])
    outside = ~ptv
    weights = {
        "bladder": col_weights(bladder & outside),
        "rectum": col_weights(rectum & outside),
        "femur_l": col_weights(fl & outside),
        "femur_r": col_weights(fr & outside),
        "normal": col_weights(body & outside),
    }
    iso = np.asarray(anatomy.iso, np.float32)
    # A fixed-size box of full-grid voxels around the isocentre for the PTV objectives.
    fx, fy, fz = fine.axes()
    lo = [int(np.clip(np.argmin(np.abs(a - c)) - n // 2, 0, len(a) - n)) for a, c, n in zip((fx, fy, fz), iso, PTV_BOX)]
    box = tuple(slice(l, l + n) for l, n in zip(lo, PTV_BOX))
    if ptv_fine[box].sum() != ptv_fine.sum():  # guarded by the anatomy ranges; a bug if it fires
        raise AssertionError("the PTV extends beyond the optimizer's PTV box; enlarge PTV_BOX")
    bx, by = np.meshgrid(fx[box[0]], fy[box[1]], indexing="ij")
    box_ptv = ptv_fine[box].reshape(-1, PTV_BOX[2]).astype(np.float32)
    # The box columns holding PTV, in order, padded to PTV_COLUMNS: far-away columns (no dose) that
    # the scatter back into the box drops (index past the box).
    ptv_columns = np.flatnonzero(box_ptv.any(axis=1))
    if len(ptv_columns) > PTV_COLUMNS:  # guarded by the anatomy ranges; a bug if it fires
        raise AssertionError(f"{len(ptv_columns)} PTV columns exceed PTV_COLUMNS={PTV_COLUMNS}")
    box_pad = PTV_COLUMNS - len(ptv_columns)
    box_cols = np.stack([bx.ravel(), by.ravel()], 1).astype(np.float32)[ptv_columns]
    # Depth inside the PTV (mm to the nearest voxel outside it), for the hot-core dome.
    depth = ndimage.distance_transform_edt(ptv_fine[box], sampling=fine.spacing_mm).astype(np.float32)
    box_data = {
        "box_depth_mm": depth.reshape(-1, PTV_BOX[2]),
        "box_cols": np.concatenate([box_cols, np.full((box_pad, 2), 1e4, np.float32)]),
        "box_index": np.concatenate([ptv_columns, np.full(box_pad, len(box_ptv))]).astype(np.int32),
        "box_z_rel": (fz[box[2]] - iso[2]).astype(np.float32),
        "box_ellipse": anatomy.body_ellipse(fz[box[2]]),
        "box_ptv": box_ptv / box_ptv.sum(),
    }
    return {
        **box_data,
        "cols": cols.astype(np.float32),
        "iso_xy": iso[:2],
        "ellipse": anatomy.body_ellipse(az),
        "z_rel": (az - iso[2]).astype(np.float32),
        "weights": weights,
        "distance_mm": distance_cols,
        "aperture": aperture_mask(ptv_fine, fine, iso, angles),
        "beam_profile": np.ones(len(angles), np.float32) if beam_profile is None else np.asarray(beam_profile, np.float32),
    }


def aperture_mask(ptv: np.ndarray, grid: Grid, iso: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(B, BEAMLETS_U, BEAMLETS_Z) float: beamlets that see the PTV, plus a margin (the MLC opening)."""
    ax, ay, az = grid.axes()
    pts = np.argwhere(ptv)
    x, y, z = ax[pts[:, 0]] - iso[0], ay[pts[:, 1]] - iso[1], az[pts[:, 2]] - iso[2]
    out = np.zeros((len(angles), BEAMLETS_U, BEAMLETS_Z), np.float32)
    # All beams at once ((B, 1) against the points); the sines and cosines per beam as before,
    # so every element is the same float32 arithmetic as the per-beam loop it replaced.
    sin = np.array([np.sin(theta) for theta in angles])[:, None]
    cos = np.array([np.cos(theta) for theta in angles])[:, None]
    s = -x * sin + y * cos
    u = (x * cos + y * sin) * SAD_MM / (SAD_MM + s)
    beam = np.arange(len(angles))[:, None]
    # A beamlet opens when the PTV reaches within half a beamlet of its centre.
    for du in (-0.5, 0.0, 0.5):
        iu = np.clip(np.round((u - _U_BINS[0]) / BEAMLET_MM + du).astype(int), 0, BEAMLETS_U - 1)
        for dz in (-0.5, 0.0, 0.5):
            iz = np.clip(np.round((z - _Z_BINS[0]) / BEAMLET_MM + dz).astype(int), 0, BEAMLETS_Z - 1)
            out[beam, iu, iz[None, :]] = 1.0
    size = 2 * APERTURE_MARGIN_BEAMLETS + 1
    grown = ndimage.binary_dilation(out > 0, structure=np.ones((1, size, size), bool))
    return ndimage.binary_fill_holes(grown, structure=np.ones((1, 3, 3), bool)).astype(np.float32)
