"""Scales of the OpenKBP study (`python -m flaxdose.launch.openkbp_study --scale NAME`).

Each scale overrides `configs/openkbp.py`. `downsample` is the training grid: the challenge's
128^3 grid divided by it along every axis (`flaxdose.openkbp.downsample_case`); scores are
always computed on the challenge's own grid against the original doses. `anneal` (optional)
continues training from the best checkpoint at a lower learning rate (a step decay);
`mirror` averages every prediction with that of the left-right mirrored case. A scale whose
``data`` sets ``include_ct`` trains and is scored on the patients with a CT only (the study's CT
subset stage), as is one with ``ct_patients_only`` (a masks-only model on the CT model's
patients); ``model.in_channels`` follows the data settings (configs/openkbp.py).
"""

SCALES = {
    # Seconds: a test runs the whole path on the four sample patients (3 train, 1 validation).
    "smoke": dict(
        downsample=4,
        mirror=True,
        data={"patch_shape": (32, 32, 32), "patch_sigma": (1.0, 1.0, 1.0), "workers": 0},
        model={"features": (4, 8), "convs_per_level": 1, "groups": 2},
        train={"steps": 2, "batch_size": 4, "learning_rate": 1e-3, "log_every": 1, "eval_every": 2,
               "checkpoint_every": 2},
        anneal={"steps": 2, "learning_rate": 2e-4},
    ),
    # Within 40 minutes on the 2-core dev machine: 64^3 grid (twice the voxel size), 32^3 patches around
    # the targets. Chosen on a tuning split of train-pats (`--tune`, docs/results/openkbp_cpu.md, ablation):
    # one signed-distance channel per PTV level (the network knows which dose level a voxel is near),
    # target voxels weighted 10x in the MSE, GroupNorm before the ReLU, nearest-neighbour-initialized
    # up-sampling, a wider UNet and warmup-stable-decay at 2e-3 (the decay replaces the old anneal phase).
    "openkbp_cpu": dict(
        downsample=2,
        mirror=True,
        data={"patch_shape": (32, 32, 32), "patch_sigma": (6.0, 4.0, 6.0), "workers": 0,
              "target_distance": "per_target"},
        model={"features": (12, 24, 48, 96), "convs_per_level": 2, "groups": 4, "norm_order": "norm_relu",
               "upsample_init": "icnr"},
        train={"steps": 4000, "batch_size": 2, "learning_rate": 2e-3, "schedule": "warmup_stable_decay",
               "warmup_steps": 100, "decay_steps": 1000, "end_lr_fraction": 0.01, "target_weight": 10.0,
               "log_every": 50, "eval_every": 1000, "checkpoint_every": 1000},
    ),
    # One <= 9-minute call on one H200 (bf16), the data converted beforehand (--data_only, see
    # docs/openkbp.md): 64^3 grid (twice the voxel size), whole volumes, the paper's UNet
    # preset, with what openkbp_cpu learned (per-target distance channels, target weight 10, GroupNorm
    # before the ReLU, ICNR up-sampling, warmup-stable-decay in place of the anneal phase). Not run yet:
    # the step count is an estimate.
    "openkbp_gpu": dict(
        downsample=2,
        mirror=True,
        data={"patch_shape": (64, 64, 64), "patch_sigma": (2.0, 2.0, 2.0), "workers": 4,
              "target_distance": "per_target"},
        model={"dtype": "bfloat16", "norm_order": "norm_relu", "upsample_init": "icnr"},
        train={"steps": 2500, "batch_size": 8, "learning_rate": 5e-4, "schedule": "warmup_stable_decay",
               "warmup_steps": 100, "decay_steps": 625, "end_lr_fraction": 0.01, "target_weight": 10.0,
               "log_every": 50, "eval_every": 250, "checkpoint_every": 250},
    ),
}


def _with_data(scale: str, data: dict | None = None, **settings) -> dict:
    """Scale `scale` with more ``data`` and study settings (the rest shared, so it follows that scale's tuning)."""
    base = SCALES[scale]
    return {**base, **settings, "data": {**base["data"], **(data or {})}}


# The smoke and CPU scales with the CT as one more input channel (HU, flaxdose.data.pipeline.ct_channel): trained
# and scored on the patients with a CT (170 of 196 train-pats, 33 of 40 validation-pats); compare with the
# masks-only scale's "patients with a CT" table (python -m flaxdose.launch.openkbp_study --compare), or with
# openkbp_cpu_ct_patients: the masks-only model trained and scored on the same patients as the CT model.
SCALES["smoke_ct"] = _with_data("smoke", {"include_ct": True})
SCALES["openkbp_cpu_ct"] = _with_data("openkbp_cpu", {"include_ct": True})
SCALES["openkbp_cpu_ct_patients"] = _with_data("openkbp_cpu", ct_patients_only=True)
