"""3D UNet with GroupNorm for dose prediction (Kandalan et al. 2020), in flax.linen.

Parameters are grouped in four top-level subtrees, `encoder`, `bottleneck`, `decoder` and
`head`, so transfer learning can freeze or re-initialize them by name. Inputs are
channels-last (N, X, Y, Z, C) and any spatial size works: the volume is zero-padded up to a
multiple of the total down-sampling factor and the output is cropped back.

Up-sampling by 2 is a bias-free 1x1x1 convolution to 8*C channels, a depth-to-space
reshape and one bias per output channel. That is exactly a 2x2x2 stride-2 transposed
convolution (whose windows never overlap) with the same parameter count, and its gradient
is several times faster on GPUs than `nn.ConvTranspose` (see docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from flaxdose.convolution import check_form, conv_general_dilated_2d, resolve_form
from flaxdose.errors import FlaxdoseError

NORM_ORDERS = ("relu_norm", "norm_relu")
SUBTREES = ("encoder", "bottleneck", "decoder", "head")
UPSAMPLE_INITS = ("default", "icnr")
# Model settings that change how the network is computed or initialized, not its parameter tree.
COMPUTE_ONLY = ("conv", "upsample_init")


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """Architecture hyper-parameters; `model.*` in the configs.

    features: channels per level, the last one the bottleneck's; convs_per_level: conv +
    ReLU + GroupNorm units per level; groups: GroupNorm groups (divides every feature count);
    in_channels: input masks (structures). Raises FlaxdoseError for invalid values.
    """

    features: tuple[int, ...] = (16, 32, 64, 128, 232)
    convs_per_level: int = 3
    groups: int = 8
    in_channels: int = 6
    norm_order: str = "relu_norm"  # paper: "group normalization after each set of conv and ReLU"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    conv: str = "auto"  # 3x3x3 convolution form (flaxdose.convolution.CONV_FORMS); same parameters in every form
    upsample_init: str = "default"  # "icnr": every up-sampling starts as nearest-neighbour (see `Upsample`)

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.groups < 1:
            raise FlaxdoseError(f"model.groups must be >= 1, got {self.groups}")
        if len(self.features) < 2:
            raise FlaxdoseError(f"model.features needs at least 2 levels (channels per level), got {self.features}; "
                                "on the command line write a tuple, e.g. '--config.model.features=(8,16,32)'")
        bad = [f for f in self.features if f % self.groups]
        if bad:
            raise FlaxdoseError(
                f"model.features {bad} are not divisible by model.groups={self.groups}; "
                "choose channel counts that are multiples of the GroupNorm group count"
            )
        if self.norm_order not in NORM_ORDERS:
            raise FlaxdoseError(f"model.norm_order must be one of {NORM_ORDERS}, got {self.norm_order!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise FlaxdoseError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        check_form(self.conv)
        if self.upsample_init not in UPSAMPLE_INITS:
            raise FlaxdoseError(f"model.upsample_init must be one of {UPSAMPLE_INITS}, got {self.upsample_init!r}")
        if self.convs_per_level < 1 or self.in_channels < 1:
            raise FlaxdoseError("model.convs_per_level and model.in_channels must be >= 1")

    @property
    def factor(self) -> int:
        """Total down-sampling factor: spatial sizes are padded to a multiple of it."""
        return 2 ** (len(self.features) - 1)

    @classmethod
    def from_config(cls, cfg) -> UNetSpec:
        """The spec of a `config.model` mapping; FlaxdoseError for a key that is not a UNetSpec field (a typo)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(dict(cfg)) - fields)
        if unknown:
            raise FlaxdoseError(f"model config keys {unknown} are not model settings; the settings are {sorted(fields)}")
        return cls(**{k: (tuple(v) if k == "features" else v) for k, v in dict(cfg).items()})


# Presets: `paper` matches the paper's 7,870,177 trainable parameters to within 0.2 %
# (five levels, three conv + ReLU + GroupNorm per level); `tiny` is for CPU tests.
PRESETS = {
    "paper": dict(features=(16, 32, 64, 128, 232), convs_per_level=3, groups=8),
    "small": dict(features=(8, 16, 32, 64), convs_per_level=2, groups=4),
    "tiny": dict(features=(4, 8), convs_per_level=1, groups=2),
}


