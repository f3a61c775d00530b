"""The synthetic generator's dose sum and fluence optimizer BEFORE issue 24 (kept as a test oracle).

Pre-vectorisation code, copied verbatim from `flaxdose/synthetic/vmat.py` at commit de29e4b
(the generator before issue 24 item 3): the beams' doses stacked as (B, P, S) and summed with
`jnp.sum(axis=0)`. On XLA:CPU that sum and the fusions around it took ~70 % of a plan; the
library now adds the beams in a scan (`flaxdose.synthetic.vmat._dose`). Do not "fix" or speed
up this file: tests/test_synth_vmat.py checks the fast code against it.

Only the physics constants and the unchanged helpers' inputs come from the library.
`PRE_CHANGE_PLANS` holds numbers of plans the pre-change generator made (see its comment).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from flaxdose.synthetic.vmat import (
    _U_BINS,
    _U_FINE,
    _Z_BINS,
    BEAMLET_MM,
    BUILDUP,
    FINE_U_HALF_MM,
    FINE_U_MM,
    ITERATIONS,
    LEARNING_RATE,
    MU_PER_MM,
    N_FINE,
    PENUMBRA_SIGMA_MM,
    SAD_MM,
    SCATTER_FRACTION,
    SCATTER_SIGMA_MM,
)


# ----------------------------------------------------------------- verbatim from de29e4b
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
    return jnp.sum(jax.vmap(_beam_dose)(fine_fluence(fluence, z_rel), *geometry), axis=0)


def _objective(theta, w, data, geometry, scale):
    aperture = data["aperture"]
    fluence = scale * theta * aperture
    dose = _dose(fluence, data["z_rel"], geometry["coarse"])
    m = data["weights"]  # per-structure voxel weights summing to 1: means
    # Coverage and homogeneity on the full-grid PTV (a box around it): the coarse grid
    # misses the PTV boundary's penumbra and fluence ripples finer than 8 mm.
    ptv_dose = _dose(fluence, data["box_z_rel"], geometry["box"])
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
    dose0 = _dose(start, data["box_z_rel"], geometry["box"])
    scale = 1.0 / jnp.maximum(jnp.sum(data["box_ptv"] * dose0), 1e-6)
    opt = optax.adam(LEARNING_RATE)
    grad_fn = jax.grad(lambda t: _objective(t, w, data, geometry, scale)[0])

    def step(_, carry):
        theta, state = carry
        updates, state = opt.update(grad_fn(theta), state, theta)
        return jnp.maximum(optax.apply_updates(theta, updates), 0.0), state  # fluence >= 0

    theta, _ = jax.lax.fori_loop(0, iterations, step, (start, opt.init(start)))
    return scale * theta * aperture, _objective(theta, w, data, geometry, scale)[1]




# Plans the pre-change generator made (commit de29e4b, this machine's jax 0.10.2 / XLA:CPU):
# generate_case(style, seed=0, index=5000, scale=0.5) -> (sha256 of np.packbits(masks), the dose's
# float64 sum (Gy), 15 (i, j, k, dose Gy) voxels at 5..100 % quantiles of the in-body dose).
PRE_CHANGE_PLANS = {
    "source": ("e37c0cb0d62f63552bec8cfb17887a37f08c6ef74e0cd28e70a5448eca32cf8d", 216537.71455751068, [(16, 34, 0, 0.01251182146370411), (31, 16, 28, 0.025325356051325798), (11, 31, 28, 0.04517899453639984), (29, 38, 2, 0.07558386772871017), (40, 31, 4, 0.11981718242168427), (26, 24, 4, 0.1831747144460678), (27, 42, 23, 0.27929767966270447), (26, 23, 7, 0.4873744547367096), (45, 37, 9, 2.58038330078125), (51, 26, 18, 6.387703895568848), (19, 23, 20, 8.917588233947754), (24, 16, 11, 10.976165771484375), (24, 21, 17, 13.743353843688965), (23, 33, 10, 19.373355865478516), (29, 33, 15, 73.45931243896484)]),
    "internal_a": ("e37c0cb0d62f63552bec8cfb17887a37f08c6ef74e0cd28e70a5448eca32cf8d", 214666.0795982657, [(11, 19, 1, 0.012129654176533222), (37, 42, 29, 0.024670720100402832), (35, 24, 28, 0.04418017342686653), (10, 25, 27, 0.07455674558877945), (47, 36, 26, 0.11831437796354294), (45, 38, 25, 0.18058450520038605), (50, 25, 8, 0.2764582335948944), (27, 24, 23, 0.4751379191875458), (15, 18, 9, 2.3359973430633545), (36, 25, 21, 5.960739612579346), (49, 29, 11, 8.796965599060059), (41, 30, 15, 10.872220039367676), (27, 20, 11, 13.65533447265625), (24, 36, 10, 19.374004364013672), (29, 33, 16, 74.28921508789062)]),
    "internal_b": ("e37c0cb0d62f63552bec8cfb17887a37f08c6ef74e0cd28e70a5448eca32cf8d", 213760.76250671287, [(13, 27, 31, 0.011256275698542595), (15, 18, 29, 0.023301690816879272), (27, 21, 2, 0.0420658253133297), (34, 38, 2, 0.07160741090774536), (17, 31, 4, 0.11514964699745178), (27, 20, 23, 0.1777879148721695), (22, 40, 6, 0.27327778935432434), (38, 37, 24, 0.4571455419063568), (48, 36, 9, 1.9252787828445435), (19, 19, 21, 5.258428573608398), (34, 40, 21, 8.865976333618164), (12, 35, 12, 11.180352210998535), (15, 35, 13, 13.987948417663574), (37, 29, 13, 19.61513900756836), (29, 33, 16, 74.1229476928711)]),
    "internal_c": ("e37c0cb0d62f63552bec8cfb17887a37f08c6ef74e0cd28e70a5448eca32cf8d", 212986.15938176773, [(37, 19, 28, 0.01080764178186655), (16, 25, 1, 0.022519422695040703), (31, 21, 26, 0.04076176881790161), (33, 13, 23, 0.0693453922867775), (16, 37, 4, 0.1124589666724205), (30, 25, 25, 0.17526492476463318), (23, 16, 22, 0.2686176002025604), (23, 19, 22, 0.4372827708721161), (33, 23, 20, 1.3859033584594727), (52, 28, 20, 4.900373458862305), (49, 29, 21, 8.882637023925781), (19, 19, 15, 11.471024513244629), (32, 32, 22, 14.2598295211792), (19, 34, 16, 19.541332244873047), (29, 33, 12, 74.9473876953125)]),
    "external": ("e37c0cb0d62f63552bec8cfb17887a37f08c6ef74e0cd28e70a5448eca32cf8d", 222172.89704811433, [(37, 16, 30, 0.01299047376960516), (44, 33, 1, 0.026019571349024773), (31, 16, 2, 0.046203214675188065), (32, 30, 1, 0.07724417746067047), (27, 18, 4, 0.12289012968540192), (18, 35, 5, 0.18791420757770538), (14, 21, 8, 0.2862043082714081), (47, 31, 8, 0.503445029258728), (39, 27, 22, 2.5231356620788574), (31, 12, 21, 6.402405261993408), (22, 25, 20, 8.483527183532715), (22, 17, 16, 11.433752059936523), (42, 32, 18, 14.948877334594727), (37, 28, 16, 20.426633834838867), (32, 31, 16, 71.44998931884766)]),
}
