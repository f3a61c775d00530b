"""Inference: a trained model as an object that predicts dose for cases.

`Model` holds the architecture, parameters, the structures it expects and its training
patch size; build it from a workdir (`Model.load`) or from a config and parameters
(`Model.from_config`). Prediction runs sliding windows of the training patch size with
50 % overlap and Gaussian blending, so the network always sees inputs like those it was
trained on: with GroupNorm, a whole-volume pass normalizes over a different extent than
the training patches and shifts the dose (``window=None`` still does that, for
comparison). Dose is clipped at 0, converted from units of the prescription to Gy, and
zeroed outside the case's dose region (`Case.dose_region`: the body, or OpenKBP's
possible-dose mask).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flaxdose.checkpoint import restore_params
from flaxdose.convolution import resolve_form
from flaxdose.data.case import Case, Dataset, each_case, with_all_split, write_dataset
from flaxdose.data.pipeline import InputSpec, check_in_channels, model_inputs, no_ct_error
from flaxdose.errors import FlaxdoseError
from flaxdose.inference import package
from flaxdose.inference.spacing import check_spacing, describe_spacing
from flaxdose.io import check_writable
from flaxdose.model import UNet3D, UNetSpec, init_params
from flaxdose.run import SPACING_KEY, Run

log = logging.getLogger("flaxdose")


@functools.lru_cache(maxsize=16)  # one compiled function per model, however many Models use it
def make_predict_fn(spec: UNetSpec) -> Callable:
    """jit-compiled (params, uint8 or float inputs (N, X, Y, Z, C)) -> (N, X, Y, Z) dose / prescription;
    ``model.conv="auto"`` takes the fastest forward-only convolution form (`resolve_form`)."""
    spec = dataclasses.replace(spec, conv=resolve_form(spec.conv, inference=True))
    return jax.jit(lambda params, inputs: UNet3D(spec).apply({"params": params}, inputs.astype(jnp.float32)))


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
    """Predict a (X, Y, Z, C) `volume` window by window and blend the windows.

    `run` maps (B, *window, C) inputs to (B, *window) outputs; windows of at most `window`
    voxels overlap by `overlap` along each axis (`window_starts`) and are blended with
    `gaussian_weights`. Returns float32 (X, Y, Z) in `run`'s units.
    """
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


# ---------------------------------------------------------------- plausibility
# A prostate plan's maximum is ~105-115 % of the prescription; far above it the input is unlike
# anything the model was trained on. Prescriptions beyond these bounds look like cGy or a typo.
IMPLAUSIBLE_MAX_RELATIVE = 1.5
PLAUSIBLE_PRESCRIPTION_GY = (1.0, 120.0)


def implausible(case: Case, relative: np.ndarray) -> str:
    """Why a prediction (dose / prescription, (X, Y, Z)) should not be trusted, or "" (checks: its maximum
    against `IMPLAUSIBLE_MAX_RELATIVE`, the prescription against `PLAUSIBLE_PRESCRIPTION_GY`)."""
    lo, hi = PLAUSIBLE_PRESCRIPTION_GY
    if not lo <= case.prescription_gy <= hi:
        return (f"prescription {case.prescription_gy:g} Gy is outside {lo:g}-{hi:g} Gy (cGy given as Gy?); the "
                "predicted dose scales with it: check prescription_gy")
    peak = float(np.max(relative)) if relative.size else 0.0
    if peak > IMPLAUSIBLE_MAX_RELATIVE:
        return (f"predicted maximum {peak * case.prescription_gy:.1f} Gy is {peak:.2f} x the prescription: either "
                "the case is unlike the model's training data (structure names and order, grid, spacing?) or the "
                "model is under-trained (few steps; see its validation loss); do not use it")
    return ""


class Model:
    """A trained model: architecture, parameters, the structures it expects and its training patch size.

    `predict` runs sliding windows of the training patch size (50 % overlap, Gaussian
    blending): every window is exactly the input the model was trained on, including its
    GroupNorm statistics. `window=None` instead predicts each whole volume in one pass
    (zero-padded to the down-sampling factor and cropped back). `mirror=True` also predicts
    the left-right mirrored case (paired structures swapped, as the training flips do) and
    averages the two (test-time augmentation; twice the work). `inputs`: the channels the model takes
    (`flaxdose.data.pipeline.InputSpec`, of `structures`; None: the masks only), checked against
    ``spec.in_channels`` (FlaxdoseError naming the right value). `train_spacing_mm`:
    the training cases' spacing (`spacing_record`), checked against each case (`check_spacing`);
    None checks nothing (a model trained before runs stored it, or one built mid-training). `config`: the
    run config (a package's: its model part) the model was built from (`from_config`), else None.
    """

    def __init__(self, spec: UNetSpec, params, structures: Sequence[str], name: str = "model",
                 window: Sequence[int] | None = None, overlap: float = 0.5, mirror: bool = False,
                 inputs: InputSpec | None = None, train_spacing_mm: Mapping | None = None, config=None):
        self.spec, self.structures, self.name, self.config = spec, tuple(structures), name, config
        self.inputs = InputSpec(self.structures) if inputs is None else inputs
        if self.inputs.structures != self.structures:
            raise FlaxdoseError(f"model {name!r}: its inputs' structures {list(self.inputs.structures)} differ from "
                                f"its structures {list(self.structures)}; build both from one config")
        check_in_channels(self.inputs, spec.in_channels, f"model {name!r}: ")
        self.train_spacing_mm = None if train_spacing_mm is None else dict(train_spacing_mm)
        self.window, self.overlap, self.mirror = (tuple(window) if window else None), overlap, mirror
        self.params = jax.device_put(params)
        self._predict = make_predict_fn(spec)

    @classmethod
    def from_config(cls, config, params, name: str = "model", full_volume: bool = False, mirror: bool = False,
                    train_spacing_mm: Mapping | None = None) -> Model:
        """The model a run config trains (`config.model`, its inputs `InputSpec.from_config`: ``data.structures``,
        ``target_distance``, ``include_ct``; its patch size), with `params` (and the training spacing to check
        cases against, if known)."""
        window = None if full_volume else tuple(config.data.patch_shape)
        return cls(UNetSpec.from_config(config.model), params, config.data.structures, name=name, window=window,
                   mirror=mirror, inputs=InputSpec.from_config(config),
                   train_spacing_mm=train_spacing_mm, config=config)

    @classmethod
    def load(cls, path: str | Path, which: str = "best", full_volume: bool = False, mirror: bool = False) -> Model:
        """From a training workdir, a checkpoint path inside one (config.json is found above it; `from_run`), or a
        model package (`flaxdose.inference.package`, hash-checked; it holds one set of weights, so `which` is ignored).

        `which`: "best" (lowest validation loss, else the latest) or "latest". Raises FlaxdoseError
        when there is no checkpoint or config.json, or the shapes differ (and see `package.read_package`).
        """
        if package.is_package(path):
            config, params, name, spacing = package.read_package(path)
            return cls.from_config(config, params, name=name, full_volume=full_volume, mirror=mirror,
                                   train_spacing_mm=spacing)
        return cls.from_run(Run.open(path, which), full_volume=full_volume, mirror=mirror)

    @classmethod
    def from_run(cls, run: Run, full_volume: bool = False, mirror: bool = False) -> Model:
        """The model of the checkpoint `run.checkpoint` of a trained run (`Run.open`), named by its folder.

        The checkpoint's training spacing (`SPACING_KEY`) is checked against every case predicted; for a
        checkpoint without one (trained before runs stored it) it is recovered from the training data
        (`Run.recovered_spacing`), and only when that cannot be read is a warning logged that it cannot
        be checked. Raises FlaxdoseError when the stored shapes differ from the run's model.
        """
        spec = UNetSpec.from_config(run.config.model)
        template = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
        params, meta = restore_params(run.checkpoint, template)
        name = run.name
        spacing = meta.get(SPACING_KEY)
        if spacing is None:
            try:
                spacing = run.recovered_spacing()
                log.info("model %s: training voxel spacing %s mm recovered from its training data (its checkpoint "
                         "predates stored spacings)", name, describe_spacing(spacing))
            except FlaxdoseError as e:
                log.warning("model %s (%s) stores no training voxel spacing and its training data cannot be read "
                            "(%s): the spacing of the cases it predicts cannot be checked, and on another spacing "
                            "its dose is wrong in scale. Predict only data on the training spacing, or retrain it "
                            "with this flaxdose (runs now store the spacing)", name, run.workdir, e)
        trained, planned = run.latest_step, int(run.config.train.steps)
        if trained is not None and trained < planned:
            log.warning("model %s: its training stopped at step %d of %d (an unfinished run); rerun the training "
                        "command to finish it", name, trained, planned)
        return cls.from_config(run.config, params, name=name, full_volume=full_volume, mirror=mirror,
                               train_spacing_mm=spacing)

    def with_params(self, params, name: str | None = None) -> Model:
        """This model with other parameters of the same shapes (and another `name`, if given)."""
        other = copy.copy(self)
        other.params, other.name = jax.device_put(params), self.name if name is None else name
        return other

    def predict_relative(self, inputs: np.ndarray, batch_size: int = 1) -> np.ndarray:
        """(X, Y, Z, C) `model_inputs` -> (X, Y, Z) dose in units of the prescription."""
        run = lambda x: self._predict(self.params, x)
        one = lambda v: (np.asarray(run(v[None]))[0] if self.window is None
                         else sliding_window(run, v, self.window, self.overlap, batch_size))
        if not self.mirror:
            return one(inputs)
        swapped = inputs[::-1][..., list(self.inputs.lr_swap_permutation())]  # x: right -> left
        return (one(inputs) + one(np.ascontiguousarray(swapped))[::-1]) / 2

    def check_case(self, case: Case, what: str | None = None) -> None:
        """Raise FlaxdoseError unless the model can predict `case`: the model's structures in its order, a
        prescription, a CT when the model takes one (`InputSpec.include_ct`), and a voxel spacing within the
        training spacing's tolerance (`check_spacing`; the error names the case as `what`, default its id)."""
        case.check_structures(self.structures)
        if not case.prescription_gy > 0:
            raise FlaxdoseError(f"{what or f'case {case.case_id!r}'} has no prescription; set prescription_gy to "
                                "predict Gy")
        if self.inputs.include_ct and case.ct is None:
            raise no_ct_error(what or f"case {case.case_id!r}", f"model {self.name!r}")
        check_spacing(case, self.train_spacing_mm, f"model {self.name!r}", what)

    def predict(self, cases: Sequence[Case], batch_size: int = 1, progress: bool = False,
                check: bool = True) -> list[Case]:
        """Predicted dose for each case, as copies of the cases with `dose` replaced.

        The dose is float32 (X, Y, Z) in Gy: the network's output x the case's prescription,
        clipped at 0 and zero outside `Case.dose_region`. With `check`, an `implausible` prediction is
        logged and noted in the case's meta (``prediction_warning``). Raises FlaxdoseError for a case
        `check_case` refuses (before predicting any), for one without target voxels when the model takes
        the distance to their union, and for one without a CT when it takes the CT.
        """
        for case in cases:
            self.check_case(case)
        out = []
        for case in tqdm(cases, desc=f"predict {self.name}", unit="case", disable=not progress):
            relative = self.predict_relative(model_inputs(case, self.inputs), batch_size)
            if not np.isfinite(relative).all():  # the inputs are masks: the model is at fault, not the case
                raise FlaxdoseError(f"model {self.name!r} predicted NaN or infinite dose for case {case.case_id!r}: "
                                    "its weights are broken (a diverged training run?); predict with another "
                                    "checkpoint (--which latest) or retrain")
            dose = np.clip(relative, 0.0, None) * case.prescription_gy
            region = case.dose_region()
            if region is not None:  # no dose in the air around the patient
                dose = dose * region
            dose = dose.astype(np.float32)
            meta = {**case.meta, "predicted_by": self.name}
            doubt = implausible(case, dose / case.prescription_gy) if check else ""
            if doubt:
                log.warning("case %s: %s", case.case_id, doubt)
                meta["prediction_warning"] = doubt
            out.append(case.replace(dose=dose, meta=meta))
        return out


def predict_dataset(model: Model, data: str | Path, split: str, out: str | Path, batch_size: int = 1,
                    overwrite: bool = False, keep_going: bool = False) -> Dataset:
    """Predict every case of a split of the dataset `data` and write them as a dataset at `out`.

    `split` "all" (`data.case.ALL_SPLITS`, unless the dataset has a split of that name): every case of every
    split, each once, in split order, written as the split "all".

    The written cases are copies of the inputs whose `dose` is the prediction (Gy), with the
    split's name and ids. `keep_going`: a case that cannot be read or predicted (a FlaxdoseError:
    no target, other structures or spacing, ...) is logged and left out, and the manifest's
    ``failed`` maps its id to the reason (always present, {} when none failed); otherwise the
    first such case stops the run. Raises FlaxdoseError for an empty split, an `out` that holds
    files (unless `overwrite`), or when no case could be predicted (naming why); nothing
    half-written is left.
    """
    check_writable(out, overwrite, "dataset")
    dataset = with_all_split(Dataset.open(data), split)
    ids = dataset.split(split)
    if not ids:
        raise FlaxdoseError(f"split {split!r} of {dataset.root} is empty; nothing to predict")
    if not keep_going:
        predictions, done, failed = model.predict([dataset.load(i) for i in ids], batch_size=batch_size,
                                                  progress=True), ids, {}
    else:
        results, failed = each_case(ids, lambda i: model.predict([dataset.load(i)], batch_size=batch_size)[0],
                                    action="predicted", what=f"split {split!r} of {dataset.root}")
        predictions, done = list(results.values()), list(results)
    return write_dataset(out, predictions, {split: done}, overwrite=overwrite,
                         extra={"predicted_by": str(model.name), "source_dataset": str(Path(data).resolve()),
                                "failed": failed})


