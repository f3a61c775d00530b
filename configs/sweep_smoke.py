"""A seconds-long sweep for tests and a first try: 8 tiny runs (2 modes x 2 plan counts x 2 seeds).

On 4 devices it trains in 2 waves of 4 (one per mode). Data: the source and internal_c
styles on a half-size grid.
"""

from flaxdose.configs import quick
from flaxdose.configs._sweep import sweep_config


def get_config():
    base = quick.base_config()
    base.model.update(features=(4, 8), convs_per_level=1, groups=2)
    base.data.update(patch_shape=(16, 16, 16), patch_sigma=(4.0, 4.0, 2.0), val_cases=1)
    base.train.update(steps=4, batch_size=2, log_every=2, eval_every=4, checkpoint_every=2)
    return sweep_config(
        base,
        targets={"internal_c": (1, 2)},
        modes=("paper", "full"),
        seeds=(0, 1),
        learning_rates=(1e-3,),
        scratch_learning_rates=(1e-3,),
        source_train=dict(steps=4, learning_rate=1e-3),
        plans={"source": (3, 1), "internal_c": (2, 1)},
    )
