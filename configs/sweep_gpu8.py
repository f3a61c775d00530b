"""8 fine-tunes for one GPU, packed into a single wave (vmap): the packing check of issue 7.

`bash launch/gpu_bench.sh sweep` trains them packed and one after another and reports both
wall times. Full-size grid, the `small` UNet preset, 64x64x32 patches.
"""

from flaxdose.configs import source
from flaxdose.configs._sweep import sweep_config
from flaxdose.model import PRESETS


def get_config():
    base = source.get_config()
    base.model.update(PRESETS["small"])
    base.data.update(patch_shape=(64, 64, 32), val_cases=2, workers=0)
    base.train.update(steps=100, batch_size=2, log_every=25, eval_every=100, checkpoint_every=100)
    return sweep_config(
        base,
        targets={"internal_a": (2, 5, 10, 29)},
        modes=("paper",),
        seeds=(0, 1),
        learning_rates=(1e-4,),
        scratch_learning_rates=(1e-3,),
        source_train=dict(steps=300, learning_rate=1e-3, eval_every=100, checkpoint_every=100),
        plans={"source": (16, 2), "internal_a": (29, 5)},
        scale=1.0,
        runs_per_device=8,
    )
