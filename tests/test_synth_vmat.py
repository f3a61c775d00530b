"""The synthetic VMAT dose engine (the beam sum as a scan) against the stacked code it replaced and its plans.

The beam sum of the fluence optimizer is now a scan (`flaxdose.synthetic.vmat._dose`) instead of
a (B, P, S) stack summed by `jnp.sum`; tests/synthetic_reference.py keeps the stacked code as an
oracle. XLA fuses a beam's two interpolation products into a multiply-add in the scan, so the
doses are not bit for bit those of the old code: masks are identical, doses within DOSE_ATOL_GY
(measured on 20 plans, all styles, scales 0.5 and 1.0: max |diff| 3.8e-5 Gy of 70 Gy). The same
code and seed still give identical arrays.
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import synthetic_reference as ref
from flaxdose.synthetic import anatomy, vmat
from flaxdose.synthetic import generator as synth
from flaxdose.synthetic.styles import STYLE_TABLE

DOSE_ATOL_GY = 1e-4  # fast vs pre-change generator, per voxel (70 Gy plans; float32 spacing at 70 Gy: 7.6e-6)
ANATOMY = (0, synth.TEST_ANATOMY_BASE)  # (seed, index): the first shared test patient
BEAM_COUNTS = {len(STYLE_TABLE[s].gantry_deg): s for s in synth.STYLES}  # 36, 33, 23 beams


@pytest.fixture(scope="module")
def problems():
    """Optimizer input and beam geometry of one patient for each beam count of the styles."""
    patient = anatomy.sample_anatomy(*ANATOMY)
    geo = jax.jit(jax.vmap(vmat.beam_geometry, in_axes=(0, None, None, None)))
    out = {}
    for n, style in BEAM_COUNTS.items():
        st = STYLE_TABLE[style]
        angles = np.deg2rad(np.asarray(st.gantry_deg, np.float32))
        data = vmat.optimization_data(patient, angles, st.beam_profile)
        geometry = {
            "coarse": geo(angles, data["cols"], data["iso_xy"], data["ellipse"]),
            "box": geo(angles, data["box_cols"], data["iso_xy"], data["box_ellipse"]),
        }
        out[n] = (data, geometry)
    return out


@pytest.mark.parametrize("beams", sorted(BEAM_COUNTS))
def test_beam_sum_matches_the_stacked_reference(problems, beams):
    """`_dose` and its gradient (what the optimizer differentiates) equal the stacked sum to
    float32 rounding, on the optimizer's coarse grid and its full-grid PTV box."""
    data, geometry = problems[beams]
    fluence = jnp.asarray(data["aperture"]) * jnp.linspace(0.5, 1.5, beams)[:, None, None]
    for part, z in (("coarse", data["z_rel"]), ("box", data["box_z_rel"])):
        cot = jnp.cos(jnp.arange(geometry[part][1].shape[1] * len(z), dtype=jnp.float32)).reshape(-1, len(z))
        new_dose, new_grad = _dose_and_vjp(vmat._dose)(fluence, z, geometry[part], cot)
        old_dose, old_grad = _dose_and_vjp(ref._dose)(fluence, z, geometry[part], cot)
        scale = float(jnp.max(jnp.abs(old_dose)))
        assert scale > 0
        np.testing.assert_allclose(new_dose, old_dose, rtol=0, atol=1e-6 * scale, err_msg=part)
        np.testing.assert_allclose(new_grad, old_grad, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(old_grad))), err_msg=part)


def _dose_and_vjp(dose_fn):
    """jit of (dose, its vjp with `cot`); everything an argument (no constants for XLA to fold)."""

    def both(fluence, z, geometry, cot):
        dose, vjp = jax.vjp(lambda f: dose_fn(f, z, geometry), fluence)
        return dose, vjp(cot)[0]

    return _JITTED.setdefault(dose_fn, jax.jit(both))


_JITTED = {}


@pytest.mark.parametrize("style", synth.STYLES)
def test_plans_match_the_pre_change_generator(style):
    """Every style: identical masks, the dose within DOSE_ATOL_GY of the pre-change plan."""
    case = synth.generate_case(style, *ANATOMY, scale=0.5)
    mask_sha, dose_sum, voxels = ref.PRE_CHANGE_PLANS[style]
    assert hashlib.sha256(np.packbits(case.masks).tobytes()).hexdigest() == mask_sha
    for i, j, k, value in voxels:
        assert abs(float(case.dose[i, j, k]) - value) <= DOSE_ATOL_GY, (style, (i, j, k))
    assert abs(float(case.dose.astype(np.float64).sum()) - dose_sum) <= DOSE_ATOL_GY * case.dose.size


def test_same_seed_gives_identical_arrays():
    a = synth.generate_case("internal_b", 1, 3, scale=0.5)
    b = synth.generate_case("internal_b", 1, 3, scale=0.5)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.dose, b.dose)
    assert a.dose.dtype == np.float32 and a.masks.dtype == bool


def test_ptv_mask_is_the_first_structure_mask():
    """The optimizer's full-grid PTV (`ptv_mask`, without the other organs) is the case's PTV."""
    for scale in (0.5, 1.0):
        grid = anatomy.grid_for_scale(scale)
        for index in (0, 1, synth.TEST_ANATOMY_BASE):
            patient = anatomy.sample_anatomy(2, index)
            np.testing.assert_array_equal(anatomy.ptv_mask(patient, grid), anatomy.structure_masks(patient, grid)[0])
