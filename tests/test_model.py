import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdose.convolution import conv3x3x3_2d, conv3x3x3_2d_taps, conv_general_dilated_2d, resolve_form
from flaxdose.errors import FlaxdoseError
from flaxdose.model import SUBTREES, GroupNorm, UNet3D, UNetSpec, Upsample, count_params, init_params, preset

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


def test_icnr_upsample_starts_as_nearest_neighbour():
    x = jax.random.normal(jax.random.key(1), (1, 3, 4, 5, 6))
    default, icnr = Upsample(4), Upsample(4, initializer="icnr")
    p_default, p_icnr = default.init(jax.random.key(0), x), icnr.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, p_default) == jax.tree.map(jnp.shape, p_icnr)  # same tree: checkpoints load
    y = np.asarray(icnr.apply(p_icnr, x))
    # Nearest neighbour of the (Cin, C) projection: the 2x2x2 block of every input voxel holds one value.
    kernel = np.asarray(p_icnr["params"]["proj"]["kernel"]).reshape(6, 32)[:, :4]
    expected = np.repeat(np.repeat(np.repeat(np.asarray(x) @ kernel, 2, 1), 2, 2), 2, 3)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    # The default draws 8 independent kernels: a 2x2x2 checkerboard from the first step.
    assert np.abs(np.diff(np.asarray(default.apply(p_default, x))[:, :2], axis=1)).max() > 0.1


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
    with pytest.raises(FlaxdoseError, match="upsample_init"):
        UNetSpec(upsample_init="bilinear")
    with pytest.raises(FlaxdoseError, match="norm_order"):
        UNetSpec(norm_order="sideways")
    with pytest.raises(FlaxdoseError, match="unknown model preset"):
        preset("huge")
    spec = preset("tiny")
    params = init_params(spec, jax.random.key(0))
    with pytest.raises(FlaxdoseError, match="model input"):
        UNet3D(spec).apply({"params": params}, jnp.ones((1, 4, 4, 4, 3)))


# ---------------------------------------------------------------- convolution forms
def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("shape, c_in, c_out", [((5, 7, 3), 3, 4), ((1, 2, 9), 6, 2), ((4, 4, 4), 16, 8)])
def test_2d_form_equals_lax_3d_convolution(shape, c_in, c_out):
    _assert_forms_agree(((2, *shape, c_in), (3, 3, 3, c_in, c_out)))


