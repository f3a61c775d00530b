"""The one optimizer builder: Adam, an optional learning-rate schedule, and freezing for transfer
learning (see `flaxdose.training.transfer`).

The learning rate lives in the optimizer state (`optax.inject_hyperparams`), so runs with
different rates have states of one structure: a sweep stacks them and trains them with one
compiled step, each at its own rate. Only the rate is injected; Adam's moments and the
updates are computed exactly as `optax.adam(learning_rate)` computes them. A schedule
(``train.schedule``) multiplies the updates by a factor of the step (`schedule_factor`),
after the injected rate, so per-run rates and the schedule compose; ``"constant"`` adds no
transformation at all (bit-identical to `optax.adam`).
"""

from __future__ import annotations

import logging
import math

import optax

from flaxdose.errors import FlaxdoseError
from flaxdose.training import transfer

SCHEDULES = ("constant", "warmup_cosine", "warmup_stable_decay")
log = logging.getLogger("flaxdose")


def scaled_warmup_decay(warmup: int, decay: int, steps: int) -> tuple[int, int]:
    """A warmup and decay that fit a run of `steps` (>= 1).

    Unchanged when warmup + decay <= steps. Else a warmup shorter than the run is kept as the
    user set it and the decay shrinks to the rest, steps - warmup; a warmup as long as the run
    or longer is scaled down with the decay, both by steps / (warmup + decay) and rounded down,
    keeping a warmup >= 1 if there was one (a 1-step run has none: the warmup must end before
    the last step) and a decay >= 1.
    """
    if warmup + decay <= steps:
        return warmup, decay
    if warmup < steps:
        return warmup, steps - warmup
    factor = steps / (warmup + decay)
    new_warmup = min(max(math.floor(warmup * factor), 1 if warmup >= 1 else 0), steps - 1)
    return new_warmup, max(1, min(math.floor(decay * factor), steps - new_warmup))


def fit_schedule(config):
    """`config`, or a copy whose ``train.warmup_steps`` and ``train.decay_steps`` fit ``train.steps``
    (`scaled_warmup_decay`) for a ``"warmup_stable_decay"`` run too short for them, so
    ``--config.train.steps=20`` on a config made for 1000 steps just works; the change is logged.
    Other schedules, and settings `schedule_factor` refuses anyway (decay <= 0, steps < 1), pass
    unchanged. Fitting a fitted config changes nothing."""
    train = config.train
    if train.get("schedule", "constant") != "warmup_stable_decay":
        return config
    warmup, decay, steps = int(train.warmup_steps), int(train.get("decay_steps", 0)), int(train.steps)
    if steps < 1 or warmup < 0 or decay <= 0 or warmup + decay <= steps:
        return config
    new_warmup, new_decay = scaled_warmup_decay(warmup, decay, steps)
    how = ("warmup kept, decay shrunk to the remaining steps" if new_warmup == warmup
           else "both scaled down, as the warmup alone fills the run")
    log.warning("train.warmup_steps=%d + train.decay_steps=%d exceed train.steps=%d: warmup %d and decay %d steps "
                "(%s; set them to choose others)", warmup, decay, steps, new_warmup, new_decay, how)
    config = config.copy_and_resolve_references()
    config.train.warmup_steps, config.train.decay_steps = new_warmup, new_decay
    return config


def schedule_factor(train_cfg) -> optax.Schedule | None:
    """The learning-rate multiplier of step t, or None for ``train.schedule == "constant"``.

    ``"warmup_cosine"``: linear from 0 to 1 over ``train.warmup_steps``, then a cosine decay
    to ``train.end_lr_fraction`` at ``train.steps`` (`optax.warmup_cosine_decay_schedule`;
    Loshchilov & Hutter 2017, SGDR). ``"warmup_stable_decay"``: the same warmup, then 1 until
    the last ``train.decay_steps``, which decay it (cosine) to ``train.end_lr_fraction``
    (Hu et al. 2024, MiniCPM, "WSD"): the rate stays high while the model is far from
    converged, and the short low-rate end settles it. Raises FlaxdoseError for an unknown
    schedule, or a warmup and decay that do not fit in the run.
    """
    name = train_cfg.get("schedule", "constant")
    if name == "constant":
        return None
    if name not in SCHEDULES:
        raise FlaxdoseError(f"unknown train.schedule {name!r}; choose one of {SCHEDULES}")
    warmup, steps, end = int(train_cfg.warmup_steps), int(train_cfg.steps), float(train_cfg.end_lr_fraction)
    if not 0 <= warmup < steps:
        raise FlaxdoseError(f"train.warmup_steps={warmup} must be >= 0 and below train.steps={steps}")
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps, end_value=end)
    decay = int(train_cfg.get("decay_steps", 0))
    if not 0 < decay <= steps - warmup:
        raise FlaxdoseError(f"train.decay_steps={decay} must be > 0 and at most train.steps - train.warmup_steps "
                            f"= {steps - warmup}")
    return optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0),
         optax.cosine_decay_schedule(1.0, decay, alpha=end)],
        boundaries=[warmup, steps - decay],
    )


def adam(learning_rate: float, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """`optax.adam(learning_rate)` with the rate in the state (``state[1].hyperparams["learning_rate"]``).

    With `schedule`, the updates are further multiplied by ``schedule(step)``.
    """
    parts = [optax.scale_by_adam(), optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate)]
    if schedule is not None:
        parts.append(optax.scale_by_schedule(schedule))
    return optax.chain(*parts)


def make_optimizer(config, params) -> optax.GradientTransformation:
    """The optimizer of a run config.

    Training from scratch: Adam at ``train.learning_rate`` on every parameter. Transfer
    (``transfer.mode`` other than "none"): Adam at ``transfer.learning_rate`` on the mode's
    trainable parameters and `optax.set_to_zero` on the frozen ones, through
    `optax.multi_transform`, so frozen parameters stay bit-identical and carry no moments.
    Both follow ``train.schedule`` (`schedule_factor`) over the run's ``train.steps``.
    `params` gives the tree the labels are computed for. Raises FlaxdoseError for an
    unknown transfer mode or schedule.
    """
    schedule = schedule_factor(config.get("train", {}))
    if not transfer.is_transfer(config):
        return adam(config.train.learning_rate, schedule)
    labels = transfer.param_labels(params, transfer.get_mode(config.transfer.mode))
    return optax.multi_transform(
        {transfer.TRAINABLE: adam(config.transfer.learning_rate, schedule), transfer.FROZEN: optax.set_to_zero()}, labels
    )


def learning_rate(config, step: int) -> float:
    """The learning rate that update number `step` (1-based) of a run of `config` applies: the run's base rate
    (``train.learning_rate``, or ``transfer.learning_rate`` for transfer) times its schedule's factor
    (`schedule_factor`) of the step count before the update."""
    base = float(config.transfer.learning_rate if transfer.is_transfer(config) else config.train.learning_rate)
    schedule = schedule_factor(config.train)
    return base if schedule is None else base * float(schedule(max(int(step) - 1, 0)))
