"""Speed levers the benchmark can switch one at a time (see docs/performance.md).

- `XLA_FLAG_PRESETS`: named sets of XLA flags. They only act if set before JAX starts its
  backend, so `python -m flaxdose.bench --xla_flags NAME` sets them at start-up; one
  process measures one preset.
- `groupnorm_interceptor("fused")`: replaces every `nn.GroupNorm` call of the model, without
  touching its parameters, by a GroupNorm with statistics in float32 from one pass
  (sum and sum of squares), the affine folded into one multiply-add per element, and a
  hand-written backward (`jax.custom_vjp`) that needs two per-group reductions instead of
  what autodiff of the forward generates. The math is GroupNorm's; tests check it against flax.
- `make_optimizer(name, lr)`: `adam` (flaxdose.training.optim.adam, what the trainer uses) or `adam_flat`
  (optax.flatten: one concatenated vector, so the update is a few large kernels instead of a
  few per parameter).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxdose import model
from flaxdose.errors import FlaxdoseError
from flaxdose.training import optim

# Flag names checked against the jaxlib of the dev machine (an unknown flag aborts XLA).
XLA_FLAG_PRESETS: dict[str, str] = {
    "default": "",
    "autotune0": "--xla_gpu_autotune_level=0",
    "cmdbuf_off": "--xla_gpu_enable_command_buffer=",
    "runtime_fusion": "--xla_gpu_use_runtime_fusion=true",
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
}

GROUPNORM_VARIANTS = ("flax", "fused")
OPTIMIZERS = ("adam", "adam_flat")


def xla_flags_for(name_or_flags: str) -> str:
    """A preset name -> its flags; a string starting with '--' is taken as raw flags."""
    if name_or_flags.startswith("--"):
        return name_or_flags
    if name_or_flags not in XLA_FLAG_PRESETS:
        raise FlaxdoseError(
            f"unknown --xla_flags preset {name_or_flags!r}; choose one of {sorted(XLA_FLAG_PRESETS)} "
            "or pass raw flags starting with '--'"
        )
    return XLA_FLAG_PRESETS[name_or_flags]


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The trainer's Adam (`flaxdose.training.optim.adam`), or the same on one flattened parameter vector."""
    if name == "adam":
        return optim.adam(learning_rate)
    if name == "adam_flat":
        return optax.flatten(optim.adam(learning_rate))
    raise FlaxdoseError(f"unknown --optimizer {name!r}; choose one of {OPTIMIZERS}")


# ---------------------------------------------------------------- fused GroupNorm
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, groups: int, epsilon: float):
    """GroupNorm over all axes but the first (batch) and last (channels); float32 statistics."""
    return _gn_forward(x, scale, bias, groups, epsilon)[0]


def _stats(x, groups):
    n, c = x.shape[0], x.shape[-1]
    xg = x.reshape(n, -1, groups, c // groups).astype(jnp.float32)
    count = xg.shape[1] * xg.shape[3]
    s1 = jnp.sum(xg, axis=(1, 3))
    s2 = jnp.sum(jnp.square(xg), axis=(1, 3))
    mean = s1 / count
    var = jnp.maximum(s2 / count - jnp.square(mean), 0.0)
    return mean, var  # (n, groups)


def _per_channel(v, c):
    """(n, groups) -> (n, c): each group's value repeated for its c // groups channels."""
    n, g = v.shape
    return jnp.repeat(v, c // g, axis=1)


def _gn_forward(x, scale, bias, groups, epsilon):
    n, c = x.shape[0], x.shape[-1]
    mean, var = _stats(x, groups)
    inv = jax.lax.rsqrt(var + epsilon)
    a = _per_channel(inv, c) * scale.astype(jnp.float32)  # (n, c)
    b = bias.astype(jnp.float32) - _per_channel(mean, c) * a
    bshape = (n,) + (1,) * (x.ndim - 2) + (c,)
    y = (x.astype(jnp.float32) * a.reshape(bshape) + b.reshape(bshape)).astype(x.dtype)
    return y, (x, scale, mean, inv)


def _gn_fwd(x, scale, bias, groups, epsilon):
    y, res = _gn_forward(x, scale, bias, groups, epsilon)
    return y, (*res, bias)


def _gn_bwd(groups, epsilon, res, dy):
    x, scale, mean, inv, bias = res
    n, c = x.shape[0], x.shape[-1]
    bshape = (n,) + (1,) * (x.ndim - 2) + (c,)
    xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
    xhat = (xf - _per_channel(mean, c).reshape(bshape)) * _per_channel(inv, c).reshape(bshape)
    red = tuple(range(x.ndim - 1))
    dscale = jnp.sum(dyf * xhat, axis=red)
    dbias = jnp.sum(dyf, axis=red)
    g = dyf * scale.astype(jnp.float32)  # d loss / d xhat
    gg = g.reshape(n, -1, groups, c // groups)
    hg = xhat.reshape(n, -1, groups, c // groups)
    count = gg.shape[1] * gg.shape[3]
    m1 = jnp.sum(gg, axis=(1, 3), keepdims=True) / count
    m2 = jnp.sum(gg * hg, axis=(1, 3), keepdims=True) / count
    invg = inv[:, None, :, None]
    dx = (invg * (gg - m1 - hg * m2)).reshape(x.shape).astype(x.dtype)
    return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm.defvjp(_gn_fwd, _gn_bwd)


def _fused_groupnorm_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
        not isinstance(module, (nn.GroupNorm, model.GroupNorm))
        or context.method_name != "__call__"
        or module.is_initializing()
        or getattr(module, "group_size", None) is not None
        or not (getattr(module, "use_scale", True) and getattr(module, "use_bias", True))
    ):
        return next_fun(*args, **kwargs)
    x = args[0]
    dtype = module.dtype or x.dtype
    scale = module.get_variable("params", "scale")
    bias = module.get_variable("params", "bias")
    return group_norm(x.astype(dtype), scale, bias, module.num_groups, module.epsilon)


def groupnorm_interceptor(variant: str):
    """A context manager under which flax GroupNorm calls use the chosen implementation.

    It must be active while the model is traced (inside the jitted function).
    """
    if variant == "flax":
        return contextlib.nullcontext()
    if variant == "fused":
        return nn.intercept_methods(_fused_groupnorm_interceptor)
    raise FlaxdoseError(f"unknown --groupnorm {variant!r}; choose one of {GROUPNORM_VARIANTS}")


def with_groupnorm(fn, variant: str):
    """Wrap a function that applies the model so that it traces with the chosen GroupNorm."""
    if variant == "flax":
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with groupnorm_interceptor(variant):
            return fn(*args, **kwargs)

    return wrapped
