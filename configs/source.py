"""The paper's source model: full 120x120x64 grid, paper UNet preset, 96x96x48 patches, Adam 1e-4.

Trains on the built-in synthetic `source` style with the paper's split (108 train / 10 test),
generated and cached under `<workdir>/data` on first use.
"""

import ml_collections
from ml_collections import config_dict

from flaxdose.data.case import PROSTATE_STRUCTURES
from flaxdose.model import PRESETS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(PRESETS["paper"], in_channels=len(PROSTATE_STRUCTURES), norm_order="relu_norm", dtype="float32",
             conv="auto",  # 3x3x3 form: auto = 2D rewrite on CPU, cuDNN's 3D on GPU; the parameters do not depend on it
             upsample_init="default")  # "icnr": up-sampling starts as nearest-neighbour (no checkerboard; model.Upsample)
    )
    c.data = ml_collections.ConfigDict(
        dict(
            kind="synthetic",  # synthetic | phantom | folder
            path="",  # dataset folder for kind=folder
            cache_dir="",  # where built-in data is generated; "" = <workdir>/data
            style="source",
            n_train=108,
            n_test=10,
            scale=1.0,  # 1.0 = the paper's 120x120x64 grid
            seed=0,
            phantom_shape=(32, 32, 16),
            structures=PROSTATE_STRUCTURES,
            train_split="train",
            train_cases=(),  # case ids: train on this subset of the split (empty = all of it)
            val_cases=8,  # held out of the train split for the validation loss (no "val" split)
            patch_shape=(96, 96, 48),
            patch_sigma=(8.0, 8.0, 4.0),  # voxels; Gaussian spread of patch centres around the PTV centroid
            flip_lr=True,
            # Extra inputs after the masks (flaxdose.data.pipeline.InputSpec; model.in_channels counts them):
            # target_distance False: none; True: one, the signed distance to the union of the targets (PTV...);
            # "per_target": one per target in structures (a target a case lacks reads 4.0, "far from it").
            # Any of the three on the command line (--config.data.target_distance=per_target).
            target_distance=config_dict.FieldReference(False, field_type=object),
            include_ct=False,  # True: one more input, last: the CT, HU clipped to [-1000, 2000] / 1000
            workers=2,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=20000,
            batch_size=8,  # global; split over local devices
            learning_rate=1e-4,
            schedule="constant",  # or "warmup_cosine" / "warmup_stable_decay" (flaxdose.training.optim.schedule_factor)
            warmup_steps=0,
            decay_steps=0,  # warmup_stable_decay: the last steps, decaying to end_lr_fraction
            end_lr_fraction=0.01,
            target_weight=1.0,  # >1: MSE with target (PTV) voxels weighted more (trainer.DoseLoss); 1 = the paper
            log_every=50,
            eval_every=500,
            checkpoint_every=500,
            keep_checkpoints=2,
        )
    )
    c.transfer = ml_collections.ConfigDict(dict(mode="none", source="", learning_rate=1e-5))
    return c
