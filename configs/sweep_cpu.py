"""The default sweep, sized for a 2-core CPU (under 40 minutes): the few-shot learning curve.

Target styles internal_a and external, 2, 5, 10 and 29 training plans each (10 test plans each),
the paper's transfer recipe and full fine-tuning, 3 seeds: 48 runs. The model and loss are the
quick start's (configs/quick.py: a 7th input, the signed distance to the PTV; GroupNorm before
the ReLU, ICNR up-sampling; PTV voxels weighted 10x); the source model is trained as the quick
start is, for 2500 steps. Each fine-tune: 450 steps of 2 patches, Adam 1e-3 held, then decayed
over the last quarter (the cpu paper study's transfer recipe, shorter, to fit 48 runs in the 40
minutes): with the old 120 steps at batch 4 the curve was flat (the step budget, not the plans,
limited it).
Results: docs/results/sweep_cpu.md. For a GPU, raise `base` to the paper's settings
(configs/source.py) and the grid to more modes and seeds.
"""

from flaxdose.configs import quick
from flaxdose.configs._sweep import sweep_config


def get_config():
    base = quick.get_config()
    base.data.update(val_cases=4)
    base.train.update(steps=450, batch_size=2, learning_rate=1e-3, warmup_steps=40, decay_steps=110,
                      log_every=50, eval_every=450, checkpoint_every=150)
    return sweep_config(
        base,
        targets={"internal_a": (2, 5, 10, 29), "external": (2, 5, 10, 29)},
        modes=("paper", "full"),
        seeds=(0, 1, 2),
        learning_rates=(1e-3,),
        scratch_learning_rates=(2e-3,),
        source_train=dict(steps=2500, learning_rate=2e-3, warmup_steps=80, decay_steps=625, eval_every=1250,
                          checkpoint_every=1250),
        plans={"source": (48, 4), "internal_a": (29, 10), "external": (29, 10)},
    )
