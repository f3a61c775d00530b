import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdose.errors import FlaxdoseError
from flaxdose.model import SUBTREES, UNet3D, UNetSpec, Upsample, count_params, init_params, preset

PAPER_PARAMS = 7_870_177


def test_upsample_equals_strided_conv_transpose():
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 5, 6))
    conv_t = nn.ConvTranspose(4, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
    ct_params = conv_t.init(jax.random.key(2), x)["params"]
    ct_params = {**ct_params, "bias": jax.random.normal(jax.random.key(3), (4,))}
    # lax.conv_transpose flips the kernel spatially; our channel order is ((dx*2+dy)*2+dz)*C + c.
    kernel = ct_params["kernel"][::-1, ::-1, ::-1].transpose(3, 0, 1, 2, 4).reshape(1, 1, 1, 6, 32)
    ours = Upsample(4).apply({"params": {"proj": {"kernel": kernel}, "bias": ct_params["bias"]}}, x)
    ref = conv_t.apply({"params": ct_params}, x)
    assert ours.shape == ref.shape == (2, 6, 8, 10, 4)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    ours_count = count_params(Upsample(4).init(jax.random.key(0), x))
    assert ours_count == count_params(ct_params)


def test_paper_preset_parameter_count_and_shapes():
    spec = preset("paper", in_channels=6)
    params = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
    assert sorted(params) == sorted(SUBTREES)
    n = count_params(params)
    assert abs(n / PAPER_PARAMS - 1) < 0.03, n
    for shape in [(96, 96, 48), (120, 120, 64)]:
        out = jax.eval_shape(lambda p, x: UNet3D(spec).apply({"params": p}, x), params, jnp.zeros((1, *shape, 6)))
        assert out.shape == (1, *shape)


@pytest.mark.parametrize("shape", [(8, 8, 8), (5, 6, 7), (9, 4, 3)])
def test_any_size_is_padded_and_cropped(shape):
    spec = preset("tiny", in_channels=6)
    params = init_params(spec, jax.random.key(0))
    x = jax.random.bernoulli(jax.random.key(1), 0.3, (2, *shape, 6)).astype(jnp.float32)
    y = UNet3D(spec).apply({"params": params}, x)
    assert y.shape == (2, *shape) and y.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params():
    spec = preset("tiny", dtype="bfloat16")
    params = init_params(spec, jax.random.key(0))
    assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    x = jnp.ones((1, 4, 4, 4, 6))
    y32 = UNet3D(preset("tiny")).apply({"params": params}, x)
    y16 = UNet3D(spec).apply({"params": params}, x)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=0.1)


def test_norm_order_is_configurable_and_matters():
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 4, 6))
    a, b = preset("tiny"), preset("tiny", norm_order="norm_relu")
    params = init_params(a, jax.random.key(0))
    assert count_params(params) == count_params(init_params(b, jax.random.key(0)))
    ya = UNet3D(a).apply({"params": params}, x)
    yb = UNet3D(b).apply({"params": params}, x)
    assert not np.allclose(ya, yb)


def test_bad_specs_raise_flaxdose_error():
    with pytest.raises(FlaxdoseError, match="groups must be >= 1"):
        UNetSpec(groups=0)
    with pytest.raises(FlaxdoseError, match=r"\['featurs'\] are not model settings"):
        UNetSpec.from_config({"featurs": (8, 16), "groups": 4})
    with pytest.raises(FlaxdoseError, match="divisible"):
        UNetSpec(features=(6, 12), groups=4)
    with pytest.raises(FlaxdoseError, match=r"at least 2 levels.*--config.model.features=\(8,16,32\)"):
        UNetSpec(features=(8,), groups=4)
    with pytest.raises(FlaxdoseError, match="norm_order"):
        UNetSpec(norm_order="sideways")
    with pytest.raises(FlaxdoseError, match="unknown model preset"):
        preset("huge")
    spec = preset("tiny")
    params = init_params(spec, jax.random.key(0))
    with pytest.raises(FlaxdoseError, match="model input"):
        UNet3D(spec).apply({"params": params}, jnp.ones((1, 4, 4, 4, 3)))
