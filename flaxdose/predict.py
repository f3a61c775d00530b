"""Full-volume dose prediction.

``python -m flaxdose.predict --workdir W --data DIR --split test --out OUT`` predicts every
case of a split and writes them as a dataset of Cases whose `dose` is the prediction (Gy).
``--rtdose-out DIR --reference CT_DIR`` also writes the prediction of one case as a DICOM
RTDOSE on that patient's CT; ``--dicom PATIENT_DIR`` predicts straight from a patient's
DICOM-RT export (CT + RTSTRUCT [+ RTPLAN]) on the paper's model grid.

Inference runs sliding windows of the training patch size with 50 % overlap and Gaussian
blending (see `Model`), so the network always sees inputs like those it was trained on:
with GroupNorm, a whole-volume pass normalizes over a different extent than the training
patches and shifts the dose (`--full_volume` still does that, for comparison). Dose is
clipped at 0 and converted from units of the prescription to Gy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags
from tqdm import tqdm

from flaxdose import cli
from flaxdose import config as config_lib
from flaxdose.checkpoint import find_checkpoint, restore_params
from flaxdose.data.case import Case, Dataset, write_dataset
from flaxdose.io import check_writable
from flaxdose.errors import FlaxdoseError
from flaxdose.model import UNetSpec, init_params


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window offsets along one axis: stride window*(1-overlap), the last window flush with the end."""
    if window >= size:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else [*starts, size - window]


