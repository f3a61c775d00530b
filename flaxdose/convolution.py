"""The UNet's 3x3x3 convolution in two exact forms, and the backend choice between them.

- ``"3d"``: ``lax.conv_general_dilated`` on the 5-D input, as ``flax.linen.Conv`` does. cuDNN's
  3D convolution is fast; XLA:CPU's is not (4-9x slower than its own 2D convolution, measured
  in docs/performance.md).
- ``"2d"``: the same convolution as one 2D convolution. The input is shifted by -1, 0, +1 along
  the first spatial axis X, the three copies are stacked as 3*C channels, X is folded into
  the batch, and a 3x3 convolution over (Y, Z) with the kernel reshaped to (3, 3, 3*C, D)
  finishes the sum over the X taps. Autodiff gives the input's gradient; the kernel's is one
  matrix product of the stacked input with nine shifted copies of the output gradient
  (`kernel_gradient`: the whole training step on XLA:CPU 1.14-1.16x faster for the paper preset
  and the (12..96) UNets, 0.91x for the quick start's 3-level UNet; nine separate products were
  slower, docs/performance.md). The fastest form for a training step on XLA:CPU.
- ``"2d_taps"``: three 2D convolutions over (Y, Z), one per X tap, on slices of the X-padded
  input (no stacked copy), summed. The fastest forward pass on XLA:CPU (1.3x the whole
  paper-preset inference); its gradient is the ``"2d"`` form's, which trains faster than the
  taps' own.

``"auto"`` picks per backend and task: on CPU ``"2d"`` to train and ``"2d_taps"`` to predict;
elsewhere cuDNN's ``"3d"``.

Both take the same kernel tensor (kx, ky, kz, C_in, C_out), so a checkpoint trained with one
form restores and predicts with the other; both equal the 3D convolution to float32
rounding (tests/test_model.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from flaxdose.errors import FlaxdoseError

CONV_FORMS = ("auto", "3d", "2d", "2d_taps")
_DN2 = ("NHWC", "HWIO", "NHWC")
_DN3 = ("NDHWC", "DHWIO", "NDHWC")


def check_form(form: str) -> None:
    """Raises FlaxdoseError unless `form` is one of `CONV_FORMS`."""
    if form not in CONV_FORMS:
        raise FlaxdoseError(f"model.conv must be one of {CONV_FORMS}, got {form!r}")


def resolve_form(form: str, backend: str | None = None, inference: bool = False) -> str:
    """``"auto"`` -> on the CPU backend ``"2d"`` (training) or ``"2d_taps"`` (`inference`: forward
    only), both measured fastest there; elsewhere ``"3d"`` (cuDNN). Other forms are returned as
    given. Raises FlaxdoseError for an unknown form."""
    check_form(form)
    if form != "auto":
        return form
    if (backend or jax.default_backend()) != "cpu":
        return "3d"
    return "2d_taps" if inference else "2d"


def _shifted(x: jax.Array) -> jax.Array:
    """(N, X, Y, Z, C) -> (N, X, Y, Z, 3C): x[i-1], x[i], x[i+1] along X (zero outside), stacked."""
    n = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    return jnp.concatenate([xp[:, t:t + n] for t in range(3)], axis=-1)


def _conv_2d(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    n, sx, sy, sz, c = x.shape
    stacked = _shifted(x).reshape(n * sx, sy, sz, 3 * c)
    k2 = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, kernel.shape[-1])  # channel = tap_x * C + c
    y = lax.conv_general_dilated(stacked, k2, (1, 1), "SAME", dimension_numbers=_DN2, precision=precision)
    return y.reshape(n, sx, sy, sz, kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3x3_2d(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """'SAME' 3x3x3 convolution (stride 1) of (N, X, Y, Z, C) by (3, 3, 3, C, D) in the ``"2d"`` form.

    Gradients: the input's by autodiff of the 2D convolution; the kernel's by `kernel_gradient`.
    """
    return _conv_2d(x, kernel, precision)


def kernel_gradient(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
    """d(loss)/d(kernel) (3, 3, 3, C, D) of the 'SAME' 3x3x3 convolution of x (N, X, Y, Z, C) given dy (N, X, Y, Z, D).

    dK[tx, ty, tz, c, d] = sum over voxels p of x[p + t - 1, c] dy[p, d] = sum over p of S[p, (tx, c)]
    dy[p - (ty, tz) + 1, d], with S the X-stacked input: one matrix product of S (voxels x 3C) with the
    nine (Y, Z)-shifted copies of dy side by side (voxels x 9D). XLA:CPU computes autodiff's kernel
    gradient of the 2D convolution by transposing S to put the batch last first; this product made
    the whole training step 1.14-1.16x faster for the larger UNets (docs/performance.md). Accumulates
    in float32.
    """
    n, sx, sy, sz, c = x.shape
    d = dy.shape[-1]
    stacked = _shifted(x).reshape(-1, 3 * c)
    dyp = jnp.pad(dy.reshape(n * sx, sy, sz, d), ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = jnp.concatenate([dyp[:, 2 - ty:2 - ty + sy, 2 - tz:2 - tz + sz] for ty in range(3) for tz in range(3)], -1)
    k = lax.dot_general(stacked, shifted.reshape(-1, 9 * d), (((0,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)  # (3C, 9D): rows (tx, c), columns (ty, tz, d)
    return k.reshape(3, c, 3, 3, d).transpose(0, 2, 3, 1, 4)


def _conv_2d_fwd(x, kernel, precision):
    return _conv_2d(x, kernel, precision), (x, kernel)


def _conv_2d_bwd(precision, residuals, dy):
    x, kernel = residuals
    dx = jax.vjp(lambda x: _conv_2d(x, kernel, precision), x)[1](dy)[0]
    return dx, kernel_gradient(x, dy, precision).astype(kernel.dtype)


conv3x3x3_2d.defvjp(_conv_2d_fwd, _conv_2d_bwd)


def _taps(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    n, sx, sy, sz, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    y = sum(lax.conv_general_dilated(xp[:, t:t + sx].reshape(n * sx, sy, sz, c), kernel[t], (1, 1), "SAME",
                                     dimension_numbers=_DN2, precision=precision) for t in range(3))
    return y.reshape(n, sx, sy, sz, kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3x3_2d_taps(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """The ``"2d_taps"`` form of `conv3x3x3_2d` (same arguments and result); gradients by the ``"2d"`` form."""
    return _taps(x, kernel, precision)


def _taps_fwd(x, kernel, precision):
    return _taps(x, kernel, precision), (x, kernel)


def _taps_bwd(precision, residuals, dy):
    return _conv_2d_bwd(precision, residuals, dy)  # the "2d" form's gradients


conv3x3x3_2d_taps.defvjp(_taps_fwd, _taps_bwd)


def conv_general_dilated_2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                            dimension_numbers=None, feature_group_count=1, precision=None, *, taps=False, **kwargs):
    """A drop-in for ``lax.conv_general_dilated`` as ``flax.linen.Conv`` calls it (channels-last 5-D
    input, (3, 3, 3, C, D) kernel, stride 1, 'SAME'): the ``"2d"`` form, or with `taps` the
    ``"2d_taps"`` form; any other use goes to lax unchanged."""
    plain = (
        lhs.ndim == 5 and rhs.shape[:3] == (3, 3, 3) and tuple(window_strides) == (1, 1, 1)
        and padding in ("SAME", ((1, 1),) * 3, [(1, 1)] * 3) and feature_group_count == 1
        and all(d in (None, 1, (1, 1, 1)) for d in (lhs_dilation, rhs_dilation)) and not kwargs
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN3)
    )
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    return (conv3x3x3_2d_taps if taps else conv3x3x3_2d)(lhs, rhs, precision)
