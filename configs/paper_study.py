"""Scales of the paper study (`python -m launch.paper_study --scale NAME`).

Each scale overrides the `source` config and the transfer configs. `splits` None means the
paper's Table 1 sizes. Transfer keeps the paper's ratio: learning rate one tenth of the source's.
"""

SCALES = {
    # Seconds: a test runs the whole pipeline end to end.
    "smoke": dict(
        splits={"source": (3, 1), "internal_a": (2, 1), "internal_b": (2, 1), "internal_c": (2, 1), "external": (2, 1)},
        data={"scale": 0.5, "patch_shape": (16, 16, 16), "patch_sigma": (4.0, 4.0, 2.0), "val_cases": 1, "workers": 0},
        model={"features": (4, 8), "convs_per_level": 1, "groups": 2},
        source_train={"steps": 4, "batch_size": 4, "learning_rate": 1e-3, "log_every": 2, "eval_every": 4, "checkpoint_every": 4},
        target_train={"steps": 2, "batch_size": 4, "log_every": 2, "eval_every": 2, "checkpoint_every": 2},
        transfer_lr=1e-4,
    ),
    # Within 40 minutes on the 2-core dev machine: half-size grid, small UNet.
    "cpu": dict(
        splits=None,
        data={"scale": 0.5, "patch_shape": (32, 32, 16), "patch_sigma": (8.0, 8.0, 4.0), "val_cases": 4, "workers": 0},
        model={"features": (8, 16, 32), "convs_per_level": 2, "groups": 4},
        source_train={"steps": 1200, "batch_size": 4, "learning_rate": 1e-3, "log_every": 50, "eval_every": 250, "checkpoint_every": 250},
        target_train={"steps": 300, "batch_size": 4, "log_every": 50, "eval_every": 100, "checkpoint_every": 100},
        transfer_lr=1e-4,
    ),
    # The paper's settings on a GPU: full grid, paper preset, 96x96x48 patches, Adam 1e-4 / 1e-5.
    "paper": dict(
        splits=None,
        data={},
        model={},
        source_train={"steps": 20000},
        target_train={"steps": 4000},
        transfer_lr=1e-5,
    ),
}
