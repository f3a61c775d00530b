"""Train on OpenKBP (head-and-neck IMRT, the public benchmark): ``--config=openkbp[:SCALE]``.

Convert the challenge data first (its `provided-data` folder; see docs/openkbp.md):
    python -m flaxdose.convert_openkbp provided-data --out workdirs/openkbp64 --noinclude_ct --downsample 2
then
    python -m flaxdose.train --config=openkbp:openkbp_cpu --config.data.path=workdirs/openkbp64 --workdir workdirs/openkbp-run
The inputs are the ten structure masks in the challenge's order (OARs, then PTV56, PTV63,
PTV70), then what the scale's ``data`` adds (`flaxdose.data.pipeline.InputSpec`:
``target_distance``, ``include_ct``, the CT as the last channel; a CT model needs a dataset
converted with the CT, the default). `model.in_channels` is the channel count of these data
settings (`InputSpec.channels`); set it again when overriding them on the command line
(training says the value). `train-pats` trains, `validation-pats` (the dataset's "val" split)
gives the validation loss that picks the best checkpoint.

Without SCALE: the paper's UNet on the challenge's own 128^3 grid, 96^3 patches (a GPU
run). With SCALE, a name in configs/openkbp_study.py (`openkbp_cpu`, `openkbp_gpu`,
`smoke`): that scale's grid, model and training settings (its first phase). `data.downsample`
is the grid factor of the dataset in `data.path` (2: a `--downsample 2` dataset, 64^3);
scoring uses it to bring predictions back to the challenge's grid (`python -m
flaxdose.evaluate --openkbp`), and refuses a run whose dataset says otherwise.
"""

from flaxdose.configs import source
from flaxdose.configs.openkbp_study import SCALES

from flaxdose.data.pipeline import InputSpec
from flaxdose.errors import FlaxdoseError
from flaxdose.openkbp import OPENKBP_STRUCTURES


def get_config(scale: str = ""):
    c = source.get_config()
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
    if scale:
        if scale not in SCALES:
            raise FlaxdoseError(f"unknown OpenKBP scale {scale!r}; choose one of {sorted(SCALES)}")
        settings = SCALES[scale]
        c.data.update(settings["data"], downsample=settings["downsample"])
        c.model.update(settings["model"])
        c.train.update(settings["train"])
    c.model.in_channels = InputSpec.from_config(c).channels  # the masks, then the data settings' extra channels
    return c
