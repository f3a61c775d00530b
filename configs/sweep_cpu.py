"""The default sweep, sized for a 2-core CPU (under an hour): the few-shot learning curve.

Target styles internal_a (up to its 29 plans) and external (up to 20), 2..29 training plans,
modes paper / full / scratch (the control), 2 seeds: 48 runs of 120 steps on a half-size grid
with a small UNet; the short schedule takes learning rate 3e-4 for the transfer modes.
Results: docs/results/sweep_cpu.md. For a GPU, raise `base` to the paper's settings
(configs/source.py) and the grid to more modes and seeds.
"""

from flaxdose.configs import quick
from flaxdose.configs._sweep import sweep_config


def get_config():
    base = quick.base_config()
    base.model.update(features=(8, 16, 32), convs_per_level=1, groups=4)
    base.data.update(patch_shape=(32, 32, 16), val_cases=4)
    base.train.update(steps=120, batch_size=4, log_every=40, eval_every=120, checkpoint_every=40)
    return sweep_config(
        base,
        targets={"internal_a": (2, 5, 10, 29), "external": (2, 5, 10, 20)},
        modes=("paper", "full", "scratch"),
        seeds=(0, 1),
        learning_rates=(3e-4,),
        scratch_learning_rates=(1e-3,),
        source_train=dict(steps=1000, learning_rate=1e-3, eval_every=250, checkpoint_every=250),
        plans={"source": (48, 4), "internal_a": (29, 5), "external": (20, 10)},
    )
