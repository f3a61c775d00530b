"""The one optimizer builder: Adam, with freezing for transfer learning (see `flaxdose.transfer`).

The learning rate lives in the optimizer state (`optax.inject_hyperparams`), so runs with
different rates have states of one structure: a sweep stacks them and trains them with one
compiled step, each at its own rate. Only the rate is injected; Adam's moments and the
updates are computed exactly as `optax.adam(learning_rate)` computes them.
"""

from __future__ import annotations

import optax

from flaxdose import transfer


def adam(learning_rate: float) -> optax.GradientTransformation:
    """`optax.adam(learning_rate)` with the rate in the state (``state[1].hyperparams["learning_rate"]``)."""
    return optax.chain(
        optax.scale_by_adam(),
        optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate),
    )


def make_optimizer(config, params) -> optax.GradientTransformation:
    """The optimizer of a run config.

    Training from scratch: Adam at ``train.learning_rate`` on every parameter. Transfer
    (``transfer.mode`` other than "none"): Adam at ``transfer.learning_rate`` on the mode's
    trainable parameters and `optax.set_to_zero` on the frozen ones, through
    `optax.multi_transform`, so frozen parameters stay bit-identical and carry no moments.
    `params` gives the tree the labels are computed for. Raises FlaxdoseError for an
    unknown transfer mode.
    """
    if not transfer.is_transfer(config):
        return adam(config.train.learning_rate)
    labels = transfer.param_labels(params, transfer.get_mode(config.transfer.mode))
    return optax.multi_transform(
        {transfer.TRAINABLE: adam(config.transfer.learning_rate), transfer.FROZEN: optax.set_to_zero()}, labels
    )
