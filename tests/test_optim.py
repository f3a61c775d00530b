"""The optimiser (flaxdose.training.optim): Adam with the learning rate in its state, the schedules'
factors by hand, and a short run's warmup and decay fitted to its steps."""

import logging
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest

from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError
from flaxdose.model import init_params, preset
from flaxdose.training import optim, trainer


def test_adam_with_the_rate_in_its_state_equals_optax_adam_bitwise():
    """optim.adam keeps the rate in the state (sweeps stack per-run rates) and computes what optax.adam does."""
    params = init_params(preset("tiny"), jax.random.key(0))
    grads = jax.tree.map(lambda p: np.random.default_rng(1).standard_normal(p.shape).astype(np.float32), params)
    for lr in (1e-3, 3e-4):
        ours, ref = optim.adam(lr), optax.adam(lr)
        s_ours, s_ref = ours.init(params), ref.init(params)
        for _ in range(3):
            u_ours, s_ours = ours.update(grads, s_ours, params)
            u_ref, s_ref = ref.update(grads, s_ref, params)
            for a, b in zip(jax.tree_util.tree_leaves(u_ours), jax.tree_util.tree_leaves(u_ref)):
                np.testing.assert_array_equal(a, b)
        assert float(s_ours[1].hyperparams["learning_rate"]) == np.float32(lr)


# ---------------------------------------------------------------- the schedules
def test_warmup_cosine_schedule_scales_adam_by_the_factor_of_the_step():
    """Factor by hand: linear 0 -> 1 over the warmup, then 0.5 (1 + cos(pi t)) decaying to end_lr_fraction."""
    train = ml_collections.ConfigDict({"schedule": "warmup_cosine", "warmup_steps": 2, "end_lr_fraction": 0.1, "steps": 6})
    factor = optim.schedule_factor(train)
    cosine = lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    for step, want in ((0, 0.0), (1, 0.5), (2, 1.0), (4, cosine(0.5)), (6, 0.1)):
        assert float(factor(step)) == pytest.approx(want, abs=1e-6), step
    params = init_params(preset("tiny"), jax.random.key(0))
    grads = jax.tree.map(lambda p: np.random.default_rng(1).standard_normal(p.shape).astype(np.float32), params)
    ours, ref = optim.adam(1e-3, factor), optax.adam(1e-3)
    s_ours, s_ref = ours.init(params), ref.init(params)
    for step in range(4):
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_ref, s_ref = ref.update(grads, s_ref, params)
        for a, b in zip(jax.tree_util.tree_leaves(u_ours), jax.tree_util.tree_leaves(u_ref)):
            np.testing.assert_allclose(a, np.asarray(b) * float(factor(step)), rtol=1e-6, atol=1e-12)
    assert optim.schedule_factor(ml_collections.ConfigDict({"schedule": "constant"})) is None
    with pytest.raises(FlaxdoseError, match="warmup_cosine"):
        optim.schedule_factor(ml_collections.ConfigDict({"schedule": "cosine"}))
    with pytest.raises(FlaxdoseError, match="below train.steps"):
        optim.schedule_factor(ml_collections.ConfigDict({**train, "warmup_steps": 6}))


def test_warmup_stable_decay_holds_the_rate_then_decays_over_the_last_steps():
    """Factor by hand: linear warmup over 2 steps, 1 until step 6, then a cosine to 0.1 over the last 4 of 10."""
    train = ml_collections.ConfigDict({"schedule": "warmup_stable_decay", "warmup_steps": 2, "decay_steps": 4,
                                       "end_lr_fraction": 0.1, "steps": 10})
    factor = optim.schedule_factor(train)
    cosine = lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    for step, want in ((0, 0.0), (1, 0.5), (2, 1.0), (5, 1.0), (6, 1.0), (7, cosine(0.25)), (8, cosine(0.5)), (10, 0.1)):
        assert float(factor(step)) == pytest.approx(want, abs=1e-6), step
    for decay in (0, 9):
        with pytest.raises(FlaxdoseError, match="decay_steps"):
            optim.schedule_factor(ml_collections.ConfigDict({**train, "decay_steps": decay}))


# ---------------------------------------------------------------- a short run's warmup and decay
def test_warmup_and_decay_scale_down_with_a_short_run_by_hand(caplog):
    # 20 steps, warmup 20 + decay 125 = 145: x 20/145 -> 2.76 and 17.24, rounded down: 2 and 17
    assert optim.scaled_warmup_decay(20, 125, 20) == (2, 17)
    assert optim.scaled_warmup_decay(1, 1000, 20) == (1, 19)  # 0.02 -> kept at 1; 19.98 -> 19
    assert optim.scaled_warmup_decay(20, 125, 1) == (0, 1)  # one step: no room for a warmup
    assert optim.scaled_warmup_decay(20, 125, 500) == (20, 125)  # fits: unchanged
    config = config_lib.load_config("quick", {"train.steps": 20, "train.warmup_steps": 40, "train.decay_steps": 250})
    with caplog.at_level(logging.WARNING, logger="flaxdose"):
        fitted = optim.fit_schedule(config)
    assert (fitted.train.warmup_steps, fitted.train.decay_steps) == (2, 17)
    # warmup 40 >= 20 steps: both scaled by 20 / (40 + 250): 2.76 and 17.24, rounded down: 2 and 17
    assert (config.train.warmup_steps, config.train.decay_steps) == (40, 250)  # the caller's config is untouched
    assert "warmup 2 and decay 17 steps (both scaled down" in caplog.text
    import jax

    from flaxdose.model import UNetSpec

    spec, devices = UNetSpec.from_config(config.model), jax.local_devices()[:1]
    with pytest.raises(FlaxdoseError, match="warmup_steps=40 must be"):
        trainer.check_setup(config, spec, devices)  # what train_and_evaluate checked before fitting
    trainer.check_setup(fitted, spec, devices)  # valid now
    unchanged = config_lib.load_config("quick")  # its own warmup and decay fit its steps
    assert optim.fit_schedule(unchanged) is unchanged


def test_a_warmup_shorter_than_the_run_is_kept(caplog):
    assert optim.scaled_warmup_decay(15, 250, 20) == (15, 5)  # 20 - 15 = 5
    assert optim.scaled_warmup_decay(19, 1, 20) == (19, 1)  # fits: unchanged
    assert optim.scaled_warmup_decay(19, 2, 20) == (19, 1)
    # warmup 30 >= 20 steps: both x 20 / (30 + 175) = 0.09756: 2.93 -> 2, 17.07 -> 17
    assert optim.scaled_warmup_decay(30, 175, 20) == (2, 17)
    # warmup 20 = steps: x 20 / 145: 2.76 -> 2, 17.24 -> 17
    assert optim.scaled_warmup_decay(20, 125, 20) == (2, 17)
    config = config_lib.load_config("quick", {"train.steps": 20, "train.warmup_steps": 15})
    with caplog.at_level(logging.WARNING, logger="flaxdose"):
        fitted = optim.fit_schedule(config)
    assert (fitted.train.warmup_steps, fitted.train.decay_steps) == (15, 5)
    assert "warmup 15 and decay 5 steps (warmup kept" in caplog.text
    quick = config_lib.load_config("quick", {"train.steps": 20, "train.warmup_steps": 30, "train.decay_steps": 175})
    fitted = optim.fit_schedule(quick)
    assert (fitted.train.warmup_steps, fitted.train.decay_steps) == (2, 17)
    assert optim.fit_schedule(fitted) is fitted  # fitting a fitted config changes nothing