def preset(name: str, **overrides) -> UNetSpec:
    """The `PRESETS[name]` spec with `overrides` (UNetSpec fields); FlaxdoseError for an unknown name."""
    if name not in PRESETS:
        raise FlaxdoseError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNetSpec(**{**PRESETS[name], **overrides})


def depth_to_space(x: jax.Array, channels: int) -> jax.Array:
    """(N, X, Y, Z, 8*C) -> (N, 2X, 2Y, 2Z, C); channel index = ((dx*2 + dy)*2 + dz)*C + c."""
    n, sx, sy, sz, _ = x.shape
    x = x.reshape(n, sx, sy, sz, 2, 2, 2, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(n, 2 * sx, 2 * sy, 2 * sz, channels)


def icnr_init(base=nn.initializers.lecun_normal()):
    """Initializer of the (1, 1, 1, Cin, 8*C) up-sampling projection: one (Cin, C) kernel drawn by
    `base`, repeated for the 8 sub-voxels, so the up-sampling starts as a projection followed by
    nearest-neighbour up-sampling and not as 8 independent kernels that paint a 2x2x2
    checkerboard into the dose (ICNR, Aitken et al. 2017, arXiv:1707.02937)."""

    def init(key, shape, dtype=jnp.float32):
        *taps, cin, cout = shape
        kernel = base(key, (*taps, cin, cout // 8), dtype)
        return jnp.tile(kernel, (1,) * len(taps) + (1, 8))  # channel (sub-voxel * C + c), as depth_to_space reads

    return init


class Upsample(nn.Module):
    """2x up-sampling equal to a 2x2x2 stride-2 `nn.ConvTranspose` (see module docstring).

    `initializer`: "default" draws the projection like any `nn.Conv`; "icnr" uses `icnr_init`. Both
    give the same parameter tree."""

    features: int
    dtype: jnp.dtype = jnp.float32
    initializer: str = "default"

    @nn.compact
    def __call__(self, x):
        kernel_init = icnr_init() if self.initializer == "icnr" else nn.linear.default_kernel_init
        y = nn.Conv(8 * self.features, (1, 1, 1), use_bias=False, dtype=self.dtype, kernel_init=kernel_init,
                    name="proj")(x)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return depth_to_space(y, self.features) + bias.astype(y.dtype)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float = 1e-6) -> jax.Array:
    """GroupNorm of (N, X, Y, Z, C) over (X, Y, Z) and the C/groups channels of each group, as
    `flax.linen.GroupNorm` computes it (float32 statistics, variance E[x^2] - E[x]^2 clipped at 0,
    then `scale` and `bias` per channel; Wu & He 2018), returned in float32.

    The sums are taken in two stages, over (Y, Z) and then over X: XLA:CPU reduces a whole volume
    in one pass 3x slower (forward; 1.9x with the gradient), measured in docs/performance.md.
    """
    n, c = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(n, x.shape[1], -1, c)
    s1 = xf.sum(2).sum(1).reshape(n, groups, -1).sum(-1)
    s2 = jnp.square(xf).sum(2).sum(1).reshape(n, groups, -1).sum(-1)
    count = math.prod(x.shape[1:-1]) * (c // groups)
    mean = s1 / count
    var = jnp.maximum(s2 / count - jnp.square(mean), 0.0)
    a = jnp.repeat(jax.lax.rsqrt(var + epsilon), c // groups, axis=1) * scale  # (N, C)
    b = bias - jnp.repeat(mean, c // groups, axis=1) * a
    shape = (n,) + (1,) * (x.ndim - 2) + (c,)
    return xf.reshape(x.shape) * a.reshape(shape) + b.reshape(shape)


class GroupNorm(nn.Module):
    """`flax.linen.GroupNorm(num_groups)` with the same parameters (`scale` ones, `bias` zeros, float32)
    and math, computed by `group_norm`; the output in `dtype`."""

    num_groups: int
    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


class ConvBlock(nn.Module):
    """`n` times: 3x3x3 conv (in the resolved `conv` form), then ReLU and GroupNorm in the configured order."""

    features: int
    n: int
    groups: int
    norm_order: str
    dtype: jnp.dtype = jnp.float32
    conv: str = "3d"

    @nn.compact
    def __call__(self, x):
        form = resolve_form(self.conv)
        conv_fn = None if form == "3d" else functools.partial(conv_general_dilated_2d, taps=form == "2d_taps")
        for i in range(self.n):
            x = nn.Conv(self.features, (3, 3, 3), dtype=self.dtype, conv_general_dilated=conv_fn, name=f"conv{i}")(x)
            norm = GroupNorm(num_groups=self.groups, dtype=self.dtype, name=f"norm{i}")
            x = norm(nn.relu(x)) if self.norm_order == "relu_norm" else nn.relu(norm(x))
        return x


class Encoder(nn.Module):
    """Per level but the last: a `ConvBlock`, then 2x2x2 max-pool; returns (pooled, [skip per level])."""

    spec: UNetSpec

    @nn.compact
    def __call__(self, x):
        s, dtype = self.spec, jnp.dtype(self.spec.dtype)
        skips = []
        for level, f in enumerate(s.features[:-1]):
            x = ConvBlock(f, s.convs_per_level, s.groups, s.norm_order, dtype, s.conv, name=f"level{level}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
        return x, skips


class Decoder(nn.Module):
    """Per level, deepest first: `Upsample`, concatenation with the skip (channels-last), a `ConvBlock`."""

    spec: UNetSpec

    @nn.compact
    def __call__(self, x, skips):
        s, dtype = self.spec, jnp.dtype(self.spec.dtype)
        for level in reversed(range(len(s.features) - 1)):
            f = s.features[level]
            x = Upsample(f, dtype, s.upsample_init, name=f"up{level}")(x)
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x = ConvBlock(f, s.convs_per_level, s.groups, s.norm_order, dtype, s.conv, name=f"level{level}")(x)
        return x


class UNet3D(nn.Module):
    """(N, X, Y, Z, in_channels) masks -> float32 (N, X, Y, Z) dose in units of the prescription.

    Raises FlaxdoseError for an input of another rank or channel count.
    """

    spec: UNetSpec

    def setup(self):
        """The four parameter subtrees (`SUBTREES`): encoder, bottleneck, decoder, float32 1x1x1 head."""
        s = self.spec
        self.encoder = Encoder(s)
        self.bottleneck = ConvBlock(
            s.features[-1], s.convs_per_level, s.groups, s.norm_order, jnp.dtype(s.dtype), s.conv
        )
        self.decoder = Decoder(s)
        self.head = nn.Conv(1, (1, 1, 1), dtype=jnp.float32)

    def __call__(self, x):
        if x.ndim != 5 or x.shape[-1] != self.spec.in_channels:
            raise FlaxdoseError(
                f"model input must be (N, X, Y, Z, {self.spec.in_channels}), got {x.shape}"
            )
        size = x.shape[1:4]
        padded = tuple(math.ceil(n / self.spec.factor) * self.spec.factor for n in size)
        x = jnp.pad(x, [(0, 0)] + [(0, p - n) for p, n in zip(padded, size)] + [(0, 0)])
        x = x.astype(self.spec.dtype)
        x, skips = self.encoder(x)
        x = self.bottleneck(x)
        x = self.decoder(x, skips)
        y = self.head(x.astype(jnp.float32))[..., 0]
        return y[:, : size[0], : size[1], : size[2]]


def init_params(spec: UNetSpec, rng: jax.Array, patch_shape: Sequence[int] | None = None):
    """The float32 parameter tree of `UNet3D(spec)` (without the "params" wrapper), initialised from `rng`.

    A small dummy input is used (parameter shapes do not depend on it); `patch_shape` (X, Y, Z)
    only changes that input.
    """
    shape = tuple(patch_shape) if patch_shape is not None else (spec.factor,) * 3
    return _init_fn(spec, tuple(int(n) for n in shape))(rng)


@functools.lru_cache(maxsize=16)
def _init_fn(spec: UNetSpec, shape: tuple[int, ...]):
    """jit-compiled init, cached so that many runs of one model (sweeps) compile it once."""
    dummy = np.zeros((1, *shape, spec.in_channels), np.float32)  # numpy: never a tracer, even if first called under a trace
    return jax.jit(lambda key: UNet3D(spec).init(key, dummy)["params"])  # jit: op-by-op init is slow


def count_params(params) -> int:
    """Total number of parameter elements in a pytree."""
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
