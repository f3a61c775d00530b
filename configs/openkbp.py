"""Train on an OpenKBP dataset (head-and-neck IMRT, the public benchmark).

Convert the challenge data first:
    python -m flaxdose.data.openkbp convert open-kbp/provided-data --out data/openkbp
then
    python -m flaxdose.train --config=openkbp --config.data.path=data/openkbp --workdir runs/openkbp
Volumes are 128^3 on each patient's own voxel size; the ten structure masks are the inputs
(the CT channel of the dataset is not used by the model). Score predictions with
`flaxdose.metrics.openkbp_scores`.
"""

from flaxdose.configs import source
from flaxdose.data.openkbp import OPENKBP_STRUCTURES


def get_config():
    c = source.get_config()
    c.model.in_channels = len(OPENKBP_STRUCTURES)
    c.data.update(
        kind="folder",
        path="",  # the folder written by `python -m flaxdose.data.openkbp convert`
        structures=OPENKBP_STRUCTURES,
        patch_shape=(96, 96, 96),
        patch_sigma=(10.0, 10.0, 10.0),
        val_cases=0,
    )
    c.data.flip_lr = True  # the parotids swap channels, like the femoral heads
    return c
