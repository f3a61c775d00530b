"""The PyTorch baseline: flaxdose's UNet3D layer for layer, and a weight converter.

`TorchUNet3D(spec)` builds the same network as `flaxdose.model.UNet3D(spec)`:

- per level `convs_per_level` times a 3x3x3 convolution (padding 1) followed by ReLU and
  GroupNorm in `spec.norm_order` (GroupNorm epsilon 1e-6, flax's default, not torch's 1e-5);
- 2x2x2 max-pool down, 2x2x2 stride-2 `ConvTranspose3d` up (flaxdose's 1x1x1 projection +
  depth-to-space + bias is exactly this layer, with the same parameter count), the skip
  concatenated after the up-sampled tensor, a 1x1x1 float32 head;
- the input zero-padded at the end of each spatial axis up to a multiple of `spec.factor`
  and the output cropped back.

Torch is channels-first: flaxdose's (N, X, Y, Z, C) is torch's (N, C, X, Y, Z), with
(D, H, W) = (X, Y, Z). Module names mirror the flax parameter tree, so
`flax_to_torch_state_dict(params)` is a renaming plus kernel transposes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from flaxdose.errors import FlaxdoseError
from flaxdose.model import UNetSpec

try:
    import torch
    from torch import nn
    import torch.nn.functional as F
except ImportError:  # the baseline is an optional extra
    torch = None

GROUPNORM_EPS = 1e-6  # flax.linen.GroupNorm's default


def require_torch():
    """The torch module, or a FlaxdoseError that says how to install it."""
    if torch is None:
        raise FlaxdoseError(
            "the PyTorch baseline needs torch, which is not installed; "
            "install it from the flaxdose checkout with `pip install -e \".[bench]\"` (or pip install torch), "
            "or measure flaxdose alone with --frameworks=flax"
        )
    return torch


if torch is not None:

    class ConvBlock(nn.Module):
        """`n` times: 3x3x3 conv, then ReLU and GroupNorm in the given order (names conv{i}, norm{i})."""

        def __init__(self, cin: int, features: int, n: int, groups: int, norm_order: str):
            super().__init__()
            self.n, self.norm_order = n, norm_order
            for i in range(n):
                self.add_module(f"conv{i}", nn.Conv3d(cin if i == 0 else features, features, 3, padding=1))
                self.add_module(f"norm{i}", nn.GroupNorm(groups, features, eps=GROUPNORM_EPS))

        def forward(self, x):
            for i in range(self.n):
                x = getattr(self, f"conv{i}")(x)
                norm = getattr(self, f"norm{i}")
                x = norm(F.relu(x)) if self.norm_order == "relu_norm" else F.relu(norm(x))
            return x

    class Encoder(nn.Module):
        """Per level a `ConvBlock` then 2x2x2 max-pool; returns (pooled, skips before pooling)."""

        def __init__(self, spec: UNetSpec):
            super().__init__()
            self.levels = len(spec.features) - 1
            cin = spec.in_channels
            for level, f in enumerate(spec.features[:-1]):
                self.add_module(f"level{level}", ConvBlock(cin, f, spec.convs_per_level, spec.groups, spec.norm_order))
                cin = f

        def forward(self, x):
            skips = []
            for level in range(self.levels):
                x = getattr(self, f"level{level}")(x)
                skips.append(x)
                x = F.max_pool3d(x, 2, 2)
            return x, skips

    class Decoder(nn.Module):
        """Per level, deepest first: 2x up-sampling, concatenation with the skip, a `ConvBlock`."""

        def __init__(self, spec: UNetSpec):
            super().__init__()
            self.levels = len(spec.features) - 1
            cin = spec.features[-1]
            for level in reversed(range(self.levels)):
                f = spec.features[level]
                self.add_module(f"up{level}", nn.ConvTranspose3d(cin, f, 2, stride=2))
                self.add_module(f"level{level}", ConvBlock(2 * f, f, spec.convs_per_level, spec.groups, spec.norm_order))
                cin = f

        def forward(self, x, skips):
            for level in reversed(range(self.levels)):
                x = getattr(self, f"up{level}")(x)
                x = torch.cat([x, skips[level]], dim=1)
                x = getattr(self, f"level{level}")(x)
            return x

    class TorchUNet3D(nn.Module):
        """(N, C, X, Y, Z) masks -> (N, X, Y, Z) dose / prescription; see the module docstring."""

        def __init__(self, spec: UNetSpec):
            super().__init__()
            self.spec = spec
            self.encoder = Encoder(spec)
            self.bottleneck = ConvBlock(
                spec.features[-2], spec.features[-1], spec.convs_per_level, spec.groups, spec.norm_order
            )
            self.decoder = Decoder(spec)
            self.head = nn.Conv3d(spec.features[0], 1, 1)

        def forward(self, x):
            if x.ndim != 5 or x.shape[1] != self.spec.in_channels:
                raise FlaxdoseError(
                    f"torch model input must be (N, {self.spec.in_channels}, X, Y, Z), got {tuple(x.shape)}"
                )
            size = x.shape[2:]
            f = self.spec.factor
            pad = [(math.ceil(n / f) * f - n) for n in size]
            if any(pad):  # F.pad lists the last axis first
                x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
            x, skips = self.encoder(x)
            x = self.bottleneck(x)
            x = self.decoder(x, skips)
            with torch.autocast(x.device.type, enabled=False):  # float32 head, as in flaxdose
                y = self.head(x.to(self.head.weight.dtype))[:, 0]
            return y[:, : size[0], : size[1], : size[2]]

else:  # pragma: no cover - exercised only without torch

    class TorchUNet3D:  # noqa: D101
        def __init__(self, *args, **kwargs):
            require_torch()


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def flax_to_torch_state_dict(params) -> dict:
    """flaxdose UNet3D params -> a state_dict for `TorchUNet3D` of the same spec (float32 tensors).

    - 3x3x3 / 1x1x1 conv kernel (kx, ky, kz, cin, cout) -> weight (cout, cin, kx, ky, kz);
    - up-sampling projection (1, 1, 1, cin, 8*C), channel ((dx*2+dy)*2+dz)*C + c ->
      ConvTranspose3d weight (cin, C, dx, dy, dz);
    - GroupNorm scale -> weight; biases keep their names.
    """
    torch_ = require_torch()
    if hasattr(params, "unfreeze"):
        params = params.unfreeze()
    if "params" in params and len(params) == 1:
        params = params["params"]
    out = {}
    for path, value in _flatten(params):
        array = np.array(value, dtype=np.float32)  # a writable copy for torch.from_numpy
        *module, leaf = path
        if module and module[-1] == "proj" and leaf == "kernel":  # Upsample projection
            cin, channels = array.shape[3], array.shape[4] // 8
            array = array.reshape(cin, 2, 2, 2, channels).transpose(0, 4, 1, 2, 3)
            name = (*module[:-1], "weight")
        elif leaf == "kernel":
            array = array.transpose(4, 3, 0, 1, 2)
            name = (*module, "weight")
        elif leaf == "scale":
            name = (*module, "weight")
        elif leaf == "bias":
            name = (*module, "bias")
        else:
            raise FlaxdoseError(f"unexpected parameter {'/'.join(path)} in flaxdose params; is this a UNet3D tree?")
        out[".".join(name)] = torch_.from_numpy(np.ascontiguousarray(array))
    return out


def torch_model_from_flax(spec: UNetSpec, params):
    """A `TorchUNet3D` on the CPU holding exactly the given flaxdose params (strict load)."""
    require_torch()
    model = TorchUNet3D(spec)
    state = flax_to_torch_state_dict(params)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or extra or bad_shapes:
        raise FlaxdoseError(
            f"params do not fit TorchUNet3D({spec}): missing {missing[:4]}, unexpected {extra[:4]}, "
            f"wrong shapes {bad_shapes[:4]}; convert params of a UNet3D with the same spec"
        )
    model.load_state_dict(state, strict=True)
    return model


def count_torch_params(model) -> int:
    """Number of trainable parameters (elements of tensors with requires_grad) of a torch module."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
