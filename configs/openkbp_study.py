"""Scales of the OpenKBP study (`python -m launch.openkbp_study --scale NAME`).

Each scale overrides `configs/openkbp.py`. `downsample` is the training grid: the challenge's
128^3 grid divided by it along every axis (`flaxdose.openkbp.downsample_case`); scores are
always computed on the challenge's own grid against the original doses.
"""

SCALES = {
    # Seconds: a test runs the whole path on the four sample patients (3 train, 1 validation).
    "smoke": dict(
        downsample=4,
        data={"patch_shape": (32, 32, 32), "patch_sigma": (1.0, 1.0, 1.0), "workers": 0},
        model={"features": (4, 8), "convs_per_level": 1, "groups": 2},
        train={"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1, "eval_every": 2,
               "checkpoint_every": 2},
    ),
    # Within 40 minutes on the 2-core dev machine: 32^3 grid (4x the voxel size), whole volumes.
    "openkbp_cpu": dict(
        downsample=4,
        data={"patch_shape": (32, 32, 32), "patch_sigma": (2.0, 2.0, 2.0), "workers": 0},
        model={"features": (8, 16, 32, 64), "convs_per_level": 2, "groups": 4},
        train={"steps": 250, "batch_size": 4, "learning_rate": 2e-3, "log_every": 10, "eval_every": 50,
               "checkpoint_every": 50},
    ),
    # One <= 9-minute call on one H200 (bf16): 64^3 grid (twice the voxel size), whole volumes,
    # the paper's UNet preset. Unmeasured so far.
    "openkbp_gpu": dict(
        downsample=2,
        data={"patch_shape": (64, 64, 64), "patch_sigma": (2.0, 2.0, 2.0), "workers": 2},
        model={"dtype": "bfloat16"},
        train={"steps": 4000, "batch_size": 8, "learning_rate": 1e-3, "log_every": 50, "eval_every": 250,
               "checkpoint_every": 250},
    ),
}