def gaussian_weights(window: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """Blending weights peaking at the window centre (edges, with the least context, count least)."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / max(n * sigma_fraction, 1e-6)) ** 2) for n in window]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def sliding_window(run, volume: np.ndarray, window: Sequence[int], overlap: float = 0.5, batch_size: int = 1) -> np.ndarray:
    """Predict (X, Y, Z, C) `volume` window by window with `run` ((B, *window, C) -> (B, *window))
    and blend overlapping windows with Gaussian weights."""
    shape = volume.shape[:3]
    window = tuple(min(w, n) for w, n in zip(window, shape))
    corners = [(i, j, k) for i in window_starts(shape[0], window[0], overlap)
               for j in window_starts(shape[1], window[1], overlap) for k in window_starts(shape[2], window[2], overlap)]
    weights = gaussian_weights(window)
    total, norm = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for chunk in range(0, len(corners), batch_size):
        members = corners[chunk : chunk + batch_size]
        slices = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in members]
        crops = np.stack([volume[s] for s in slices])
        if len(members) < batch_size:  # one batch shape: one compilation
            crops = np.concatenate([crops, np.zeros((batch_size - len(members), *crops.shape[1:]), crops.dtype)])
        predicted = np.asarray(run(crops))
        for row, s in enumerate(slices):
            total[s] += predicted[row] * weights
            norm[s] += weights
    return total / norm


class Model:
    """A trained model: architecture, parameters, the structures it expects and its training patch size.

    `predict` runs sliding windows of the training patch size (50 % overlap, Gaussian
    blending): every window is exactly the input the model was trained on, including its
    GroupNorm statistics. `window=None` instead predicts each whole volume in one pass
    (zero-padded to the down-sampling factor and cropped back).
    """

    def __init__(self, spec: UNetSpec, params, structures: Sequence[str], name: str = "model",
                 window: Sequence[int] | None = None, overlap: float = 0.5):
        import jax

        from flaxdose.trainer import make_predict_fn

        self.spec, self.structures, self.name = spec, tuple(structures), name
        self.window, self.overlap = (tuple(window) if window else None), overlap
        self.params = jax.device_put(params)
        self._predict = make_predict_fn(spec)

    @classmethod
    def load(cls, path: str | Path, which: str = "best", full_volume: bool = False) -> Model:
        """From a training workdir, or a checkpoint path inside one (config.json is found above it)."""
        import jax

        path = Path(path)
        directory, _ = find_checkpoint(path, which)
        config_file = next((p / "config.json" for p in [directory, *directory.parents] if (p / "config.json").is_file()), None)
        if config_file is None:
            raise FlaxdoseError(f"no config.json next to the checkpoint {directory}; pass the training workdir")
        config = config_lib.load_config_json(config_file)
        spec = UNetSpec.from_config(config.model)
        template = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
        params, _ = restore_params(path, template, which)
        window = None if full_volume else tuple(config.data.patch_shape)
        return cls(spec, params, config.data.structures, name=config_file.parent.name, window=window)

    def predict_relative(self, inputs: np.ndarray, batch_size: int = 1) -> np.ndarray:
        """(X, Y, Z, C) uint8 masks -> (X, Y, Z) dose in units of the prescription."""
        run = lambda x: self._predict(self.params, x)
        if self.window is None:
            return np.asarray(run(inputs[None]))[0]
        return sliding_window(run, inputs, self.window, self.overlap, batch_size)

    def predict(self, cases: Sequence[Case], batch_size: int = 1, progress: bool = False) -> list[Case]:
        """Predicted dose (Gy, clipped at 0, zero outside the body) for each case, as copies of the cases."""
        for case in cases:
            case.check_structures(self.structures)
            if not case.prescription_gy > 0:
                raise FlaxdoseError(f"case {case.case_id!r} has no prescription; set prescription_gy to predict Gy")
        out = []
        for case in tqdm(cases, desc=f"predict {self.name}", unit="case", disable=not progress):
            relative = self.predict_relative(np.moveaxis(case.masks, 0, -1).astype(np.uint8), batch_size)
            dose = np.clip(relative, 0.0, None) * case.prescription_gy
            if "Body" in case.structures:  # no dose in the air around the patient
                dose = dose * case.mask("Body")
            dose = dose.astype(np.float32)
            out.append(case.replace(dose=dose, meta={**case.meta, "predicted_by": self.name}))
        return out


def predict_dataset(model: Model, data: str | Path, split: str, out: str | Path, batch_size: int = 1,
                    overwrite: bool = False) -> Dataset:
    check_writable(out, overwrite)
    dataset = Dataset.open(data)
    ids = dataset.split(split)
    if not ids:
        raise FlaxdoseError(f"split {split!r} of {dataset.root} is empty; nothing to predict")
    predictions = model.predict([dataset.load(i) for i in ids], batch_size=batch_size, progress=True)
    return write_dataset(out, predictions, {split: ids}, overwrite=overwrite,
                         extra={"predicted_by": str(model.name), "source_dataset": str(Path(data).resolve())})


def export_rtdose(predicted: Case, reference_ct: str | Path, out_dir: str | Path, plan: str | None = None) -> Path:
    """One RTDOSE of `predicted` on the CT it was imported from (see flaxdose.dicom.rtdose)."""
    from flaxdose.dicom import write_rtdose

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_rtdose(predicted, reference_ct, out_dir, plan_path=plan)


def predict_dicom(model: Model, patient_dir: str | Path, prescription_gy: float | None = None) -> Case:
    """Read a patient's DICOM-RT export onto the model grid and predict its dose."""
    from flaxdose.dicom import read_rt

    case = read_rt(patient_dir, structures=model.structures, grid="model", prescription_gy=prescription_gy)
    if not case.prescription_gy > 0:
        raise FlaxdoseError(f"no RTPLAN prescription found in {patient_dir}; pass --prescription_gy")
    return model.predict([case])[0]


# ---------------------------------------------------------------- CLI
def define_flags() -> None:
    """CLI flags, defined only when run as a program so other modules can import this one."""
    flags.DEFINE_string("workdir", None, "training workdir to load the model from (best checkpoint)")
    flags.DEFINE_string("checkpoint", None, "a checkpoint path instead of --workdir")
    flags.DEFINE_string("data", None, "dataset folder (with manifest.json)")
    flags.DEFINE_string("split", "test", "which split to predict")
    flags.DEFINE_string("out", None, "output dataset folder for the predicted cases")
    flags.DEFINE_integer("batch_size", 1, "windows per forward pass")
    flags.DEFINE_bool("full_volume", False, "one whole-volume pass per case instead of sliding windows")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")
    flags.DEFINE_string("dicom", None, "predict one patient straight from its DICOM-RT export folder")
    flags.DEFINE_float("prescription_gy", None, "prescription for --dicom when the export has no RTPLAN")
    flags.DEFINE_string("case", None, "with --rtdose-out: the case of --data/--split to export")
    flags.DEFINE_string("rtdose_out", None, "folder for an RTDOSE of the prediction (one case)")
    flags.DEFINE_string("reference", None, "the patient's CT folder for --rtdose-out (default: --dicom)")
    flags.DEFINE_string("plan", None, "the patient's RTPLAN file, referenced by the RTDOSE")


FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not (FLAGS.workdir or FLAGS.checkpoint) or not (FLAGS.data or FLAGS.dicom):
        raise FlaxdoseError(
            "usage: python -m flaxdose.predict --workdir W (or --checkpoint C) "
            "(--data DIR --out OUT | --dicom PATIENT_DIR --rtdose-out DIR)"
        )
    if FLAGS.rtdose_out and not (FLAGS.reference or FLAGS.dicom):
        raise FlaxdoseError("--rtdose-out needs --reference CT_DIR, the patient's CT the dose is written on")
    if FLAGS.data and not FLAGS.out:
        raise FlaxdoseError("--data needs --out, the folder for the predicted cases")
    model = Model.load(FLAGS.checkpoint or FLAGS.workdir, full_volume=FLAGS.full_volume)
    if FLAGS.dicom:
        predicted = [predict_dicom(model, FLAGS.dicom, FLAGS.prescription_gy)]
    else:
        result = predict_dataset(model, FLAGS.data, FLAGS.split, FLAGS.out, FLAGS.batch_size, FLAGS.overwrite)
        ids = result.split(FLAGS.split)
        print(json.dumps({"predicted": len(ids), "out": str(result.root)}))
        predicted = [result.load(i) for i in ([FLAGS.case] if FLAGS.case else ids)] if FLAGS.rtdose_out else []
    if FLAGS.rtdose_out:
        if len(predicted) != 1:
            raise FlaxdoseError(f"--rtdose-out writes one patient's dose; choose one with --case (of {len(predicted)})")
        path = export_rtdose(predicted[0], FLAGS.reference or FLAGS.dicom, FLAGS.rtdose_out, FLAGS.plan)
        print(json.dumps({"rtdose": str(path)}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