def _conv3d(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _assert_forms_agree(*shapes):
    """For each (input shape, kernel shape): the "2d" and "2d_taps" forms' outputs and both gradients (of a
    non-linear loss) equal the 3D convolution's to float32 rounding. One jitted program per form for all
    shapes (fast)."""
    xs = [jax.random.normal(jax.random.key(0), x) for x, _ in shapes]
    ks = [jax.random.normal(jax.random.key(1), k) / np.sqrt(np.prod(k[:4])) for _, k in shapes]  # outputs O(1)

    def outputs_and_grads(conv):
        loss = lambda x, k: jnp.sum(jnp.sin(conv(x, k)))  # noqa: E731
        return jax.jit(lambda xs, ks: [(conv(x, k), *jax.grad(loss, (0, 1))(x, k)) for x, k in zip(xs, ks)])(xs, ks)

    reference = outputs_and_grads(_conv3d)
    for form in (conv3x3x3_2d, conv3x3x3_2d_taps):
        for ours, theirs in zip(outputs_and_grads(form), reference):
            for a, b in zip(ours, theirs):
                assert _rel_err(a, b) < 1e-5, form.__name__


def test_2d_form_gradients_in_bfloat16():
    """In bfloat16 the kernel gradient (one matrix product, float32 accumulation) keeps the kernel's dtype and
    is within bfloat16 rounding of the float32 3D convolution's."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 4, 8))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 8, 4)) / np.sqrt(216)
    loss = lambda conv, x, k: jnp.sum(jnp.sin(conv(x, k).astype(jnp.float32)))  # noqa: E731
    dx16, dk16 = jax.grad(lambda x, k: loss(conv3x3x3_2d, x, k), (0, 1))(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    dx, dk = jax.grad(lambda x, k: loss(_conv3d, x, k), (0, 1))(x, k)
    assert dx16.dtype == dk16.dtype == jnp.bfloat16
    assert _rel_err(dk16.astype(jnp.float32), dk) < 3e-2 and _rel_err(dx16.astype(jnp.float32), dx) < 3e-2


def test_2d_form_leaves_other_convolutions_to_lax():
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4, 3))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 3, 5))  # a 1x1x1 projection: not rewritten
    dn = ("NDHWC", "DHWIO", "NDHWC")
    ours = conv_general_dilated_2d(x, k, (1, 1, 1), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(ours, jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=dn), rtol=1e-6)


def test_auto_form_per_backend_and_bad_form():
    assert resolve_form("auto", "cpu") == "2d" and resolve_form("auto", "gpu") == "3d"
    assert resolve_form("auto", "cpu", inference=True) == "2d_taps" and resolve_form("auto", "gpu", inference=True) == "3d"
    assert resolve_form("3d", "cpu") == "3d" and resolve_form("2d", "cpu", inference=True) == "2d"
    with pytest.raises(FlaxdoseError, match="model.conv"):
        preset("tiny", conv="winograd")


def _conv_layer_shapes(spec, x):
    """(input shape, kernel shape) of every 3x3x3 convolution the UNet runs on `x`, read off the model."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.module.kernel_size == (3, 3, 3):
            seen.append((args[0].shape, (3, 3, 3, args[0].shape[-1], context.module.features)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: UNet3D(spec).apply({"params": p}, x), init_params(spec, jax.random.key(0)))
    return sorted(set(seen))


@pytest.mark.parametrize("name, shape", [("tiny", (5, 6, 7)),  # the small and paper presets compile ~20 layer
                                         pytest.param("small", (9, 8, 5), marks=pytest.mark.slow),  # shapes twice:
                                         pytest.param("paper", (17, 16, 9), marks=pytest.mark.slow)])  # 1-2 min each
def test_every_layer_of_every_preset_equal_in_both_forms(name, shape):
    """Every 3x3x3 convolution the preset runs on an odd-sized input (padded by the model): the 2D rewrite's
    output and both gradients equal the 3D convolution's to float32 rounding; then the whole UNet's output.
    (Whole-network gradients are not compared here: max-pool near-ties may be broken by float32 rounding
    differently in the two forms, routing a gradient to another, equally valid voxel.)"""
    spec3 = preset(name, conv="3d")
    x = jax.random.bernoulli(jax.random.key(1), 0.3, (1, *shape, spec3.in_channels)).astype(jnp.float32)
    layers = _conv_layer_shapes(spec3, x)
    assert len(layers) >= 2 * (len(spec3.features) - 1) + 1  # every level, both paths, the bottleneck
    _assert_forms_agree(*layers)
    params = init_params(spec3, jax.random.key(0))
    y3 = jax.jit(UNet3D(spec3).apply)({"params": params}, x)
    for form in ("2d", "2d_taps"):
        y = jax.jit(UNet3D(preset(name, conv=form)).apply)({"params": params}, x)
        assert _rel_err(y, y3) < 1e-4, form  # up to 17 layers deep: float32 rounding adds up (one layer: 1e-5)


@pytest.mark.parametrize("shape, groups", [((2, 5, 6, 7, 8), 4), ((1, 2, 1, 1, 12), 3), ((1, 9, 4, 3, 16), 8)])
def test_group_norm_equals_flax_group_norm(shape, groups):
    """The model's GroupNorm (two-stage sums) has flax.linen.GroupNorm's parameters, values and gradients."""
    x = 3.0 + jax.random.normal(jax.random.key(0), shape)  # an offset exercises E[x^2] - E[x]^2
    ours, theirs = GroupNorm(num_groups=groups), nn.GroupNorm(num_groups=groups)
    params = theirs.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)  # not the identity
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours.apply)(params, x), jax.jit(theirs.apply)(params, x), rtol=1e-4, atol=1e-4)  # the offset costs
    # both implementations a digit in E[x^2] - E[x]^2 (float32), summed in another order
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss(ours), (0, 1)))(params, x)),
                    jax.tree.leaves(jax.jit(jax.grad(loss(theirs), (0, 1)))(params, x))):
        assert _rel_err(a, b) < 1e-4
