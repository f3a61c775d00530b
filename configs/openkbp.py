"""Train on OpenKBP (head-and-neck IMRT, the public benchmark) on the challenge's own 128^3 grid.

Convert the challenge data first (its `provided-data` folder; see docs/openkbp.md):
    python -m flaxdose.convert_openkbp provided-data --out data/openkbp --noinclude_ct
then
    python -m flaxdose.train --config=openkbp --config.data.path=data/openkbp --workdir runs/openkbp
The inputs are the ten structure masks in the challenge's order (OARs, then PTV56, PTV63,
PTV70; the CT is not used). `train-pats` trains, `validation-pats` (the dataset's "val"
split) gives the validation loss that picks the best checkpoint. `data.downsample` is the
grid factor of the dataset in `data.path` (2: a `--downsample 2` dataset, 64^3); scoring
uses it to bring predictions back to the challenge's grid (`python -m flaxdose.evaluate
--openkbp`). `launch/openkbp_study.py` runs the whole path at several scales.
"""

from flaxdose.configs import source
from flaxdose.openkbp import OPENKBP_STRUCTURES


def get_config():
    c = source.get_config()
    c.model.in_channels = len(OPENKBP_STRUCTURES)
    c.data.update(
        kind="folder",
        path="",  # the folder written by `python -m flaxdose.convert_openkbp`
        structures=OPENKBP_STRUCTURES,
        patch_shape=(96, 96, 96),
        patch_sigma=(10.0, 10.0, 10.0),
        val_cases=0,  # the dataset's own "val" split (validation-pats) validates
    )
    c.data.downsample = 1
    c.data.flip_lr = True  # the parotids swap channels, like the femoral heads
    return c
