"""The one Grid, and resample (scipy.ndimage) against the former hand-written trilinear code."""

import numpy as np
import pytest

from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM, Grid
from flaxdose.dicom.geometry import resample


def test_grid_coordinates_and_centring():
    grid = Grid((-10.0, 5.0, 2.5), (2.0, 0.5, 3.0), (4, 3, 2))
    np.testing.assert_array_equal(grid.coords(0), [-10.0, -8.0, -6.0, -4.0])
    assert grid.coords(1).dtype == np.float64
    x, y, z = grid.axes()
    assert x.dtype == y.dtype == z.dtype == np.float32
    np.testing.assert_array_equal(z, np.float32([2.5, 5.5]))
    assert grid.as_dict() == {"origin_mm": [-10.0, 5.0, 2.5], "spacing_mm": [2.0, 0.5, 3.0], "shape": [4, 3, 2]}
    model = Grid.centred(MODEL_SHAPE, MODEL_SPACING_MM, centre_mm=(1.0, -2.0, 3.0))
    assert model.shape == (120, 120, 64) and model.spacing_mm == (4.0, 4.0, 3.0)
    # the middle of the voxel block is the centre: (n - 1) / 2 voxels from the origin
    assert model.origin_mm == (1.0 - 59.5 * 4.0, -2.0 - 59.5 * 4.0, 3.0 - 31.5 * 3.0)
    assert Grid((0, 0, 0), (1, 1, 1), (2, 2, 2)) == Grid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (2, 2, 2))


# The hand-written resampling that flaxdose used before scipy (commit ea8791b), kept here as
# the reference: separable linear interpolation, points outside the source grid get cval.
def _old_axis_weights(c, n, order):
    c = np.asarray(c, np.float64)
    if order == 0 or n == 1:
        i = np.rint(c).astype(np.int64)
        valid = (c >= -0.5) & (c <= n - 0.5) if n > 1 or order == 0 else np.abs(c) <= 0.5
        return np.clip(i, 0, n - 1), None, valid
    valid = (c >= -1e-6) & (c <= n - 1 + 1e-6)
    cc = np.clip(c, 0, n - 1)
    i0 = np.clip(np.floor(cc).astype(np.int64), 0, n - 2)
    return i0, cc - i0, valid


def _old_resample(volume, src, dst, order=1, cval=0.0):
    out = np.asarray(volume, np.float32)
    valid_all = []
    for axis in range(3):
        idx = (dst.coords(axis) - src.origin_mm[axis]) / src.spacing_mm[axis]
        i0, w, valid = _old_axis_weights(idx, out.shape[axis], order)
        if w is None:
            out = np.take(out, i0, axis=axis)
        else:
            shape = [1, 1, 1]
            shape[axis] = -1
            w = w.reshape(shape).astype(np.float32)
            out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
        valid_all.append(valid)
    inside = valid_all[0][:, None, None] & valid_all[1][None, :, None] & valid_all[2][None, None, :]
    return np.where(inside, out, np.float32(cval)).astype(np.float32)


@pytest.mark.parametrize("order", [0, 1])
def test_resample_equals_the_former_implementation(order):
    rng = np.random.default_rng(7)
    for _ in range(150):
        src = Grid(rng.uniform(-20, 20, 3), rng.uniform(0.5, 4, 3), rng.integers(1, 10, 3))
        dst = Grid(rng.uniform(-25, 15, 3), rng.uniform(0.3, 5, 3), rng.integers(1, 12, 3))
        volume = rng.normal(0, 30, src.shape).astype(np.float32)
        new, old = resample(volume, src, dst, order, cval=-7.0), _old_resample(volume, src, dst, order, cval=-7.0)
        assert new.dtype == np.float32 and new.shape == dst.shape
        # the same interpolation; scipy sums in float64, the old code in float32
        np.testing.assert_allclose(new, old, rtol=0, atol=2e-5 * 30)
        assert np.array_equal(new == -7.0, old == -7.0)  # the same points fall outside


def test_resample_on_the_same_lattice_and_at_the_edges():
    src = Grid((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (4, 3, 2))
    volume = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    # a sub-grid, and the same grid one voxel larger on each side: outer voxels get cval
    np.testing.assert_array_equal(resample(volume, src, Grid((2.0, 0.0, 0.0), (2.0, 2.0, 2.0), (2, 3, 2))), volume[1:3])
    big = resample(volume, src, Grid((-2.0, -2.0, -2.0), (2.0, 2.0, 2.0), (6, 5, 4)), cval=-1.0)
    np.testing.assert_array_equal(big[1:-1, 1:-1, 1:-1], volume)
    assert (big[0] == -1).all() and (big[:, :, -1] == -1).all()
    # half-way between voxel centres: the mean of the two (trilinear), by hand
    mid = resample(volume, src, Grid((1.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 1, 1)))
    assert mid[0, 0, 0] == pytest.approx((volume[0, 0, 0] + volume[1, 0, 0]) / 2)
